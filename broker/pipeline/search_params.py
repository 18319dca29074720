"""Validation of FHIR search parameters on the facade.

Only an allow-list of parameters passes, each checked against a strict pattern, so that
nothing a caller sends can widen the search beyond the MDT's youth (no ``patient``,
``subject``, ``_include``, ``_has``, chained or reverse-chained parameters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import BadRequest

RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE = r"(eq|ne|lt|gt|le|ge|sa|eb|ap)?\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
DATE_VALUE = re.compile(rf"^{_DATE}$")
TOKEN_VALUE = re.compile(r"^([A-Za-z0-9:/.\-_#%]{0,200}\|)?[A-Za-z0-9.\-_]{1,64}$")
SORT_VALUES = frozenset({"date", "-date", "_lastUpdated", "-_lastUpdated"})
MAX_PARAMS = 20
MAX_VALUES_PER_PARAM = 20
_DIGITS = re.compile(r"[0-9]{1,7}")
PASSTHROUGH = ("_lastUpdated", "date", "code", "_id", "status", "category", "_sort")


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A validated facade search: upstream params plus the facade's own paging."""

    params: tuple[tuple[str, str], ...]
    count: int
    offset: int


def parse_search(items: list[tuple[str, str]], *, max_count: int) -> SearchRequest:
    """Validate raw query items; raise BadRequest naming the parameter (never its value)."""
    if len(items) > MAX_PARAMS:
        raise BadRequest("too many search parameters")
    count, offset = max_count, 0
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in items:
        if name in ("_count", "_offset"):
            if name in seen:
                raise BadRequest(f"search parameter {name} given more than once")
            seen.add(name)
            number = _int(name, value)
            if name == "_count":
                if number < 1:  # a page of 0 would link "next" to itself forever; totals are never given
                    raise BadRequest("search parameter _count must be at least 1")
                count = min(number, max_count)  # FHIR lets a server return fewer than asked for
            else:
                offset = number
            continue
        if name == "_format":
            if value not in ("json", "application/fhir+json", "application/json"):
                raise BadRequest("only JSON is supported")
            continue
        if name not in PASSTHROUGH:
            raise BadRequest(f"unsupported search parameter: {_safe(name)}")
        values = value.split(",")
        if len(values) > MAX_VALUES_PER_PARAM:
            raise BadRequest(f"too many values for search parameter {name}")
        for v in values:
            if not _valid(name, v):
                raise BadRequest(f"malformed value for search parameter {name}")
        params.append((name, value))
    return SearchRequest(params=tuple(params), count=count, offset=offset)


def _valid(name: str, value: str) -> bool:
    if name in ("date", "_lastUpdated"):
        return bool(DATE_VALUE.match(value))
    if name == "_id":
        return bool(RESOURCE_ID.match(value))
    if name == "_sort":
        return value in SORT_VALUES
    return bool(TOKEN_VALUE.match(value))


def _int(name: str, value: str) -> int:
    if not _DIGITS.fullmatch(value):  # ASCII only: str.isdigit() also accepts "²", which int() refuses
        raise BadRequest(f"search parameter {name} must be a non-negative integer")
    return int(value)


def _safe(name: str) -> str:
    """A parameter name is echoed only if it looks like one, and shortened."""
    return name[:40] if re.fullmatch(r"[A-Za-z_:.\-]{1,40}", name) else "(unrecognised)"
