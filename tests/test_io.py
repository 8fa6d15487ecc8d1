"""JSON and JSONL reading and writing: every bad input is a DataError naming the file and line;
a failed write names the output, a failed read inside a writer its own file."""
import pytest

from srlm_engine.data import load_sft
from srlm_engine.io import DataError, read_json, read_jsonl


def test_jsonl_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n\n{"prompt": "caf\xc3\xa9"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: invalid UTF-8: byte 0xe9 at byte 16 of the line"):
        read_jsonl(p)
    sft = tmp_path / "ift.jsonl"  # the loaders go through read_jsonl
    sft.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(DataError, match=r"ift\.jsonl:1: invalid UTF-8: byte 0xff"):
        load_sft(sft)


def test_jsonl_reads_utf8_text(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_bytes('{"prompt": "café ☕"}\r\n\n{"prompt": "x"}'.encode())
    assert read_jsonl(p) == [{"prompt": "café ☕"}, {"prompt": "x"}]


def test_json_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b'{"a": 1,\n "b": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.json:2: invalid UTF-8: byte 0xe9 at byte 11 of the line"):
        read_json(p)
    p.write_bytes('{"a": "é"}'.encode())
    assert read_json(p) == {"a": "é"}
    with pytest.raises(DataError, match=r"missing\.json: file not found"):
        read_json(tmp_path / "missing.json")


def test_write_errors_name_the_output_and_read_errors_their_own_file(tmp_path):
    import errno

    from srlm_engine.io import atomic_path, write_jsonl

    def from_missing_input():
        yield {"a": 1}
        open(tmp_path / "missing.jsonl")  # a reader the records come from fails

    with pytest.raises(FileNotFoundError) as e:
        write_jsonl(tmp_path / "out.jsonl", from_missing_input())
    assert e.value.filename == str(tmp_path / "missing.jsonl") and "cannot write" not in str(e.value)
    with pytest.raises(OSError, match=r"out\.jsonl: cannot write: No space left on device"):
        with atomic_path(tmp_path / "out.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk raises it from write()
    assert list(tmp_path.iterdir()) == []  # no temp file left, no partial output


def test_a_write_removes_what_a_dead_writer_of_the_same_target_left(tmp_path):
    import os
    import subprocess
    import sys

    from srlm_engine.io import _HOST, atomic_dir, atomic_path, write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(dead.stdout)
    live = os.getppid()
    (tmp_path / f".model.{_HOST}-{dead}.ab_1.tmp").mkdir()        # killed while writing
    (tmp_path / f".model.{_HOST}-{dead}.cd_2.old").mkdir()        # killed while removing the old copy
    (tmp_path / f".model.{_HOST}-{dead}.cd_2.old" / "x").mkdir()
    keep = [f".model.{_HOST}-{live}.ef_3.tmp",   # a live process's write in progress
            f".model.otherhost-{dead}.gh_4.tmp",  # another host's: its pid means nothing here
            f".model2.{_HOST}-{dead}.ij_5.tmp"]   # another target's
    for k in keep:
        (tmp_path / k).mkdir()
    (tmp_path / f".out.txt.{_HOST}-{dead}.kl_6.tmp").write_text("half")
    with atomic_dir(tmp_path / "model") as d:
        (d / "w").write_text("weights")
    write_text(tmp_path / "out.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["model", "out.txt"])
    assert (tmp_path / "model" / "w").read_text() == "weights"
    # The temporaries carry this process's host and pid, so a later sweep can tell whose they are.
    with atomic_path(tmp_path / "f") as t:
        assert t.name.startswith(f".f.{_HOST}-{os.getpid()}.") and t.name.endswith(".tmp")
        t.write_text("x")


def test_json_written_is_strict_nan_and_inf_become_null(tmp_path):
    import json
    import math

    from srlm_engine.io import write_json, write_jsonl

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    write_json(tmp_path / "m.json", {"acc": math.nan, "xs": [1.5, -math.inf, (math.inf, 2)], "n": 3})
    assert strict((tmp_path / "m.json").read_text()) == {"acc": None, "xs": [1.5, None, [None, 2]], "n": 3}
    write_jsonl(tmp_path / "m.jsonl", [{"loss": math.nan}, {"loss": 0.25}])
    assert [strict(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [{"loss": None}, {"loss": 0.25}]
