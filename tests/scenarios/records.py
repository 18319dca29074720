"""The synthetic records' ground truth, read from the data's own README table."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "connectors" / "demo_data" / "fhir" / "README.md"
ROW = re.compile(r"^\| `(?P<id>[^`]+)` \| (?P<type>\w+) \| `(?P<patient>[^`]+)` \| [^|]* \| [^|]* \| "
                 r"(?P<cats>[a-z0-9\-, ]+) \|")


@cache
def records() -> dict[str, tuple[str, str, frozenset[str]]]:
    """id -> (resource type, patient id, categories)."""
    out = {}
    for line in README.read_text().splitlines():
        m = ROW.match(line)
        if m:
            cats = frozenset(c.strip() for c in m["cats"].split(",") if c.strip())
            out[m["id"]] = (m["type"], m["patient"], cats)
    assert len(out) > 20, "the data README table could not be read"
    return out


def expected_ids(patient: str, allowed: frozenset[str], types: set[str] | None = None) -> set[str]:
    """Resources of a patient that must be released when exactly ``allowed`` categories are allowed."""
    return {rid for rid, (rtype, pat, cats) in records().items()
            if pat == patient and cats <= allowed and (types is None or rtype in types)}
