"""bench/bench_scale.py's parts at the tiny shape on the CPU, the code bench/gpu_scale.sh runs on a
lent GPU at the 1B and 8B shapes; and gpu_scale.sh's parts against the script's choices and the
8 minutes it is given.

(Here, not in bench/, so that `make test` runs it.)
"""
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_scale  # noqa: E402

SCRIPT = BENCH / "gpu_scale.sh"


def figures(out: str, part: str) -> dict[str, float]:
    """The name=value figures of the part's one line (before its '#' notes)."""
    lines = [line for line in out.splitlines() if line.startswith(f"{part} tiny: ") and "=" in line]
    assert len(lines) == 1, out
    pairs = lines[0].split(": ", 1)[1].split(" # ")[0].split()
    return {k: float(v) for k, v in (p.split("=") for p in pairs)}


@pytest.mark.parametrize("part, keys", [
    ("throughput", {"output_tok_s", "seconds", "output_tokens", "mfu", "vs_vllm_a800", "vs_vllm_a800_bw_scaled"}),
    ("decode", {"decode_tok_s", "hbm_share", "bytes_per_token", "limit_tok_s"}),
    ("dpo", {"ours_tok_s", "ours_peak_mb", "ours_mfu", "torch_tok_s", "torch_peak_mb", "speed_x", "memory_x"}),
])
def test_part_runs_at_the_tiny_shape(part, keys, tmp_path, monkeypatch, capsys):
    import _common
    results = tmp_path / "RESULTS.md"
    results.write_text(_common.HEADER)
    monkeypatch.setattr(_common, "RESULTS", results)
    prof = tmp_path / "profiles"
    assert bench_scale.main(["--shape", "tiny", "--part", part, "--device", "cpu", "--no-record", "--profile",
                             "--profile-dir", str(prof)]) == 0
    fig = figures(capsys.readouterr().out, part)
    assert keys <= set(fig), fig
    assert all(math.isfinite(v) and v > 0 for v in fig.values()), fig
    # the profile summary of a missed goal: the top ops by time under the wall-time line
    text = (prof / f"{part}-tiny.txt").read_text()
    assert "wall " in text and "Name" in text and "aten::" in text
    assert results.read_text() == _common.HEADER  # --no-record (and tiny) records nothing


def test_decode_bytes_per_token_are_the_weights_and_the_kv_read(capsys):
    bench_scale.main(["--shape", "tiny", "--part", "decode", "--device", "cpu", "--no-record"])
    fig = figures(capsys.readouterr().out, "decode")
    cfg = bench_scale.ModelConfig(**bench_scale.SHAPES["tiny"])
    plen, ntok = bench_scale.WORK["tiny"]["decode"]
    weights = bench_scale.linear_params(cfg) * 4  # fp32 on CPU
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * (plen + ntok / 2)
    assert fig["bytes_per_token"] == pytest.approx(weights + kv, rel=1e-5)
    assert fig["hbm_share"] == pytest.approx(fig["decode_tok_s"] / fig["limit_tok_s"], rel=1e-4)


def test_determinism_part_passes_at_the_tiny_shape(capsys):
    assert bench_scale.main(["--shape", "tiny", "--part", "determinism", "--device", "cpu", "--no-record"]) == 0
    fig = figures(capsys.readouterr().out, "determinism")
    assert fig["identical"] == 1 and fig["finite"] == 1 and fig["tokens"] > 0


def test_shapes_have_the_published_parameter_counts():
    """Llama-3.2-1B: 1,235,814,400 parameters, Llama-3.1-8B: 8,030,261,248 (their safetensors on
    the Hugging Face hub; tied embeddings counted once). N (linear_params) is that less the norms
    and, where untied, the input embedding."""
    from srlm_engine.model.llama import Llama
    for shape, total in (("1b", 1_235_814_400), ("8b", 8_030_261_248)):
        cfg = bench_scale.ModelConfig(**bench_scale.SHAPES[shape])
        with torch.device("meta"):
            m = Llama(cfg)
        assert sum(p.numel() for p in m.parameters()) == total
        norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
        embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
        assert bench_scale.linear_params(cfg) == total - norms - embed


def test_requests_are_nano_vllms():
    """nano-vllm's bench.py, as written there: random.seed(0), then the prompts, then max_tokens."""
    state = random.getstate()
    try:
        random.seed(0)
        want = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        outs = [random.randint(100, 1024) for _ in range(256)]
    finally:
        random.setstate(state)
    w = bench_scale.WORK["1b"]
    assert bench_scale.nano_vllm_requests(w["requests"], w["in_len"], w["out_len"], w["max_id"]) == (want, outs)


def _parts():
    """(limit, name, argv) of each `part` line of gpu_scale.sh."""
    out = []
    for line in SCRIPT.read_text().splitlines():
        m = re.match(r'part (\d+) "([^"]+)" (.*)$', line)
        if m:
            out.append((int(m[1]), m[2], m[3].split()))
    return out


def test_gpu_scale_fits_its_8_minutes_and_names_real_parts():
    parts = _parts()
    assert sum(limit for limit, _, _ in parts) <= 480, parts
    choices = {a.dest: a.choices for a in bench_scale.parser()._actions if a.choices}
    ran = set()
    for _, name, argv in parts:
        if argv[0] != "$scale":
            continue
        part, shape = argv[argv.index("--part") + 1], argv[argv.index("--shape") + 1]
        assert part in choices["part"] and shape in choices["shape"], name
        ran.add((part, shape))
    assert ran == {("throughput", "1b"), ("decode", "1b"), ("dpo", "1b"), ("throughput", "8b"),
                   ("decode", "8b"), ("determinism", "1b")}
    assert any("bench/bench_generate.py --device cuda" in " ".join(argv) for _, _, argv in parts)
    assert 'scale="$py bench/bench_scale.py --device cuda"' in SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_a_recorded_part_appends_its_row_to_its_section(tmp_path, monkeypatch, capsys):
    """The 1B and 8B rows' path, at the tiny shape under another name (tiny itself records nothing)."""
    import _common
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## bench_scale: bench/bench_scale.py\n\nHow to read.\n\n" + _common.TABLE
                       + "\n## gpu_check.sh: bench/gpu_check.sh\n")
    monkeypatch.setattr(_common, "RESULTS", results)
    monkeypatch.setitem(bench_scale.SHAPES, "small", bench_scale.SHAPES["tiny"])
    monkeypatch.setitem(bench_scale.WORK, "small", bench_scale.WORK["tiny"])
    assert bench_scale.main(["--shape", "small", "--part", "decode", "--device", "cpu", "--profile",
                             "--profile-dir", str(tmp_path / "profiles")]) == 0
    section = results.read_text().split("## bench_scale")[1].split("## gpu_check.sh")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "decode small" in line]
    assert len(rows) == 1 and rows[0].count(" | ") == 5, section
    shown = (tmp_path / "profiles" / "decode-small.txt").resolve()  # outside the repository: as it is
    assert "tok/s" in rows[0] and f"profile summary: {shown}" in rows[0]
    assert (tmp_path / "profiles" / "decode-small.txt").is_file()
