"""The run folder: what pins it (manifest.json), the steps that fill it, and the engines they use.

Every step writes its artifact whole or not at all (rank 0 writes, every rank computes), and a
rerun skips the steps whose artifact exists. RUN/manifest.json pins the config and the input
hashes: a folder made with another config is refused, naming what changed. A generation step's
finished shards wait in RUN/shards/<artifact>/ until the artifact is written (runtime.py,
engine/data_parallel.py).

    folder.step(path, make, "iter 1: candidates")     # make() writes path, if path is absent
    with folder.engine(model_dir) as llm:             # opened at the first llm(), freed at the end
        outs = llm().chat(...)
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from srlm_engine.config import LoopConfig
from srlm_engine.engine.data_parallel import DataParallelLLM, ShardStore
from srlm_engine.io import file_sha256, read_json, write_json, write_jsonl
from srlm_engine.judge import DEFAULT_TEMPLATE
from srlm_engine.runtime import Runtime, open_engine


class LoopStop(RuntimeError):
    """The loop cannot go on (no prompts survived the filters, no pairs after ties, a folder made
    with another config); the artifacts written so far are kept, and the message says what happened."""


class RunFolder:
    def __init__(self, root: Path, cfg: LoopConfig, model_dir: Path, log: Callable[[str], None] = print,
                 rt: Runtime | None = None, rank_log: Callable[[str], None] | None = None):
        self.root, self.cfg, self.log = root, cfg, log
        self.rt = rt or Runtime()
        self.rank_log = rank_log or log  # every rank's own lines (its shard of each generation call)
        self._current: Path | None = None  # the shard folder of the step under way
        seed_dir = Path(cfg.seed_dir)
        inputs = {f"seed/{n}": file_sha256(seed_dir / n) for n in ("ift.jsonl", "eft_train.jsonl", "eft_eval.jsonl")}
        if (seed_dir / "eft_eval_lengthfree.jsonl").is_file():  # the second judge eval set, where there is one
            inputs["seed/eft_eval_lengthfree.jsonl"] = file_sha256(seed_dir / "eft_eval_lengthfree.jsonl")
        if cfg.eft_extra:
            inputs[f"seed/{Path(cfg.eft_extra).name}"] = file_sha256(seed_dir / cfg.eft_extra)
        inputs["model/config.json"] = file_sha256(model_dir / "config.json")
        for w in sorted(model_dir.glob("model*.safetensors")):  # ~2 s for SmolLM2's 538 MB
            inputs[f"model/{w.name}"] = file_sha256(w)
        inputs["judge_template"] = (file_sha256(Path(cfg.judge_template)) if cfg.judge_template
                                    else hashlib.sha256(DEFAULT_TEMPLATE.encode("utf-8")).hexdigest())
        manifest = {"config": _plain(cfg.to_dict()), "model": str(model_dir), "inputs": inputs}
        path = root / "manifest.json"
        if path.is_file():
            old = read_json(path)
            # a setting added since the folder was made ran there as its default does now
            old["config"] = _with_defaults(old.get("config", {}), _plain(LoopConfig().to_dict()))
            diff = [k for k in ("config", "inputs") if old.get(k) != manifest[k]]
            if diff:
                keys = _changed(old.get("config", {}), manifest["config"]) if "config" in diff else []
                keys += [f"input {k}" for k in manifest["inputs"] if old.get("inputs", {}).get(k) != manifest["inputs"][k]]
                raise LoopStop(f"{root} was made with another config or inputs (changed: {', '.join(keys)}); "
                               f"use a new --out folder, or rerun with the settings of that run")
        else:
            self.write_json(path, manifest)
        self.rt.barrier()

    # ---------------------------------------------------------------- steps
    def step(self, path: Path, make: Callable[[], object], stage: str, timings_file: Path | None = None) -> Path:
        """The artifact at `path`, made by `make()` (which writes it) if absent. Every rank runs
        `make` (its generation calls are collectives); rank 0 writes."""
        if self.rt.decide(path.exists()):  # rank 0's view: it may be writing what another rank looks for
            self.log(f"[{stage}] done before: {path.relative_to(self.root)}")
            return path
        self.log(f"[{stage}] running")
        t0 = time.perf_counter()
        self._current = self.shards(path)
        try:
            make()
        finally:
            self._current = None
        self.rt.barrier()  # the artifact is on disk for every rank
        dt = time.perf_counter() - t0
        if self.rt.main:
            if timings_file is not None:
                t = read_json(timings_file) if timings_file.is_file() else {}
                t[stage] = round(dt, 3)
                write_json(timings_file, t)
            if self.shards(path).exists():  # the step is whole: its shards are spent
                shutil.rmtree(self.shards(path))
        self.log(f"[{stage}] {dt:.1f}s -> {path.relative_to(self.root)}")
        return path

    def shards(self, artifact: Path) -> Path:
        return self.root / "shards" / artifact.relative_to(self.root).with_suffix("")

    def write_json(self, path: Path, obj) -> None:
        if self.rt.main:
            write_json(path, obj)

    def write_jsonl(self, path: Path, records) -> None:
        if self.rt.main:
            write_jsonl(path, records)

    def move(self, src: Path, dst: Path) -> None:
        """Move a finished model directory into place in one rename (same filesystem)."""
        if self.rt.main:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        self.rt.barrier()

    # ---------------------------------------------------------------- engines
    @contextmanager
    def engine(self, model_dir: Path):
        """An engine on `model_dir` for the steps inside the block: opened at the first call of
        the yielded function (never, when their artifacts exist), turned to each step's shard
        folder, and freed when the block ends, before the next engine or training allocates."""
        lease = _Lease(self, model_dir)
        try:
            yield lease
        finally:
            lease.close()


class _Lease:
    def __init__(self, folder: RunFolder, model_dir: Path):
        self.folder, self.model_dir, self.llm = folder, model_dir, None

    def __call__(self):
        f = self.folder
        if self.llm is None:
            self.llm = open_engine(self.model_dir, f.cfg, f.rt, f._current, f.rank_log)
        elif isinstance(self.llm, DataParallelLLM):
            self.llm.begin(ShardStore(f._current) if f._current else None, f._current.name if f._current else "")
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            gc.collect()  # engines hold reference cycles: only the collector frees them
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _plain(d: dict) -> dict:
    """A config dict as manifest.json holds it (tuples as lists)."""
    return json.loads(json.dumps(d))


def _with_defaults(old: dict, defaults: dict) -> dict:
    """`old` with each key it lacks taken from `defaults`, table by table."""
    out = dict(old)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def _changed(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _changed(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out
