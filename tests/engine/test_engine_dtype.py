"""The loop's engine takes the `auto` dtype of srlm_engine/device.py, and says so."""
import torch

from srlm_engine import device
from srlm_engine.config import LoopConfig


def test_the_loops_engine_takes_the_auto_dtype_and_the_run_says_so(tiny_dir, tmp_path, monkeypatch, capsys):
    from srlm_engine.cli import main
    from srlm_engine.runtime import open_engine

    monkeypatch.delenv("SRLM_CPU_BF16")
    cfg = LoopConfig(kv_cache_tokens=256, max_num_seqs=4)
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: [])
    assert open_engine(tiny_dir, cfg).model.embed_tokens.weight.dtype == torch.float32
    monkeypatch.setattr(device, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert open_engine(tiny_dir, cfg).model.embed_tokens.weight.dtype == torch.bfloat16
    # `srlm judge-eval` prints its choice first (an empty eval file ends it right after)
    empty = tmp_path / "eval.jsonl"
    empty.write_text("")
    main(["judge-eval", "--model", str(tiny_dir), "--data", str(empty), "--lengthfree", ""])
    assert "generation on cpu in bfloat16 (auto: a CPU with avx512_bf16)" in capsys.readouterr().out
