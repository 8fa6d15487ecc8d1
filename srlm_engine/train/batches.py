"""Records -> token ids with loss masks -> right-padded micro-batches.

SFT record (any form of data.py: messages, or prompt + completion, as strings or message lists):
the conversation (`data.sft_conversation`) is rendered with the model's chat template and cut into
segments at every trained assistant turn (every one of a "messages" record, those of the
completion of a prompt-completion one). For assistant message i,
    P_i = render(messages[:i], add_generation_prompt=True)      text before the reply
    Q_i = render(messages[:i + 1], add_generation_prompt=False)  text through the reply's end
must both be prefixes of the whole rendering (checked; a template where they are not is an
error, never a guess). The reply span is text[len(P_i):len(Q_i)] without trailing whitespace, so
it holds the content and the end-of-turn token (<|im_end|> for SmolLM2) the model must learn to
emit. Each segment is tokenized on its own: the prompt's tokens are exactly those generation
sees (the engine tokenizes P_i and the model continues from there).

Pair record (any form of data.py: strings, conversational, implicit prompt): `data.pair_conversations`
gives the prompt messages P (a string prompt is [user: prompt]) and each response as one assistant
message. Each response is the reply span of the conversation P + [assistant: response], cut exactly
as SFT cuts it, so DPO trains the same end-of-turn token SFT taught (<|eot_id|> for Llama 3, which is
not its tokenizer's eos_token); the prompt is render(P, add_generation_prompt=True), what generation
sees. Loss on the response.

Truncation to max_seq_len L (counted in `Encoded.truncated`): the text before the last trained
span is the prompt, the rest the response. The response keeps its head, at least
min(len(response), L // 2) tokens; the prompt keeps its tail in what is left. For a pair, the
longer response decides the prompt's cut, so chosen and rejected share one prompt.

Batching: the order of samples is a stream of per-epoch permutations (seeded by seed + epoch),
and global batch s is stream[s * G:(s + 1) * G]; it depends on G, never on the number of
processes. Inside a global batch, samples are sorted by length (length buckets: each
micro-batch pads to the longest of similar lengths) and cut into W * A micro-batches; micro-batch
k goes to rank k % W at accumulation step k // W.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from srlm_engine.data import pair_conversations, sft_conversation
from srlm_engine.io import DataError
from srlm_engine.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Encoded:
    """Token ids and a per-token "trained" mask for every sample (DPO: chosen and rejected)."""
    ids: list[list[int]] = field(default_factory=list)       # SFT: one per record
    mask: list[list[bool]] = field(default_factory=list)
    rejected_ids: list[list[int]] = field(default_factory=list)  # DPO only
    rejected_mask: list[list[bool]] = field(default_factory=list)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def length(self, i: int) -> int:
        return max(len(self.ids[i]), len(self.rejected_ids[i]) if self.rejected_ids else 0)


def _cut(prompt: list, responses: list[list], max_len: int) -> tuple[int, list[int]]:
    """-> (prompt tokens to keep from its tail, tokens to keep from each response's head)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_len:
        return len(prompt), [len(r) for r in responses]
    r_keep = min(longest, max(max_len - len(prompt), max_len // 2))
    p_keep = min(len(prompt), max_len - r_keep)
    return p_keep, [min(len(r), max_len - p_keep) for r in responses]


def _prefix(full: str, part: str, what: str) -> int:
    if not full.startswith(part):
        raise ValueError(f"the chat template does not render {what} as a prefix of the whole "
                         f"conversation; assistant spans cannot be located exactly")
    return len(part)


def sft_segments(tok: Tokenizer, messages: list[dict], first: int = 0) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into (text, trained) segments, the assistant turns from
    message `first` on trained; their concatenation is the whole rendering."""
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    segs, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        start = _prefix(full, tok.apply_chat_template(messages[:i], add_generation_prompt=True),
                        f"the prompt before message {i}") if i else 0
        end = _prefix(full, tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False),
                      f"messages[:{i + 1}]")
        end = start + len(full[start:end].rstrip())
        if start < pos or end <= start:
            raise ValueError(f"assistant message {i} renders to an empty or overlapping span")
        segs += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segs.append((full[pos:], False))
    return [(t, m) for t, m in segs if t]


def encode_sft(tok: Tokenizer, records: list[dict], max_seq_len: int) -> Encoded:
    out = Encoded()
    for n, rec in enumerate(records):
        try:
            segs = sft_segments(tok, *sft_conversation(rec))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"SFT record {n}: {e if not isinstance(e, KeyError) else f'missing field {e}'}") from None
        ids, mask = [], []
        for text, trained in segs:
            t = tok.encode(text, add_special_tokens=False)
            ids += t
            mask += [trained] * len(t)
        if not any(mask):
            raise DataError(f"SFT record {n}: no assistant tokens to train on")
        last = max(i for i, m in enumerate(mask) if m)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        p_keep, (r_keep,) = _cut(ids[:first], [ids[first:]], max_seq_len)
        if p_keep < first or r_keep < len(ids) - first:
            out.truncated += 1
            ids = ids[first - p_keep:first + r_keep]
            mask = mask[first - p_keep:first + r_keep]
        out.ids.append(ids)
        out.mask.append(mask)
    return out


def _reply(tok: Tokenizer, prompt: list[dict], response: dict) -> tuple[str, str]:
    """-> (prompt text, reply text with its end-of-turn) of prompt + [response]."""
    segs = sft_segments(tok, prompt + [response], first=len(prompt))
    trained = [i for i, (_, t) in enumerate(segs) if t]
    if len(trained) != 1:
        raise ValueError("the chat template renders the response as no span or several spans")
    return "".join(text for text, _ in segs[:trained[0]]), segs[trained[0]][0]


def encode_pairs(tok: Tokenizer, records: list[dict], max_seq_len: int) -> Encoded:
    out = Encoded()
    for n, rec in enumerate(records):
        try:
            prompt_msgs, chosen, rejected = pair_conversations(rec)
            (prompt_text, c_text), (p2, r_text) = (_reply(tok, prompt_msgs, m) for m in (chosen, rejected))
            if p2 != prompt_text:
                raise ValueError("the chat template renders the prompt differently before chosen and rejected")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"pair record {n}: {e if not isinstance(e, KeyError) else f'missing field {e}'}") from None
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        resp = [tok.encode(t, add_special_tokens=False) for t in (c_text, r_text)]
        p_keep, keeps = _cut(prompt, resp, max_seq_len)
        if p_keep < len(prompt) or any(k < len(r) for k, r in zip(keeps, resp)):
            out.truncated += 1
        p = prompt[len(prompt) - p_keep:]
        (c, r), (kc, kr) = resp, keeps
        out.ids.append(p + c[:kc])
        out.mask.append([False] * len(p) + [True] * kc)
        out.rejected_ids.append(p + r[:kr])
        out.rejected_mask.append([False] * len(p) + [True] * kr)
    return out


def pad(seqs: list[list[int]], masks: list[list[bool]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest -> input_ids [B, T], targets [B, T] (targets[b, t] = ids[b, t+1]
    where that token is trained, else IGNORE; the last column is always IGNORE)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    tgt = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, :len(s)] = torch.tensor(s)
        nxt = torch.tensor(s[1:], dtype=torch.long)
        keep = torch.tensor(m[1:], dtype=torch.bool)
        tgt[b, :len(s) - 1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
    return ids, tgt


def sample_order(n: int, start: int, count: int, seed: int) -> list[int]:
    """Samples start..start+count of the stream of per-epoch permutations of range(n)."""
    out, epoch = [], start // n
    pos = start - epoch * n
    while len(out) < count:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += perm[pos:pos + count - len(out)]
        epoch, pos = epoch + 1, 0
    return out


def micro_batches(enc: Encoded, step: int, global_batch: int, world: int, rank: int,
                  accum: int, seed: int) -> list[list[int]]:
    """Sample indices of this rank's `accum` micro-batches for global step `step`."""
    idx = sample_order(len(enc), step * global_batch, global_batch, seed)
    idx.sort(key=lambda i: (enc.length(i), i))
    micro = global_batch // (world * accum)
    chunks = [idx[k * micro:(k + 1) * micro] for k in range(world * accum)]
    return [chunks[a * world + rank] for a in range(accum)]


def collate(enc: Encoded, idx: list[int], pad_id: int, dpo: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, targets [B, T] for SFT; [2B, T] for DPO (B chosen rows, then B rejected)."""
    return pad(*_rows(enc, idx, dpo), pad_id)


def _rows(enc: Encoded, idx: list[int], dpo: bool) -> tuple[list[list[int]], list[list[bool]]]:
    seqs = [enc.ids[i] for i in idx]
    masks = [enc.mask[i] for i in idx]
    if dpo:
        seqs += [enc.rejected_ids[i] for i in idx]
        masks += [enc.rejected_mask[i] for i in idx]
    return seqs, masks


@dataclass
class Packed:
    """A micro-batch as one row of N tokens: the prompt prefix its R sequences share, once, then
    each sequence's own tokens, with no padding. Each token attends to the prefix tokens before it
    and to its own sequence's (model/llama.segment_attend), so it computes what it computes in
    its own row of the padded batch, and the shared prefix is computed once instead of R times."""
    ids: torch.Tensor        # [1, N]
    targets: torch.Tensor    # [1, N]: IGNORE throughout the prefix
    positions: torch.Tensor  # [1, N]: each token's position in its own sequence
    segments: torch.Tensor   # [N]: 0 for the shared prefix, r + 1 for sequence r's own tokens
    rows: torch.Tensor       # [R, T]: where (r, t) of the padded batch lies in the packed row; -1: padding

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.ids, self.targets, self.positions, self.segments, self.rows)))


def row_lengths(enc: Encoded, idx: list[int], dpo: bool) -> list[int]:
    """Tokens of each row of collate(enc, idx, ...)."""
    return [len(x) for x in _rows(enc, idx, dpo)[0]]


def pack(ids: torch.Tensor, tgt: torch.Tensor, lens: list[int], min_saving: float = 0.25) -> Packed | None:
    """A padded micro-batch (collate's ids, targets [R, T]; each row's length) packed (Packed), or
    None when that saves less than `min_saving` of its R x T tokens. The shared prefix is the
    longest run of leading columns equal in every row where no row has a target (so every token a
    loss reads keeps its own context); every row keeps at least one token of its own."""
    limit = max(min(lens) - 1, 0)
    differ = (ids[:, :limit] != ids[:1, :limit]).any(0) | (tgt[:, :limit] != IGNORE).any(0)
    shared = int(differ.int().argmax()) if differ.any() else limit
    n = shared + sum(x - shared for x in lens)
    if len(lens) < 2 or n > (1 - min_saving) * ids.numel():
        return None
    keep = [ids[0, :shared]] + [ids[r, shared:x] for r, x in enumerate(lens)]
    keep_tgt = [tgt[0, :shared]] + [tgt[r, shared:x] for r, x in enumerate(lens)]
    positions = [torch.arange(shared)] + [torch.arange(shared, x) for x in lens]
    segments = [torch.zeros(shared, dtype=torch.long)] + [torch.full((x - shared,), r + 1) for r, x in enumerate(lens)]
    rows = torch.full(ids.shape, -1, dtype=torch.long)
    start = shared
    for r, x in enumerate(lens):
        rows[r, :shared] = torch.arange(shared)
        rows[r, shared:x] = torch.arange(start, start + x - shared)
        start += x - shared
    return Packed(torch.cat(keep)[None], torch.cat(keep_tgt)[None], torch.cat(positions)[None], torch.cat(segments),
                  rows)
