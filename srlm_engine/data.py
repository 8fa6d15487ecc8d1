"""Record schemas of the loop's JSONL files, checked line by line, and converters between them.

    SFT (IFT)   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}
    pairs       {"prompt": str, "chosen": str, "rejected": str, ...}       (AIFT(M_t))
    EFT train   {"instruction": str, "response": str, "justification": str, "score": 0..5}
    EFT eval    {"instruction": str, "responses": [str, ...], "scores": [0..5, ...]}

Every loader goes through `io.read_jsonl`, so a bad record raises DataError naming file:line.
Fields beyond the schema are kept as they are.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .io import DataError, read_jsonl, write_jsonl
from .judge import DEFAULT_TEMPLATE, MAX_SCORE, check_template, fill_template, has_score_line

ROLES = ("system", "user", "assistant")


def _text(rec: dict, key: str, where: str = "") -> str:
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"field {where or key!r} must be a non-empty string, got {v!r:.60}")
    return v


def _score(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SCORE:
        raise ValueError(f"{where} must be an integer 0..{MAX_SCORE}, got {v!r}")
    return v


# --------------------------------------------------------------------------- validators

def check_sft(rec: dict) -> dict:
    """An SFT record: a non-empty list of messages with known roles and non-empty string
    content, at least one of them an assistant turn (the loss is on assistant turns)."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
        _text(m, "content", f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("messages hold no assistant turn")
    return rec


def check_ift(rec: dict) -> dict:
    """A seed IFT record: an SFT record with a user turn too, since the loop takes each record's
    first user turn as a seed prompt for self-instruction."""
    check_sft(rec)
    if not any(m["role"] == "user" for m in rec["messages"]):
        raise ValueError("messages hold no user turn (the first user turn of a seed IFT record is "
                         "its seed prompt)")
    return rec


def check_pair(rec: dict) -> dict:
    """A preference record: non-empty prompt, chosen and rejected, with chosen != rejected."""
    for k in ("prompt", "chosen", "rejected"):
        _text(rec, k)
    if rec["chosen"] == rec["rejected"]:
        raise ValueError("chosen and rejected are the same text")
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


def eft_to_sft(records: Iterable[dict], template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """EFT train records -> SFT records: the user turn is the filled judge prompt, the assistant
    turn is the justification followed by "\\nScore: <n>" (the form `parse_score` reads)."""
    check_template(template)
    out = []
    for r in records:
        check_eft_train(r)
        prompt = fill_template(template, r["instruction"], r["response"])
        target = f"{r['justification'].rstrip()}\nScore: {r['score']}"
        out.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": target}]})
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
           "load_sft"]
