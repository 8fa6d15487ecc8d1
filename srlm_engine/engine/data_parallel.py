"""Data-parallel generation: one LLM per rank, each request computed on one rank, every rank
handed every result.

    llm = DataParallelLLM(LLM(model_dir, device=...), group)     # inside an initialized process group
    outs = llm.generate(prompts, params)                         # a collective: every rank calls it

Every rank of `group` calls with the same requests (SPMD: the loop computes the same inputs on
every rank). Each call splits them into one shard per rank, balanced by expected tokens (prompt
+ n x max_tokens, longest first onto the least-loaded rank) rather than by count, computes its
own shard, and all-gathers the outputs back into request order. A request's seed is in its
SamplingParams, so it draws the same tokens whichever rank computes it, and the results do not
depend on the number of ranks; but for the last digits of log-probs where a prompt prefix one rank
finds in its KV cache is computed afresh on another (they round differently), which can also decide
a near-tie between two tokens.

With a `ShardStore`, each rank writes its finished shard of each call to a file before the
gather, and a rerun of the same calls reads it back instead of computing it again: a job killed
mid-phase loses only the shards that had not finished.

With tensor-parallel engines, `group` is the data-parallel group (one rank of each
tensor-parallel group) and `llm` this rank's tensor-parallel engine: the ranks of one
tensor-parallel group run the same shard together.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.engine.llm import LLM, as_requests, render_chats
from srlm_engine.engine.outputs import CompletionOutput, Logprob, RequestOutput
from srlm_engine.io import write_text


def balanced_shards(weights: list[int], world: int) -> list[list[int]]:
    """Indices of `weights` split into `world` lists with near-equal weight sums: longest
    first onto the least-loaded shard (LPT), ties to the lower rank; each list in index order."""
    heap = [(0, r) for r in range(world)]
    shards: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        shards[r].append(i)
        heapq.heappush(heap, (load + weights[i], r))
    return [sorted(s) for s in shards]


class ShardStore:
    """Files of finished shards: DIR/call-NNNN.rank-R-of-W.json, each written whole (temp +
    rename). A file holds a digest of its call's inputs: a rerun whose call differs computes anew."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, call: int, rank: int, world: int) -> Path:
        return self.root / f"call-{call:04d}.rank-{rank}-of-{world}.json"

    def load(self, call: int, rank: int, world: int, digest: str):
        p = self._path(call, rank, world)
        if not p.is_file():
            return None
        d = json.loads(p.read_text(encoding="utf-8"))
        return d["result"] if d.get("digest") == digest else None

    def save(self, call: int, rank: int, world: int, digest: str, result) -> None:
        write_text(self._path(call, rank, world), json.dumps({"digest": digest, "result": result}))


class DataParallelLLM:
    """generate / chat / next_token_logprobs of an LLM, as collectives over `group` (see above)."""

    def __init__(self, llm: LLM, group=None, store: ShardStore | None = None, log=None, phase: str = "generate",
                 writer: bool = True):
        self.llm, self.group, self.store, self.log, self.phase = llm, group, store, log, phase
        self.writer = writer  # saves its shards: one rank of each tensor-parallel group
        self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.calls = 0

    def begin(self, store: ShardStore | None, phase: str) -> None:
        """Start a new phase on the same engine: its calls are numbered from 0 in `store`."""
        self.store, self.phase, self.calls = store, phase, 0

    # ---------------------------------------------------------------- the engine's API
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        prompts, params = as_requests(prompts, sampling_params)
        ids = self.llm._encode_all(prompts)  # bad requests are named by their index in the whole call
        for r, (t, p) in enumerate(zip(ids, params)):
            self.llm._check_lengths(r, t, p.max_tokens)
        weights = [len(t) + p.n * (p.max_tokens or self.max_model_len - len(t)) for t, p in zip(ids, params)]

        def run(mine):
            outs = self.llm.generate([ids[i] for i in mine], [params[i] for i in mine], use_tqdm=use_tqdm)
            return [_to_dict(o) for o in outs]
        key = [ids, [repr(p) for p in params]]
        outs = [_from_dict(d) for d in self._collective(run, weights, key)]
        for r, (o, prompt) in enumerate(zip(outs, prompts)):
            o.request_id, o.prompt = str(r), prompt if isinstance(prompt, str) else None
        return outs

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, *, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        texts = render_chats(self.tokenizer, messages, chat_template, add_generation_prompt)
        outs = self.generate([self.tokenizer.encode(t, add_special_tokens=False) for t in texts],
                             sampling_params, use_tqdm)
        for o, text in zip(outs, texts):
            o.prompt = text
        return outs

    def next_token_logprobs(self, prompts, token_ids: list[int] | None = None) -> torch.Tensor:
        ids = self.llm._encode_all(as_requests(prompts)[0])

        def run(mine):
            return self.llm.next_token_logprobs([ids[i] for i in mine], token_ids=token_ids).tolist()
        return torch.tensor(self._collective(run, [len(t) for t in ids], [ids, token_ids]), dtype=torch.float32)

    # ---------------------------------------------------------------- the collective
    def _collective(self, run, weights: list[int], key) -> list:
        """run(indices) -> one result per index, over this rank's shard; -> all results in order."""
        call, self.calls = self.calls, self.calls + 1
        shards = balanced_shards(weights, self.world)
        mine = shards[self.rank]
        digest = hashlib.sha256(json.dumps([key, shards], default=str).encode()).hexdigest()
        got = self.store.load(call, self.rank, self.world, digest) if self.store else None
        reused = got is not None
        if not reused:
            got = run(mine) if mine else []
            _fault_point(self.phase, self.rank, self.store)
            if self.store and self.writer:
                self.store.save(call, self.rank, self.world, digest, got)
        if self.log:
            self.log(f"{self.phase}: {len(mine)} of {len(weights)} requests" + (" (shard done before)" * reused))
        parts = [None] * self.world
        dist.all_gather_object(parts, (mine, got), group=self.group)
        out = [None] * len(weights)
        for idx, res in parts:
            for i, x in zip(idx, res):
                out[i] = x
        return out


def _fault_point(phase: str, rank: int, store: ShardStore | None) -> None:
    """Fault injection for the resume test: SRLM_KILL_RANK=PHASE:RANK makes that rank SIGKILL itself
    in that phase, its own shard computed but not saved, once another rank's shard is on disk."""
    want = os.environ.get("SRLM_KILL_RANK")
    if not want or want != f"{phase}:{rank}" or store is None:
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        others = [p for p in store.root.glob("call-*.json") if f".rank-{rank}-" not in p.name]
        if others:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)


def _to_dict(o: RequestOutput) -> dict:
    d = asdict(o)  # Logprobs become dicts too
    for c in d["outputs"]:  # JSON keys are strings: keep the token ids as pairs
        if c["logprobs"] is not None:
            c["logprobs"] = [list(step.items()) for step in c["logprobs"]]
    return d


def _from_dict(d: dict) -> RequestOutput:
    outs = []
    for c in d["outputs"]:
        if c["logprobs"] is not None:
            c = {**c, "logprobs": [{int(k): Logprob(**v) for k, v in step} for step in c["logprobs"]]}
        outs.append(CompletionOutput(**c))
    return RequestOutput(**{**d, "outputs": outs})
