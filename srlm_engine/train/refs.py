"""Reference log-probs for DPO, computed once before training so training holds one model.

    ref_chosen_logp   = sum_t log M_t(chosen_t | prompt, chosen_<t)       summed over response tokens + end-of-turn
    ref_rejected_logp = the same for the rejected response
computed with no grad by the fused kernel, over the same tokens (same truncation, same
max_seq_len) that train_dpo trains on. Each record gains those two fields plus `ref_max_seq_len`
and `ref_model` (a fingerprint of the reference's weights), which train_dpo checks, and
`ref_dtype`. The pass should run in the precision the policy computes in (`policy_dtype`: its
weights' dtype, bfloat16 under FSDP2 mixed precision, or one process's bf16 autocast), as TRL's
reference model shares the policy's: then at step 0 policy and reference give the same log-probs
and the implicit rewards start at 0, not at the rounding difference of bf16 against fp32 summed
over each response.
Under torchrun each rank scores every W-th pair with a full copy of the model, and rank 0
gathers them; call it before the model is sharded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.io import DataError, write_jsonl
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import load_model
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.checkpoint import model_fingerprint
from srlm_engine.train.losses import TokenLogprobs
from srlm_engine.train.parallel import bf16_compute, setup

AUTOCAST = "bfloat16-autocast"  # float32 weights, the forward under torch.autocast(bfloat16)


@torch.no_grad()
def sequence_logps(model: Llama, enc: batches.Encoded, order: list[int], pad_id: int,
                   batch_size: int, device) -> dict[int, tuple[float, float]]:
    """Summed response log-probs of the pairs in `order` -> {index: (chosen, rejected)}."""
    root = TokenLogprobs(model).eval()
    order = sorted(order, key=lambda i: (enc.length(i), i))  # similar lengths share a batch
    out = {}
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, tgt = batches.collate(enc, idx, pad_id, dpo=True)  # (2b, T)
        seq = root(ids.to(device), tgt.to(device)).sum(-1).double().cpu()  # (2b,)
        for j, i in enumerate(idx):
            out[i] = (float(seq[j]), float(seq[len(idx) + j]))
    return out


def compute_reference_logps(model_dir: str | Path, pairs: list[dict], max_seq_len: int = 1024,
                            batch_size: int = 8, out_path: str | Path | None = None,
                            model: Llama | None = None, dtype: str = "float32") -> list[dict]:
    """-> copies of `pairs` with ref_chosen_logp, ref_rejected_logp, ref_max_seq_len, ref_model,
    ref_dtype. Written atomically to `out_path` (JSONL, by rank 0) when given. `model`: an already
    loaded M_t, scored in its own dtype; else it is loaded from `model_dir` in `dtype` ('float32',
    'bfloat16'), or in float32 and scored under bf16 autocast ('bfloat16-autocast'): the policy's
    compute precision, `policy_dtype`."""
    model_dir = Path(model_dir)
    if not pairs:
        raise DataError("no preference pairs to score")
    d = setup()
    tok = Tokenizer.from_pretrained(model_dir)
    enc = batches.encode_pairs(tok, pairs, max_seq_len)
    autocast = dtype == AUTOCAST
    if model is None:
        model = load_model(model_dir, dtype=torch.float32 if autocast else getattr(torch, dtype), device=d.device)
    pad_id = tok.token_to_id(tok.pad_token or tok.eos_token or "") or 0
    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=autocast):
        mine = sequence_logps(model, enc, list(range(d.rank, len(pairs), d.world)), pad_id, batch_size, d.device)
    if d.distributed:
        parts = [None] * d.world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    fp = model_fingerprint(model_dir)
    out = [{**p, "ref_chosen_logp": mine[i][0], "ref_rejected_logp": mine[i][1],
            "ref_max_seq_len": max_seq_len, "ref_model": fp, "ref_dtype": AUTOCAST if autocast else dtype_name(model)}
           for i, p in enumerate(pairs)]
    if out_path is not None and d.main:
        write_jsonl(out_path, out)
    if d.distributed:
        dist.barrier()
    return out


def cached_reference_logps(model_dir: str | Path, pairs: list[dict], path: str | Path,
                           max_seq_len: int = 1024, batch_size: int = 8, dtype: str = "float32") -> list[dict]:
    """compute_reference_logps, unless the pairs already hold log-probs by this model at this
    max_seq_len in this dtype, or `path` holds them for exactly these pairs (a resumed run does not
    score them again)."""
    path = Path(path)
    fp = model_fingerprint(Path(model_dir))

    def scored(recs):  # log-probs of this model, at this max_seq_len, in this dtype
        return all(r.get("ref_model") == fp and r.get("ref_max_seq_len") == max_seq_len
                   and r.get("ref_dtype", "float32") == dtype and "ref_chosen_logp" in r
                   and "ref_rejected_logp" in r for r in recs)

    if pairs and scored(pairs):  # given already scored (the loop scores them before `srlm dpo --nproc`)
        return pairs
    if path.is_file():
        from srlm_engine.io import read_jsonl
        old = read_jsonl(path)
        if len(old) == len(pairs) and scored(old) and all(
                all(o.get(k) == v for k, v in p.items()) for o, p in zip(old, pairs)):
            return old
    return compute_reference_logps(model_dir, pairs, max_seq_len, batch_size, out_path=path, dtype=dtype)


def policy_dtype(cfg, world: int, device: torch.device | None = None) -> str:
    """The precision the policy computes in when training with TrainConfig `cfg` on `world`
    processes on `device` (default: this process's): 'bfloat16' for bf16 weights or FSDP2 mixed
    precision, 'bfloat16-autocast' for one process's autocast over fp32 weights, else cfg.dtype.
    Score the reference in it."""
    if not bf16_compute(cfg, device if device is not None else setup().device):
        return cfg.dtype
    return "bfloat16" if world > 1 else AUTOCAST


def dtype_name(model: torch.nn.Module) -> str:
    """'float32', 'bfloat16', ...: the dtype a model's weights are held (and computed) in."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
