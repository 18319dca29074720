"""Migrations build exactly the models' schema on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from broker.store.db import make_engine, upgrade
from broker.store.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def migrated_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    upgrade(url)
    return url


def test_migrations_match_models(migrated_url):
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"agencies", "staff", "oauth_clients", "youth", "youth_identifiers", "mdts", "memberships",
            "audit_events", "audit_head", "policy_versions"} <= tables


def test_upgrade_is_idempotent(migrated_url):
    upgrade(migrated_url)


def _hold_sqlite_write_lock(engine, holding, release):  # type: ignore[no-untyped-def]
    with engine.connect() as conn, conn.begin():  # BEGIN IMMEDIATE: the database write lock
        conn.exec_driver_sql("UPDATE registry_generation SET value = value + 1")
        holding.set()
        release.wait(30)


def test_a_read_only_connection_does_not_wait_for_the_sqlite_write_lock(tmp_path):
    """The pipeline's context reads begin DEFERRED: in WAL mode they read while the audit writer
    holds the write lock, and so does a Session bound to such a connection; so does the inline
    generation read on the event loop. A session that may write still begins IMMEDIATE and waits."""
    import threading
    import time

    from sqlalchemy import text

    from broker.pipeline import context_cache
    from broker.store.db import make_sessionmaker, read_only

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    before = context_cache.read_generation(engine)
    inline = context_cache.InlineGeneration.for_engine(engine)
    assert inline is not None and inline.read() == before
    holding, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_sqlite_write_lock, args=(engine, holding, release))
    holder.start()
    try:
        assert holding.wait(30)
        began = time.monotonic()
        assert inline.read() == before  # the last committed value, without waiting
        assert context_cache.read_generation(engine) == before
        with read_only(engine) as conn:
            with sessions(bind=conn) as session:  # how the pipeline resolves a context it has not kept
                assert session.execute(text("SELECT value FROM registry_generation")).scalar_one() == before
        assert time.monotonic() - began < 1.0
        done = threading.Event()

        def may_write() -> None:
            with sessions() as session:  # not marked: BEGIN IMMEDIATE waits for the lock
                session.execute(text("SELECT 1"))
                done.set()

        writer = threading.Thread(target=may_write)
        writer.start()
        assert not done.wait(0.5)
        release.set()
        assert done.wait(30)
        writer.join(30)
        assert inline.read() == before + 1 == context_cache.read_generation(engine)  # the holder's commit
    finally:
        release.set()
        holder.join(30)
        inline.close()
        engine.dispose()


def test_the_inline_generation_read_is_for_sqlite_files_only_and_gives_way_when_it_cannot_read(tmp_path):
    from sqlalchemy import create_engine

    from broker.pipeline import context_cache

    assert context_cache.InlineGeneration.for_engine(create_engine("sqlite://")) is None  # :memory:
    assert context_cache.InlineGeneration.for_engine(
        create_engine("postgresql+psycopg://u:p@127.0.0.1:1/db")) is None
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    inline = context_cache.InlineGeneration.for_engine(engine)
    generation = inline.read()
    assert isinstance(generation, int)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM registry_generation")
    assert inline.read() is context_cache.UNREAD  # no row: the caller reads the pooled way (None: keep nothing)
    assert context_cache.read_generation(engine) is None
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE registry_generation")
    assert inline.read() is context_cache.UNREAD  # an error is not raised here: the pooled read's is the request's
    with pytest.raises(Exception):
        context_cache.read_generation(engine)
    inline.close()
    engine.dispose()


def test_the_inline_generation_connection_cannot_write(tmp_path):
    import sqlite3

    from broker.pipeline import context_cache

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    inline = context_cache.InlineGeneration.for_engine(engine)
    assert isinstance(inline.read(), int)
    with pytest.raises(sqlite3.OperationalError):
        inline._conn.execute("UPDATE registry_generation SET value = value + 1")
    inline.close()
    engine.dispose()
def _query_only_write(inline) -> None:  # type: ignore[no-untyped-def]
    inline._conn.execute("CREATE TABLE nope (x)")


def test_a_sqlite_begin_that_cannot_take_the_lock_raises_sqlalchemys_error_and_keeps_nothing_open(tmp_path):
    """BEGIN IMMEDIATE is sent on the driver; a failure is SQLAlchemy's OperationalError, as before,
    and the connection can begin again once the lock is free."""
    import threading

    from sqlalchemy.exc import OperationalError

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    holding, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_sqlite_write_lock, args=(engine, holding, release))
    holder.start()
    try:
        assert holding.wait(30)
        with engine.connect() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=0").close()
            with pytest.raises(OperationalError, match="database is locked"):
                conn.begin()
            assert not conn.in_transaction()
            release.set()
            holder.join(30)
            with conn.begin():
                value = conn.exec_driver_sql("SELECT value FROM registry_generation").scalar_one()
                conn.exec_driver_sql("UPDATE registry_generation SET value = value + 1")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT value FROM registry_generation").scalar_one() == value + 1
    finally:
        release.set()
        holder.join(30)
        engine.dispose()
