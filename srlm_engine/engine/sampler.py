"""Sampling: SamplingParams (vLLM's fields and defaults), the batched sampler, per-request seeds.

Order of the logits processors, as vLLM's V0 sampler: temperature, then top-k, then top-p,
then min-p; all batched over rows with per-row parameters as tensors. A row with temperature 0
is greedy (argmax of the raw logits, first index on ties, as torch and transformers do).

Randomness: every sequence owns a torch.Generator. A random row samples by the exponential race
argmax(p_i / E_i), E_i ~ Exp(1) drawn from the row's own generator, which is a draw from p and
depends on nothing else in the batch; so a request with a seed gives the same tokens whatever it
is batched with. Reported log-probs are those of the raw model distribution (before temperature
and filtering), as vLLM reports them by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What to generate for one prompt; fields and defaults follow vLLM's SamplingParams."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            bad("temperature", "a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "-1 or 0 (off) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1 (or None: up to the model's context)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "None or an integer >= 0")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            bad("stop", "a non-empty string or a list of them")
        self.stop_list = stop
        ids = self.stop_token_ids or []
        if not all(_is_int(i) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of token ids")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_generator(seed: int | None, index: int) -> torch.Generator:
    """The generator of sample `index` of a request: from (seed, index) if seeded, else fresh."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        # Distinct, reproducible streams per sample; a plain mix keeps it independent of batching.
        g.manual_seed((seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63))
    return g


CANDIDATES = 256  # top-k / top-p look at this many best tokens first; the full sort is the fallback


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Scaled, filtered logits [R, V]; removed entries are -inf.

    logits [R, V] fp32; temperature [R] (> 0 for every row passed here); top_k [R] int64
    (<= 0: off); top_p [R] in (0, 1]; min_p [R] in [0, 1]. top-k keeps the k largest (ties at the
    k-th value kept too); top-p keeps the smallest prefix of the sorted distribution (after top-k)
    whose mass reaches p (always at least the top token); min-p keeps tokens with
    p >= min_p * max p.

    Speed: sorting 49k logits per row dominated a decode step, so rows are first filtered over
    their CANDIDATES best tokens, which is exact when top-k <= CANDIDATES or those tokens hold at
    least top_p of the mass; other rows take the full sort. The choice is per row, so a row's
    result never depends on the rest of the batch."""
    x = logits / temperature[:, None]
    V = x.shape[1]
    rows = ((top_k > 0) | (top_p < 1)).nonzero()[:, 0]
    if len(rows):
        xs, k, p = x[rows], top_k[rows], top_p[rows]
        K = min(V, CANDIDATES)
        vals, order = xs.topk(K, dim=-1)
        lse = xs.logsumexp(-1)
        kept, mass = _sorted_filter(vals, k, p, lse)
        exact = ((k > 0) & (k <= K)) | (mass >= p)
        out = torch.full_like(xs, float("-inf")).scatter(1, order, kept)
        slow = (~exact).nonzero()[:, 0]
        if len(slow):
            vals, order = xs[slow].sort(dim=-1, descending=True)
            kept, _ = _sorted_filter(vals, k[slow], p[slow], lse[slow])
            out[slow] = torch.full_like(vals, float("-inf")).scatter(1, order, kept)
        x = x.index_copy(0, rows, out)
    if bool((min_p > 0).any()):
        probs = x.softmax(dim=-1)
        keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        x = x.masked_fill(~keep, float("-inf"))
    return x


def _sorted_filter(vals, k, p, lse):
    """Top-k then top-p on descending values [R, C] (the best C of each row; lse: logsumexp of
    the whole row). Returns (filtered values, mass the C candidates hold after top-k)."""
    C = vals.shape[1]
    on = (k > 0) & (k <= C)
    kth = vals.gather(1, (torch.where(on, k, torch.full_like(k, C)) - 1)[:, None])
    vals = torch.where(on[:, None] & (vals < kth), float("-inf"), vals)
    # with top-k on, the distribution renormalizes over the k kept tokens (all among the C)
    norm = torch.where(on, vals.logsumexp(-1), lse)
    probs = (vals - norm[:, None]).exp()
    csum = probs.cumsum(dim=-1)
    before = csum - probs  # mass strictly before each token; keep while it is < p
    return vals.masked_fill(before >= p[:, None], float("-inf")), csum[:, -1]


class Sampler:
    """Samples one token per row. Rows carry their SamplingParams and generator."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator]) -> tuple[list[int], torch.Tensor]:
        """logits [R, V] -> (token ids [R] as a list, raw log-probs [R, V] fp32)."""
        logits = logits.float()
        logprobs = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            sub = [params[i] for i in rand]
            dev = logits.device
            x = filter_logits(
                logits[rand],
                torch.tensor([p.temperature for p in sub], dtype=torch.float32, device=dev),
                torch.tensor([p.top_k for p in sub], dtype=torch.int64, device=dev),
                torch.tensor([p.top_p for p in sub], dtype=torch.float32, device=dev),
                torch.tensor([p.min_p for p in sub], dtype=torch.float32, device=dev))
            # Inverse CDF: one uniform per row from that row's own generator (a draw over the
            # whole vocabulary per row cost ~1 ms each). side="right" never lands on a token of
            # zero probability: it returns the first index whose cumulative mass exceeds u.
            cdf = x.softmax(dim=-1).cumsum(dim=-1)
            # the generators are CPU generators: the same draws on any device
            u = torch.stack([torch.rand((), generator=generators[i]) for i in rand]).to(dev)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right")[:, 0]
            tokens[rand] = pick.clamp_max(cdf.shape[1] - 1)
        return tokens.tolist(), logprobs


def top_logprobs(logprobs: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[dict | None]:
    """Per row, {token_id: logprob} for the top-k plus the sampled token (None where k is None)."""
    out: list[dict | None] = [None] * len(tokens)
    want = [i for i, k in enumerate(ks) if k is not None]
    if not want:
        return out
    kmax = max(ks[i] for i in want)
    if kmax > 0:
        vals, idx = logprobs[want].topk(kmax, dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
    for j, i in enumerate(want):
        d = {}
        if ks[i] > 0:
            d = dict(zip(idx[j][:ks[i]], vals[j][:ks[i]]))
        d[tokens[i]] = float(logprobs[i, tokens[i]])
        out[i] = d
    return out


def check_stop(seq, tokenizer, eos_ids: set[int], max_model_len: int) -> str | None:
    """After seq's newest token: "stop", "length" or None. Stop strings are searched in text
    decoded incrementally (vLLM's prefix/read offsets: only a few tail tokens are decoded per
    step); on a hit seq.text is cut at the stop string (kept if include_stop_str_in_output)."""
    p, tok = seq.params, seq.token_ids[-1]
    if (tok in eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
        return "stop"
    if p.stop_list and _append_text(seq, tokenizer):
        return "stop"
    if len(seq.token_ids) - seq.num_prompt >= seq.max_tokens or len(seq.token_ids) >= max_model_len:
        return "length"
    return None


def _append_text(seq, tokenizer) -> bool:
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset])
    new = tokenizer.decode(ids[seq.prefix_offset:])
    if len(new) <= len(prefix) or new.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait
        return False
    old_len = len(seq.text)
    seq.text += new[len(prefix):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    for s in seq.params.stop_list:
        j = seq.text.find(s, max(0, old_len - len(s) + 1))  # only where the new text can complete it
        if j >= 0:
            seq.text = seq.text[:j + len(s) if seq.params.include_stop_str_in_output else j]
            seq.stop_text_end = len(seq.text)
            return True
    return False
