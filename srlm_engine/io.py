"""Files written whole or not at all, and JSONL read with line numbers.

Every file the engine writes goes through here (but the training log metrics.jsonl, appended a
line per step and cut back on resume): the bytes go to a temporary file in the same
directory, are flushed and fsync'ed, then renamed over the target. A killed process leaves either
the old file or the new one, never half of one; the directory is fsync'ed after the rename, so
the new name also survives a power loss. Temporaries are named `.<target>.<host>-<pid>.<random>.tmp`
(`.old` for a directory moved aside): the next write of the same target removes those that a dead
process of this host left, so killed runs do not pile up checkpoints' worth of stale files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


class DataError(ValueError):
    """Bad input data: the message names the file and, where there is one, the line and field."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed.
    An OS error (disk full, permission) is raised again naming `path`; the old file is untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path)
        fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        # mkstemp makes 0600, and so do writers that replace the file (safetensors' save_file):
        # the file should look like any other
        os.chmod(tmp, 0o666 & ~_UMASK)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if str(path) in str(e) or e.filename not in (None, str(tmp), tmp):
            raise  # names its file already: ours, or another the caller read (a missing input)
        raise OSError(e.errno, f"{path}: cannot write: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for d, _, files in os.walk(tmp):
            for f in files:
                _fsync_file(Path(d) / f)
            _fsync_dir(Path(d))
        if path.exists():
            # Move the old directory aside first so that `path` is never missing its files midway.
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _sweep(path: Path) -> None:
    """Remove the temporaries of `path` that a process of this host, now dead, left behind."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_HOST}-(\d+)\.[^.]+\.(tmp|old)")
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: a NaN or infinite float (a metric that cannot be measured, a diverged loss) is
    written as null, since jq, JavaScript and most parsers outside Python reject bare NaN."""
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, to_json(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records one JSON object per line; returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(to_json(r) + "\n")
            n += 1
    return n


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _utf8(raw: bytes, path: Path, lineno: int | None = None) -> str:
    """`raw` (one line, or a whole file when `lineno` is None) decoded as UTF-8; a bad byte raises
    DataError naming the file, the line and the byte's place in it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:
            lineno = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: invalid UTF-8: byte 0x{raw[e.start]:02x} at byte {column} "
                        f"of the line ({e.reason}); the file must be UTF-8 text") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        return json.loads(_utf8(raw, path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def read_jsonl(path: str | os.PathLike, check: Callable[[dict], Any] | None = None) -> list:
    """Read a JSONL file. Blank lines are skipped; any other bad line raises DataError naming the
    file and line. `check(record)` may validate or convert a record; a ValueError or KeyError it
    raises is reported with the file and line too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if check is not None:
                try:
                    rec = check(rec)
                except (ValueError, KeyError, TypeError) as e:
                    msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                    raise DataError(f"{path}:{lineno}: {msg}") from None
            out.append(rec)
    return out
