"""The `srlm` command line: flags made from the settings' metadata, --print-config and the shipped
configs, generate / chat / report, --version, a --help that does not load torch, and exit status
1 (the work failed), 2 (the command line is wrong), 130 (interrupted)."""
import json
import signal
import subprocess
import sys
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from srlm_engine import cli
from srlm_engine.cli import main
from srlm_engine.config import LoopConfig, TrainConfig, to_toml

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def usage_exit(capsys, *args) -> str:
    """argparse's own usage error: SystemExit(2) and its message."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------- models

def test_model_info_prints_config_and_parameter_count(tmp_path, capsys, tiny_writer):
    model = tiny_writer(tmp_path, "gqa_untied")
    assert main(["model", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in model.parameters())
    assert f"{n:,}" in out and "num_key_value_heads" in out


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    rc, _, err = run(capsys, "model", "info", tmp_path / "missing")
    assert rc == 1 and "model directory not found" in err and "Traceback" not in err


# ---------------------------------------------------------------------- version, help

def test_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"srlm {version('srlm-engine')}"


def test_version_without_an_installed_distribution(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "version", missing)
    assert cli.version() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_help_does_not_import_torch():
    """`srlm --help` answers at once: building the parser and every command's help loads only
    argparse, the standard library and config.py. Needs srlm_engine/__init__.py not to import torch."""
    code = ("import sys, srlm_engine.cli as c\n"
            "p = c.build()\n"
            "sub = next(a for a in p._actions if a.dest == 'command')\n"
            "texts = [p.format_help()] + [q.format_help() for q in sub.choices.values()]\n"
            "assert all(texts)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"srlm --help imported {r.stdout.strip()[:300]}"


# ---------------------------------------------------------------------- flags from the settings' metadata

def _subparser(name: str):
    sub = next(a for a in cli.build()._actions if a.dest == "command")
    return sub.choices[name]


def _flags(parser) -> dict:
    return {o: a for a in parser._actions for o in a.option_strings}


def test_every_training_setting_has_a_flag_with_its_help_and_choices_and_dpo_ones_only_where_dpo_runs():
    sft, dpo, loop = (_flags(_subparser(n)) for n in ("sft", "dpo", "loop"))
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        dpo_only = f.metadata["only"] == "dpo"
        assert (flag in sft) is not dpo_only and flag in dpo
        assert ("--sft-" + flag[2:] in loop) is not dpo_only and "--dpo-" + flag[2:] in loop
        assert dpo[flag].help.startswith(f.metadata["help"])
        if f.metadata["choices"]:
            assert dpo[flag].metavar == "{" + ",".join(f.metadata["choices"]) + "}"
    for f in fields(LoopConfig):
        if f.name not in ("sft", "dpo"):
            assert loop["--" + f.name.replace("_", "-")].help.startswith(f.metadata["help"])
    assert "--beta" not in _subparser("sft").format_help() and "--loss-type" in _subparser("dpo").format_help()


def test_a_dpo_flag_on_sft_is_a_usage_error(capsys):
    err = usage_exit(capsys, "sft", "--model", "m", "--data", "d", "--out", "o", "--beta", "0.2")
    assert "unrecognized arguments: --beta 0.2" in err


def test_loop_flags_set_the_loop_and_both_training_stages(capsys):
    rc, out, _ = run(capsys, "loop", "--preset", "quick", "--print-config", "--n", "3", "--no-length-control",
                     "--judge-mode", "sample", "--sft-lr", "1e-4", "--sft-max-steps", "5", "--dpo-beta", "0.3",
                     "--dpo-loss-type", "ipo", "--dpo-max-grad-norm", "none", "--dpo-adam-betas", "0.8", "0.9",
                     "--no-dpo-mixed-precision")
    assert rc == 0
    cfg = LoopConfig.build(None, tomllib.loads(out))
    want = LoopConfig.build("quick", None, n=3, length_control=False, judge_mode="sample",
                            sft=dict(lr=1e-4, max_steps=5),
                            dpo=dict(beta=0.3, loss_type="ipo", max_grad_norm=None, adam_betas=(0.8, 0.9),
                                     mixed_precision="none"))
    assert cfg == want and cfg.dpo.max_grad_norm is None and cfg.sft.beta == 0.1


# ---------------------------------------------------------------------- --print-config, shipped configs

@pytest.mark.parametrize("command", ["loop", "demo"])
def test_print_config_is_toml_that_reads_back_to_the_same_run(command, tmp_path, capsys):
    rc, out, _ = run(capsys, command, "--preset", "paper", "--print-config", "--iterations", "3")
    assert rc == 0
    assert LoopConfig.build(None, tomllib.loads(out)) == LoopConfig.build("paper", None, iterations=3)
    saved = tmp_path / "run.toml"
    saved.write_text(out)
    assert run(capsys, "loop", "--config", saved, "--print-config")[1] == out


def test_demo_prints_the_quick_preset_without_pulling_anything(capsys, monkeypatch):
    import srlm_engine.model.pull as pull

    def no_pull(*a, **k):
        raise AssertionError("--print-config pulled the model")
    monkeypatch.setattr(pull, "pull", no_pull)
    rc, out, _ = run(capsys, "demo", "--print-config")
    assert rc == 0 and out == to_toml(LoopConfig.build("quick"))


def test_a_shipped_config_by_name_is_the_preset(capsys):
    for name in LoopConfig.PRESETS:
        by_config = run(capsys, "loop", "--config", name, "--print-config")[1]
        assert by_config == run(capsys, "loop", "--preset", name, "--print-config")[1]
        assert by_config == to_toml(LoopConfig.build(name))


def test_train_print_config_reads_back(tmp_path, capsys):
    toml = tmp_path / "t.toml"
    toml.write_text("[train]\nmax_seq_len = 128\nlr = 2e-5\n")
    rc, out, _ = run(capsys, "dpo", "--config", toml, "--beta", "0.2", "--mixed-precision", "--print-config")
    assert rc == 0
    cfg = TrainConfig.from_dict(tomllib.loads(out))
    assert (cfg.max_seq_len, cfg.lr, cfg.beta, cfg.mixed_precision) == (128, 2e-5, 0.2, "bf16")
    assert asdict(cfg) == asdict(TrainConfig(max_seq_len=128, lr=2e-5, beta=0.2, mixed_precision="bf16"))


# ---------------------------------------------------------------------- exit status

def test_a_bad_setting_is_a_usage_error_naming_it(tmp_path, capsys):
    rc, _, err = run(capsys, "loop", "--preset", "quick", "--judge-mode", "best", "--print-config")
    assert rc == 2 and "srlm loop: error: judge_mode must be 'sample' or 'expected', got 'best'" in err
    rc, _, err = run(capsys, "sft", "--lr-scaling", "cube", "--print-config")
    assert rc == 2 and "lr_scaling must be 'none', 'linear' or 'sqrt', got 'cube'" in err
    bad = tmp_path / "run.toml"
    bad.write_text("iterations = 1\nprompt = 3\n")
    rc, _, err = run(capsys, "loop", "--config", bad, "--print-config")
    assert rc == 2 and f"{bad}: unknown loop setting 'prompt'" in err
    rc, _, err = run(capsys, "loop", "--config", tmp_path / "none.toml", "--print-config")
    assert rc == 2 and "none.toml: No such file or directory" in err
    rc, _, err = run(capsys, "generate", tmp_path, "--prompt", "hi", "--top-p", "1.5")
    assert rc == 2 and "top_p must be in (0, 1]" in err
    assert "invalid int value: 'many'" in usage_exit(capsys, "loop", "--n", "many")


def test_missing_required_arguments_are_usage_errors(capsys):
    rc, _, err = run(capsys, "loop", "--preset", "quick")
    assert rc == 2 and "the following arguments are required: --model, --out" in err
    rc, _, err = run(capsys, "dpo", "--model", "m", "--out", "o")
    assert rc == 2 and "the following arguments are required: --pairs" in err


def test_runtime_errors_exit_1_in_one_line_and_srlm_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    rc, _, err = run(capsys, "report", tmp_path)
    assert rc == 1 and err == f"srlm report: error: {tmp_path}: not a run folder (no manifest.json)\n"
    monkeypatch.setenv("SRLM_DEBUG", "1")
    from srlm_engine.io import DataError
    with pytest.raises(DataError, match="not a run folder"):
        main(["report", str(tmp_path)])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_report", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["report", "x"])


def test_ctrl_c_exits_130_and_a_run_folder_command_says_to_rerun(tmp_path, capsys, monkeypatch):
    import srlm_engine.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "run", interrupted)
    rc, _, err = run(capsys, "loop", "--model", tmp_path, "--out", tmp_path / "run", "--preset", "quick")
    assert rc == 130 and "srlm loop: interrupted; rerun the same command to resume" in err
    monkeypatch.setattr(cli, "_open_llm", interrupted)
    rc, _, err = run(capsys, "generate", tmp_path, "--prompt", "hi")
    assert rc == 130 and "srlm generate: interrupted" in err and "rerun" not in err


def test_ctrl_c_under_torchrun_exits_130(monkeypatch, capsys):
    # torchrun stops every rank on SIGINT and raises SignalException in the launching process
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def launched(nproc, argv):
        raise SignalException("Process got signal: 2", signal.SIGINT)
    monkeypatch.setattr(cli, "torchrun", launched)
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    rc, _, err = run(capsys, "sft", "--model", "m", "--data", "d", "--out", "o", "--nproc", "2")
    assert rc == 130 and "srlm sft: interrupted; rerun the same command to resume" in err


# ---------------------------------------------------------------------- generate, chat

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_dir):
    """test_loop's tiny model with 512 positions: a long chat turn outgrows it."""
    from test_loop import write_tiny_smollm2
    return write_tiny_smollm2(tmp_path_factory.mktemp("chat"), smollm2_dir, max_position_embeddings=512)


def test_generate_prints_the_engines_completions(chat_model, capsys):
    import torch

    from srlm_engine.engine import LLM, SamplingParams
    prompts = ["The capital of France is", "Once upon a time"]
    rc, out, err = run(capsys, "generate", chat_model, "--prompt", prompts[0], "--prompt", prompts[1], "--n", "2",
                       "--temperature", "0.8", "--top-p", "0.95", "--max-tokens", "6", "--seed", "3")
    assert rc == 0 and "generation on cpu in float32" in err
    want = LLM(chat_model, dtype=torch.float32).generate(
        prompts, SamplingParams(n=2, temperature=0.8, top_p=0.95, max_tokens=6, seed=3), use_tqdm=False)
    expected = "".join(f"--- prompt {i + 1}, completion {j + 1} ---\n{c.text}\n"
                       for i, r in enumerate(want) for j, c in enumerate(r.outputs))
    assert out == expected and len({c.text for r in want for c in r.outputs}) > 1
    # one prompt, one completion: the text alone, for a pipe
    rc, out, _ = run(capsys, "generate", chat_model, "--prompt", prompts[0], "--max-tokens", "6", "--seed", "3",
                     "--temperature", "0.8", "--top-p", "0.95")
    assert rc == 0 and out == want[0].outputs[0].text + "\n"


def test_chat_keeps_the_conversation_until_reset_and_ends_at_exit(chat_model, capsys, monkeypatch):
    import io

    from srlm_engine.engine.llm import LLM
    seen, real = [], LLM.chat

    def chat(self, messages, params=None, use_tqdm=True, **kw):
        seen.append(json.loads(json.dumps(messages)))
        outs = real(self, messages, params, use_tqdm, **kw)
        replies.append(outs[0].outputs[0].text)
        return outs
    replies = []
    monkeypatch.setattr(LLM, "chat", chat)
    lines = ["Hello there", "", "What is two plus two?", "/reset", "Bye", "/exit", "not read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(x + "\n" for x in lines)))
    rc, out, _ = run(capsys, "chat", chat_model, "--max-tokens", "5", "--seed", "1", "--system", "Be brief.")
    assert rc == 0
    system = {"role": "system", "content": "Be brief."}
    assert seen == [[[system, {"role": "user", "content": "Hello there"}]],
                    [[system, {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": replies[0]},
                      {"role": "user", "content": "What is two plus two?"}]],
                    [[system, {"role": "user", "content": "Bye"}]]]
    assert out == "".join(r + "\n" for r in replies)
    # end of input ends it too
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi"))
    assert run(capsys, "chat", chat_model, "--max-tokens", "3")[0] == 0 and len(seen) == 4


def test_chat_turn_longer_than_the_context_is_dropped_not_fatal(chat_model, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 600 + "\nHi\n"))  # the model has 512 positions
    rc, out, err = run(capsys, "chat", chat_model, "--max-tokens", "3")
    assert rc == 0 and "/reset starts a new conversation" in err and out.endswith("\n")  # "Hi" was answered


def test_ctrl_c_in_a_running_srlm_exits_130_without_a_traceback(chat_model):
    # Ctrl-C as a terminal delivers it. A test run started in the background of a non-interactive
    # shell inherits SIGINT ignored, and Python then leaves it ignored: the child restores it.
    srlm = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'srlm'; runpy.run_module('srlm_engine.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", srlm, "chat", str(chat_model)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "generation on cpu" in proc.stderr.readline()
        proc.stdin.write("Hi\n")
        proc.stdin.flush()
        proc.stdout.readline()  # the reply: the model is loaded and the chat waits for the next line
        proc.send_signal(signal.SIGINT)  # stdin stays open: only the interrupt can end it
        proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "srlm chat: interrupted" in err and "Traceback" not in err


# ---------------------------------------------------------------------- report

def _run_folder(root: Path, prompts: int) -> Path:
    from srlm_engine.evaluate import judge_vs_human
    from srlm_engine.io import write_json
    cfg = LoopConfig.build("quick", None, prompts=prompts)
    write_json(root / "manifest.json", {"config": json.loads(json.dumps(cfg.to_dict())), "model": "/models/m0",
                                        "inputs": {}})
    m = asdict(judge_vs_human([[5, 3, 0]], [[4.5, 3, 1]]))
    scores = {k: 1 for k in ("unscored", "0", "1", "2", "3", "4", "5")}
    for name in ("m0", "m1", "m2"):
        write_json(root / "eval" / f"judge_{name}.json",
                   {"expected": {"metrics": m, "parse_rate": 1.0, "distribution": scores}})
    write_json(root / "iter_1" / "metrics.json", {
        "prompts": prompts, "pair_counts": {"pairs": 5, "ties": 2}, "candidate_mean_words": 41.0,
        "head_to_head": {"mean_len_new": 37.0, "wins": 3, "ties": 1, "losses": 2, "win_rate": 0.58}})
    write_json(root / "iter_1" / "timings.json", {"iter 1: candidates": 30.0, "iter 1: dpo": 10.0})
    return root


def test_report_is_rebuilt_from_the_run_folder_alone(tmp_path, capsys):
    run_dir = _run_folder(tmp_path / "run", prompts=9)
    rc, out, _ = run(capsys, "report", run_dir)
    assert rc == 0 and out.strip() == str(run_dir / "report.md")
    text = (run_dir / "report.md").read_text()
    assert "Model: /models/m0; 1 iteration(s), 9 prompts x N=4, K=2, judge mode in the loop: expected." in text
    assert "| 1 | 9 | 5 | 2 | 0 | 41 | 37 | 58% (3/1/2) | 75% of 40s |" in text
    assert "| | M0 (no EFT) | M1 | M2 |" in text
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["iterations.png", "judge_vs_human.png",
                                                                     "score_distribution.png"]
    (run_dir / "manifest.json").write_text("[]")
    rc, _, err = run(capsys, "report", run_dir)
    assert rc == 1 and "manifest.json: no config object" in err
