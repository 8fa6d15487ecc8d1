"""Bad input gives a clear error naming the file (and line), and nothing already saved is lost. Bad input
data exits 1; a bad setting (flag or --config) is a usage error and exits 2."""
import hashlib
import json

import pytest

from srlm_engine.cli import main
from trainkit import DATA, write_jsonl

FAST = ["--max-seq-len", "64", "--micro-batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
        "--no-progress", "--lr", "1e-3"]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def digest(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_out(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(["sft", "--model", str(tiny_model), "--data", str(DATA / "sft_train.jsonl"), "--out", str(out),
                 *FAST, "--save-every", "1", "--max-steps", "3"]) == 0
    return out


def test_empty_file(tiny_model, trained_out, tmp_path, capsys):
    before = digest(trained_out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = run(capsys, "sft", "--model", tiny_model, "--data", empty, "--out", trained_out, *FAST)
    assert rc == 1 and f"{empty}: no records" in err
    assert digest(trained_out) == before


def test_malformed_line_named(tiny_model, trained_out, tmp_path, capsys):
    before = digest(trained_out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                   + "\n{not json\n")
    rc, err = run(capsys, "sft", "--model", tiny_model, "--data", bad, "--out", trained_out, *FAST)
    assert rc == 1 and f"{bad}:2: invalid JSON" in err
    assert digest(trained_out) == before


def test_pair_with_chosen_equal_rejected(tiny_model, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                               {"prompt": "q", "chosen": "same", "rejected": "same"}])
    rc, err = run(capsys, "dpo", "--model", tiny_model, "--pairs", pairs, "--out", tmp_path / "o", *FAST)
    assert rc == 1 and f"{pairs}:2:" in err and "chosen and rejected are the same" in err
    assert not (tmp_path / "o" / "model").exists()


def test_missing_model_directory(tmp_path, capsys):
    rc, err = run(capsys, "sft", "--model", tmp_path / "nope", "--data", DATA / "sft_train.jsonl",
                  "--out", tmp_path / "o", *FAST)
    assert rc == 1 and "nope: model directory not found" in err


def test_resume_from_another_models_checkpoint(trained_out, tmp_path, capsys):
    from trainkit import make_model_dir
    before = digest(trained_out)
    other = make_model_dir(tmp_path / "other", seed=9, hidden_size=48)
    rc, err = run(capsys, "sft", "--model", other, "--data", DATA / "sft_train.jsonl", "--out", trained_out, *FAST,
                  "--max-steps", "3")
    assert rc == 1 and "cannot resume" in err and "base model" in err
    assert digest(trained_out) == before


def test_bad_setting_and_toml(tiny_model, tmp_path, capsys):
    toml = tmp_path / "t.toml"
    toml.write_text('[train]\nmax_seq_len = 64\nloss_typo = "x"\n')
    rc, err = run(capsys, "dpo", "--model", tiny_model, "--pairs", DATA / "pairs.jsonl", "--out", tmp_path / "o",
                  "--config", toml)
    assert rc == 2 and f"{toml}: unknown training setting(s) loss_typo" in err
    rc, err = run(capsys, "sft", "--model", tiny_model, "--data", DATA / "sft_train.jsonl", "--out", tmp_path / "o",
                  "--schedule", "exp")
    assert rc == 2 and "schedule must be 'linear' or 'cosine'" in err
