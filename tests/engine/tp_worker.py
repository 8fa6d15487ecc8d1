"""One rank of the tensor-parallel tests (test_tensor_parallel.py), started by torch.distributed.run:

    python -m torch.distributed.run --nproc-per-node W --master-port P tp_worker.py SPEC.json OUT

The W ranks form W / k tensor-parallel groups of k consecutive ranks (the whole default group when
W == k); group g is a data-parallel replica serving SPEC["prompts"][g]. Each rank builds
LLM(model, tensor_parallel_size=k) over every checkpoint of SPEC["models"], runs `run_requests`,
and writes what it got and what it holds to OUT/rank{R}.json. SPEC["refuse"] lists (model, size)
pairs that LLM(model, tensor_parallel_size=size) over the default group must refuse; their
messages are written too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)
SAMPLED = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=24)
UNSEEDED = SamplingParams(temperature=0.8, max_tokens=12)  # seeds from the LLM's own generator


def run_requests(llm: LLM, prompts: list[list[int]]) -> dict:
    """What the tests compare: greedy, seeded and unseeded samples, next-token log-probabilities.
    The reference (one process) calls this too, so both draw the unseeded seeds in the same order."""
    out = {}
    for name, params in (("greedy", GREEDY), ("sampled", SAMPLED), ("unseeded", UNSEEDED)):
        res = llm.generate(prompts, params, use_tqdm=False)
        out[name] = [[(c.token_ids, c.finish_reason, c.cumulative_logprob) for c in r.outputs] for r in res]
    out["next_token_logprobs"] = llm.next_token_logprobs(prompts).tolist()
    return out


def holdings(llm: LLM) -> dict:
    """The shapes and bytes this rank's model and KV cache hold."""
    from srlm_engine.engine.linear import SmallBatchLinear

    params = dict(llm.model.named_parameters())  # a tied lm_head is the embedding: counted once
    return {"shapes": {k: list(v.shape) for k, v in params.items()},
            "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "kv_cache_shape": list(llm.runner.cache.k[0].shape),
            "backend": llm.runner.backend.name,
            "small_batch_linears": sum(isinstance(m, SmallBatchLinear) for m in llm.model.modules())}


def main(spec_file: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo")
    rank, world, k = dist.get_rank(), dist.get_world_size(), spec["tp"]
    # every rank creates every group, in the same order (dist.new_group is collective)
    groups = [dist.new_group(list(range(g, g + k))) for g in range(0, world, k)] if world > k else [None]
    replica = rank // k
    result = {"rank": rank, "replica": replica, "models": {}, "refused": []}
    for name, model_dir in spec["models"].items():
        # seed differs per rank on purpose: the group takes its rank 0's
        llm = LLM(model_dir, device="cpu", tensor_parallel_size=k, tp_group=groups[replica], num_threads=1,
                  kv_cache_tokens=1024, seed=rank)
        result["models"][name] = {**run_requests(llm, spec["prompts"][replica]), **holdings(llm)}
    for model_dir, size in spec["refuse"]:
        try:
            LLM(model_dir, device="cpu", tensor_parallel_size=size, num_threads=1)
            result["refused"].append(None)
        except ValueError as e:
            result["refused"].append(str(e))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
