"""JSON and JSONL reading: every bad input is a DataError naming the file and line."""
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
