"""Serve FHIR resources from JSON Bundles on disk, so the demo runs without a FHIR server.

It answers the small search subset the demo uses, with the same meaning a FHIR server gives
it: ``_id``; ``code`` (``system|code`` or ``code``, comma = OR, case-insensitive like medplum);
``date`` and ``_lastUpdated`` with prefixes eq/ne/lt/le/gt/ge compared as ranges (a day or a
dateTime at its precision); ``_count`` caps the result; ``_sort`` is accepted and ignored.
Any other parameter raises ``SourceUnavailable`` rather than silently returning too much.
"""

from __future__ import annotations

import calendar
import copy
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from connectors.base import SourceQuery, SourceUnavailable, belongs_to_patient

if TYPE_CHECKING:
    from broker.settings import SourceConfig

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
)
_IGNORED_PARAMS = frozenset({"_sort", "_format", "_total"})
_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

Range = tuple[datetime, datetime]
_TICK = timedelta(microseconds=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


class StaticFhirConnector:
    """An in-memory FHIR source loaded once from a directory of Bundle JSON files."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        identifier_system: str,
        default_categories: Iterable[str],
        resource_types: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.identifier_system = identifier_system
        self.default_categories = frozenset(default_categories)
        self._by_type: dict[str, dict[str, dict]] = {}
        for path in sorted(Path(data_dir).glob("*.json")):
            for resource in _bundle_resources(path):
                self._by_type.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        if not self._by_type:
            raise ValueError(f"source {name}: no FHIR resources found in {data_dir}")
        self.resource_types = frozenset(resource_types) or frozenset(self._by_type)

    @classmethod
    def from_config(cls, cfg: "SourceConfig") -> "StaticFhirConnector":
        """Build from a ``SourceConfig`` whose ``data_dir`` holds the Bundles."""
        if cfg.data_dir is None:
            raise ValueError(f"source {cfg.name}: kind static-fhir needs data_dir")
        return cls(
            name=cfg.name,
            data_dir=cfg.data_dir,
            identifier_system=cfg.identifier_system,
            default_categories=cfg.default_categories,
            resource_types=cfg.resource_types,
        )

    async def search(self, query: SourceQuery, *, timeout: float) -> list[dict]:
        """Matching resources of the patient, in file order, as copies."""
        if query.resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {query.resource_type} not served")
        filters = []
        count: int | None = None
        for key, value in query.params:
            if key == "_count":
                count = _parse_count(self.name, value)
            elif key in _IGNORED_PARAMS:
                continue
            else:
                filters.append(self._filter(key, value))
        out: list[dict] = []
        for resource in self._by_type.get(query.resource_type, {}).values():
            if count is not None and len(out) >= count:
                break
            if belongs_to_patient(resource, query.patient_id) and all(f(resource) for f in filters):
                out.append(copy.deepcopy(resource))
        return out

    async def read(self, resource_type: str, resource_id: str, *, timeout: float) -> dict | None:
        """One resource by id, None if there is none."""
        if resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {resource_type} not served")
        found = self._by_type.get(resource_type, {}).get(resource_id)
        return copy.deepcopy(found) if found is not None else None

    async def aclose(self) -> None:
        """Nothing to release; part of the Protocol."""

    def _filter(self, key: str, value: str):
        if key == "_id":
            ids = set(value.split(","))
            return lambda r: r.get("id") in ids
        if key == "code":
            tokens = [_token(t) for t in value.split(",") if t]
            return lambda r: any(_coding_matches(c, tokens) for c in _codings(r))
        if key in ("date", "_lastUpdated"):
            prefix, target = _date_filter(self.name, value)
            if key == "date":
                return lambda r: any(_compare(prefix, v, target) for v in _date_values(r))
            return lambda r: any(_compare(prefix, v, target) for v in _last_updated(r))
        raise SourceUnavailable(f"source {self.name}: search parameter {key} not supported")


def _bundle_resources(path: Path) -> Iterator[dict]:
    try:
        bundle = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValueError(f"{path}: not a FHIR Bundle")
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("resourceType") or not resource.get("id"):
            raise ValueError(f"{path}: entry {i} has no resource with resourceType and id")
        yield resource


def _parse_count(name: str, value: str) -> int:
    if not value.isdigit():
        raise SourceUnavailable(f"source {name}: _count must be a non-negative integer")
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


def _date_filter(name: str, value: str) -> tuple[str, Range]:
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    text = value[2:] if value[:2] in _PREFIXES else value
    target = to_range(text)
    if target is None:
        raise SourceUnavailable(f"source {name}: malformed date parameter")
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
