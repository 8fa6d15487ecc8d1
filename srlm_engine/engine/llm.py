"""LLM: the public face of the engine, shaped like vLLM's.

    llm = LLM(model_dir)
    outs = llm.generate(["Hello"], SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=128))
    outs[0].outputs[2].text

Contracts:
- A prompt is a string (encoded with add_special_tokens=True, as vLLM does) or a list of token ids.
- Every request is validated before any work (empty prompt, token ids outside the vocabulary,
  prompt of max_position_embeddings tokens or more, or too long for the KV pool): ValueError naming
  the request index. max_tokens is capped so that prompt + output fits max_position_embeddings
  (vLLM's behaviour at max_model_len); such an output ends with finish_reason "length".
- An exception during generation names the request(s) it concerns; the engine is then reset
  (all blocks released) and stays usable.
- The n samples of a request are n sequences; the prefix cache makes them share the prompt's full
  blocks (allocated once). Each sample has its own generator: from (seed, index) when seeded.
- Devices: on CPU with srlm_engine._C built, the C++ paged attention and small-batch linear
  (engine/linear.py); on CUDA, the Triton paged attention, one SDPA call for a step's prefills,
  and CUDA graphs for decode steps (engine/cuda_graph.py; enforce_eager=True turns them off).
- Tensor parallelism (tensor_parallel_size=k > 1, engine/tensor_parallel.py): inside an initialized
  torch.distributed process group of k ranks (tp_group, default the whole default group), every
  rank builds an LLM with the same arguments and calls generate with the same requests; each holds
  and reads from disk only its slice of the weights and nkv/k heads of the KV cache. The logits are
  all-gathered, so all ranks sample the same tokens and return the same outputs. Several groups
  (dist.new_group) serve as data-parallel replicas, each with its own requests. CUDA graphs are
  off under tensor parallelism: captured collectives are untested here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.engine.attention import KVCache, PagedAttention, StepMetadata, select_backend
from srlm_engine.engine.blocks import BlockPool
from srlm_engine.engine.sampler import Sampler, SamplingParams, check_stop, make_generator, top_logprobs
from srlm_engine.engine.scheduler import Scheduled, Scheduler, Sequence
from srlm_engine.model.weights import load_config, load_model
from srlm_engine.tokenizer import Tokenizer

# A step that computes prompt tokens runs every linear layer on at least MIN_ROWS rows: below about
# 12 rows the CPU matmul takes another path whose sums round differently, and a prompt's logits
# would depend on how many other tokens shared its step (see attention.INVARIANT_KV).
MIN_ROWS = 16


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 block_size: int = 16, max_num_seqs: int = 128, kv_cache_tokens: int = 32768,
                 max_num_batched_tokens: int = 2048, attention_backend: str | None = None,
                 num_threads: int | None = None, seed: int = 0, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, tp_group=None):
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"LLM: tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        if torch.device(device).type == "cpu":
            # one thread per core this process may use, shared by the group's ranks (on one
            # machine, the usual CPU case); more only adds contention
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(num_threads or max(1, cores // tensor_parallel_size))
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("kv_cache_tokens", kv_cache_tokens),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LLM: {name} must be a positive integer, got {v!r}")
        self.tp_group = None
        if tensor_parallel_size == 1 and tp_group is None:
            self.model = load_model(model_dir, dtype=dtype, device=device)
            self.config = self.model.config
        else:
            from srlm_engine.engine import tensor_parallel as tp
            self.config = load_config(model_dir)
            tp.check_divides(self.config, tensor_parallel_size)
            self.tp_group = tp.process_group(tensor_parallel_size, tp_group)
            self.model = tp.load_tensor_parallel(model_dir, self.config, self.tp_group, dtype, device)
            seed = tp.broadcast_int(seed, self.tp_group)  # the unseeded requests' seeds agree too
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model.config  # this rank's: its kv heads size the KV cache
        self.max_model_len = cfg.max_position_embeddings
        self.device = torch.device(device)
        num_blocks = -(-kv_cache_tokens // block_size)
        self.pool = BlockPool(num_blocks, block_size)
        self.cache = KVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                             cfg.head_dim, dtype, device)
        self.scale = cfg.head_dim ** -0.5
        self.backend = select_backend(self.device, block_size, attention_backend)
        if self.backend.name == "cpp":  # the extension is there: small-batch decode streams weights
            from srlm_engine.engine.linear import use_small_batch_linear
            use_small_batch_linear(self.model)
        # CUDA graphs for decode steps (vLLM's default; enforce_eager=True turns them off)
        self.graphs = None
        if (self.device.type == "cuda" and not enforce_eager and self.backend.name == "triton"
                and self.tp_group is None):
            from srlm_engine.engine.cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(self.model, self.backend, self.cache, self.scale, max_num_seqs,
                                       -(-self.max_model_len // block_size))
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
        ids = self._encode_all(prompts)
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
        for r, (prompt, toks, p) in enumerate(zip(prompts, ids, params)):
            mine, k = seqs[k:k + p.n], k + p.n  # made in request order, then index order
            outs.append(RequestOutput(r, prompt if isinstance(prompt, str) else None, list(toks),
                                      [self._completion(s) for s in mine]))
        return outs

    def chat(self, messages: list[list[dict]], sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """generate() over conversations rendered by the model's chat template."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        ids = [self.tokenizer.encode(self.tokenizer.apply_chat_template(m, add_generation_prompt),
                                     add_special_tokens=False) for m in messages]
        return self.generate(ids, sampling_params, use_tqdm)

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
            seqs.append(Sequence(r, 0, list(toks), p, 1, None, keep_logprobs=True))
        self._run(seqs, use_tqdm=False)
        out = torch.stack([s.full_logprobs for s in seqs])
        return (out if token_ids is None else out[:, torch.tensor(token_ids, device=out.device)]).cpu()

    def stats(self) -> dict:
        return {"allocated_blocks": self.pool.allocated, "prefix_hit_tokens": self.pool.hit_tokens,
                "prefix_queried_tokens": self.pool.queried_tokens, "prefix_hit_rate": self.pool.hit_rate(),
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps,
                "backend": self.backend.name, "cuda_graph_steps": self.graphs.replays if self.graphs else 0}

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
        pool_tokens = self.pool.num_blocks * self.pool.block_size
        if n + max_tokens > pool_tokens:
            raise ValueError(f"request {r}: prompt of {n} tokens + max_tokens {max_tokens} exceeds "
                             f"the KV cache of {pool_tokens} tokens (raise kv_cache_tokens)")
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
        step = self._prepare(sched)
        samplers = step[-1]
        try:
            logits = self._forward(sched, *step)
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
                        s.logprobs = (s.logprobs or []) + [tops[j]]
                    s.finish_reason = check_stop(s, self.tokenizer, self.eos_ids, self.max_model_len)
            except Exception as e:
                raise RuntimeError(f"request {s.request} (sample {s.index}): {e}") from e
            if s.finish_reason is not None:
                self.scheduler.finish(s)
                done += 1
        return done

    def _forward(self, sched: Scheduled, ids, pos, slots, ctx, tables, q_starts, q_lens, sample_rows,
                 samplers) -> torch.Tensor | None:
        """Logits [len(samplers), V] of the step's sampling rows (None if none samples)."""
        if self.graphs is not None and len(samplers) == len(ids) and self.graphs.fits(len(ids)):
            # one token per sequence and every row samples: a pure decode step
            return self.graphs.run(ids, pos, slots, tables, ctx)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = StepMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            num_decode=sched.num_decode, query_starts=q_starts, query_lens=q_lens, ctx_lens=ctx)
        attend = PagedAttention(self.backend, self.cache, meta, self.scale)
        rows = len(ids)
        if q_starts and rows < MIN_ROWS:  # pad rows: never written to the cache, dropped after
            ids, pos = ids + [0] * (MIN_ROWS - rows), pos + [0] * (MIN_ROWS - rows)
        h = self.model.hidden_states(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                                     attend=attend)
        if not samplers:
            return None
        if q_starts and len(sample_rows) < MIN_ROWS:
            sample_rows = sample_rows + [sample_rows[-1]] * (MIN_ROWS - len(sample_rows))
        return self.model.logits(h[torch.tensor(sample_rows, device=dev)])[:len(samplers)]

    def _prepare(self, sched: Scheduled):
        """The step as lists: packed ids and positions, cache slots, context lengths, block
        tables, the prefill sequences' rows, and which rows sample (and whose they are)."""
        bs = self.pool.block_size
        ids, pos, slots, ctx, tables = [], [], [], [], []
        q_starts, q_lens, sample_rows, samplers = [], [], [], []
        for i, (s, n) in enumerate(zip(sched.seqs, sched.num_new)):
            start, end = s.num_computed, s.num_computed + n
            if i >= sched.num_decode:
                q_starts.append(len(ids))
                q_lens.append(n)
            ids += s.token_ids[start:end]
            pos += range(start, end)
            bt = s.block_table
            slots += [-1 if p < s.num_shared else bt[p // bs] * bs + p % bs for p in range(start, end)]
            ctx.append(end)
            tables.append(bt)
            s.num_computed = end
            if end == s.num_tokens:  # the chunk reaches the last token: sample from it
                sample_rows.append(len(ids) - 1)
                samplers.append(s)
        return ids, pos, slots, ctx, tables, q_starts, q_lens, sample_rows, samplers

    def _completion(self, s: Sequence) -> CompletionOutput:
        # cut at a stop string: the incrementally decoded text; else decode the whole output once,
        # without the text of a stop token (EOS or stop_token_ids) unless asked, as vLLM does
        ids = s.output_ids
        if s.finish_reason == "stop" and s.stop_text_end is None and not s.params.include_stop_str_in_output:
            ids = ids[:-1]
        text = s.text if s.stop_text_end is not None else self.tokenizer.decode(ids)
        return CompletionOutput(s.index, text, list(s.output_ids), s.finish_reason,
                                s.cumulative_logprob, s.logprobs)


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
