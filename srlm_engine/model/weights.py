"""Llama weights in Hugging Face layout: safetensors only, single file or sharded with an index.

`load_model(path)` is the way to load a model directory; `save_model` writes one. This module
builds the Llama (model/llama.py), which imports nothing from here.

Loading checks every file's header against its size before reading, so a truncated file names
the first tensor that does not fit; a missing, unexpected or wrongly shaped tensor names the
tensor and the file. Saving writes the same layout (config.json, model.safetensors or shards +
model.safetensors.index.json), each file atomically and a re-save whole or not at all (see
save_model), so transformers and vLLM read what we save.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from srlm_engine.config import ConfigError, ModelConfig
from srlm_engine.io import DataError, atomic_path, read_json, write_json
from srlm_engine.model.llama import Llama, rope_inv_freq

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightsError(ValueError):
    """A checkpoint is missing, truncated or does not match its config; names file and tensor."""


def hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


def our_name(hf: str) -> str | None:
    if hf.endswith("rotary_emb.inv_freq"):  # recomputed from the config, never loaded
        return None
    if hf.startswith("model."):
        return hf[len("model."):]
    return hf


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path}: model directory not found")
    f = path / "config.json"
    try:
        return ModelConfig.from_hf(read_json(f), source=str(f))
    except DataError as e:
        raise ConfigError(str(e)) from None


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # bytes per element by safetensors dtype
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # what casts to a weight as it is (fp8 needs its scales)


def read_header(file: Path) -> dict:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise WeightsError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{file}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, end) = [int(d) for d in info["shape"]], info["data_offsets"]
            nbytes = _ITEMSIZE[info["dtype"]] * torch.Size(shape).numel()
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end) or end - start != nbytes:
            raise WeightsError(f"{file}: tensor {name!r}: data_offsets {info['data_offsets']} do not hold its "
                               f"{info['dtype']} shape {tuple(shape)} ({nbytes} bytes)")
        if end > data:
            raise WeightsError(f"{file}: truncated: tensor {name!r} needs bytes up to {end} "
                               f"but the data section has {data}")
    header.pop("__metadata__", None)
    return header


def weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it."""
    index = path / INDEX
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise WeightsError(f"{index}: missing field 'weight_map'")
        for fname in set(wm.values()):
            # a shard is a file of this folder: "../other/model.safetensors" would load another model's weights
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise WeightsError(f"{index}: weight_map names {fname!r}; a shard must be a file name "
                                   f"in the model folder, with no directory part")
            if not (path / fname).is_file():
                raise WeightsError(f"{path / fname}: shard listed in {INDEX} is missing")
        return {k: path / v for k, v in wm.items()}
    single = path / SINGLE
    if not single.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise WeightsError(f"{path}: only pickle weights found; srlm loads safetensors only")
        raise WeightsError(f"{single}: weights file not found")
    return {k: single for k in read_header(single)}


def load_state_dict(path: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_state_dict_slices(path, cfg, {}, dtype, device)


def load_state_dict_slices(path: str | Path, cfg: ModelConfig, slices: dict[str, tuple[slice, ...]],
                           dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """load_state_dict, with each tensor named in `slices` (our names) read as tensor[slices[name]].

    A slice is read through safetensors' get_slice and only its elements are copied out of the
    memory-mapped file, so a tensor-parallel rank never holds a whole tensor it keeps a slice of. The checks are the same,
    against the full shapes config.json implies. A tied lm_head.weight found in the file is read
    with the embedding's slice, to compare with it."""
    path = Path(path)
    files = weight_files(path)
    expected = {k: tuple(v) for k, v in _shapes(cfg).items()}
    unknown = sorted(set(slices) - set(expected))
    if unknown:
        raise ValueError(f"slices name tensor(s) this config does not have: {', '.join(unknown)}")
    headers = {f: read_header(f) for f in set(files.values())}
    sd = {}
    seen: dict[str, str] = {}  # our name -> the checkpoint's name for it
    for hf, file in files.items():
        name = our_name(hf)
        if name is not None and seen.setdefault(name, hf) != hf:  # "model.norm.weight" and "norm.weight"
            raise WeightsError(f"{file}: tensors {seen[name]!r} and {hf!r} are both {hf_name(name)!r}; "
                               f"which one to load is a guess")
        if name is None or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if name not in expected:
            raise WeightsError(f"{file}: unexpected tensor {hf!r} for this config")
        info = headers[file].get(hf)
        if info is None:
            raise WeightsError(f"{file}: tensor {hf!r} listed in the index is not in the file")
        if info["dtype"] not in _FLOAT_DTYPES:
            raise WeightsError(f"{file}: tensor {hf!r} has dtype {info['dtype']}; weights must be floating point")
        if tuple(info["shape"]) != expected[name]:
            raise WeightsError(f"{file}: tensor {hf!r} has shape {tuple(info['shape'])}, "
                               f"config.json implies {expected[name]}")
    by_file: dict[Path, list[str]] = {}
    for hf, file in files.items():
        by_file.setdefault(file, []).append(hf)
    tied_head = None  # a tied config's lm_head.weight in the file: it must be the embedding itself
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf in names:
                    name = our_name(hf)
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        tied_head = (file, _read(f, hf, slices.get("embed_tokens.weight"), dtype, device))
                    elif name is not None:
                        sd[name] = _read(f, hf, slices.get(name), dtype, device)
        except SafetensorError as e:  # what read_header's checks let through; its text names no file
            raise WeightsError(f"{file}: corrupt safetensors file: {e}") from None
    emb = sd.get("embed_tokens.weight")
    if tied_head is not None and emb is not None and not torch.equal(tied_head[1].to(emb), emb):
        raise WeightsError(f"{tied_head[0]}: config.json ties the embeddings (tie_word_embeddings true) but tensor "
                           f"'lm_head.weight' differs from 'model.embed_tokens.weight'; loading would drop it")
    missing = [hf_name(k) for k in expected if k not in sd]
    if missing:
        raise WeightsError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return sd


def _read(f, hf: str, index: tuple[slice, ...] | None, dtype: torch.dtype, device) -> torch.Tensor:
    if index is None:
        return f.get_tensor(hf).to(device=device, dtype=dtype)
    # get_slice's result is a view into the whole tensor's (memory-mapped) bytes: copy the slice
    # out, so that the whole tensor is never kept
    part = f.get_slice(hf)[index]
    return torch.empty(part.shape, dtype=dtype, device=device).copy_(part)


def _shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        m = Llama(cfg)
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Llama:
    cfg = load_config(path)
    return model_from_state_dict(cfg, load_state_dict(path, cfg, dtype, device), device)


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu") -> Llama:
    """A Llama of `cfg` holding the tensors of `sd` themselves (no copy), in eval mode."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg, device=device)
    return model.eval()


def _indexed(path: Path) -> set:
    """The file names the folder's index lists (none when there is no readable index)."""
    try:
        wm = read_json(path / INDEX).get("weight_map") if (path / INDEX).is_file() else None
    except (DataError, AttributeError):
        return set()
    return set(wm.values()) if isinstance(wm, dict) else set()


_LAYOUT = re.compile(r"model(-\d{5}-of-\d{5}(\.b)?)?\.safetensors")  # the names save_model writes


def save_model(model: Llama, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and the weights in HF layout; shards + index above `max_shard_bytes`.

    Over an earlier save, the weights switch whole or not at all: each file is written atomically,
    and the new shards never take the names the current index lists (they alternate with
    model-*-of-*.b.safetensors), so until the new index (or, unsharded, the removal of the old
    index) commits them, the old set is what loads. Then the old layout's files go."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {hf_name(k): v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if len(shards) == 1:
        names = [SINGLE]
    else:
        live = _indexed(path)
        for suffix in ("", ".b"):
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}{suffix}.safetensors" for i in range(len(shards))]
            if not live & set(names):
                break
    for name, shard in zip(names, shards):
        with atomic_path(path / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(path / INDEX, {"metadata": {"total_size": total},
                                  "weight_map": {k: n for n, s in zip(names, shards) for k in s}})
    else:
        (path / INDEX).unlink(missing_ok=True)
    for stale in path.glob("model*.safetensors"):  # an earlier save's other layout; nothing else of the folder's
        if stale.name not in names and _LAYOUT.fullmatch(stale.name):
            stale.unlink()
    write_json(path / "config.json", hf_cfg)
