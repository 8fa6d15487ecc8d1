"""LLM: the public face of the engine, shaped like vLLM's, and the life of its requests.

    llm = LLM(model="path/to/checkpoint")     # or LLM("path/to/checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=128))
    outs[0].outputs[2].text

Construction takes vLLM's arguments where they mean the same here: model, tokenizer (a directory;
default the model's), dtype ("auto", "bfloat16", "float16", "float32", "half", "float" or a torch
dtype; "auto" is srlm_engine/device.py's: bf16 on CUDA and on CPUs with native bf16, fp32
elsewhere), seed (None: a fresh one), tensor_parallel_size, enforce_eager, block_size,
max_num_seqs, max_num_batched_tokens, max_model_len (at most max_position_embeddings) and
trust_remote_code (False only: no checkpoint code is ever run). Other vLLM arguments raise a
TypeError. Its own: device (default the GPU where there is one), kv_cache_tokens (the KV cache's
size), attention_backend, num_threads, tp_group.

Contracts:
- A prompt is a string (encoded with add_special_tokens=True, as vLLM does) or a list of token ids.
- Every request is validated before any work (empty prompt, token ids outside the vocabulary,
  prompt of max_model_len tokens or more, or too long for the KV pool): ValueError naming the
  request index. max_tokens is capped so that prompt + output fits max_model_len (vLLM's
  behaviour); such an output ends with finish_reason "length".
- An exception during generation names the request(s) it concerns; the engine is then reset
  (all blocks released) and stays usable.
- The n samples of a request are n sequences; the prefix cache makes them share the prompt's full
  blocks (allocated once). Each sample has its own generator: from (seed, index) when seeded.
- The model runner (engine/model_runner.py) owns the model's inputs, forward and CUDA graphs
  (enforce_eager=True turns the graphs off); this file owns the requests.
- Tensor parallelism (tensor_parallel_size=k > 1, engine/tensor_parallel.py): inside an initialized
  torch.distributed process group of k ranks (tp_group, default the whole default group), every
  rank builds an LLM with the same arguments and calls generate with the same requests; each holds
  and reads from disk only its slice of the weights and nkv/k heads of the KV cache. The logits are
  all-gathered, so all ranks sample the same tokens and return the same outputs. Several groups
  (dist.new_group) serve as data-parallel replicas, each with its own requests. CUDA graphs are
  off under tensor parallelism: no test captures a collective in a graph.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.device import default_device, resolve_dtype
from srlm_engine.engine.blocks import BlockPool
from srlm_engine.engine.model_runner import ModelRunner
from srlm_engine.engine.outputs import CompletionOutput, Logprob, RequestOutput
from srlm_engine.engine.sampler import Sampler, SamplingParams, check_stop, make_generator, top_logprobs
from srlm_engine.engine.scheduler import Scheduled, Scheduler
from srlm_engine.engine.sequence import Sequence
from srlm_engine.model.weights import load_config, load_model
from srlm_engine.tokenizer import Tokenizer

DTYPE_NAMES = {"auto": "auto", "bfloat16": "bfloat16", "float16": "float16", "half": "float16",
               "float32": "float32", "float": "float32"}  # vLLM's names
# vLLM arguments with no meaning here, and what to use instead
NOT_HERE = {"gpu_memory_utilization": "the KV cache is sized in tokens: pass kv_cache_tokens",
            "swap_space": "preempted sequences are recomputed, never swapped out",
            "quantization": "weights load unquantized, in `dtype`"}


class LLM:
    def __init__(self, model: str | Path, *, tokenizer: str | Path | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                 seed: int | None = 0, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 block_size: int = 16, max_num_seqs: int = 128, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, kv_cache_tokens: int = 32768,
                 attention_backend: str | None = None, num_threads: int | None = None, tp_group=None,
                 trust_remote_code: bool = False, **unsupported):
        if unsupported:
            name = sorted(unsupported)[0]
            why = NOT_HERE.get(name, "not an argument of this engine (see srlm_engine/engine/llm.py)")
            raise TypeError(f"LLM: unsupported argument {name}={unsupported[name]!r}: {why}")
        if trust_remote_code:
            raise ValueError("LLM: trust_remote_code=True is refused: this engine runs its own Llama code "
                             "and never code shipped with a checkpoint")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"LLM: tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("kv_cache_tokens", kv_cache_tokens),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LLM: {name} must be a positive integer, got {v!r}")
        self.device = torch.device(device) if device is not None else default_device()
        dtype = _dtype(dtype, self.device)
        if self.device.type == "cpu":
            # one thread per core this process may use, shared by the group's ranks (on one
            # machine, the usual CPU case); more only adds contention
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(num_threads or max(1, cores // tensor_parallel_size))
        if seed is None:
            seed = torch.Generator().seed() % 2**62
        self.tp_group = None
        if tensor_parallel_size == 1 and tp_group is None:
            self.model = load_model(model, dtype=dtype, device=self.device)
            self.config = self.model.config
        else:
            from srlm_engine.engine import tensor_parallel as tp
            self.config = load_config(model)
            tp.check_divides(self.config, tensor_parallel_size)
            self.tp_group = tp.process_group(tensor_parallel_size, tp_group)
            self.model = tp.load_tensor_parallel(model, self.config, self.tp_group, dtype, self.device)
            seed = tp.broadcast_int(seed, self.tp_group)  # the unseeded requests' seeds agree too
        self.tokenizer = Tokenizer.from_pretrained(tokenizer if tokenizer is not None else model)
        longest = self.config.max_position_embeddings
        if max_model_len is not None and (not isinstance(max_model_len, int) or not 1 <= max_model_len <= longest):
            raise ValueError(f"LLM: max_model_len must be an integer in 1..{longest} (the model's "
                             f"max_position_embeddings), got {max_model_len!r}")
        self.max_model_len = max_model_len or longest
        self.pool = BlockPool.for_tokens(kv_cache_tokens, block_size)
        self.runner = ModelRunner(self.model, self.pool, dtype, self.device, attention_backend, max_num_seqs,
                                  self.max_model_len, cuda_graphs=not enforce_eager and self.tp_group is None)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler()
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self._rng = torch.Generator().manual_seed(seed)  # seeds the unseeded requests' generators
        self.num_steps = 0

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; each holds params.n CompletionOutputs."""
        prompts, params = as_requests(prompts, sampling_params)
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._generate(texts, self._encode_all(prompts), params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """generate() over one conversation ([{"role", "content"}, ...]) or a list of them, each
        rendered by the model's chat template or by `chat_template` (jinja text, sandboxed)."""
        texts = render_chats(self.tokenizer, messages, chat_template, add_generation_prompt)
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        _, params = as_requests(ids, sampling_params)
        return self._generate(texts, self._encode_all(ids), params, use_tqdm)

    def _generate(self, texts: list[str | None], ids: list[list[int]], params: list,
                  use_tqdm: bool) -> list[RequestOutput]:
        seqs = []
        for r, (toks, p) in enumerate(zip(ids, params)):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"request {r}: sampling_params must be SamplingParams, got {type(p).__name__}")
            max_tokens = self._check_lengths(r, toks, p.max_tokens)
            if p.logprobs is not None and p.logprobs > self.config.vocab_size:
                raise ValueError(f"request {r}: SamplingParams.logprobs = {p.logprobs} exceeds the vocabulary "
                                 f"of {self.config.vocab_size} tokens")
            for i in range(p.n):
                seed = p.seed if p.seed is not None else int(torch.randint(2**62, (1,), generator=self._rng))
                seqs.append(Sequence(r, i, list(toks), p, max_tokens, make_generator(seed, i)))
        self._run(seqs, use_tqdm)
        outs, k = [], 0
        for r, (text, toks, p) in enumerate(zip(texts, ids, params)):
            mine, k = seqs[k:k + p.n], k + p.n  # made in request order, then index order
            outs.append(RequestOutput(str(r), text, list(toks), [self._completion(s) for s in mine]))
        return outs

    @torch.inference_mode()
    def next_token_logprobs(self, prompts, token_ids: list[int] | None = None) -> torch.Tensor:
        """[B, V] fp32 log-softmax of the next token after each prompt (prefix cache reused);
        [B, len(token_ids)], those columns only, when `token_ids` is given."""
        prompts = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        ids = self._encode_all(prompts)
        p = SamplingParams(temperature=0, max_tokens=1)
        seqs = []
        for r, toks in enumerate(ids):
            self._check_lengths(r, toks, 1)
            seqs.append(Sequence(r, 0, list(toks), p, 1, None, keep_logprobs=True, invariant=True))
        self._run(seqs, use_tqdm=False)
        out = torch.stack([s.full_logprobs for s in seqs])
        return (out if token_ids is None else out[:, torch.tensor(token_ids, device=out.device)]).cpu()

    def stats(self) -> dict:
        return {"allocated_blocks": self.pool.allocated, "prefix_hit_tokens": self.pool.hit_tokens,
                "prefix_queried_tokens": self.pool.queried_tokens, "prefix_hit_rate": self.pool.hit_rate(),
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps,
                "backend": self.runner.backend.name,
                "cuda_graph_steps": self.runner.graphs.replays if self.runner.graphs else 0}

    # ------------------------------------------------------------------ validation
    def _encode_all(self, prompts) -> list[list[int]]:
        out = []
        for r, p in enumerate(prompts):
            if isinstance(p, str):
                toks = self.tokenizer.encode(p, add_special_tokens=True)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                toks = [int(t) for t in p]
                bad = [t for t in toks if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise ValueError(f"request {r}: token id {bad[0]} outside the vocabulary "
                                     f"(0..{self.config.vocab_size - 1})")
            else:
                raise ValueError(f"request {r}: a prompt must be a string or a list of token ids, "
                                 f"got {type(p).__name__}")
            if not toks:
                raise ValueError(f"request {r}: the prompt is empty")
            out.append(toks)
        return out

    def _check_lengths(self, r: int, toks: list[int], max_tokens: int | None) -> int:
        n = len(toks)
        if n >= self.max_model_len:
            raise ValueError(f"request {r}: prompt of {n} tokens does not fit the model's context of "
                             f"{self.max_model_len} tokens (at least one token must be generated)")
        cap = self.max_model_len - n
        max_tokens = cap if max_tokens is None else min(max_tokens, cap)
        if n + max_tokens > self.pool.capacity:
            raise ValueError(f"request {r}: prompt of {n} tokens + max_tokens {max_tokens} exceeds "
                             f"the KV cache of {self.pool.capacity} tokens (raise kv_cache_tokens)")
        return max_tokens

    # ------------------------------------------------------------------ the loop
    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        if self.tp_group is not None:
            from srlm_engine.engine.tensor_parallel import check_same_everywhere
            seeds = [s.generator.initial_seed() if s.generator is not None else None for s in seqs]
            check_same_everywhere(repr([(s.request, s.token_ids, s.params, s.max_tokens, g)
                                        for s, g in zip(seqs, seeds)]), self.tp_group)
            use_tqdm = use_tqdm and dist.get_rank(self.tp_group) == 0  # one bar per group
        for s in seqs:
            self.scheduler.add(s)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="seq")
        try:
            with torch.inference_mode():
                t0, tokens = time.perf_counter(), 0
                while self.scheduler.has_work():
                    sched = self.scheduler.schedule()
                    tokens += sum(sched.num_new)  # prompt and generated tokens computed
                    done = self._step(sched)
                    if bar is not None:
                        bar.update(done)
                        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
        except BaseException:
            self._abort()
            raise
        finally:
            if bar is not None:
                bar.close()

    def _abort(self) -> None:
        sch = self.scheduler
        for s in list(sch.running):
            sch.finish(s)
        sch.waiting.clear()
        # blocks are keyed when their step is scheduled, before the forward writes their KV: after
        # a failed step some keyed blocks hold nothing, so no cached prefix is trusted any more
        self.pool.forget_prefixes()

    def _step(self, sched: Scheduled) -> int:
        if not sched.seqs:
            raise RuntimeError("scheduler found nothing to run: the KV pool cannot hold one sequence")
        self.num_steps += 1
        step = self.runner.prepare(sched)
        for s, n in zip(sched.seqs, sched.num_new):
            s.num_computed += n
        samplers = step.samplers
        try:
            logits = self.runner.forward(step)
        except Exception as e:
            reqs = sorted({s.request for s in sched.seqs})
            raise RuntimeError(f"model step failed for request(s) {reqs}: {e}") from e
        if not samplers:
            return 0
        logits = logits.float()
        tokens, lse = self.sampler(logits, [s.params for s in samplers], [s.generator for s in samplers])
        tops = top_logprobs(logits, lse, tokens, [s.params.logprobs for s in samplers])
        chosen = (logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0] - lse).tolist()
        done = 0
        for j, s in enumerate(samplers):
            try:
                if s.keep_logprobs:
                    s.full_logprobs = logits[j] - lse[j]
                    s.finish_reason = "length"
                else:
                    s.token_ids.append(tokens[j])
                    s.cumulative_logprob += chosen[j]
                    if tops[j] is not None:
                        s.logprobs = s.logprobs if s.logprobs is not None else []
                        s.logprobs.append(tops[j])
                    s.finish_reason = check_stop(s, self.tokenizer, self.eos_ids, self.max_model_len)
            except Exception as e:
                raise RuntimeError(f"request {s.request} (sample {s.index}): {e}") from e
            if s.finish_reason is not None:
                self.scheduler.finish(s)
                done += 1
        return done

    def _completion(self, s: Sequence) -> CompletionOutput:
        # cut at a stop string: the incrementally decoded text; else decode the whole output once,
        # without the text of a stop token (EOS or stop_token_ids) unless asked, as vLLM does
        ids = s.output_ids
        if s.finish_reason == "stop" and s.stop_text_end is None and not s.params.include_stop_str_in_output:
            ids = ids[:-1]
        text = s.text if s.stop_text_end is not None else self.tokenizer.decode(ids)
        logprobs = None
        if s.logprobs is not None:
            words: dict[int, str] = {}
            for step in s.logprobs:
                for t in step:
                    if t not in words:
                        words[t] = self.tokenizer.decode([t], skip_special_tokens=False)
            logprobs = [{t: Logprob(lp, rank, words[t]) for t, (lp, rank) in step.items()} for step in s.logprobs]
        return CompletionOutput(s.index, text, list(s.output_ids), s.cumulative_logprob, logprobs,
                                s.finish_reason, s.stop_reason)


def render_chats(tokenizer: Tokenizer, messages, chat_template: str | None = None,
                 add_generation_prompt: bool = True) -> list[str]:
    """The prompt texts of one conversation (a list of {"role", "content"} dicts) or of a list of
    them, rendered by the tokenizer's chat template or by `chat_template`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat: messages must be a conversation (a non-empty list of "
                         f"{{'role', 'content'}} dicts) or a list of them, got {messages!r:.80}")
    convs = [messages] if isinstance(messages[0], dict) else list(messages)
    for i, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"chat: conversation {i} must be a non-empty list of {{'role', 'content'}} "
                             f"dicts, got {conv!r:.80}")
    return [tokenizer.apply_chat_template(list(c), add_generation_prompt, chat_template=chat_template)
            for c in convs]


def as_requests(prompts, sampling_params=None) -> tuple[list, list]:
    """generate()'s arguments as two lists of one length: the prompts (texts or token-id lists)
    and one SamplingParams per prompt (a single one, or None for the defaults, serves them all)."""
    prompts = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
    params = sampling_params if sampling_params is not None else SamplingParams()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
    return prompts, list(params)


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(t, int) for t in p)


def _dtype(dtype, device: torch.device) -> torch.dtype:
    """vLLM's dtype argument (a name or a torch dtype) -> the torch dtype on `device`."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return resolve_dtype(DTYPE_NAMES[dtype], device)
    raise ValueError(f"LLM: dtype must be one of {', '.join(DTYPE_NAMES)} or torch.float32, torch.bfloat16, "
                     f"torch.float16, got {dtype!r}")
