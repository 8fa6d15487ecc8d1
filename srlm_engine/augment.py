"""Graded EFT examples derived mechanically from IFT records.

Each IFT record gives an instruction (its first user turn) and a reference reply (the assistant
turn after it). From the pair come variants of the reply whose grade under the additive rubric of
`judge.DEFAULT_TEMPLATE` (1 relevance, 2 coverage, 3 usefulness, 4 clarity, 5 expertise) follows
from how the variant was made:

    variant     score  response                                 points earned, and those missed
    reference   5      the reference reply                      all five: a reply a person chose as a
                                                                good answer to this very request
                4      ... when it is under 8 words             1-4; too bare for the context or
                                                                insight of 5
    short       4      the reply's first sentence, where it     1-4: direct, complete and correct;
                       answers a short factual question         no context or insight (misses 5)
    padded      4      generic preamble + reply + sign-off      1-4: the whole answer is there and
                                                                reads clearly; the filler is
                                                                extraneous (misses 5)
    rambling    3      two preamble sentences + reply + its     1-3: the answer is there, but it is
                       first sentence repeated + an unrelated   neither direct nor well organized
                       aside + sign-off                         (misses 4), and extraneous (misses 5)
    partial     2      the reply cut after the first third of   1-2: on topic and part of the request
                       its units (sentences; a list item,       is dealt with, but it stops before
                       heading or code block counts as one)     the user can act on it (misses 3-5)
    error       1      the reply with the number that answers   1: on topic, but a wrong answer is
                       the request changed (one of its two      neither substantial nor usable
                       leading digits, at every occurrence)     (misses 2-5)
    irrelevant  0      another record's reply                   none: off topic (misses 1), and no
                                                                other point stands without it

Length is no shortcut: padded and rambling replies are longer than the reference and score lower;
the short one is shorter and scores 4; erroneous and irrelevant ones are as long as any reply.

When each variant is made. A variant that no rule can grade with confidence is skipped, never guessed.
- A reply "leads with its answer" when its first unit is a statement (ends in "." or "!") that is
  alone in its paragraph, or that answers a question or a request for one answer ("...?", or
  opening with what/how/... or explain/identify/classify/calculate/convert/solve/...).
- short: the instruction is one question of at most 15 words asking for a fact (what is/are/was,
  who, when, where, which, how many/much/long/far/old, in what/which), not two questions joined by
  "and"; the reply leads with its answer in a statement of 3 to 30 words that repeats at least half
  of the question's content words, and goes on after it.
- partial: the reply has at least 2 units and does not lead with its answer (the kept part would
  still hold it); a kept part that ends in a lead-in (":") keeps one more unit; skipped when the
  kept part holds a code block (the function asked for, the output shown) or 2/3 of the reply.
- error: the instruction asks for a number (it holds one, or asks how many/much/..., when, or names
  a quantity: speed, price, area, ...), the reply leads with its answer, and that first unit holds
  a number (not a list marker, code, an exponent or part of a word such as CO2). The first number
  there that the instruction does not state is changed (the answer, not a restated given), else
  the first. For a request to compose something (write, draft, ...) only numbers the instruction
  states count: the others are invented, and changing them makes nothing wrong.
- irrelevant: of 8 other records drawn at random, the reply sharing the fewest content words with
  the instruction; records of the same instruction, or with the same reply, are not used.
- A record whose reply holds a "Score:" line gives nothing, and is never an irrelevant reply:
  quoting it could put a score line into a justification.

The justification names the points earned and missed and why, in the manner of
srlm_engine/seed/eft_train.jsonl, quoting the variant where that says more (the changed number, where a
partial reply stops, how an irrelevant one begins); the score stays in its own field.
Each record draws `per_record` of the variants made for it (all of them if fewer) with
`random.Random(seed)`, written in the order of VARIANTS. Records carry "source": "augment:<variant>":
`data.check_eft_train` checks the four schema fields and keeps any others.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from .data import check_eft_train, check_ift, load_ift
from .io import write_jsonl
from .judge import has_score_line

VARIANTS = ("reference", "short", "padded", "rambling", "partial", "error", "irrelevant")
SHORT_REPLY_WORDS = 8   # a reference under this many words is graded 4, not 5

_PREAMBLES = (
    "Thanks for reaching out! I'm happy to help with this.",
    "Sure, I'd be glad to help with that.",
    "That's a really good thing to ask about, and a lot of people wonder about the same thing.",
    "Let me take a moment to go through this with you.",
    "This is something that comes up quite often, so it's worth getting right.",
    "Before I answer, I want to say that this is an interesting topic to think about.",
)
_CLOSINGS = (
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to reach out if you'd like more information on this or anything else.",
    "Thanks again for asking, and good luck!",
    "Hopefully that covers what you were looking for. Have a great day!",
)
_REPEATS = ("Just to repeat the main point: ", "Again, to be clear: ", "So, once more: ")
# True facts on subjects far from everyday requests; each with the subject its justification names.
_ASIDES = (
    ("octopuses", "By the way, octopuses have three hearts and blue blood."),
    ("honey", "On a side note, honey can keep for thousands of years; edible honey has been found "
              "in ancient Egyptian tombs."),
    ("Venus", "Unrelated, but interesting: a day on Venus is longer than its year."),
    ("bananas", "Incidentally, bananas are berries in the botanical sense, while strawberries are not."),
    ("the Eiffel Tower", "As an aside, the Eiffel Tower grows slightly taller in summer, because its "
                         "iron expands in the heat."),
    ("sea otters", "Fun fact while we're at it: sea otters often hold hands while they sleep so "
                   "they don't drift apart."),
    ("wombats", "On another topic entirely, wombats produce cube-shaped droppings."),
)

_STOP = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being do does did "
    "what which who whom whose when where why how many much long far old i you my your me we our it "
    "its this that these those there their they them he she his her can could should would will "
    "shall may might must not no yes if than then so as about into over under up out just also very "
    "have has had get give tell".split())
_WORD_RE = re.compile(r"[^\W_]+")
_ITEM_RE = re.compile(r"\s*(?:[-*+•]|\d+[.)]|#{1,6})\s")      # list item or markdown heading
# A sentence ends at . ! or ? (and closing quotes), before whitespace and a capital or a digit.
_END_RE = re.compile(r"[.!?][\"'”’)\]*_]*(?=\s+[\"'“‘(\[*_`]*[A-Z0-9])")
_ABBREV = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "approx", "no", "fig"})
_STATEMENT_RE = re.compile(r"[.!][\"'”’)\]*_`]*$")
# A number standing alone: not part of a word ("CO2", "5K"), an exponent ("x^2") or a list of
# digits such as "(1,6)"; "1,440", "0.05" and "7.5" are one number each.
_NUM_RE = re.compile(r"(?<![\w.,^])[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?(?![\w]|[.,][0-9])")
_CODE_RE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.S)
_FACT_QUESTION_RE = re.compile(
    r"(what\s+(is|are|was|were)|what's|who|when|where|which|how\s+(many|much|long|far|old)|"
    r"in\s+(what|which))\b", re.I)
# A question, or a request for one answer: a reply to it that opens with a statement opens with the answer.
_QUESTION_RE = re.compile(r"\s*(what|who|when|where|which|why|how|is|are|does|do|can|should|explain|identify|"
                          r"classify|categorize|determine|name|find|calculate|compute|convert|solve|"
                          r"simplify)\b", re.I)
# A request whose answer is a number: it holds one, or asks for a quantity.
_QUANTITY_RE = re.compile(
    r"[0-9]|\b(how\s+(many|much|long|far|old|big|tall|fast|often|high|deep|heavy)|what\s+year|when|"
    r"number|percent|percentage|temperature|speed|distance|height|length|weight|population|price|"
    r"cost|area|volume|angle|average|sum|probability|boiling|freezing|melting)\b", re.I)
_TWO_QUESTIONS_RE = re.compile(r",\s*and\b|\band\s+(what|why|how|where|when|who|which)\b", re.I)
_COMPOSE_RE = re.compile(r"\s*(write|draft|compose|create|invent|make up|come up with|brainstorm|"
                         r"suggest)\b", re.I)


def eft_augment(ift_records: list[dict], seed: int = 0, per_record: int = 4) -> list[dict]:
    """EFT train records graded by the rules of this module's docstring, `per_record` at most per
    IFT record, the same for the same records and seed."""
    if isinstance(per_record, bool) or not isinstance(per_record, int) or per_record < 1:
        raise ValueError(f"per_record must be a positive integer, got {per_record!r}")
    pairs = []
    for i, rec in enumerate(ift_records):
        try:
            check_ift(rec)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"ift_records[{i}]: {e}") from None
        pairs.append(_first_exchange(rec["messages"]))
    usable = [k for k, p in enumerate(pairs) if p is not None and not has_score_line(p[1])]
    rng = random.Random(seed)
    out = []
    for pos, k in enumerate(usable):
        instruction, reply = pairs[k]
        made = _variants(instruction, reply, [pairs[j] for j in _draw_others(rng, usable, pos)], rng)
        for variant in sorted(rng.sample(list(made), min(per_record, len(made))), key=VARIANTS.index):
            response, score, justification = made[variant]
            out.append(check_eft_train({"instruction": instruction, "response": response,
                                        "justification": justification, "score": score,
                                        "source": f"augment:{variant}"}))
    return out


def write_eft_augment(ift_path: str | Path, out_path: str | Path, seed: int = 0,
                      per_record: int = 4) -> dict[str, int]:
    """Read IFT JSONL, write its EFT augmentation atomically; returns how many records of each variant."""
    records = eft_augment(load_ift(ift_path), seed=seed, per_record=per_record)
    write_jsonl(out_path, records)
    counts = Counter(r["source"].removeprefix("augment:") for r in records)
    return {v: counts[v] for v in VARIANTS}


# --------------------------------------------------------------------------- variants

def _variants(instruction: str, reply: str, others: list[tuple[str, str]], rng: random.Random) -> dict:
    """variant -> (response, score, justification) for each variant a rule grades; `others` are
    (instruction, reply) pairs of other records, the candidates for the irrelevant reply."""
    units = _units(reply)
    leads = _leads_with_answer(instruction, reply, units)
    made = {"reference": _reference(reply)}
    first = reply[slice(*units[0])]
    if leads and len(units) > 1 and _answers_short_question(instruction, first):
        made["short"] = (first, 4, _SHORT)
    made["padded"] = _padded(reply, rng)
    made["rambling"] = _rambling(instruction, reply, units, rng)
    if not leads and len(units) > 1:
        made["partial"] = _partial(reply, units)
    if leads and _QUANTITY_RE.search(instruction):
        made["error"] = _error(instruction, reply, units[0], rng)
    # Another record of the same request (a duplicate prompt) would give a relevant reply.
    others = [o for q, o in others if q.strip() != instruction.strip() and o.strip() != reply.strip()]
    if others:
        words = _content_words(instruction)
        other = min(others, key=lambda o: len(words & _content_words(o)))
        made["irrelevant"] = (other, 0, _IRRELEVANT.format(start=_quote(other, 8)))
    return {v: m for v, m in made.items() if m is not None}


def _reference(reply: str) -> tuple:
    n = len(reply.split())
    if n >= SHORT_REPLY_WORDS:
        return reply, 5, _REFERENCE
    return reply, 4, _REFERENCE_SHORT.format(n=n, words="word" if n == 1 else "words")


def _padded(reply: str, rng: random.Random) -> tuple:
    pre, close = rng.choice(_PREAMBLES), rng.choice(_CLOSINGS)
    return f"{pre}\n\n{reply}\n\n{close}", 4, _PADDED.format(pre=_quote(pre, 6), close=_quote(close, 6))


def _rambling(instruction: str, reply: str, units: list, rng: random.Random) -> tuple:
    pre = " ".join(rng.sample(_PREAMBLES, 2))
    # The aside that shares the fewest words with the request; ties go to the random order.
    context = _content_words(instruction + " " + reply)
    subject, aside = min(rng.sample(_ASIDES, len(_ASIDES)), key=lambda a: len(context & _content_words(a[1])))
    # Repeated: the first sentence that starts like one (a poem's last line "and footsteps..." does not).
    sentences = [reply[a:b] for a, b in units if _STATEMENT_RE.search(reply[a:b])
                 and not _ITEM_RE.match(reply[a:b]) and re.match(r"[\"'“‘*_]*[A-Z0-9]", reply[a:b])]
    repeat = f"{rng.choice(_REPEATS)}{' '.join(sentences[0].split())}\n\n" if sentences else ""
    text = f"{pre}\n\n{reply}\n\n{repeat}{aside} {rng.choice(_CLOSINGS)}"
    return text, 3, _RAMBLING.format(again=" and repeats itself" if repeat else "", subject=subject)


def _partial(reply: str, units: list) -> tuple | None:
    keep = max(1, len(units) // 3)
    if reply[slice(*units[keep - 1])].rstrip().endswith(":"):
        keep += 1  # a lead-in alone ("Here are three ways:") covers nothing
    cut = reply[:units[keep - 1][1]].rstrip()
    # A whole code block kept is a whole answer (the function asked for, the output shown).
    if keep >= len(units) or len(cut) >= 2 / 3 * len(reply.strip()) or "```" in cut:
        return None
    return cut, 2, _PARTIAL.format(end=_quote(cut, 8, tail=True))


def _error(instruction: str, reply: str, first: tuple, rng: random.Random) -> tuple | None:
    code = [m.span() for m in _CODE_RE.finditer(reply)]
    nums = [m for m in _NUM_RE.finditer(reply)
            if not any(a <= m.start() < b for a, b in code) and not _is_list_marker(reply, m)]
    given = {n.replace(",", "") for n in re.findall(r"[0-9]+(?:[.,][0-9]+)*", instruction)}
    candidates = [m[0] for m in nums if first[0] <= m.start() < first[1]]
    if _COMPOSE_RE.match(instruction):
        candidates = [c for c in candidates if c.replace(",", "") in given]
    if not candidates:
        return None
    derived = [c for c in candidates if c.replace(",", "") not in given]
    old = (derived or candidates)[0]  # the answer comes first in a reply that leads with it
    new = _change_digit(old, rng)
    parts, pos = [], 0
    for m in nums:
        if m[0] == old:
            parts += [reply[pos:m.start()], new]
            pos = m.end()
    text = "".join(parts) + reply[pos:]
    stated = f" (the request itself says {old})" if old.replace(",", "") in given else ""
    said = _quote(text[first[0]:first[1]], 20)  # a digit for a digit: the spans stay put
    return text, 1, _ERROR.format(said=said, new=new, old=old, stated=stated)


# --------------------------------------------------------------------------- justifications

_REFERENCE = ("The response is relevant and answers the request fully and correctly, earning the "
              "relevance, coverage, and usefulness points. It is clear, well organized, and written "
              "from an assistant's perspective, earning the clarity point. It is fitted closely to "
              "the request, accurate, and carries nothing extraneous, so it earns the expertise point too.")
_REFERENCE_SHORT = ("The response is relevant and answers the request correctly, earning the "
                    "relevance, coverage, and usefulness points, and it speaks to the request "
                    "directly, earning the clarity point. At {n} {words} it is too bare to give any "
                    "context, reasoning, or insight, so it does not earn the expertise point.")
_SHORT = ("The response is relevant and states the answer in one complete, correct sentence, "
          "earning the relevance, coverage, and usefulness points. It answers directly from an "
          "assistant's perspective, earning the clarity point. It stops at the bare answer, with no "
          "context, explanation, or insight that would show expertise, so the fifth point is not earned.")
_PADDED = ("The response is relevant and contains a complete, correct answer, earning the relevance, "
           "coverage, and usefulness points, and the answer itself is clear and well organized, "
           "earning the clarity point. But it is wrapped in generic filler ('{pre}' at the start, "
           "'{close}' at the end) that adds nothing, so it is not fitted closely to the request and "
           "misses the expertise point.")
_RAMBLING = ("The response is relevant and the complete answer is in it, earning the relevance, "
             "coverage, and usefulness points. But it opens with filler before getting to the "
             "point{again}, and wanders into an unrelated aside about {subject}, so it does not "
             "speak to the request directly or read as well organized, and misses the clarity "
             "point. The extraneous material also rules out the expertise point.")
_PARTIAL = ("The response is on topic and starts the answer correctly, earning the relevance point, "
            "and it deals with part of the request (point 2). But it breaks off after '{end}' and "
            "leaves the rest of the request unaddressed, so the user cannot act on it as it is, and "
            "it is neither complete enough for the clarity point nor the expertise point.")
_ERROR = ("The response addresses the request directly, earning the relevance point. But its answer "
          "is wrong: it says '{said}', giving {new} where the correct figure is {old}{stated}. "
          "Since the key information is incorrect, the response does not cover the request "
          "substantially or usefully, and none of the other points can be earned.")
_IRRELEVANT = ("The response does not address the request: it begins '{start}' and is about an "
               "unrelated subject. It offers no information that bears on what was asked, so it "
               "fails the relevance criterion, and none of the other criteria can be met without it.")


# --------------------------------------------------------------------------- text helpers

def _first_exchange(messages: list[dict]) -> tuple[str, str] | None:
    """(first user turn, the assistant turn after it), or None when no assistant turn follows."""
    roles = [m["role"] for m in messages]
    u = roles.index("user")
    a = next((j for j in range(u + 1, len(roles)) if roles[j] == "assistant"), None)
    return None if a is None else (messages[u]["content"], messages[a]["content"])


def _draw_others(rng: random.Random, usable: list[int], pos: int, n: int = 8) -> list[int]:
    """n usable records other than usable[pos], drawn with replacement (repeats do no harm)."""
    others = len(usable) - 1
    if others < 1:
        return []
    return [usable[j + (j >= pos)] for j in (rng.randrange(others) for _ in range(n))]


def _units(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of the text's units in order: sentences, except that a list item, a
    heading or a fenced code block is one unit whole. Blank lines belong to no unit."""
    units, fence, pos = [], None, 0
    for line in text.split("\n"):
        start, pos = pos, pos + len(line) + 1
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = start
            else:
                units.append((fence, start + len(line.rstrip())))
                fence = None
            continue
        if fence is not None or not stripped:
            continue
        a, end = start + len(line) - len(line.lstrip()), start + len(line.rstrip())
        if not _ITEM_RE.match(line):
            for m in _END_RE.finditer(line):
                before = line[:m.start()].split()
                word = before[-1].lstrip("(\"'“‘*_").lower() if before else ""
                if word in _ABBREV or (len(word) == 1 and word.isalpha()):
                    continue  # "Mr. Patel", "e.g. Rome", "J. K. Rowling"
                units.append((a, start + m.end()))
                rest = line[m.end():]
                a = start + m.end() + len(rest) - len(rest.lstrip())
        if a < end:
            units.append((a, end))
    if fence is not None:
        units.append((fence, len(text.rstrip())))
    return units or [(0, len(text))]


def _leads_with_answer(instruction: str, reply: str, units: list) -> bool:
    """Whether the reply's first unit is its answer: a statement alone in its paragraph, or a
    statement opening the reply to a question or a request for one answer (_QUESTION_RE)."""
    a, b = units[0]
    first = reply[a:b]
    if _ITEM_RE.match(first) or first.startswith("```") or not _STATEMENT_RE.search(first):
        return False
    alone = not reply[b:].strip() or re.match(r"[ \t]*\n[ \t]*\n", reply[b:]) is not None
    return alone or "?" in instruction or _QUESTION_RE.match(instruction) is not None


def _answers_short_question(instruction: str, first: str) -> bool:
    q = instruction.strip()
    if ("\n" in q or q.count("?") != 1 or not q.endswith("?") or len(q.split()) > 15
            or not _FACT_QUESTION_RE.match(q) or _TWO_QUESTIONS_RE.search(q)):
        return False
    if not 3 <= len(first.split()) <= 30 or first.rstrip().endswith(":"):
        return False
    asked = _content_words(q)
    return bool(asked) and len(asked & _content_words(first)) * 2 >= len(asked)


def _content_words(text: str) -> set[str]:
    """Lowercased words less stop words, with a plural "s" dropped ("bones" ~ "bone")."""
    words = (w for w in _WORD_RE.findall(text.lower()) if w not in _STOP)
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words}


def _is_list_marker(text: str, m: re.Match) -> bool:
    line_start = text.rfind("\n", 0, m.start()) + 1
    return not text[line_start:m.start()].strip() and text[m.end():m.end() + 2] in (". ", ") ")


def _change_digit(number: str, rng: random.Random) -> str:
    """The number with one of its two leading significant digits replaced by another, so that the
    error is not lost in the decimals ("23.5" -> "23.6"). The first significant digit never
    becomes 0, which would read as a leading zero ("06") or zero the number ("0.05" -> "0.00")."""
    digits = [i for i, c in enumerate(number) if c.isdigit()]
    significant = [i for i in digits if number[i] != "0" or any(number[j] != "0" for j in digits if j < i)]
    if not significant:  # "0", "0.0": any digit but 0 makes it wrong
        significant = digits[-1:]
    i = rng.choice(significant[:2])
    banned = {number[i]} | ({"0"} if i == significant[0] else set())
    return number[:i] + rng.choice([d for d in "0123456789" if d not in banned]) + number[i + 1:]


def _quote(text: str, words: int, tail: bool = False) -> str:
    """The first (or last) `words` words of text on one line, with "..." where it was cut."""
    w = text.split()
    if len(w) <= words:
        return " ".join(w)
    return "..." + " ".join(w[-words:]) if tail else " ".join(w[:words]) + "..."
