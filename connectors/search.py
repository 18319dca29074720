"""FHIR search parameters applied in memory, shared by the connectors that hold or build resources.

The meaning is the one a FHIR R4 server gives these parameters, for the subset the broker
passes on: ``_id`` (comma = OR); ``code`` (``system|code``, ``|code``, ``system|`` or ``code``,
comma = OR, case-insensitive like medplum); ``date`` and ``_lastUpdated`` with prefixes
eq/ne/lt/le/gt/ge/sa/eb compared as ranges (a day or a dateTime at its own precision, a Period
with open ends); ``_count`` caps the result; ``_sort`` is accepted and ignored. Any other
parameter, and any malformed value, raises ``SourceUnavailable`` rather than silently returning
too much.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from connectors.base import SourceUnavailable

# The elements each search parameter looks at, in the order FHIR R4 resources use them.
CODE_ELEMENTS = ("code", "medicationCodeableConcept", "vaccineCode")
DATE_ELEMENTS = (
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod",
    "recordedDate",
    "date",
    "authoredOn",
    "occurrenceDateTime",
    "period",
    "sent",  # Communication
)
IGNORED_PARAMS = frozenset({"_sort", "_format", "_total"})
SUPPORTED_PARAMS = frozenset({"_id", "code", "date", "_lastUpdated", "_count"}) | IGNORED_PARAMS
_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

Range = tuple[datetime, datetime]
Predicate = Callable[[dict], bool]
_TICK = timedelta(microseconds=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CompiledSearch:
    """The predicates every returned resource must pass, and the cap on how many are returned."""

    filters: tuple[Predicate, ...]
    count: int | None

    def matches(self, resource: dict) -> bool:
        """True if the resource passes every parameter."""
        return all(f(resource) for f in self.filters)

    def apply(self, resources: Iterable[dict], limit: int | None = None) -> list[dict]:
        """The matching resources, in the given order, at most ``count`` (and ``limit``) of them."""
        cap = min((c for c in (self.count, limit) if c is not None), default=None)
        out: list[dict] = []
        for resource in resources:
            if cap is not None and len(out) >= cap:
                break
            if self.matches(resource):
                out.append(resource)
        return out


def compile_search(source: str, params: Iterable[tuple[str, str]]) -> CompiledSearch:
    """Validate and compile the parameters; a problem names the source and parameter, never its value."""
    filters: list[Predicate] = []
    count: int | None = None
    for key, value in params:
        if key == "_count":
            count = parse_count(source, value)
        elif key in IGNORED_PARAMS:
            continue
        else:
            filters.append(_filter(source, key, value))
    return CompiledSearch(tuple(filters), count)


def _filter(source: str, key: str, value: str) -> Predicate:
    if key == "_id":
        ids = set(value.split(","))
        return lambda r: r.get("id") in ids
    if key == "code":
        tokens = [_token(t) for t in value.split(",") if t]
        return lambda r: any(_coding_matches(c, tokens) for c in _codings(r))
    if key in ("date", "_lastUpdated"):
        prefix, target = _date_filter(source, value)
        if key == "date":
            return lambda r: any(_compare(prefix, v, target) for v in _date_values(r))
        return lambda r: any(_compare(prefix, v, target) for v in _last_updated(r))
    raise SourceUnavailable(f"source {source}: search parameter {key} not supported")


def parse_count(source: str, value: str) -> int:
    """``_count`` as a non-negative integer."""
    if not value.isdigit():
        raise SourceUnavailable(f"source {source}: _count must be a non-negative integer")
    return int(value)


def _token(text: str) -> tuple[str | None, str]:
    if "|" in text:
        system, code = text.split("|", 1)
        return system.lower(), code.lower()
    return None, text.lower()


def _coding_matches(coding: dict, tokens: list[tuple[str | None, str]]) -> bool:
    system = str(coding.get("system") or "").lower()
    code = str(coding.get("code") or "").lower()
    for want_system, want_code in tokens:
        if want_system is None:
            if code == want_code:
                return True
        elif want_system == "":
            if not system and code == want_code:
                return True
        elif system == want_system and (not want_code or code == want_code):
            return True
    return False


def _codings(resource: dict) -> Iterator[dict]:
    for name in CODE_ELEMENTS:
        concept = resource.get(name)
        if isinstance(concept, dict):
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict):
                    yield coding


def _date_filter(source: str, value: str) -> tuple[str, Range]:
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    text = value[2:] if value[:2] in _PREFIXES else value
    target = to_range(text)
    if target is None:
        raise SourceUnavailable(f"source {source}: malformed date parameter")
    return prefix, target


def _date_values(resource: dict) -> Iterator[Range]:
    for name in DATE_ELEMENTS:
        value = resource.get(name)
        if isinstance(value, str):
            rng = to_range(value)
            if rng:
                yield rng
        elif isinstance(value, dict):
            yield _period_range(value)


def _period_range(period: dict) -> Range:
    """A Period's instants; a missing start or end is open."""
    start = to_range(period["start"]) if isinstance(period.get("start"), str) else None
    end = to_range(period["end"]) if isinstance(period.get("end"), str) else None
    return (start[0] if start else _EARLIEST), (end[1] if end else _LATEST)


def _last_updated(resource: dict) -> Iterator[Range]:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    rng = to_range(value) if isinstance(value, str) else None
    if rng:
        yield rng


def _compare(prefix: str, value: Range, target: Range) -> bool:
    """FHIR date comparison of two ranges, as R4 search section 3.1.1.4.2 defines it."""
    (v_start, v_end), (t_start, t_end) = value, target
    if prefix == "eq":
        return t_start <= v_start and v_end <= t_end
    if prefix == "ne":
        return not (t_start <= v_start and v_end <= t_end)
    if prefix == "lt":
        return v_start < t_start
    if prefix == "le":
        return v_start <= t_end
    if prefix == "gt":
        return v_end > t_end
    if prefix == "ge":
        return v_end >= t_start
    if prefix == "sa":
        return v_start > t_end
    if prefix == "eb":
        return v_end < t_start
    return False


def to_range(text: str) -> Range | None:
    """The instants a FHIR date, dateTime or instant covers, at its own precision, in UTC."""
    m = _DATE.match(text.strip())
    if not m:
        return None
    try:
        year = int(m["y"])
        if m["m"] is None:
            start = datetime(year, 1, 1, tzinfo=UTC)
            return start, datetime(year + 1, 1, 1, tzinfo=UTC) - _TICK
        month = int(m["m"])
        if m["d"] is None:
            start = datetime(year, month, 1, tzinfo=UTC)
            days = calendar.monthrange(year, month)[1]
            return start, start + timedelta(days=days) - _TICK
        day = int(m["d"])
        if m["H"] is None:
            start = datetime(year, month, day, tzinfo=UTC)
            return start, start + timedelta(days=1) - _TICK
        tz = UTC
        if m["tz"] and m["tz"] != "Z":
            sign = 1 if m["tz"][0] == "+" else -1
            hours, minutes = int(m["tz"][1:3]), int(m["tz"][4:6])
            tz = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
        seconds = int(m["S"]) if m["S"] is not None else 0
        micros = int((m["f"] or "0")[:6].ljust(6, "0"))
        start = datetime(year, month, day, int(m["H"]), int(m["M"]), seconds, micros, tzinfo=tz).astimezone(UTC)
    except ValueError:
        return None
    if m["S"] is None:
        return start, start + timedelta(minutes=1) - _TICK
    if m["f"] is None:
        return start, start + timedelta(seconds=1) - _TICK
    return start, start
