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
