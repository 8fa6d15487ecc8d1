"""Checkpoints that are complete or absent, in a layout transformers and our loader both read.

    OUT/checkpoints/step-00000200/
        model/        config.json, model.safetensors (HF names), tokenizer files of the input model
        trainer.pt    optimizer state (full, keyed by parameter name), scheduler, RNG; no model weights
        state.json    step and the run's resume meta: kind, fingerprints of the base model and the
                      data, global batch, seed, total steps, the optimizer's and the loss's settings

The model and optimizer state are gathered whole to rank 0 (get_model_state_dict /
get_optimizer_state_dict with full_state_dict=True, cpu_offload=True), so a checkpoint does not
depend on the number of processes that wrote it. Rank 0 writes everything into a temporary
directory that is renamed into place (io.atomic_dir), then removes all but the last `keep_last`
(with keep_models, a removed checkpoint's model/ is first renamed to OUT/models/step-N: the
weights of every checkpoint stay, for the loop's checkpoint selection, without their optimizer state).
trainer.pt holds tensors and plain containers only and is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from srlm_engine.config import ModelConfig
from srlm_engine.io import atomic_dir, read_json, write_json
from srlm_engine.model.weights import model_from_state_dict, save_model
from srlm_engine.train.parallel import Dist, barrier

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
_STEP = re.compile(r"^step-(\d+)$")
_PREFIXES = ("llama.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed here; the message says which file and what differs."""


def _clean(name: str) -> str:
    for p in _PREFIXES:
        name = name.replace(p, "")
    return name


def full_model_state(root: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Llama's own parameter names -> full CPU tensors on rank 0 (empty dict on other ranks).
    Every rank must call it (it all-gathers)."""
    if d.distributed:
        sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in root.state_dict().items()}
    return {_clean(k): v for k, v in sd.items()}


def write_model_dir(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, tokenizer_src: Path) -> None:
    """Write an HF-layout model directory (weights, config.json, tokenizer files) into `path`."""
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model = model_from_state_dict(cfg, state)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise CheckpointError(f"model state misses {missing[:3]}")
    save_model(model, path)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy2(tokenizer_src / name, path / name)


def fingerprint(obj) -> str:
    """sha256 of a JSON-able object (records, configs): equal data, equal fingerprint."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def model_fingerprint(model_dir: Path) -> str:
    """config.json plus the size and first/last MiB of each weights file: cheap, and different for
    any other model or any retrained one."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if _STEP.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name)[1]))


def saved_models(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, model directory) of every checkpoint whose weights are on disk, oldest first: those
    kept in OUT/models and those of the complete checkpoints still in OUT/checkpoints."""
    kept = {int(_STEP.match(p.name)[1]): p for p in (Path(out_dir) / "models").glob("step-*")
            if _STEP.match(p.name) and (p / "config.json").is_file()}
    for p in checkpoints(out_dir):  # one killed between the rename and the removal has no model/ left
        if (p / "model" / "config.json").is_file():
            kept.setdefault(int(_STEP.match(p.name)[1]), p / "model")
    return sorted(kept.items())


def save_checkpoint(out_dir: Path, step: int, root: nn.Module, optimizer, scheduler, d: Dist,
                    meta: dict, cfg: ModelConfig, tokenizer_src: Path, keep_last: int,
                    keep_models: bool = False) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the checkpoint path on rank 0."""
    model_sd = full_model_state(root, d)
    opt_sd = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=d.distributed))
    path = None
    if d.main:
        ckdir = Path(out_dir) / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        for stale in [*ckdir.glob(".step-*.tmp"), *ckdir.glob(".step-*.old")]:  # a killed save's
            shutil.rmtree(stale, ignore_errors=True)
        path = ckdir / f"step-{step:08d}"
        trainer = {"optimizer": _clean_keys(opt_sd), "scheduler": scheduler.state_dict(),
                   "rng_cpu": torch.get_rng_state(),
                   "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        with atomic_dir(path) as tmp:
            write_model_dir(model_sd, cfg, tmp / "model", tokenizer_src)
            torch.save(trainer, tmp / "trainer.pt")
            write_json(tmp / "state.json", {**meta, "step": step})
        for old in checkpoints(out_dir)[:-keep_last]:
            if keep_models and (old / "model").is_dir():  # one rename: the weights are never half moved
                (Path(out_dir) / "models").mkdir(exist_ok=True)
                os.replace(old / "model", Path(out_dir) / "models" / old.name)
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return path


def _clean_keys(opt_sd: dict) -> dict:
    state = {_clean(k): v for k, v in opt_sd.get("state", {}).items()}
    groups = [{**g, "params": [_clean(p) for p in g["params"]]} for g in opt_sd.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


# How an error names a meta key (others by the key itself).
_NAMES = {"kind": "training kind", "base_model": "base model", "model_config": "model config",
          "data": "training data", "global_batch": "global batch", "total_steps": "total steps"}


def load_checkpoint(path: Path, meta: dict) -> tuple[dict, dict]:
    """Read state.json and trainer.pt, refusing a checkpoint whose saved meta differs from this
    run's in any key of `meta` (the trainer puts there all that a resumed run must share with the
    run that saved: another model, data, kind, seed or schedule would splice two runs). -> (state, trainer)."""
    path = Path(path)
    state = read_json(path / "state.json")
    for key, new in meta.items():
        if state.get(key) != new:
            raise CheckpointError(f"{path}: cannot resume: checkpoint's {_NAMES.get(key, key)} ({state.get(key)!r}) "
                                  f"differs from this run's ({new!r}); use another --out or remove the "
                                  f"checkpoint yourself")
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return state, trainer


def restore_optimizer(root: nn.Module, optimizer, full_osd: dict, d: Dist) -> None:
    """Load a full optimizer state (Llama names) into this run's (maybe sharded) optimizer."""
    # Back to the names the state-dict API uses for this run: "llama." kept, wrappers dropped.
    names = {_clean(k): k.replace("_checkpoint_wrapped_module.", "") for k, _ in root.named_parameters()}
    fix = lambda n: names.get(n, n)  # noqa: E731
    osd = {"state": {fix(k): v for k, v in full_osd["state"].items()},
           "param_groups": [{**g, "params": [fix(p) for p in g["params"]]} for g in full_osd["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, osd, options=StateDictOptions(full_state_dict=True))
