"""The loop's own rules: the schedule, the batch-size rule for the lr, TOML + flag settings,
a non-finite step skipped and logged, DPO refs checked, an accumulated step's weighting, the
reference's dtype."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from srlm_engine.cli import _train_config, build
from srlm_engine.config import ConfigError, TrainConfig
from srlm_engine.io import DataError
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import load_model
from srlm_engine.train import batches
from srlm_engine.train.batches import IGNORE
from srlm_engine.train.losses import TokenLogprobs
from srlm_engine.train.optim import lr_factor, resolve_lr
from srlm_engine.train.parallel import Dist
from srlm_engine.train.refs import cached_reference_logps, compute_reference_logps
from srlm_engine.train.trainer import accumulate, freeze_below, train_dpo, train_sft
from srlm_engine.tokenizer import Tokenizer
from trainkit import DATA, make_model_dir, tiny_config


def test_schedule_warmup_then_decay_to_floor():
    f = [lr_factor(s, total=10, warmup=2, floor=0.1, schedule="linear") for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[2] > f[3] > f[9] > 0.1
    assert f[9] == pytest.approx(0.1 + 0.9 * (1 - 7 / 8))
    c = [lr_factor(s, total=10, warmup=0, floor=0.1, schedule="cosine") for s in range(11)]
    assert c[0] == 1.0 and c[10] == pytest.approx(0.1) and c[5] == pytest.approx(0.55)


def test_lr_defaults_and_batch_rule():
    assert resolve_lr("sft", None, None, 16, 16, "none") == (5.5e-6, 1.1e-6)  # the paper's
    assert resolve_lr("dpo", None, None, 64, 16, "linear") == pytest.approx((4e-6, 4e-7))
    assert resolve_lr("dpo", None, None, 64, 16, "sqrt") == pytest.approx((2e-6, 2e-7))
    assert resolve_lr("sft", 1e-4, None, 8, 16, "none") == pytest.approx((1e-4, 1e-5))


def test_flags_override_toml(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('max_seq_len = 128\nlr = 2e-5\nadam_betas = [0.9, 0.95]\nactivation_checkpointing = true\n')
    args = build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--config", str(toml),
                               "--lr", "3e-5", "--activation-checkpointing", "selective"])
    cfg = _train_config(args)
    assert (cfg.max_seq_len, cfg.lr, cfg.adam_betas, cfg.activation_checkpointing) == (128, 3e-5, (0.9, 0.95), "selective")
    # The batch is set one way: a --grad-accum flag replaces the file's global_batch_size
    toml2 = tmp_path / "b.toml"
    toml2.write_text("global_batch_size = 8\n")
    cfg = _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--config",
                                            str(toml2), "--grad-accum", "2"]))
    assert (cfg.grad_accum, cfg.global_batch_size) == (2, None)
    # A TOML boolean still reads: true is whole blocks.
    assert _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--config",
                                             str(toml)])).activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="activation_checkpointing must be 'none', 'selective' or 'full'"):
        _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o",
                                          "--activation-checkpointing", "some"]))


def test_toml_train_table_or_top_level_not_both(tmp_path):
    def cfg_of(text):
        toml = tmp_path / "t.toml"
        toml.write_text(text)
        return _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o",
                                                 "--config", str(toml)]))
    assert cfg_of("[train]\nlr = 1e-5\nepochs = 2.0\n").lr == 1e-5
    # top-level settings beside a [train] table were dropped without a word
    with pytest.raises(ConfigError, match=r"t\.toml: put every training setting in the \[train\] table or "
                                          r"none: found \[train\] beside \['lr', 'max_seq_len'\]"):
        cfg_of("lr = 1e-5\nmax_seq_len = 256\n[train]\nepochs = 2.0\n")
    with pytest.raises(ConfigError, match=r"t\.toml: train must be a table"):
        cfg_of("train = 3\n")


def test_non_finite_step_is_skipped_and_logged(tmp_path, sft_records):
    model = make_model_dir(tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")  # every forward now gives NaN
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    out = train_sft(model, sft_records, tmp_path / "o", TrainConfig(max_seq_len=64, micro_batch_size=2,
                                                                  grad_accum=1, max_steps=2, lr=1e-3, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True]
    a, b = load_model(model).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # no update was applied


def test_dpo_needs_matching_refs(tiny_model, pair_records, tmp_path):
    cfg = TrainConfig(max_seq_len=64, micro_batch_size=2, grad_accum=1, max_steps=1, progress=False)
    with pytest.raises(DataError, match="pair record 0: no finite ref_chosen_logp"):
        train_dpo(tiny_model, pair_records, tmp_path / "o", cfg)
    refs = compute_reference_logps(tiny_model, pair_records[:4], max_seq_len=48, out_path=tmp_path / "r.jsonl")
    assert [r["prompt"] for r in refs] == [r["prompt"] for r in pair_records[:4]]
    with pytest.raises(DataError, match="max_seq_len=48, this run uses 64"):
        train_dpo(tiny_model, refs, tmp_path / "o", cfg)
    other = make_model_dir(tmp_path / "other", seed=3)
    with pytest.raises(DataError, match="computed with another model"):
        train_dpo(other, compute_reference_logps(tiny_model, pair_records[:4], max_seq_len=64), tmp_path / "o", cfg)


def short_and_long(dpo: bool) -> batches.Encoded:
    """8 samples, a 10-token prompt each, alternately 5 and 150 trained tokens (random ids < 512):
    sorted by length, the short ones and the long ones fill different micro-batches."""
    g = torch.Generator().manual_seed(0)
    enc = batches.Encoded()
    fields = [(enc.ids, enc.mask)] + ([(enc.rejected_ids, enc.rejected_mask)] if dpo else [])
    for n in [5, 150] * 4:
        for ids, mask in fields:
            ids.append(torch.randint(3, 512, (10 + n,), generator=g).tolist())
            mask.append([False] * 10 + [True] * n)
    return enc


@pytest.mark.parametrize("dpo", [False, True])
def test_accumulated_step_is_the_mean_over_the_whole_batch(dpo):
    """One step's gradient, for grad_accum 1, 2 and 4, equals the gradient of the plain mean loss
    over the whole global batch in one go: per trained token for SFT (a mean of micro-batch means
    would weigh a token of the short micro-batch 30x more than one of the long), per pair for DPO.
    float64, so any difference is a bug, not rounding."""
    enc = short_and_long(dpo)
    model = Llama(tiny_config(vocab_size=512)).init_weights(0).double()
    ids, tgt = batches.collate(enc, list(range(8)), 0, dpo)
    if dpo:
        seq_logps = lambda: TokenLogprobs(model)(ids, tgt).sum(-1)  # noqa: E731
        with torch.no_grad():  # references near the policy: margins of both signs, sigmoid unsaturated
            seq = seq_logps()
            refs = torch.stack([seq[:8], seq[8:]], 1) + torch.randn(8, 2, generator=torch.Generator().manual_seed(1),
                                                                   dtype=torch.float64)
        pc, pr = seq_logps().split(8)
        plain = -F.logsigmoid(0.1 * ((pc - refs[:, 0]) - (pr - refs[:, 1]))).mean()
    else:
        refs = None
        plain = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for accum in (1, 2, 4):
        micro = batches.micro_batches(enc, 0, 8, 1, 0, accum, seed=0)
        if accum == 2 and not dpo:  # the case the test is about: very different token counts
            counts = [int((batches.collate(enc, idx, 0, False)[1] != IGNORE).sum()) for idx in micro]
            assert max(counts) >= 20 * min(counts), counts
        cfg = TrainConfig(micro_batch_size=8 // accum, grad_accum=accum, beta=0.1)
        sums = accumulate(TokenLogprobs(model), enc, micro, 0, Dist(), cfg, refs)
        torch.testing.assert_close(sums[0], plain.item(), rtol=1e-12, atol=0)  # the logged loss
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-15, msg=f"grad_accum {accum}: {n}")
        model.zero_grad(set_to_none=True)


def test_srlm_dpo_scores_the_reference_in_the_policys_dtype(tiny_model, tmp_path, capsys):
    from srlm_engine.cli import main
    from srlm_engine.io import read_jsonl
    from srlm_engine.train.refs import policy_dtype

    out = tmp_path / "out"
    assert main(["dpo", "--model", str(tiny_model), "--pairs", str(DATA / "pairs.jsonl"), "--out", str(out),
                 "--dtype", "bfloat16", "--max-steps", "1", "--max-seq-len", "64", "--micro-batch-size", "2",
                 "--grad-accum", "1", "--no-progress"]) == 0
    assert {r["ref_dtype"] for r in read_jsonl(out / "pairs.ref.jsonl")} == {"bfloat16"}
    # The paper's DPO lr of 1e-6 is far below half the bf16 spacing of weights of size ~0.02: said aloud.
    assert re.search(r"held in bfloat16, where \d+% of them are too large for an AdamW step of lr 1e-06",
                     capsys.readouterr().out)
    # mixed precision: FSDP2 casts the weights to bf16 on 2+ processes, one process autocasts fp32 weights
    mixed = TrainConfig(mixed_precision=True)
    cpu = torch.device("cpu")
    assert (policy_dtype(mixed, 1, cpu), policy_dtype(mixed, 2, cpu)) == ("bfloat16-autocast", "bfloat16")
    assert policy_dtype(TrainConfig(), 1, cpu) == "float32"  # auto, on a CPU the suite pins to fp32
    assert policy_dtype(TrainConfig(), 2, torch.device("cuda")) == "bfloat16"  # auto on CUDA


def test_bf16_lost_share_counts_weights_an_lr_sized_step_cannot_move():
    from srlm_engine.train.trainer import bf16_lost_share

    m = torch.nn.Linear(1, 4, bias=False)
    m.weight.data = torch.tensor([[1.0], [2.0 ** -10], [-0.5], [0.0]])
    # Half the smaller bf16 gap beside each: 2^-9 at 1, 2^-19 at 2^-10, 2^-10 at -0.5, ~2^-134 at 0.
    assert bf16_lost_share(m, 1e-3) == 0.25        # only 1 (2^-9 = 1.95e-3) cannot move
    assert bf16_lost_share(m, 1e-6) == 0.75        # 0 still can
    assert bf16_lost_share(m, 2.0 ** -9) == 0.25   # a tie: 1 - 2^-9 rounds to the even 1
    assert float(torch.tensor(1.0 - 2.0 ** -9).to(torch.bfloat16)) == 1.0
    assert bf16_lost_share(m, 1.01 * 2.0 ** -9) == 0.0


def test_reference_logps_are_not_scored_twice(tiny_model, pair_records, tmp_path, monkeypatch):
    import srlm_engine.train.refs as refs_mod

    refs = cached_reference_logps(tiny_model, pair_records[:4], tmp_path / "a.jsonl", 64)
    monkeypatch.setattr(refs_mod, "compute_reference_logps", lambda *a, **k: pytest.fail("scored again"))
    # pairs that already carry them (as the loop hands them to `srlm dpo --nproc`), and a cache file
    assert cached_reference_logps(tiny_model, refs, tmp_path / "b.jsonl", 64) == refs
    assert cached_reference_logps(tiny_model, pair_records[:4], tmp_path / "a.jsonl", 64) == refs
    monkeypatch.undo()
    # another max_seq_len or dtype is another reference: scored again
    for kw in (dict(max_seq_len=32), dict(max_seq_len=64, dtype="bfloat16")):
        again = cached_reference_logps(tiny_model, refs, tmp_path / "c.jsonl", **kw)
        assert again[0]["ref_max_seq_len"] == kw["max_seq_len"] and again[0]["ref_dtype"] == kw.get("dtype", "float32")


def test_reference_in_the_policys_dtype(tiny_model, pair_records, tmp_path, capsys):
    """bf16 training with a bf16 reference starts from rewards 0 (loss log 2), as TRL's reference
    in the policy's dtype does; an fp32 reference leaves bf16's rounding in them, and says so."""
    cfg = TrainConfig(max_seq_len=64, micro_batch_size=2, grad_accum=2, max_steps=1, lr=1e-3, dtype="bfloat16",
                      progress=False)
    first = {}
    for dtype in ("float32", "bfloat16"):
        refs = cached_reference_logps(tiny_model, pair_records[:8], tmp_path / "refs.jsonl", 64, dtype=dtype)
        assert {r["ref_dtype"] for r in refs} == {dtype}  # the cache is scored again in the new dtype
        train_dpo(tiny_model, refs, tmp_path / dtype, cfg)
        first[dtype] = json.loads((tmp_path / dtype / "metrics.jsonl").read_text().splitlines()[0])
        note = "reference log-probs were computed in float32, the policy computes in bfloat16"
        assert (note in capsys.readouterr().out) == (dtype == "float32")
    # Same weights, same bf16 ops, same tokens: the batching differs (8 for the reference, 2 in
    # training), which on CPU leaves each row's result unchanged.
    assert first["bfloat16"]["rewards/chosen"] == first["bfloat16"]["rewards/rejected"] == 0.0
    assert first["bfloat16"]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    assert abs(first["float32"]["rewards/chosen"]) + abs(first["float32"]["rewards/rejected"]) > 1e-6


def test_one_process_mixed_precision_autocasts_over_fp32_weights(tiny_model, pair_records, tmp_path, capsys):
    """mixed_precision bf16 in one process: the forward runs under bf16 autocast (the matmuls and
    the fused log-prob in bf16), the weights, their gradients and AdamW stay fp32, and a reference
    scored the same way starts DPO from rewards 0. Its losses follow the fp32 run's to bf16 rounding."""
    cfg = dict(max_seq_len=64, micro_batch_size=2, grad_accum=2, max_steps=3, lr=1e-3, progress=False)
    runs = {}
    for mp in ("none", "bf16"):
        tcfg = TrainConfig(mixed_precision=mp, **cfg)
        dtype = policy_dtype_of(tcfg)
        refs = cached_reference_logps(tiny_model, pair_records[:8], tmp_path / f"refs-{mp}.jsonl", 64, dtype=dtype)
        assert {r["ref_dtype"] for r in refs} == {dtype}
        out = train_dpo(tiny_model, refs, tmp_path / mp, tcfg)
        runs[mp] = [json.loads(x) for x in (tmp_path / mp / "metrics.jsonl").read_text().splitlines()]
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    printed = capsys.readouterr().out
    assert "float32 weights, bf16 compute (the forward under torch.autocast; mixed_precision bf16)" in printed
    assert "weights and compute in float32" in printed
    bf16, fp32 = runs["bf16"], runs["none"]
    assert bf16[0]["rewards/chosen"] == bf16[0]["rewards/rejected"] == 0.0  # the reference in the same precision
    assert bf16[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    for a, b in zip(bf16, fp32):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.02) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.1)
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16[1:], fp32[1:]))  # bf16 did compute something


def test_autocast_reaches_the_fused_log_prob(tiny_model):
    """Under autocast the lm_head product runs in bf16 (autocast does not cast custom ops itself),
    and the gradient still arrives in fp32 on the fp32 weight."""
    model = load_model(tiny_model, dtype=torch.float32)
    root = TokenLogprobs(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    want = root(ids, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = root(ids, ids)
    got.sum().backward()
    assert got.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    assert not torch.equal(got, want)  # computed in bf16, so not bit-equal to fp32 ...
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # ... but within its rounding


def policy_dtype_of(cfg):
    from srlm_engine.train.refs import policy_dtype
    return policy_dtype(cfg, 1, torch.device("cpu"))


def test_trls_conversational_records_train_as_their_string_forms(tiny_model, pair_records, sft_records, tmp_path):
    """`srlm dpo` on TRL's conversational pairs scores the same reference log-probs and takes the same
    steps as on the string pairs they spell out; `srlm sft` on prompt-completion records likewise."""
    from srlm_engine.cli import main
    from srlm_engine.io import read_jsonl, write_jsonl

    def turn(role, text):
        return [{"role": role, "content": text}]

    strings = pair_records[:4]
    conversational = [{"prompt": turn("user", p["prompt"]), "chosen": turn("assistant", p["chosen"]),
                       "rejected": turn("assistant", p["rejected"])} for p in strings]
    write_jsonl(tmp_path / "s.jsonl", strings)
    write_jsonl(tmp_path / "c.jsonl", conversational)
    fast = ["--max-steps", "2", "--max-seq-len", "64", "--micro-batch-size", "2", "--grad-accum", "1", "--lr", "1e-3",
            "--no-progress"]
    for name in ("s", "c"):
        assert main(["dpo", "--model", str(tiny_model), "--pairs", str(tmp_path / f"{name}.jsonl"),
                     "--out", str(tmp_path / f"dpo-{name}"), *fast]) == 0
    ref = {n: read_jsonl(tmp_path / f"dpo-{n}" / "pairs.ref.jsonl") for n in ("s", "c")}
    assert [r["ref_chosen_logp"] for r in ref["s"]] == [r["ref_chosen_logp"] for r in ref["c"]]
    assert [r["loss"] for r in read_jsonl(tmp_path / "dpo-s" / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(tmp_path / "dpo-c" / "metrics.jsonl")]

    msgs = sft_records[:4]
    completions = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in msgs]
    assert all(r["messages"][-1]["role"] == "assistant" and
               not any(m["role"] == "assistant" for m in r["messages"][:-1]) for r in msgs)
    write_jsonl(tmp_path / "m.jsonl", msgs)
    write_jsonl(tmp_path / "pc.jsonl", completions)
    for name in ("m", "pc"):
        assert main(["sft", "--model", str(tiny_model), "--data", str(tmp_path / f"{name}.jsonl"),
                     "--out", str(tmp_path / f"sft-{name}"), *fast]) == 0
    assert [r["loss"] for r in read_jsonl(tmp_path / "sft-m" / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(tmp_path / "sft-pc" / "metrics.jsonl")]


def test_trainable_layers_freeze_the_embeddings_and_lower_blocks_and_backward_stops_above_them(
        sft_records, tmp_path):
    model_dir = make_model_dir(tmp_path / "m", num_hidden_layers=3)
    model = load_model(model_dir)
    freeze_below(model, 1, model_dir)
    outs = {}
    for i in (1, 2):
        model.layers[i].register_forward_hook(lambda m, a, out, i=i: outs.__setitem__(i, out))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    TokenLogprobs(model)(ids, ids).sum().backward()
    assert not outs[1].requires_grad and outs[2].requires_grad  # autograd recorded block 2 only
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, _ in model.named_parameters() if n.startswith(("layers.2.", "norm."))}

    cfg = TrainConfig(max_seq_len=64, micro_batch_size=2, grad_accum=1, max_steps=2, lr=1e-3, progress=False,
                      trainable_layers=1)
    a = load_model(model_dir).state_dict()
    b = load_model(train_sft(model_dir, sft_records, tmp_path / "o", cfg)).state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved == {k for k in a if k.startswith(("layers.2.", "norm."))}
    with pytest.raises(ConfigError, match=r"trainable_layers is 4, but .* has 3 blocks"):
        train_sft(model_dir, sft_records, tmp_path / "o4", TrainConfig(trainable_layers=4, progress=False))
    with pytest.raises(ConfigError, match="trainable_layers must be a positive integer"):
        TrainConfig(trainable_layers=0)


def test_share_prefix_trains_the_same_model_to_rounding(tiny_model, tmp_path):
    rubric = ("Grade the answer from 0 to 5: one point each for relevance, coverage, usefulness, clarity "
              "and expertise. ")
    recs = [{"messages": [{"role": "user", "content": f"{rubric}Request: add {a} and {b}. Answer: {a + b + e}."},
                          {"role": "assistant", "content": f"Score: {5 if e == 0 else 1}"}]}
            for a, b, e in ((2, 3, 0), (17, 25, 1), (40, 2, 0), (9, 9, 2), (123, 456, 0), (8, 1, 3))]
    runs = []
    for share in (False, True):
        cfg = TrainConfig(max_seq_len=128, micro_batch_size=3, grad_accum=1, max_steps=3, lr=1e-3, progress=False,
                          share_prefix=share, mixed_precision="none")
        out = train_sft(tiny_model, recs, tmp_path / str(share), cfg)
        runs.append(([json.loads(x)["loss"] for x in (out.parent / "metrics.jsonl").read_text().splitlines()],
                      load_model(out).state_dict()))
    (la, a), (lb, b) = runs
    enc = batches.encode_sft(Tokenizer.from_pretrained(tiny_model), recs, 128)
    ids, tgt = batches.collate(enc, [0, 1, 2], 0, False)
    assert batches.pack(ids, tgt, batches.row_lengths(enc, [0, 1, 2], False)) is not None  # the rubric is shared
    assert la == pytest.approx(lb, rel=1e-5)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - load_model(tiny_model).state_dict()[k]).abs().max()) for k in a) > 1e-3  # it trained


@pytest.mark.parametrize("share", [False, True])
def test_cache_frozen_runs_the_frozen_blocks_once_per_sample_and_trains_the_same_model(share, tmp_path,
                                                                                       monkeypatch):
    from srlm_engine.model import llama
    model_dir = make_model_dir(tmp_path / "m", num_hidden_layers=3)
    recs = [{"messages": [{"role": "user", "content": f"Grade the answer from 0 to 5. Request: add {a} and {b}. "
                                                      f"Answer: {a + b + e}."},
                          {"role": "assistant", "content": f"Score: {5 if e == 0 else 1}"}]}
            for a, b, e in ((2, 3, 0), (17, 25, 1), (40, 2, 0), (9, 9, 2), (123, 456, 0), (8, 1, 3))]
    calls = []
    forward = llama.Block.forward
    monkeypatch.setattr(llama.Block, "forward", lambda self, x, cos, sin, attend, layer:
                        calls.append(layer) or forward(self, x, cos, sin, attend, layer))
    runs = []
    for cache in (False, True):
        calls.clear()
        cfg = TrainConfig(max_seq_len=128, micro_batch_size=3, grad_accum=1, epochs=3.0, lr=1e-3, progress=False,
                          trainable_layers=1, cache_frozen=cache, share_prefix=share, mixed_precision="none")
        out = train_sft(model_dir, recs, tmp_path / f"o{cache}", cfg)
        runs.append(([json.loads(x)["loss"] for x in (out.parent / "metrics.jsonl").read_text().splitlines()],
                     load_model(out).state_dict(), calls.count(0), calls.count(2)))
    (la, a, low_a, top_a), (lb, b, low_b, top_b) = runs
    assert (low_a, top_a, low_b, top_b) == (6, 6, 2, 6)  # 6 micro-batches; the first epoch's 2 see every sample
    assert la == pytest.approx(lb, rel=1e-5) and len(la) == 6
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    with pytest.raises(ConfigError, match="cache_frozen keeps the output of frozen blocks: set trainable_layers"):
        TrainConfig(cache_frozen=True)
