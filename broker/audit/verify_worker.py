"""The fast per-row check of the audit chain walk, and the range worker that runs it in other processes.

``broker/audit/verify.py`` owns the walk and its report; this module holds only what a row that
checks out costs (a hash, an orjson parse, two tuple comparisons) and, for long chains, what a
helper process does with a range of sequences. It imports nothing from the broker and no
SQLAlchemy (only the standard library, orjson and the database driver), so that verify.py can
start a helper as ``python -c <BOOT> <this file>``: it is connected and ready in ~0.1 s with
SQLite and ~0.3 s with psycopg (its import), instead of the ~1 s that importing the broker
package takes. (For PostgreSQL a single-threaded parent forks its helpers instead.)

A range worker never decides that the chain is broken: it only says "every row of this range
checks out" (and which hashes the range starts from and ends with) or "no". On "no" the parent
walks serially from the start of that range, through the careful ORM check that names the break,
so the report is the serial walk's, whatever happened in parallel.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import orjson

# The columns in the order the body's fields are compared: rows[:10] against BODY_FIELDS(body),
# rows[10:13] against ACTOR_FIELDS(body["actor"]); the body and the hash last. The time arrives
# as the body's canonical text and (on SQLite) the body as UTF-8 bytes, so nothing is converted
# in Python for a row that checks out.
SEQ, PREV, BODY, HASH = 0, 1, 13, 14  # scan() spells them out: a name lookup per row is measurable
_COLUMNS = ("seq, prev_hash, {time}, request_id, youth_id, mdt_id, client_id, action, outcome, policy_version, "
            "actor_sub, actor_agency, actor_role, {body}, hash")
COLUMNS = {
    # SQLAlchemy stores a SQLite DATETIME as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC wall time).
    "sqlite": _COLUMNS.format(time="replace(time, ' ', 'T') || 'Z'", body="CAST(body AS BLOB)"),
    "postgresql": _COLUMNS.format(time="to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                                  body="body"),  # bytea would arrive hex-escaped: twice the bytes
}
_PLACEHOLDER = {"sqlite": "?", "postgresql": "%s"}
BODY_FIELDS = itemgetter("sequence", "previous_hash", "time", "request_id", "youth_id", "mdt_id", "client_id",
                         "action", "outcome", "policy_version")
ACTOR_FIELDS = itemgetter("sub", "agency", "role")


def scan(rows: Sequence[Sequence[Any]], i: int, expected_seq: int, prev_hash: str | None) -> int:
    """Index of the first row from ``rows[i]`` on that does not check out (``len(rows)`` if all do).

    A row checks out when it is the expected sequence, links to ``prev_hash`` (not checked when
    None: the caller trusts that row's stored previous hash), its hash is sha256(previous hash
    + "\\n" + body), its body is a JSON object whose sequence (an int) and previous hash are the
    row's, and whose indexed fields equal the row's columns. Not checking out means "look
    closer", never "broken": verify.py's careful check decides and names the break.
    """
    sha256, loads, body_fields, actor_fields = hashlib.sha256, orjson.loads, BODY_FIELDS, ACTOR_FIELDS
    n = len(rows)
    while i < n:
        row = rows[i]
        try:
            seq, row_prev = row[0], row[1]
            if seq != expected_seq or (row_prev != prev_hash and prev_hash is not None):
                return i
            body = row[13]
            if type(body) is str:
                body = body.encode("utf-8")
            row_hash = row[14]
            digest = sha256(row_prev.encode("ascii") + b"\n")  # cheaper than concatenating the body
            digest.update(body)
            if digest.hexdigest() != row_hash:
                return i
            parsed = loads(body)
            if (body_fields(parsed) != row[:10] or actor_fields(parsed["actor"]) != row[10:13]
                    or type(parsed["sequence"]) is not int):
                return i
        except Exception:  # unreadable, a field missing, a column of an unexpected type: look closer
            return i
        expected_seq, prev_hash = seq + 1, row_hash
        i += 1
    return n


def range_sql(dialect: str) -> str:
    """Rows ``lo < seq <= hi`` in order, ``limit`` at a time (keyset pagination)."""
    p = _PLACEHOLDER[dialect]
    return f"SELECT {COLUMNS[dialect]} FROM audit_events WHERE seq > {p} AND seq <= {p} ORDER BY seq LIMIT {p}"


def connect(spec: dict[str, Any]) -> Any:
    """A read-only DBAPI connection from the parent's connection arguments."""
    if spec["dialect"] == "sqlite":
        import sqlite3

        conn = sqlite3.connect(*spec["args"], **spec["kwargs"])
        conn.isolation_level = None  # BEGIN is ours: a deferred one, which never blocks a writer
        conn.execute("PRAGMA query_only = ON")
        return conn
    import psycopg

    conn = psycopg.connect(*spec["args"], **spec["kwargs"])
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def verify_range(conn: Any, dialect: str, task: dict[str, Any]) -> dict[str, Any]:
    """Check rows ``lo < seq <= last`` in one snapshot; they must be exactly ``first..last``, each checking out.

    The first row's link is left to the caller (``first_prev`` is returned for that). Also
    returned: the last row's hash and stored previous hash, and the hashes at the sequences in
    ``want`` (the checkpoints in range), so the caller can continue the walk as if it had read
    the range itself.
    """
    lo, first, last, limit = task["lo"], task["first"], task["last"], task["limit"]
    want = set(task.get("want") or ())
    sql = range_sql(dialect)
    cur = conn.cursor()
    expected, prev = first, None
    first_prev = last_prev = last_hash = None
    hashes: dict[int, str] = {}
    try:
        if dialect == "sqlite":
            cur.execute("BEGIN")
        while True:
            cur.execute(sql, (lo, last, limit))
            rows = cur.fetchall()
            if not rows:
                break
            if scan(rows, 0, expected, prev) != len(rows):
                return {"ok": False}
            if first_prev is None:
                first_prev = rows[0][PREV]
            if want:
                base = rows[0][SEQ]
                for seq in [s for s in want if base <= s <= rows[-1][SEQ]]:
                    hashes[seq] = rows[seq - base][HASH]
            last_row = rows[-1]
            lo = expected = last_row[SEQ]
            prev = last_hash = last_row[HASH]
            last_prev = last_row[PREV]
            expected += 1
            if len(rows) < limit or lo >= last:
                break
    finally:
        cur.close()
        conn.rollback()
    if last_hash is None or expected != last + 1 or len(hashes) != len(want):
        return {"ok": False}
    return {"ok": True, "first_prev": first_prev, "last_hash": last_hash, "last_prev": last_prev,
            "hashes": {str(k): v for k, v in hashes.items()}}


def serve(inp: Any, out: Any) -> None:
    """Helper process: a JSON line with the connection spec, then one JSON task per line, one result each.

    Answers ``{"ready": true}`` once connected (or ``{"error": ...}``); stops at EOF.
    """
    import gc

    gc.disable()  # nothing here makes reference cycles; the collector cost 3-10% of a range's time
    spec = orjson.loads(inp.readline())
    try:
        conn = connect(spec)
    except Exception as exc:  # the parent does the work itself
        out.write(orjson.dumps({"error": type(exc).__name__}) + b"\n")
        out.flush()
        return
    out.write(b'{"ready":true}\n')
    out.flush()
    try:
        while line := inp.readline():
            try:
                result = verify_range(conn, spec["dialect"], orjson.loads(line))
            except Exception as exc:
                result = {"error": type(exc).__name__}
            out.write(orjson.dumps(result) + b"\n")
            out.flush()
    finally:
        conn.close()


def main() -> None:
    """Entry point of a helper started as a fresh interpreter (see BOOT)."""
    serve(sys.stdin.buffer, sys.stdout.buffer)


# How verify.py starts a helper: load this file by path (not as broker.audit.verify_worker, which
# would import the broker package first) and run main().
BOOT = ("import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('mdt_verify_worker', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.main()\n")
