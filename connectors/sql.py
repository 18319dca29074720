"""Read one youth's records from an agency's own SQL database through a mapping file.

How it keeps the Connector contract (connectors/base.py):
- queries run on the connector's own bounded thread pool (``pool_size`` threads, as many pooled
  connections), so a slow database cannot starve the event loop or the broker's other threads;
- every call is bounded by ``timeout``: the coroutine gives up on time and raises
  ``SourceTimeout``, and the statement still running is interrupted (SQLite) or cancelled
  (PostgreSQL, which also gets a server-side ``statement_timeout`` per transaction), so that
  its thread and connection come back;
- the database is opened read-only (SQLite ``mode=ro``, PostgreSQL read-only transactions);
- every failure is ``SourceUnavailable`` naming the source and the kind of error, never the
  SQL, its parameters (the youth id) or any record content;
- each call renders new dicts; nothing is cached.
Search parameters have the meaning they have in every connector (``connectors.search``).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from connectors.base import SourceQuery, SourceTimeout, SourceUnavailable, belongs_to_patient
from connectors.search import compile_search
from connectors.sqlmap import (MappingError, Record, SqlMapping, load_mapping_cached, resolve_mapping_path,
                               vocabulary_categories)

if TYPE_CHECKING:
    from broker.settings import SourceConfig

MAX_PATIENT_ID = 256
MAX_STATEMENT_SECONDS = 60
_PG_TIMEOUT = text("SELECT set_config('statement_timeout', :ms, true)")


class _Cancelled(Exception):
    """The caller gave up before the statement started."""


STREAM_ROWS = 500  # rows fetched at a time while a search streams (a server-side cursor on PostgreSQL)


class _Keep:
    """A search's row filter: the patient check, the parameters, and how many it needs."""

    __slots__ = ("matches", "patient", "cap")

    def __init__(self, matches: Any, patient: str, cap: int | None) -> None:
        self.matches, self.patient, self.cap = matches, patient, cap

    def add(self, source: str, resource: dict, out: list[dict]) -> None:
        if not belongs_to_patient(resource, self.patient):
            raise SourceUnavailable(f"source {source}: a mapped row belongs to another patient")
        if self.matches(resource):
            out.append(resource)

    def full(self, out: list[dict]) -> bool:
        return self.cap is not None and len(out) >= self.cap


class _Call:
    """One database call, so that the waiting coroutine can interrupt it from outside its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dbapi: Any = None
        self._abandoned = False

    def attach(self, dbapi_connection: Any) -> None:
        with self._lock:
            if self._abandoned:
                raise _Cancelled
            self._dbapi = dbapi_connection

    def detach(self) -> None:
        # Taken under the lock: a cancel in progress finishes before the connection goes back to
        # the pool, so it can never hit another request's statement.
        with self._lock:
            self._dbapi = None

    def abandon(self) -> None:
        """Stop the running statement if there is one (called on a helper thread)."""
        with self._lock:
            self._abandoned = True
            conn = self._dbapi
            if conn is None:
                return
            try:
                if hasattr(conn, "interrupt"):  # sqlite3
                    conn.interrupt()
                elif hasattr(conn, "cancel_safe"):  # psycopg 3
                    conn.cancel_safe(timeout=5)
                elif hasattr(conn, "cancel"):
                    conn.cancel()
            except Exception:  # noqa: BLE001 - best effort; the server-side timeout is the backstop
                pass


class SqlConnector:
    """A SQL database read through a validated mapping file; safe for concurrent use on one loop."""

    def __init__(
        self,
        name: str,
        database_url: str,
        mapping: SqlMapping,
        identifier_system: str,
        default_categories: Iterable[str],
        resource_types: Iterable[str] = (),
        pool_size: int = 4,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"source {name}: pool_size must be at least 1")
        self.name = name
        self.identifier_system = identifier_system
        self.default_categories = frozenset(default_categories)
        served = frozenset(resource_types) or mapping.resource_types
        if served - mapping.resource_types:
            raise ValueError(f"source {name}: resource_types not in {mapping.path.name}: "
                             f"{', '.join(sorted(served - mapping.resource_types))}")
        self.resource_types = served
        self.mapping = mapping
        self.pool_size = pool_size
        self.engine = _make_engine(name, database_url, pool_size)
        self._postgres = self.engine.dialect.name == "postgresql"
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: "SourceConfig") -> "SqlConnector":
        """Build from a ``SourceConfig`` with ``database_url`` and ``mapping_file``; the mapping is validated now."""
        if not cfg.database_url:
            raise ValueError(f"source {cfg.name}: kind sql needs database_url")
        if cfg.mapping_file is None:
            raise ValueError(f"source {cfg.name}: kind sql needs mapping_file")
        mapping = load_mapping_cached(resolve_mapping_path(Path(cfg.mapping_file)), vocabulary_categories())
        return cls(
            name=cfg.name,
            database_url=cfg.database_url,
            mapping=mapping,
            identifier_system=cfg.identifier_system,
            default_categories=cfg.default_categories,
            resource_types=cfg.resource_types,
            pool_size=cfg.pool_size,
        )

    async def search(self, query: SourceQuery, *, timeout: float) -> list[dict]:
        """Every mapped resource of the youth that matches the parameters, records in mapping order."""
        self._check_type(query.resource_type)
        search = compile_search(self.name, query.params)  # a bad parameter fails before any SQL runs
        patient = query.patient_id
        if not isinstance(patient, str) or not patient or len(patient) > MAX_PATIENT_ID:
            raise SourceUnavailable(f"source {self.name}: invalid patient id")
        records = self.mapping.for_type(query.resource_type)
        jobs = [(rec, rec.search_statement(), {"patient": patient}) for rec in records]
        cap = min((c for c in (search.count, query.limit) if c is not None), default=None)
        return await self._run(jobs, timeout, "search", _Keep(search.matches, patient, cap))

    async def read(self, resource_type: str, resource_id: str, *, timeout: float) -> dict | None:
        """One resource by id; None if no record makes that id."""
        self._check_type(resource_type)
        jobs = []
        for rec in self.mapping.for_type(resource_type):
            key = rec.key_for(resource_id)
            if key is not None:
                jobs.append((rec, rec.read_statement(), {"key": key}))
        if not jobs:
            return None
        found = [r for r in await self._run(jobs, timeout, "read") if r["id"] == resource_id]
        if len(found) > 1:
            raise SourceUnavailable(f"source {self.name}: more than one row makes the same id")
        return found[0] if found else None

    async def aclose(self) -> None:
        """Stop the worker threads and close pooled connections; the connector may be used again."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

    async def _run(self, jobs: list[tuple[Record, Any, dict]], timeout: float, what: str,
                   keep: "_Keep | None" = None) -> list[dict]:
        call = _Call()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._get_executor(), self._execute, jobs, call, timeout, keep)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            threading.Thread(target=call.abandon, name=f"sql-cancel-{self.name}", daemon=True).start()
            raise SourceTimeout(f"source {self.name}: {what} timed out after {timeout:g} s") from None

    def _execute(self, jobs: list[tuple[Record, Any, dict]], call: _Call, timeout: float,
                 keep: "_Keep | None" = None) -> list[dict]:
        """On a worker thread: run each statement on one connection, render each row.

        With ``keep`` (a search), rows stream from the database, each is checked to belong to the
        patient and matched as it is rendered, and reading stops once ``keep.cap`` matched.
        """
        current: Record | None = None
        try:
            with self.engine.connect() as conn:
                call.attach(conn.connection.dbapi_connection)
                try:
                    if self._postgres:
                        ms = min(math.ceil(timeout * 1000) + 250, MAX_STATEMENT_SECONDS * 1000)
                        conn.execute(_PG_TIMEOUT, {"ms": str(ms)})
                    out: list[dict] = []
                    for current, stmt, params in jobs:
                        if keep is None:
                            out.extend(current.render(row) for row in conn.execute(stmt, params).mappings())
                            continue
                        if keep.full(out):
                            break
                        options = {} if keep.cap is None else {"stream_results": True, "yield_per": STREAM_ROWS}
                        result = conn.execute(stmt, params, execution_options=options)
                        with result:
                            for row in result.mappings():
                                keep.add(self.name, current.render(row), out)
                                if keep.full(out):
                                    break
                    return out
                finally:
                    call.detach()
        except _Cancelled:
            raise SourceTimeout(f"source {self.name}: abandoned") from None
        except SourceUnavailable:
            raise
        except MappingError as exc:
            raise SourceUnavailable(f"source {self.name}: mapping {self.mapping.path.name}: {exc}") from None
        except SQLAlchemyError as exc:
            kind = type(getattr(exc, "orig", None) or exc).__name__
            where = f" in record {current.name}" if current is not None else ""
            raise SourceUnavailable(f"source {self.name}: database error{where} ({kind})") from None
        except Exception as exc:  # noqa: BLE001 - whatever it is, the caller gets no content
            raise SourceUnavailable(f"source {self.name}: unexpected error ({type(exc).__name__})") from None

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.pool_size,
                                                    thread_name_prefix=f"sql-{self.name}")
            return self._executor

    def _check_type(self, resource_type: str) -> None:
        if resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {resource_type} not served")


def _make_engine(name: str, database_url: str, pool_size: int) -> Engine:
    """A pooled engine that only reads; SQLite files are opened read-only."""
    try:
        url = make_url(database_url)
    except Exception:  # noqa: BLE001 - the URL may hold a password: never echo it
        raise ValueError(f"source {name}: database_url is not a valid SQLAlchemy URL") from None
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_pre_ping": True}
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:":
            raise ValueError(f"source {name}: an in-memory SQLite database cannot be a source")
        if not database.startswith("file:"):
            path = Path(database).resolve()
            url = url.set(database=f"file:{quote(str(path))}", query={**url.query, "mode": "ro", "uri": "true"})
        kwargs.pop("pool_pre_ping")
    elif backend == "postgresql":
        connect_args = {"connect_timeout": 10, "options": "-c default_transaction_read_only=on "
                        f"-c statement_timeout={MAX_STATEMENT_SECONDS * 1000}"}
        kwargs["connect_args"] = connect_args
    try:
        return create_engine(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - e.g. a missing driver; never echo the URL
        raise ValueError(f"source {name}: cannot use database_url ({type(exc).__name__})") from None
