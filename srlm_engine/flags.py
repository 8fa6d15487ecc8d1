"""Command-line flags made from the settings dataclasses of config.py: one flag per field, named
after it, typed by its annotation, with the help text and choices of its metadata.

    add_setting_flags(parser, TrainConfig, stage="sft")                # --lr, --max-seq-len, ... (no --beta)
    add_setting_flags(group, TrainConfig, stage="dpo", prefix="dpo")   # --dpo-lr, --dpo-beta, ...
    settings_of(args, TrainConfig, prefix="dpo")                       # {"beta": 0.2}: the flags given

A flag left out stays out of the namespace, so a TOML file (or the field's default) decides it.
The values are checked where the settings are built (config.py), with the same message for a
flag as for a line of a TOML file; argparse checks only their type.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def _none_or(kind):
    """An argparse type for a field that may be None: 'none' gives None (e.g. --max-grad-norm none)."""
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


# The annotations config.py's settings use (strings: it has `from __future__ import annotations`),
# each with its argparse type and the metavar --help shows. A str setting without choices is a path.
_TYPES = {"int": (int, "N"), "float": (float, "X"), "str": (str, "PATH"), "int | None": (_none_or(int), "N|none"),
          "float | None": (_none_or(float), "X|none"), "str | None": (str, "PATH")}


def _shown(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return " ".join(map(str, v))
    return str(v)


def setting_help(cls, name: str) -> dict:
    """add_argument's help (with the field's default; an unset one is the help's to explain) and,
    for a field with choices, its metavar."""
    f = cls.__dataclass_fields__[name]
    default = "" if f.default is None else f" (default: {_shown(f.default)})"
    kw = {"help": (f.metadata["help"] + default).replace("%", "%%")}
    if f.metadata.get("choices"):
        kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    return kw


def _settings(cls, stage: str | None):
    """The fields that take a flag: not a nested table (LoopConfig.sft, .dpo), not another stage's."""
    for f in fields(cls):
        only = f.metadata.get("only")
        if f.default is not MISSING and not (stage and only and only != stage):
            yield f


def add_setting_flags(q, cls, stage: str | None = None, prefix: str | None = None) -> None:
    """One flag per field of settings dataclass `cls` on parser or group `q`: --NAME, or
    --PREFIX-NAME. `stage` ('sft' or 'dpo') leaves out the fields another stage alone reads."""
    for f in _settings(cls, stage):
        name = f"{prefix}-{f.name}" if prefix else f.name
        flag, dest = "--" + name.replace("_", "-"), f"{prefix}.{f.name}" if prefix else f.name
        kind, metavar = _TYPES.get(f.type, (None, None))
        kw = {"dest": dest, "default": argparse.SUPPRESS, "metavar": metavar, **setting_help(cls, f.name)}
        if f.name == "mixed_precision":  # a bare --mixed-precision means bf16
            q.add_argument(flag, nargs="?", const="bf16", **kw)
            q.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const="none",
                           default=argparse.SUPPRESS, help=f"the same as {flag} none")
        elif f.type == "bool":
            del kw["metavar"]
            q.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type == "tuple[float, float]":
            q.add_argument(flag, type=float, nargs=2, **{**kw, "metavar": ("B1", "B2")})
        else:
            q.add_argument(flag, type=kind, **kw)


def settings_of(args: argparse.Namespace, cls, prefix: str | None = None) -> dict:
    """The settings of `cls` given as flags (added by add_setting_flags with this prefix)."""
    given = vars(args)
    dests = {f.name: f"{prefix}.{f.name}" if prefix else f.name for f in _settings(cls, None)}
    return {name: given[dest] for name, dest in dests.items() if dest in given}
