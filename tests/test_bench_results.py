"""bench/RESULTS.md: each bench script's rows go into its own section's table.

(Here, not in bench/, so that `make test` runs it.)
"""
import re
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402

DOC = """# Benchmark results

Intro.

## alpha: bench/bench_alpha.py

How to read alpha.

| date | commit | machine | device | case | result |
| --- | --- | --- | --- | --- | --- |
| d1 | c1 | m | dev | a1 | r1 |

## alpha_long: bench/bench_alpha_long.py

| date | commit | machine | device | case | result |
| --- | --- | --- | --- | --- | --- |
| d2 | c2 | m | dev | b1 | r2 |
"""


def test_rows_go_to_the_end_of_their_own_section():
    out = _common.insert_rows(DOC, "alpha", ["| d3 | c3 | m | dev | a2 | r3 |\n"])
    lines = out.splitlines()
    assert lines[lines.index("| d1 | c1 | m | dev | a1 | r1 |") + 1] == "| d3 | c3 | m | dev | a2 | r3 |"
    assert out.replace("| d3 | c3 | m | dev | a2 | r3 |\n", "") == DOC  # nothing else moved
    # "alpha" is not a prefix match for "alpha_long": its rows land in its own last section
    out = _common.insert_rows(DOC, "alpha_long", ["| d4 | c4 | m | dev | b2 | r4 |\n"])
    assert out == DOC + "| d4 | c4 | m | dev | b2 | r4 |\n"


def test_a_bench_without_a_section_gets_one_at_the_end():
    out = _common.insert_rows(DOC, "gamma", ["| d5 | c5 | m | dev | g1 | r5 |\n"])
    assert out == DOC + "\n## gamma\n\n" + _common.TABLE + "| d5 | c5 | m | dev | g1 | r5 |\n"
    # a section of text alone gets its table after the text, before the next section
    text_only = "# R\n\n## beta: bench/bench_beta.py\n\nHow to read beta.\n\n## alpha\n"
    out = _common.insert_rows(text_only, "beta", ["| d6 | c6 | m | dev | x | y |\n"])
    assert out == ("# R\n\n## beta: bench/bench_beta.py\n\nHow to read beta.\n\n" + _common.TABLE
                   + "| d6 | c6 | m | dev | x | y |\n\n## alpha\n")


def test_append_rows_writes_the_file_whole(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text(DOC)
    monkeypatch.setattr(_common, "RESULTS", results)
    _common.append_rows("alpha", "CPU", [("case a", "result a"), ("case b", "result b")])
    alpha, rest = results.read_text().split("## alpha_long")
    table = [line.strip("| ").split(" | ") for line in alpha.splitlines() if line.startswith("|")]
    assert [row[4:] for row in table[-2:]] == [["case a", "result a"], ["case b", "result b"]]
    assert table[-1][3] == "CPU" and len(table) == 5 and "case a" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]  # no temporary left


def test_every_bench_that_records_has_its_section_and_every_row_its_six_cells():
    text = (BENCH / "RESULTS.md").read_text()
    names = {m for f in BENCH.glob("*.py") for m in re.findall(r'append_rows\(\s*"([^"]+)"', f.read_text())}
    assert {"fused_logprob", "dpo_loss", "paged_attention", "bench_generate", "bench_loop_dp"} <= names
    headings = re.findall(r"^## (.+?)(?::.*)?$", text, re.M)
    assert names <= set(headings), names - set(headings)
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.count(" | ") == 5 and line.endswith(" |"), line
