"""Engine and session factory for SQLite (embedded) and PostgreSQL (production).

SQLite transactions start with BEGIN IMMEDIATE so that writers serialize on the database
lock instead of failing on upgrade; WAL mode lets readers proceed meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the broker stores is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Create an engine configured for safe concurrent use on either backend."""
    if url.startswith("sqlite"):
        # Sized like PostgreSQL's: SQLAlchemy's default (5 + 10 overflow) closed and reopened an
        # overflow connection per request under concurrent load.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=pool_size)
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        # A transaction that may write takes the write lock up front, so it never fails upgrading
        # a read lock; one that only reads (see read_only) takes none, so in WAL mode it never
        # waits for the audit writer's commit.
        # Sent on the driver's own connection: through exec_driver_sql each transaction cost ~25 us
        # more (the audit writer begins one per batch). Its errors still raise as SQLAlchemy's.
        statement = "BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE"
        try:
            conn.connection.driver_connection.execute(statement).close()
        except sqlite3.Error as exc:
            raise DBAPIError.instance(statement, None, exc, sqlite3.Error, dialect=conn.dialect) from exc


_READ_ONLY = "broker_read_only"


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection whose transaction only reads; closed (its transaction rolled back) on leaving.

    On SQLite its transaction begins DEFERRED instead of IMMEDIATE (no write lock), so in WAL mode
    it never waits for the audit writer's commit. Should it write after all, SQLite may refuse the
    lock upgrade under contention: an error, never a silent write. No effect on PostgreSQL, where
    readers never wait for writers. A Session that must read in the same snapshot binds to it:
    ``sessions(bind=conn)``.
    """
    with engine.connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        yield conn


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    """Alembic configuration pointing at the packaged migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
