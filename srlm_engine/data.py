"""Record schemas of the loop's JSONL files, checked line by line, and converters between them.

    SFT         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}
                {"prompt": str, "completion": str}                         (TRL's prompt-completion)
                {"prompt": [messages], "completion": [assistant messages]}  (the same, conversational)
    IFT (seed)  an SFT record in the "messages" form, with a user turn
    pairs       {"prompt": str, "chosen": str, "rejected": str, ...}       (AIFT(M_t), TRL's standard form)
                {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}  (TRL's conversational)
                {"chosen": [messages], "rejected": [messages]}             (TRL's implicit prompt)
    EFT train   {"instruction": str, "response": str, "justification": str, "score": 0..5}
    EFT eval    {"instruction": str, "responses": [str, ...], "scores": [0..5, ...]}

Every form is rendered with the model's chat template (train/batches.py): a string prompt is one
user turn and a string response one assistant turn, so {"prompt": p, "completion": c} trains
exactly as {"messages": [user: p, assistant: c]}. `sft_conversation` and `pair_conversations`
turn a record of any form into those messages. The loss is on every assistant turn of a
"messages" record, on the completion only of a prompt-completion one (as TRL's completion-only
loss), and on the chosen and rejected replies of a pair.

Every loader goes through `io.read_jsonl`, so a bad record raises DataError naming file:line.
Fields beyond the schema are kept as they are.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .config import EFT_TARGETS
from .io import DataError, read_jsonl, write_jsonl
from .judge import DEFAULT_TEMPLATE, MAX_SCORE, check_template, fill_template, has_score_line

ROLES = ("system", "user", "assistant")


def _text(rec: dict, key: str, where: str = "") -> str:
    if key not in rec:
        raise KeyError(where or key)  # read_jsonl: "missing field '<where>'"
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"field {where or key!r} must be a non-empty string, got {v!r:.60}")
    return v


def _score(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SCORE:
        raise ValueError(f"{where} must be an integer 0..{MAX_SCORE}, got {v!r}")
    return v


# --------------------------------------------------------------------------- conversations

def _one_of(roles: tuple[str, ...]) -> str:
    return repr(roles[0]) if len(roles) == 1 else "one of " + ", ".join(map(repr, roles))


def _messages(v, name: str, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """`v` checked as field `name`: a non-empty list of {"role": one of `roles`, "content": non-empty str}."""
    if not isinstance(v, list) or not v:
        raise ValueError(f"field {name!r} must be a non-empty list of messages, got {v!r:.60}")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise ValueError(f"{name}[{i}] must be an object with 'role' and 'content', got {m!r:.60}")
        if m.get("role") not in roles:
            raise ValueError(f"{name}[{i}].role must be {_one_of(roles)}, got {m.get('role')!r}")
        _text(m, "content", f"{name}[{i}].content")
    return v


def _conversational(rec: dict, keys: tuple[str, ...]) -> bool:
    """Whether the record's `keys` are message lists (True) or strings (False); a mix is an error."""
    lists = [k for k in keys if isinstance(rec[k], list)]
    if lists and len(lists) < len(keys):
        rest = [k for k in keys if k not in lists]
        raise ValueError(f"field(s) {', '.join(map(repr, lists))} are message lists but {', '.join(map(repr, rest))} "
                         f"not: give {', '.join(keys)} all as strings or all as message lists")
    return bool(lists)


def sft_conversation(rec: dict) -> tuple[list[dict], int]:
    """An SFT record of any form -> (messages, first): the conversation and the index of its first
    trained message; the assistant turns from `first` on carry the loss.
        {"messages": msgs}                                 -> (msgs, 0)
        {"prompt": str, "completion": str}                 -> ([user: prompt, assistant: completion], 1)
        {"prompt": [msgs], "completion": [assistant msgs]} -> (prompt + completion, len(prompt))
    Raises ValueError (KeyError for a missing field) naming the field."""
    if "messages" in rec:
        msgs = _messages(rec["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("messages hold no assistant turn")
        return msgs, 0
    if "prompt" not in rec and "completion" not in rec:
        raise ValueError("an SFT record needs field 'messages', or 'prompt' and 'completion'")
    if not _conversational(rec, ("prompt", "completion")):
        return [{"role": "user", "content": _text(rec, "prompt")},
                {"role": "assistant", "content": _text(rec, "completion")}], 1
    prompt = _messages(rec["prompt"], "prompt")
    return prompt + _messages(rec["completion"], "completion", ("assistant",)), len(prompt)


def pair_conversations(rec: dict) -> tuple[list[dict], dict, dict]:
    """A preference record of any form -> (prompt messages, chosen reply, rejected reply), each
    reply one assistant message.
        {"prompt": str, "chosen": str, "rejected": str}    -> ([user: prompt], assistant: chosen, ...)
        {"prompt": [msgs], "chosen": [assistant], "rejected": [assistant]}
        {"chosen": [msgs], "rejected": [msgs]}             implicit prompt: the messages both begin
                                                           with; one assistant message of each follows
    Raises ValueError (KeyError for a missing field) naming the field."""
    if "prompt" not in rec and isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list):
        chosen, rejected = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same conversation")
        if n == 0:
            raise ValueError("chosen and rejected begin with different messages: without a 'prompt' field the "
                             "prompt is the messages they both begin with")
        c, r = (_tail(m, k, n) for m, k in ((chosen, "chosen"), (rejected, "rejected")))
        prompt = chosen[:n]
    elif _conversational(rec, ("prompt", "chosen", "rejected")):
        prompt = _messages(rec["prompt"], "prompt")
        c, r = (_tail(_messages(rec[k], k, ("assistant",)), k, 0) for k in ("chosen", "rejected"))
    else:
        prompt = [{"role": "user", "content": _text(rec, "prompt")}]
        c, r = ({"role": "assistant", "content": _text(rec, k)} for k in ("chosen", "rejected"))
    if c["content"] == r["content"]:
        raise ValueError("chosen and rejected are the same text")
    return prompt, c, r


def _tail(msgs: list[dict], name: str, start: int) -> dict:
    """msgs[start:], the reply after the prompt: exactly one assistant message."""
    rest = msgs[start:]
    if len(rest) != 1:
        raise ValueError(f"field {name!r} must hold one assistant message after the prompt "
                         f"({start} message(s)), got {len(rest)}")
    if rest[0]["role"] != "assistant":
        raise ValueError(f"{name}[{start}].role must be 'assistant' (the reply after the prompt), "
                         f"got {rest[0]['role']!r}")
    return rest[0]


# --------------------------------------------------------------------------- validators

def check_sft(rec: dict) -> dict:
    """An SFT record of any form (`sft_conversation`): messages with known roles and non-empty
    string content, at least one assistant turn to train on."""
    sft_conversation(rec)
    return rec


def check_ift(rec: dict) -> dict:
    """A seed IFT record: an SFT record in the "messages" form with a user turn too, since the
    loop takes each record's first user turn as a seed prompt for self-instruction."""
    if "messages" not in rec:
        raise ValueError("a seed IFT record needs field 'messages' (the loop reads its first user turn as a "
                         "seed prompt)")
    check_sft(rec)
    if not any(m["role"] == "user" for m in rec["messages"]):
        raise ValueError("messages hold no user turn (the first user turn of a seed IFT record is "
                         "its seed prompt)")
    return rec


def check_pair(rec: dict) -> dict:
    """A preference record of any form (`pair_conversations`), with chosen != rejected."""
    pair_conversations(rec)
    return rec


def check_eft_train(rec: dict) -> dict:
    """An EFT training record. The justification must not carry the score line itself: the
    converter appends "Score: <n>" from the `score` field."""
    for k in ("instruction", "response", "justification"):
        _text(rec, k)
    _score(rec["score"], "field 'score'")
    if has_score_line(rec["justification"]):  # even one stating no score: the appended line must be the only one
        raise ValueError("justification already holds a 'Score:' line; keep the score in 'score' only")
    return rec


def check_eft_eval(rec: dict) -> dict:
    """An EFT evaluation item: at least 2 non-empty responses and as many integer scores 0..5."""
    _text(rec, "instruction")
    resp, scores = rec["responses"], rec["scores"]
    if not isinstance(resp, list) or len(resp) < 2:
        n = len(resp) if isinstance(resp, list) else type(resp).__name__
        raise ValueError(f"field 'responses' must be a list of at least 2 responses, got {n}")
    if not isinstance(scores, list) or len(scores) != len(resp):
        n = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise ValueError(f"field 'scores' must be a list as long as 'responses' ({len(resp)}), got {n}")
    for i, r in enumerate(resp):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"responses[{i}] must be a non-empty string")
        _score(scores[i], f"scores[{i}]")
    return rec


# --------------------------------------------------------------------------- loaders

def load_sft(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_sft)


def load_ift(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_ift)


def load_pairs(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_pair)


def load_eft_train(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_eft_train)


def load_eft_eval(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_eft_eval)


def eft_to_sft(records: Iterable[dict], template: str = DEFAULT_TEMPLATE, target: str = "judgment") -> list[dict]:
    """EFT train records -> SFT records: the user turn is the filled judge prompt; the assistant
    turn is, for target "judgment" (the paper's), the justification followed by "\\nScore: <n>",
    what the sampled judge writes; for target "score", the score line "Score: <n>" alone, the very
    tokens the expected-score judge reads when it asks for the digit at once (judge_expected with
    after="prefix"). Either form is what `parse_score` reads."""
    check_template(template)
    if target not in EFT_TARGETS:
        raise ValueError(f"EFT target must be one of {EFT_TARGETS}, got {target!r}")
    out = []
    for r in records:
        check_eft_train(r)
        prompt = fill_template(template, r["instruction"], r["response"])
        score = f"Score: {r['score']}"
        target_text = f"{r['justification'].rstrip()}\n{score}" if target == "judgment" else score
        out.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": target_text}]})
    return out


# --------------------------------------------------------------------------- Open Assistant

def _usable(msg: dict, lang: str) -> bool:
    text = msg.get("text")
    return (isinstance(text, str) and bool(text.strip()) and msg.get("lang") == lang
            and not msg.get("deleted", False) and msg.get("review_result", True) is not False)


def convert_oasst(path: str | Path, out_dir: str | Path, lang: str = "en", eval_share: float = 0.15) -> dict[str, int]:
    """Convert Open Assistant (oasst1/oasst2) message trees into `ift.jsonl` and `eft_eval.jsonl`.

    Each tree goes to one file only, so M1 never trains on the answers the judge is scored
    against: a share `eval_share` of the trees, picked by a hash of message_tree_id (stable across
    runs and machines), becomes EFT eval; the rest IFT. 0 makes IFT only (the train export),
    1 EFT eval only (the validation export); the default 0.15 splits one file near the paper's
    3,200 : ~540.

    Input: the "trees" JSONL export, one tree per line, as released (decompress `.jsonl.gz` first).
    Only first turns are used: the tree's prompter message and its direct assistant replies.
    - Trees whose `tree_state` is present and not "ready_for_export" are skipped; so are prompts
      and replies not in `lang`, empty, deleted or failing review.
    - IFT: the prompt with its rank-0 reply -> {"messages": [user, assistant], "source": "oasst",
      "message_tree_id"}; a prompt without a usable rank-0 reply gives no IFT record.
    - EFT eval: the usable replies with a rank (rank null = unranked, dropped), at least 2. Rule for
      scores: sort by rank, take the position p = 0, 1, 2, ... (renumbered after filtering), and
      score = max(0, 5 - p): best 5, then 4, 3, ...; a sixth reply and beyond all get 0. Only the
      order carries meaning (pairwise accuracy and rank correlations read the order alone).
    Both files are written atomically. Returns counts: trees, skipped_state, skipped_lang, ift,
    no_rank0 (of the IFT trees), eft_eval, too_few_ranked (of the eval trees)."""
    if not 0 <= eval_share <= 1:
        raise ValueError(f"eval_share must be in [0, 1], got {eval_share!r}")
    trees = read_jsonl(path)
    counts = Counter(trees=len(trees))
    ift, eft = [], []
    for tree in trees:
        if tree.get("tree_state", "ready_for_export") != "ready_for_export":
            counts["skipped_state"] += 1
            continue
        prompt = tree.get("prompt") or {}
        if prompt.get("role", "prompter") != "prompter" or not _usable(prompt, lang):
            counts["skipped_lang"] += 1
            continue
        replies = [r for r in prompt.get("replies") or []
                   if r.get("role") == "assistant" and _usable(r, lang)]
        tid = tree.get("message_tree_id")
        to_eval = int.from_bytes(hashlib.sha256(str(tid).encode()).digest()[:8], "big") < eval_share * 2**64
        if not to_eval:
            top = [r for r in replies if r.get("rank") == 0]
            if top:
                ift.append({"messages": [{"role": "user", "content": prompt["text"]},
                                         {"role": "assistant", "content": top[0]["text"]}],
                            "source": "oasst", "message_tree_id": tid})
            else:
                counts["no_rank0"] += 1
            continue
        ranked = sorted((r for r in replies if isinstance(r.get("rank"), int)), key=lambda r: r["rank"])
        if len(ranked) >= 2:
            eft.append({"instruction": prompt["text"], "responses": [r["text"] for r in ranked],
                        "scores": [max(0, MAX_SCORE - p) for p in range(len(ranked))],
                        "source": "oasst", "message_tree_id": tid})
        else:
            counts["too_few_ranked"] += 1
    out_dir = Path(out_dir)
    counts["ift"] = write_jsonl(out_dir / "ift.jsonl", ift)
    counts["eft_eval"] = write_jsonl(out_dir / "eft_eval.jsonl", eft)
    for k in ("skipped_state", "skipped_lang", "no_rank0", "too_few_ranked"):
        counts.setdefault(k, 0)
    return dict(counts)


__all__ = ["DataError", "check_eft_eval", "check_eft_train", "check_ift", "check_pair", "check_sft",
           "convert_oasst", "eft_to_sft", "load_eft_eval", "load_eft_train", "load_ift", "load_pairs",
           "load_sft", "pair_conversations", "sft_conversation"]
