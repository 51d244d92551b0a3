"""Reading clause ids out of the written contract."""

from __future__ import annotations

import re
from pathlib import Path

CLAUSE = re.compile(r"^- \*\*([A-Z]+-\d+)\*\*", re.MULTILINE)
CITATION = re.compile(r"""clause\(((?:\s*["'][A-Z]+-\d+["']\s*,?)+)\)""")


def contract_path() -> Path:
    """The contract shipped beside the suite, or the repository's ``spec/CONTRACT.md``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "CONTRACT.md", here.parent / "spec" / "CONTRACT.md"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("CONTRACT.md not found beside the suite nor in ../spec/")


def contract_clauses() -> set[str]:
    """Every clause id the contract defines."""
    return set(CLAUSE.findall(contract_path().read_text(encoding="utf-8")))


def cited_clauses() -> set[str]:
    """Every clause id that a ``clause(...)`` marker in the suite's test modules cites."""
    cited: set[str] = set()
    for module in Path(__file__).resolve().parent.glob("test_*.py"):
        for group in CITATION.findall(module.read_text(encoding="utf-8")):
            cited.update(re.findall(r"[A-Z]+-\d+", group))
    return cited
