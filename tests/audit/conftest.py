"""Audit tests run against a real SQLite file and a real PostgreSQL server, one fresh database each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from broker.store.db import make_engine, make_sessionmaker, upgrade



@dataclass
class Db:
    """A migrated database: its URL, engine and sessionmaker."""

    backend: str
    url: str
    engine: Engine
    sessions: sessionmaker[Session]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path) -> Iterator[Db]:
    """A freshly migrated database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    upgrade(url)
    engine = make_engine(url)
    yield Db(request.param, url, engine, make_sessionmaker(engine))
    engine.dispose()
    if request.param == "postgresql":
        _drop_database(url)


def _drop_database(url: str) -> None:
    """Keep the server's disk (and its shutdown) small across hundreds of test databases."""
    import psycopg

    address = make_url(url)
    with psycopg.connect(host=address.host, port=address.port, user=address.username, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{address.database}" WITH (FORCE)')


@pytest.fixture
def sessions(db: Db) -> sessionmaker[Session]:
    """The sessionmaker of the parametrized database."""
    return db.sessions


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases that do not exist on SQLite are not collected (rather than skipped): verify helpers
    are forked only for PostgreSQL, and ``postgresql_only`` tests kill server connections."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        forked = "fork" in (params.get("helpers_only"), params.get("start"))
        postgresql_only = forked or item.get_closest_marker("postgresql_only") is not None
        (drop if postgresql_only and params.get("db") == "sqlite" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
