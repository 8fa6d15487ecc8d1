"""Helpers shared by the training tests: a tiny random Llama beside the real SmolLM2 tokenizer
files (vocab 49152, hidden 32, 2 layers: the fused kernel and the chat template are the real ones,
a forward costs milliseconds), record files, free ports, and running `srlm` in a subprocess."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from srlm_engine.config import ModelConfig
from srlm_engine.model.llama import Llama
from srlm_engine.model.pull import pull
from srlm_engine.model.weights import save_model
from srlm_engine.train.checkpoint import TOKENIZER_FILES

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **kw})


def make_model_dir(path: Path, seed: int = 0, **kw) -> Path:
    save_model(Llama(tiny_config(**kw)).init_weights(seed), path)
    src = pull()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, path / name)
    return path


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srlm(*args, check=True, popen=False):
    """Run `python -m srlm_engine.cli ARGS`; -> CompletedProcess, or a running Popen if `popen`."""
    cmd = [sys.executable, "-m", "srlm_engine.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"srlm {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r
