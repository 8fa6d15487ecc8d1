"""docs/ARCHITECTURE.md stays true to the tree: its module table names every module of
srlm_engine/ and nothing that is gone, and the README links it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_module_table_lists_every_module_and_no_other():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## srlm_engine/, one noun per file", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^    (\S+\.py)\s", table, flags=re.M))
    package = ROOT / "srlm_engine"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), "modules the table does not name"
    assert named - modules == set(), "the table names modules that do not exist"


def test_the_readme_links_the_architecture():
    assert "(docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()
