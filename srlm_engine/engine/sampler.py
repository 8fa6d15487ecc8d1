"""Sampling: SamplingParams (vLLM's fields and defaults), the batched sampler, per-request seeds.

Order of the logits processors, as vLLM's V0 sampler: temperature, then top-k, then top-p,
then min-p; all batched over rows with per-row parameters as tensors. A row with temperature below
GREEDY_BELOW (vLLM's 1e-5) is greedy: argmax of the raw logits, first index on ties, as torch and
transformers do (dividing by a tinier temperature would overflow the logits to inf and NaN).

Randomness: every sequence owns a torch.Generator. A random row samples by inverse CDF over its
filtered distribution in vocabulary order, with one uniform drawn from the row's own generator;
every step is per row, so a request with a seed gives the same tokens whatever it is batched
with. Reported log-probs are those of the raw model distribution (before temperature and
filtering), as vLLM reports them by default.

Speed: one C++ pass per row (csrc/sampling.cpp, PyTorch reference sampling_stats_reference) gives
the argmax, both log-sum-exps and, for top-p rows, the few tokens that can survive the filters;
those rows filter and draw among them. Other rows take the whole-vocabulary path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS


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
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            bad("stop", "a non-empty string or a list of them")
        self.stop_list = list(stop)
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of token ids")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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
    their CANDIDATES best tokens, which is exact when top-k <= CANDIDATES, or when top-k is off
    and those tokens hold at least top_p of the mass; other rows take the full sort. The choice is per row, so a row's
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
        # a top-k between K and V renormalizes over tokens beyond the candidates before top-p:
        # only the full sort knows that mass, however much the candidates hold
        exact = ((k > 0) & (k <= K)) | (((k <= 0) | (k >= V)) & (mass >= p))
        out = torch.full_like(xs, float("-inf")).scatter(1, order, kept)
        slow = (~exact).nonzero()[:, 0]
        if len(slow):
            vals, order = xs[slow].sort(dim=-1, descending=True)
            kept, _ = _sorted_filter(vals, k[slow], p[slow], lse[slow])
            out[slow] = torch.full_like(vals, float("-inf")).scatter(1, order, kept)
        x = x.index_copy(0, rows, out)
    return _min_p(x, min_p)


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


# Most candidates a row may have for the candidate path (sampling_stats): SmolLM2's answers and
# judgments at temperature 0.7, top_p 0.9 have a median of ~160, and 6% of rows pass 1024 (they
# take the whole-row path). Every row is padded to this width, not to the batch's longest, so a
# row's sums run over the same elements in the same order whatever it is batched with.
CAPACITY = 1024


def sampling_stats_reference(logits: torch.Tensor, temperature: torch.Tensor, min_prob: torch.Tensor,
                             capacity: int):
    """PyTorch reference of torch.ops.srlm_C.sampling_stats (csrc/sampling.cpp), used where the
    op is not built or the logits are not on the CPU. logits [R, V] fp32, temperature [R] > 0,
    min_prob [R] in [0, 1] -> (argmax [R], lse [R], lse_t [R], vals [R, capacity], ids [R, capacity],
    count [R]): first argmax, log-sum-exp of the logits and of logits / temperature, and the tokens
    whose probability at temperature is >= min_prob as (value / temperature, id) sorted by value
    descending (ties by id), padded with (-inf, -1); count -1 when more than capacity."""
    R, V = logits.shape
    x = logits / temperature[:, None]
    lse_t = x.logsumexp(-1)
    vals = torch.full((R, capacity), float("-inf"), device=logits.device)
    ids = torch.full((R, capacity), -1, dtype=torch.int64, device=logits.device)
    count = torch.zeros(R, dtype=torch.int64, device=logits.device)
    want = (min_prob > 0).nonzero()[:, 0]
    if len(want):
        k = min(V, capacity + 1)  # one more than fits, to tell an overflow
        top_v, top_i = x[want].topk(k, dim=-1)
        # descending by value, ties by id: ids ascending, then a stable sort by value
        top_i, order = top_i.sort(dim=-1)
        top_v, order = top_v.gather(1, order).sort(dim=-1, descending=True, stable=True)
        top_i = top_i.gather(1, order)
        keep = top_v >= (lse_t[want] + min_prob[want].log())[:, None]
        n = keep.sum(-1)
        fits = n <= capacity
        c = min(capacity, k)
        vals[want, :c] = torch.where(keep & fits[:, None], top_v, float("-inf"))[:, :c]
        ids[want, :c] = torch.where(keep & fits[:, None], top_i, -1)[:, :c]
        count[want] = torch.where(fits, n, -1)
    return logits.argmax(-1), logits.logsumexp(-1), lse_t, vals, ids, count


def sampling_stats(logits, temperature, min_prob, capacity):
    """torch.ops.srlm_C.sampling_stats on CPU when srlm_engine._C is built, else the reference."""
    if logits.device.type == "cpu" and _have_op():
        return torch.ops.srlm_C.sampling_stats(logits, temperature, min_prob, capacity)
    return sampling_stats_reference(logits, temperature, min_prob, capacity)


@functools.cache
def _have_op() -> bool:
    try:
        import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C
    except ImportError:
        return False
    return True


def candidate_floor(p: SamplingParams, vocab: int) -> float:
    """A probability below which the row's filters keep no token (0: no such bound is known).

    With top_p < 1, the tokens of probability under (1 - p) / V together hold less than 1 - p, so
    the prefix that top-p keeps ends above them; top-k first only shrinks what top-p sees (the
    sampler checks that the candidates include the k best). Half of it, for rounding."""
    if p.greedy or p.top_p >= 1:
        return 0.0
    return 0.5 * (1.0 - p.top_p) / vocab


class Sampler:
    """Samples one token per row. Rows carry their SamplingParams and generator.

    A random row draws by inverse CDF in vocabulary order with one uniform from its own
    generator, over either its candidates (sampling_stats; exact for top-p rows, see
    candidate_floor) or, for the rest, the whole filtered row (filter_logits)."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator]) -> tuple[list[int], torch.Tensor]:
        """logits [R, V] -> (token ids [R] as a list, log-sum-exp [R] fp32 of each raw row:
        the raw log-probs, before temperature and filtering, are logits - lse)."""
        logits = logits.float().contiguous()
        R, V = logits.shape
        dev = logits.device
        temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32)
        floor = torch.tensor([candidate_floor(p, V) for p in params], dtype=torch.float32)
        argmax, lse, lse_t, vals, ids, count = sampling_stats(logits, temp.to(dev), floor.to(dev), CAPACITY)
        tokens = argmax.tolist()
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if not rand:
            return tokens, lse
        # the generators are CPU generators: the same draws on any device
        u = {i: torch.rand((), generator=generators[i]) for i in rand}
        count = count.tolist()
        fast = [i for i in rand if count[i] > 0 and params[i].top_k <= count[i]]
        slow = sorted(set(rand) - set(fast))
        for rows, pick in ((fast, self._from_candidates), (slow, self._from_row)):
            if rows:
                sub = [params[i] for i in rows]
                k = torch.tensor([p.top_k for p in sub], dtype=torch.int64, device=dev)
                top_p = torch.tensor([p.top_p for p in sub], dtype=torch.float32, device=dev)
                min_p = torch.tensor([p.min_p for p in sub], dtype=torch.float32, device=dev)
                r = torch.tensor(rows, device=dev)
                uu = torch.stack([u[i] for i in rows]).to(dev)
                got = pick(logits, r, vals, ids, lse_t, temp.to(dev), k, top_p, min_p, uu)
                for i, t in zip(rows, got.tolist()):
                    tokens[i] = t
        return tokens, lse

    @staticmethod
    def _from_candidates(logits, r, vals, ids, lse_t, temp, k, top_p, min_p, u):
        kept, _ = _sorted_filter(vals[r], k, top_p, lse_t[r])
        return _draw(_min_p(kept, min_p), ids[r], u)

    @staticmethod
    def _from_row(logits, r, vals, ids, lse_t, temp, k, top_p, min_p, u):
        x = filter_logits(logits[r], temp[r], k, top_p, min_p)
        return _draw(x, None, u)


def _min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p on filtered values [R, C] (-inf = removed): keeps p >= min_p * max p."""
    if not bool((min_p > 0).any()):
        return x
    probs = x.softmax(dim=-1)
    keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(~keep, float("-inf"))


def _draw(x: torch.Tensor, ids: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """One token per row of filtered values x [R, C] (-inf = removed) over token ids [R, C]
    (None: x is the whole vocabulary): the first token, in vocabulary order, whose cumulative
    probability exceeds u [R] * total (inverse CDF)."""
    if ids is not None:  # kept candidates first, in vocabulary order
        order = torch.where(torch.isinf(x), torch.iinfo(torch.int64).max, ids).argsort(dim=-1)
        x, ids = x.gather(1, order), ids.gather(1, order)
    cdf = x.softmax(dim=-1).cumsum(dim=-1)
    # side="right" skips tokens of zero probability; u * total rounding up to the total would
    # land past the last kept token, which the clamp prevents
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right")[:, 0]
    last = cdf.shape[1] - 1 - (~torch.isinf(x)).flip(-1).int().argmax(-1)  # last kept position
    pick = torch.minimum(pick, last)
    return pick if ids is None else ids.gather(1, pick[:, None])[:, 0]


def top_logprobs(logits: torch.Tensor, lse: torch.Tensor, tokens: list[int],
                 ks: list[int | None]) -> list[dict | None]:
    """Per row, {token_id: (logprob, rank)} for the sampled token and the top-k (None where k is
    None); raw log-probs, logits [R, V] - lse [R]. Ranks are 1-based as vLLM's: the top-k are
    1..k; the sampled token, where it is not among them, counts the tokens whose log-prob is >=
    its own (itself included)."""
    out: list[dict | None] = [None] * len(tokens)
    want = [i for i, k in enumerate(ks) if k is not None]
    if not want:
        return out
    rows = logits[want] - lse[want][:, None]  # [W, V] raw log-probs
    chosen = rows.gather(1, torch.tensor([tokens[i] for i in want], device=rows.device)[:, None])
    ranks = (rows >= chosen).sum(-1).tolist()
    chosen = chosen[:, 0].tolist()
    kmax = max(ks[i] for i in want)
    if kmax > 0:
        vals, idx = rows.topk(kmax, dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
    for j, i in enumerate(want):
        d = {tokens[i]: (chosen[j], ranks[j])}
        for r in range(ks[i]):
            d[idx[j][r]] = (vals[j][r], r + 1)
        out[i] = d
    return out


def check_stop(seq, tokenizer, eos_ids: set[int], max_model_len: int) -> str | None:
    """After seq's newest token: "stop", "length" or None. Stop strings are searched in text
    decoded incrementally (vLLM's prefix/read offsets: only a few tail tokens are decoded per
    step); on a hit seq.text is cut at the stop string (kept if include_stop_str_in_output).
    seq.stop_reason becomes the stop token id or stop string that ended it (None for EOS), as
    vLLM's."""
    p, tok = seq.params, seq.token_ids[-1]
    if tok in eos_ids and not p.ignore_eos:
        return "stop"
    if tok in p.stop_token_ids:
        seq.stop_reason = tok
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
            seq.stop_reason = s
            return True
    return False
