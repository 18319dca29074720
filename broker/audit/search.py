"""Search the audit log for auditors: exact filters, sorted by sequence, stable cursor pages.

Filters backed by a column of ``audit_events`` (youth, actor, agency, role, mdt, action,
outcome, time range) are pushed into SQL; youth, actor and time use indexes, so a search that
names one of them is fast. The filters that need the event body (category, purpose, ground,
decision, break_glass) are applied in Python to the parsed body while rows stream in batches,
so the answer is exact however selective they are — but a search with only body filters reads
the whole log. The cursor is the last sequence returned: events appended between two pages
only ever come after it, so paging never repeats or skips an event.

Functions are synchronous (run them in a worker thread) and only read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import BadRequest
from broker.store.models import AuditEventRow

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
BATCH = 500
CATEGORY_STATES = ("released", "withheld", "decided")
_DIGITS = re.compile(r"[0-9]{1,6}")  # ASCII only: str.isdigit() also accepts "²", which int() refuses
_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-._:@]{0,127}$")
_ACTION = re.compile(r"^[a-z][a-z0-9\-]*(\.[a-z][a-z0-9\-]*)*$")
PARAMS = ("youth", "actor", "agency", "role", "mdt", "category", "category_state", "purpose", "ground",
          "decision", "break_glass", "action", "outcome", "from", "to", "cursor", "limit")


@dataclass(frozen=True, slots=True)
class EventFilter:
    """One search; every field None means "any". ``start`` is inclusive, ``end`` exclusive."""

    youth: str | None = None
    actor: str | None = None
    agency: str | None = None
    role: str | None = None
    mdt: str | None = None
    action: str | None = None
    outcome: int | None = None
    start: datetime | None = None
    end: datetime | None = None
    category: str | None = None
    category_state: str | None = None
    purpose: str | None = None
    ground: str | None = None
    decision: str | None = None
    break_glass: bool | None = None

    def needs_body(self) -> bool:
        """Whether rows must be parsed to decide (otherwise SQL alone is exact)."""
        return any(v is not None for v in (self.category, self.purpose, self.ground, self.decision,
                                           self.break_glass))

    def used(self) -> list[str]:
        """The names of the filters set (for the audit event of the search; never values)."""
        return sorted(f.name for f in fields(self) if getattr(self, f.name) is not None)


@dataclass(frozen=True, slots=True)
class Page:
    """Events in sequence order and the cursor of the next page (None at the end)."""

    events: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(seq: int) -> str:
    """Opaque to callers: base64url of the last sequence returned."""
    return base64.urlsafe_b64encode(str(seq).encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence a cursor stands for; anything else is a 400 naming ``cursor``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("invalid parameter: cursor") from None
    if not raw.isdigit() or len(raw) > 18:  # ascii (decoded above); 19 digits can overflow a BIGINT
        raise BadRequest("invalid parameter: cursor")
    return int(raw)


def parse_time(name: str, value: str) -> datetime:
    """ISO 8601 with a zone; a naive time is refused because its instant is a guess."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"invalid parameter: {name} (ISO 8601 with a time zone)") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise BadRequest(f"invalid parameter: {name} (ISO 8601 with a time zone)")
    return parsed.astimezone(UTC)


def parse_query(items: Sequence[tuple[str, str]], *, categories: Mapping[str, Any], purposes: Mapping[str, Any],
                grounds: Mapping[str, Any]) -> tuple[EventFilter, int | None, int]:
    """Validate the query string into (filter, after-sequence, limit); errors name the parameter only."""
    values: dict[str, str] = {}
    for name, value in items:
        if name not in PARAMS:
            raise BadRequest(f"unknown parameter: {name[:40]}")
        if name in values:
            raise BadRequest(f"repeated parameter: {name}")
        values[name] = value

    def text(name: str, pattern: re.Pattern[str] = _TEXT) -> str | None:
        v = values.get(name)
        if v is None:
            return None
        if not pattern.match(v):
            raise BadRequest(f"invalid parameter: {name}")
        return v

    def vocab(name: str, allowed: Mapping[str, Any] | Sequence[str]) -> str | None:
        v = values.get(name)
        if v is not None and v not in allowed:
            raise BadRequest(f"invalid parameter: {name}")
        return v

    outcome = values.get("outcome")
    if outcome is not None and (not _DIGITS.fullmatch(outcome) or not 100 <= int(outcome) <= 599):
        raise BadRequest("invalid parameter: outcome")
    flag = values.get("break_glass")
    if flag is not None and flag not in ("true", "false"):
        raise BadRequest("invalid parameter: break_glass (true or false)")
    limit_text = values.get("limit", str(DEFAULT_LIMIT))
    if not _DIGITS.fullmatch(limit_text) or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise BadRequest(f"invalid parameter: limit (1-{MAX_LIMIT})")
    start = parse_time("from", values["from"]) if "from" in values else None
    end = parse_time("to", values["to"]) if "to" in values else None
    if start is not None and end is not None and end < start:
        raise BadRequest("invalid parameter: to (before from)")
    state = vocab("category_state", CATEGORY_STATES)
    category = vocab("category", categories)
    if state is not None and category is None:
        raise BadRequest("invalid parameter: category_state (needs category)")
    flt = EventFilter(
        youth=text("youth"), actor=text("actor"), agency=text("agency"), role=text("role"), mdt=text("mdt"),
        action=text("action", _ACTION), outcome=int(outcome) if outcome is not None else None,
        start=start, end=end, category=category, category_state=state, purpose=vocab("purpose", purposes),
        ground=vocab("ground", grounds), decision=vocab("decision", ("allow", "deny")),
        break_glass=None if flag is None else flag == "true")
    after = decode_cursor(values["cursor"]) if "cursor" in values else None
    return flt, after, int(limit_text)


def _query(flt: EventFilter, after: int, batch: int):  # type: ignore[no-untyped-def]
    """The SQL part of the filter: column-backed conditions, sequence order, one batch."""
    q = select(AuditEventRow.seq, AuditEventRow.body, AuditEventRow.hash).where(AuditEventRow.seq > after)
    columns = ((AuditEventRow.youth_id, flt.youth), (AuditEventRow.actor_sub, flt.actor),
               (AuditEventRow.actor_agency, flt.agency), (AuditEventRow.actor_role, flt.role),
               (AuditEventRow.mdt_id, flt.mdt), (AuditEventRow.action, flt.action),
               (AuditEventRow.outcome, flt.outcome))
    for column, value in columns:
        if value is not None:
            q = q.where(column == value)
    if flt.start is not None:
        q = q.where(AuditEventRow.time >= flt.start)
    if flt.end is not None:
        q = q.where(AuditEventRow.time < flt.end)
    return q.order_by(AuditEventRow.seq).limit(batch)


def matches(flt: EventFilter, event: Mapping[str, Any]) -> bool:
    """The body filters; the column filters were already applied by SQL."""
    if flt.purpose is not None and event.get("purpose") != flt.purpose:
        return False
    if flt.break_glass is not None and bool(event.get("break_glass")) != flt.break_glass:
        return False
    decisions = [d for d in event.get("decisions") or () if isinstance(d, Mapping)]
    if flt.category is not None:
        cats = event.get("categories") or {}
        decided = {d.get("category") for d in decisions}
        states = {"released": set(cats.get("released") or ()), "withheld": set(cats.get("withheld") or ()),
                  "decided": decided}
        wanted = (flt.category_state,) if flt.category_state else CATEGORY_STATES
        if not any(flt.category in states[s] for s in wanted):
            return False
    if flt.decision is not None:
        relevant = [d for d in decisions if flt.category is None or d.get("category") == flt.category]
        if not any(d.get("effect") == flt.decision for d in relevant):
            return False
    if flt.ground is not None:
        grounds = event.get("grounds") or {}
        held = set(grounds.get("used") or ())
        relied = {d.get("ground") for d in decisions if d.get("effect") == "allow"}
        if flt.ground not in held | relied:
            return False
    return True


def stream(sessions: sessionmaker[Session], flt: EventFilter, *, after: int = 0,
           batch: int = BATCH) -> Iterator[tuple[int, dict[str, Any]]]:
    """Matching events in sequence order, read ``batch`` rows per short read transaction."""
    while True:
        with sessions() as session:
            rows = session.execute(_query(flt, after, batch)).all()
        for seq, body, digest in rows:
            event = json.loads(body)
            if flt.needs_body() and not matches(flt, event):
                continue
            event["hash"] = digest
            yield seq, event
        if len(rows) < batch:
            return
        after = rows[-1][0]


def search(sessions: sessionmaker[Session], flt: EventFilter, *, after: int | None = None,
           limit: int = DEFAULT_LIMIT) -> Page:
    """One page of matching events; ``next_cursor`` only when at least one more event matches."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError("limit out of range")
    events: list[dict[str, Any]] = []
    last = None
    batch = min(BATCH, limit + 1) if not flt.needs_body() else BATCH
    for seq, event in stream(sessions, flt, after=after or 0, batch=batch):
        if len(events) == limit:
            return Page(events=events, next_cursor=encode_cursor(last))  # type: ignore[arg-type]
        events.append(event)
        last = seq
    return Page(events=events, next_cursor=None)
