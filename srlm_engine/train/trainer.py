"""One training loop for SFT and DPO. Runs in one process, or in each of N under torchrun (FSDP2).

    train_sft(model_dir, records, out_dir, cfg) -> OUT/model
    train_dpo(model_dir, pairs_with_refs, out_dir, cfg) -> OUT/model   (refs: train/refs.py)

A step's objective is the mean loss over the whole global batch: over all its trained tokens
(SFT) or pairs (DPO), on all W ranks and in all A micro-batches (`accumulate`). This rank's A
micro-batches (train/batches.py) run forward (hidden states and the fused log-prob in one FSDP2
root forward) and backward of sum(losses) x W / N, N being the step's number of tokens or pairs
and W undoing FSDP2's mean of the gradients over ranks; one process with grad_accum = W x A
computes the same step. Then: the global grad norm; a non-finite loss or norm skips the update
(logged, the batch still counts); clipping; AdamW; the schedule. Rank 0 appends one JSON line
per step to OUT/metrics.jsonl, under TRL's metric names (train/metrics.py; with report_to
"tensorboard" also to OUT/tb/), and draws tqdm. Each metric is a mean over the whole global
batch: per pair for the DPO loss, rewards and log-probs, per trained token for the SFT loss and
for logits/*.

Resume: if OUT/checkpoints holds a checkpoint, the run continues from the newest one (weights,
optimizer, schedule, RNG, data position = step, rebuilt from the seed). It is refused if the
model, data, kind, global batch, seed, total steps or an optimizer or loss setting differs: the
resumed run would train on another order of the data or follow another schedule or objective.
The final weights go to OUT/model (HF layout + tokenizer files), written atomically.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from srlm_engine.config import ConfigError, TrainConfig
from srlm_engine.device import auto_dtype
from srlm_engine.io import DataError, atomic_dir
from srlm_engine.model.weights import load_config, load_model
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches, checkpoint as ckpt
from srlm_engine.train.cpu_allocator import use_caching_cpu_allocator
from srlm_engine.train.losses import TokenLogprobs, compared_logps, dpo_batch_loss, sft_loss
from srlm_engine.train.metrics import MetricsLog, summary_writer
from srlm_engine.train.optim import build_optimizer, resolve_lr
from srlm_engine.train.parallel import Dist, all_reduce_sum, barrier, bf16_compute, parallelize, setup
from srlm_engine.train.refs import policy_dtype
from srlm_engine.train.trunk_cache import TrunkCache

REF_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")
# What `accumulate` sums over a step's micro-batches (and the trainer over ranks), in this order.
SUMS = ("loss", "tokens", "pairs", "correct", "margins", "chosen_rewards", "rejected_rewards", "chosen_logps",
        "rejected_logps", "chosen_logits", "rejected_logits", "chosen_tokens", "rejected_tokens")


def train_sft(model_dir: str | Path, records: list[dict], out_dir: str | Path,
              cfg: TrainConfig | None = None) -> Path:
    """Fine-tune on SFT records of any form of data.py: {"messages": [...]} (loss on the assistant
    turns) or {"prompt", "completion"} (loss on the completion). -> OUT/model."""
    return _train("sft", Path(model_dir), records, Path(out_dir), cfg or TrainConfig())


def train_dpo(model_dir: str | Path, pairs: list[dict], out_dir: str | Path,
              cfg: TrainConfig | None = None) -> Path:
    """DPO on pair records of any form of data.py ({"prompt", "chosen", "rejected"} as strings or
    message lists) with "ref_chosen_logp", "ref_rejected_logp", the reference being the model in
    `model_dir`. -> OUT/model."""
    return _train("dpo", Path(model_dir), pairs, Path(out_dir), cfg or TrainConfig())


def _check_refs(pairs: list[dict], cfg: TrainConfig, base: str) -> None:
    for n, p in enumerate(pairs):
        if any(not isinstance(p.get(k), (int, float)) or not math.isfinite(p[k]) for k in REF_FIELDS):
            raise DataError(f"pair record {n}: no finite {REF_FIELDS[0]}/{REF_FIELDS[1]}; compute them "
                            f"first with train.refs.compute_reference_logps")
        if p.get("ref_max_seq_len", cfg.max_seq_len) != cfg.max_seq_len:
            raise DataError(f"pair record {n}: reference log-probs were computed with max_seq_len="
                            f"{p['ref_max_seq_len']}, this run uses {cfg.max_seq_len}")
        if p.get("ref_model", base) != base:
            raise DataError(f"pair record {n}: reference log-probs were computed with another model "
                            f"({p['ref_model']}, this model is {base})")


def _train(kind: str, model_dir: Path, records: list[dict], out_dir: Path, cfg: TrainConfig) -> Path:
    d = setup()
    mcfg = load_config(model_dir)  # a missing directory or config is an error here, before any work
    if cfg.report_to == "tensorboard":
        summary_writer()  # installed? asked on every rank, so all stop alike, before any work
    tok = Tokenizer.from_pretrained(model_dir)
    if not records:
        raise DataError(f"no {kind.upper()} records to train on")
    base = ckpt.model_fingerprint(model_dir)
    dpo = kind == "dpo"
    if dpo:
        _check_refs(records, cfg, base)
    enc = (batches.encode_pairs if dpo else batches.encode_sft)(tok, records, cfg.max_seq_len)
    refs = torch.tensor([[r[k] for k in REF_FIELDS] for r in records], dtype=torch.float32) if dpo else None
    pad_id = tok.token_to_id(tok.pad_token or tok.eos_token or "") or 0

    accum = cfg.accum_steps(d.world)
    gb = d.world * cfg.micro_batch_size * accum
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(records) / gb))
    lr, min_lr = resolve_lr(kind, cfg.lr, cfg.min_lr, gb, cfg.lr_batch_size, cfg.lr_scaling)
    meta = {"kind": kind, "base_model": base, "model_config": ckpt.fingerprint(mcfg.to_hf()),
            "data": ckpt.fingerprint(records), "global_batch": gb, "max_seq_len": cfg.max_seq_len,
            "seed": cfg.seed, "total_steps": total, "lr": lr, "min_lr": min_lr, "warmup_steps": cfg.warmup_steps,
            "schedule": cfg.schedule, "weight_decay": cfg.weight_decay, "adam_betas": list(cfg.adam_betas),
            "adam_eps": cfg.adam_eps, "max_grad_norm": cfg.max_grad_norm, "trainable_layers": cfg.trainable_layers}
    if dpo:
        meta.update(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)

    found = ckpt.checkpoints(out_dir)
    state = trainer_state = None
    if found:
        state, trainer_state = ckpt.load_checkpoint(found[-1], meta)
    src = found[-1] / "model" if found else model_dir
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = load_model(src, dtype=dtype, device=d.device)
    freeze_below(model, cfg.trainable_layers, model_dir)
    lost = bf16_lost_share(model, lr) if d.main and dtype == torch.bfloat16 else 0.0
    mixed = bf16_compute(cfg, d.device)
    root = parallelize(TokenLogprobs(model), model.layers, d, mixed, cfg.activation_checkpointing)
    root.train()
    opt, sched = build_optimizer(root, lr, min_lr, total, cfg.warmup_steps, cfg.schedule, cfg.weight_decay,
                                 cfg.adam_betas, cfg.adam_eps)
    start = 0
    if state is not None:
        ckpt.restore_optimizer(root, opt, trainer_state["optimizer"], d)
        sched.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["rng_cpu"])
        if trainer_state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(trainer_state["rng_cuda"])
        start = state["step"]
    log = None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out_dir, start, cfg.report_to)
        print(f"srlm {kind}: {len(records)} records ({enc.truncated} truncated to {cfg.max_seq_len} tokens), "
              f"{d.world} process(es), global batch {gb}, {total} steps, lr {lr:.3g} -> {min_lr:.3g}"
              + (f", resuming at step {start}" if start else ""), flush=True)
        print(f"srlm {kind}: {_precision(cfg, d, mixed)}", flush=True)
        if lost > 0.5:
            print(f"srlm {kind}: weights are held in bfloat16, where {lost:.0%} of them are too large for an AdamW "
                  f"step of lr {lr:.3g} to change (it is below half their bf16 spacing): most updates round away. "
                  f"Hold them in float32 (--dtype float32; --mixed-precision bf16 computes in bf16)", flush=True)
        policy = policy_dtype(cfg, d.world, d.device)
        ref = sorted({r.get("ref_dtype", "float32") for r in records}) if dpo else [policy]
        if ref != [policy]:
            print(f"srlm dpo: reference log-probs were computed in {'/'.join(ref)}, the policy computes in {policy}: "
                  f"at step 0 the implicit rewards are their rounding difference, not 0 (train/refs.py)", flush=True)

    if d.device.type == "cpu":
        use_caching_cpu_allocator()  # train/cpu_allocator.py: resident memory near the live tensors
    cache = None
    if cfg.cache_frozen and not d.distributed:
        cache = TrunkCache(model, len(model.layers) - cfg.trainable_layers)
    elif cfg.cache_frozen and d.main:  # ranks that skip frozen blocks others run would desynchronize FSDP2
        print(f"srlm {kind}: cache_frozen is for one process; off with {d.world}", flush=True)
    params = [p for p in root.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=start, disable=not (d.main and cfg.progress), desc=kind, dynamic_ncols=True)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr_now = sched.get_last_lr()[0]
            micro = batches.micro_batches(enc, step, gb, d.world, d.rank, accum, cfg.seed)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=mixed and not d.distributed):
                sums = accumulate(root, enc, micro, pad_id, d, cfg, refs, cache)
            norm = _grad_norm(params, d)
            tot = dict(zip(SUMS, all_reduce_sum(sums, d)))
            loss_val = tot["loss"]
            skipped = not (math.isfinite(loss_val) and math.isfinite(norm))
            if not skipped:
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, torch.tensor(norm), foreach=True)
                opt.step()
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss_val, "grad_norm": norm, "learning_rate": lr_now,
                   **(dpo_metrics(tot) if dpo else {}), "epoch": (step + 1) * gb / len(records),
                   "tokens": int(tot["tokens"]), "tokens_per_s": tot["tokens"] / dt, "seconds": dt, "skipped": skipped}
            if d.main:
                log.write(row)
                if skipped:
                    print(f"srlm {kind}: step {step + 1}: non-finite loss ({loss_val}) or grad norm ({norm}); "
                          f"update skipped", flush=True)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tot['tokens'] / dt:.0f}")
                bar.update(1)
            if (step + 1) % cfg.save_every == 0 and step + 1 < total:
                ckpt.save_checkpoint(out_dir, step + 1, root, opt, sched, d, meta, mcfg, model_dir, cfg.keep_last,
                                     cfg.keep_models)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return save_final(out_dir, root, d, mcfg, model_dir)


def freeze_below(model, trainable_layers: int | None, model_dir: Path) -> None:
    """Freeze all but the top `trainable_layers` blocks and the final norm (None: freeze nothing).
    The embeddings, the output head (tied or not) and the lower blocks then compute no gradient:
    autograd records nothing below the lowest trained block, so backward costs that block upwards
    only, and AdamW holds state for the trained weights alone."""
    if trainable_layers is None:
        return
    layers = len(model.layers)
    if trainable_layers > layers:
        raise ConfigError(f"trainable_layers is {trainable_layers}, but {model_dir} has {layers} blocks")
    trained = {id(p) for block in model.layers[layers - trainable_layers:] for p in block.parameters()}
    trained |= {id(p) for p in model.norm.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def accumulate(root, enc: batches.Encoded, micro: list[list[int]], pad_id: int, d: Dist, cfg: TrainConfig,
               refs: torch.Tensor | None = None, cache: TrunkCache | None = None) -> list[float]:
    """Forward and backward of this rank's micro-batches `micro` of one step (DPO when `refs`
    [pairs, 2] is given); the gradients add up in .grad. Every trained token (SFT) or pair (DPO)
    of the step weighs 1 / N, N counted over all micro-batches and ranks: a mean of micro-batch
    means would weigh a token of a micro-batch of short samples (micro-batches are cut from
    length-sorted samples) many times more than one of a micro-batch of long ones.
    -> this rank's sums, in the order of SUMS (the loss: its share of the step's mean), to be
    summed over ranks."""
    dpo = refs is not None
    mbs = []
    for idx in micro:
        ids, tgt = batches.collate(enc, idx, pad_id, dpo)
        mbs.append((idx, ids, tgt, batches.pack(ids, tgt, batches.row_lengths(enc, idx, dpo)) if cfg.share_prefix
                    else None))
    mine = sum(len(idx) if dpo else int((tgt != batches.IGNORE).sum()) for idx, _, tgt, _ in mbs)
    n = int(all_reduce_sum([mine], d)[0])  # the step's trained tokens (SFT) or pairs (DPO), all ranks
    s = dict.fromkeys(SUMS, 0.0)
    for idx, ids, tgt, packed in mbs:
        ids, tgt, packed = ids.to(d.device), tgt.to(d.device), packed and packed.to(d.device)
        x = cache.inputs(enc, idx, dpo, tgt.shape, packed, d.device) if cache else None
        fwd = {"packed": packed, "start": cache.start if x is not None else 0, "x": x}
        if dpo:
            b = len(idx)
            logp, mean_logit = root(ids, tgt, mean_logits=True, **fwd)  # (2B, T) each
            r = refs[idx].to(d.device)
            loss, cr, rr = dpo_batch_loss(logp, r[:, 0], r[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                          num_items=n, targets=tgt)
            seq = compared_logps(logp.detach(), cfg.loss_type, tgt)  # (2B,)
            trained = (tgt != batches.IGNORE).sum(-1)  # (2B,)
            for k, v in (("pairs", b), ("correct", (cr > rr).sum()), ("margins", (cr - rr).sum()),
                         ("chosen_rewards", cr.sum()), ("rejected_rewards", rr.sum()),
                         ("chosen_logps", seq[:b].sum()), ("rejected_logps", seq[b:].sum()),
                         ("chosen_logits", mean_logit[:b].sum()), ("rejected_logits", mean_logit[b:].sum()),
                         ("chosen_tokens", trained[:b].sum()), ("rejected_tokens", trained[b:].sum())):
                s[k] += float(v)
        else:
            loss, _ = sft_loss(root(ids, tgt, **fwd), tgt, num_items=n)  # root: (B, T)
        (loss * d.world).backward()  # x W: FSDP2 divides the summed gradients by W (train/parallel.py)
        s["loss"] += float(loss.detach())
        s["tokens"] += sum(len(enc.ids[i]) + (len(enc.rejected_ids[i]) if dpo else 0) for i in idx)
    return [s[k] for k in SUMS]


def dpo_metrics(tot: dict) -> dict:
    """A DPO step's sums over all ranks (SUMS) -> TRL's DPO metrics: means per pair, and for
    logits/* per trained token of the replies."""
    n = tot["pairs"]
    return {"rewards/chosen": tot["chosen_rewards"] / n, "rewards/rejected": tot["rejected_rewards"] / n,
            "rewards/accuracies": tot["correct"] / n, "rewards/margins": tot["margins"] / n,
            "logps/chosen": tot["chosen_logps"] / n, "logps/rejected": tot["rejected_logps"] / n,
            "logits/chosen": tot["chosen_logits"] / max(tot["chosen_tokens"], 1),
            "logits/rejected": tot["rejected_logits"] / max(tot["rejected_tokens"], 1)}


@torch.no_grad()
def bf16_lost_share(model: torch.nn.Module, lr: float) -> float:
    """Share of the weights w for which both w + lr and w - lr round back to w in bf16. Adam's step
    is about lr in size whatever the gradient's scale, so for those weights nearly every update is lost.
    A tensor of more than 2^16 weights is estimated from an evenly strided sample, weighted by its size."""
    lost = total = 0
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        w = flat[::max(1, flat.numel() >> 16)].to(torch.bfloat16)
        up = torch.nextafter(w, torch.full_like(w, float("inf"))).float() - w.float()
        down = w.float() - torch.nextafter(w, torch.full_like(w, float("-inf"))).float()
        share = float((torch.minimum(up, down) / 2 >= lr).float().mean()) if w.numel() else 0.0  # a tie rounds to even
        lost += share * flat.numel()
        total += flat.numel()
    return lost / max(total, 1)


def _precision(cfg: TrainConfig, d: Dist, mixed: bool) -> str:
    """The line a run prints about its precision, and why."""
    if not mixed:
        why = "" if cfg.dtype != "float32" or cfg.mixed_precision == "none" else \
            f" (mixed_precision auto: {auto_dtype(d.device)[1]})"
        return f"weights and compute in {cfg.dtype}{why}"
    how = "FSDP2 casts the gathered weights" if d.distributed else "the forward under torch.autocast"
    why = f"auto: {auto_dtype(d.device)[1]}" if cfg.mixed_precision == "auto" else "mixed_precision bf16"
    return f"float32 weights, bf16 compute ({how}; {why})"


def save_final(out_dir: Path, root, d: Dist, mcfg, tokenizer_src: Path) -> Path:
    """Collective: gather the weights and write OUT/model atomically on rank 0."""
    sd = ckpt.full_model_state(root, d)
    path = out_dir / "model"
    if d.main:
        with atomic_dir(path) as tmp:
            ckpt.write_model_dir(sd, mcfg, tmp, tokenizer_src)
    barrier(d)
    return path


def _grad_norm(params, d: Dist) -> float:
    """Global L2 norm of all gradients (all ranks' shards), the same float on every rank. The
    squares are summed in float64, where a float32 gradient's squares are exact and their sum
    rounds near 1e-16: the float32 norm that clipping uses (and the log shows) is then the same
    however the gradients are cut into shards, so one process and W ranks clip a step alike."""
    sq = None
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # DTensor: this rank's shard
            n = torch.linalg.vector_norm(g, dtype=torch.float64).square()
            sq = n if sq is None else sq + n
    total = all_reduce_sum([float(sq) if sq is not None else 0.0], d)[0]
    return float(torch.tensor(math.sqrt(total), dtype=torch.float32))  # the float32 that clipping uses
