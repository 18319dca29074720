"""The audit sink: append one event to the hash chain, durably, before the response is sent."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Select, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import GENESIS_HASH, canonical_json, chain_hash
from broker.domain import AuditOutcome
from broker.store.models import AuditEventRow, AuditHead

HEAD_ID = 1
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


class AuditWriteError(Exception):
    """The event was not committed; the pipeline must answer 503, never release the data."""


class AuditSink(Protocol):
    """Where the pipeline records each decision before it responds.

    ``append`` is synchronous (blocking: async code awaits it through ``append_async`` below) and
    safe to call from many threads at once. When it returns,
    the event is committed durably and chained; on any failure it raises AuditWriteError and
    nothing of the event is stored. On success it adds ``sequence`` and ``previous_hash`` to
    the caller's dict (and changes nothing else in it).
    """

    def append(self, event: dict[str, Any]) -> AuditOutcome:
        """Commit ``event`` as the next link of the chain."""
        ...


async def append_async(sink: AuditSink, event: dict[str, Any]) -> AuditOutcome:
    """Await ``sink.append(event)``: on the running loop when the sink has its own ``append_async``
    (GroupCommitAuditSink: the request holds no thread while its batch commits), else in a worker thread."""
    native = getattr(sink, "append_async", None)
    if native is not None:
        return await native(event)
    from anyio import to_thread

    return await to_thread.run_sync(sink.append, event)


class SqlAuditSink:
    """AuditSink over the ``audit_events``/``audit_head`` tables on SQLite or PostgreSQL.

    Every append locks the single head row for the length of one short transaction, so the
    chain never forks however many threads or processes write. Thread-safe: it holds nothing
    but the sessionmaker.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def append(self, event: dict[str, Any]) -> AuditOutcome:
        """Chain and commit ``event``; raises AuditWriteError (naming only the cause's class)."""
        try:
            record = {k: v for k, v in event.items() if k != "hash"}
            columns = index_columns(record)
            with self._sessions.begin() as session:
                seq, prev = _lock_head(session.connection())
                seq += 1
                record["sequence"] = seq
                record["previous_hash"] = prev
                body = canonical_json(record)
                digest = chain_hash(prev, body)
                session.add(AuditEventRow(seq=seq, body=body.decode("utf-8"), prev_hash=prev,
                                          hash=digest, **columns))
                session.flush()
                session.execute(update(AuditHead).where(AuditHead.id == HEAD_ID)
                                .values(seq=seq, hash=digest))
        except Exception as exc:  # any failure at all must reach the caller as one type
            raise AuditWriteError(f"audit append failed: {type(exc).__name__}") from exc
        event["sequence"] = seq
        event["previous_hash"] = prev
        return AuditOutcome(sequence=seq, hash=digest)


def index_columns(event: dict[str, Any]) -> dict[str, Any]:
    """The searchable columns of an event, validated so both backends refuse the same events."""
    when = event.get("time")
    if not isinstance(when, datetime) or when.utcoffset() is None:
        raise ValueError("event time must be a timezone-aware datetime")
    actor = event.get("actor") or {}
    if not isinstance(actor, dict):
        raise TypeError("event actor must be a mapping")
    outcome = event.get("outcome")
    if not isinstance(outcome, int) or isinstance(outcome, bool):
        raise TypeError("event outcome must be an int HTTP status")
    columns = {
        "time": when.astimezone(UTC),
        "request_id": event.get("request_id"),
        "youth_id": event.get("youth_id"),
        "mdt_id": event.get("mdt_id"),
        "actor_sub": actor.get("sub"),
        "actor_agency": actor.get("agency"),
        "actor_role": actor.get("role"),
        "client_id": event.get("client_id"),
        "action": event.get("action"),
        "outcome": outcome,
        "policy_version": event.get("policy_version"),
    }
    for name, nullable, length in _TEXT_COLUMNS:
        value = columns[name]
        if value is None:
            if not nullable:
                raise ValueError(f"event {name} is required")
        elif type(value) is not str and not isinstance(value, str):
            raise TypeError(f"event {name} must be a string")
        elif len(value) > length:
            raise ValueError(f"event {name} is longer than {length}")
    return columns


# SQLite ignores VARCHAR lengths and nullability of our making: index_columns enforces them for
# both backends, from the table definition (read once: the per-call lookup was a visible cost).
_TEXT_COLUMNS = tuple((name, AuditEventRow.__table__.c[name].nullable, AuditEventRow.__table__.c[name].type.length)
                      for name in ("request_id", "youth_id", "mdt_id", "actor_sub", "actor_agency", "actor_role",
                                   "client_id", "action", "policy_version"))


def _head_query() -> Select[tuple[int, str]]:
    return select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == HEAD_ID).with_for_update()


def _lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the head row (creating it race-free on first use) and return its seq and hash.

    PostgreSQL: SELECT ... FOR UPDATE. SQLite renders no FOR UPDATE; its BEGIN IMMEDIATE
    (see broker.store.db) already holds the database write lock.
    """
    row = conn.execute(_head_query()).one_or_none()
    if row is None:
        insert = _INSERTS[conn.dialect.name]
        conn.execute(insert(AuditHead).values(id=HEAD_ID, seq=0, hash=GENESIS_HASH)
                     .on_conflict_do_nothing(index_elements=[AuditHead.id]))
        row = conn.execute(_head_query()).one()
    return int(row.seq), str(row.hash)
