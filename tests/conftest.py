"""Session-wide servers: one PostgreSQL and one FHIR R4 server, on loopback, stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, start_postgres

REPO = Path(__file__).resolve().parent.parent
DEMO_FHIR = REPO / "connectors" / "demo_data" / "fhir"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL 15 server from Debian's packages."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fhir_server():  # type: ignore[no-untyped-def]
    """The Node FHIR R4 test server seeded with the synthetic records."""
    from tests.support.fhir_server import start_fhir_server

    server = start_fhir_server(sorted(DEMO_FHIR.glob("*.json")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cws_server():  # type: ignore[no-untyped-def]
    """A second FHIR server standing in for the child welfare agency's system."""
    from tests.support.fhir_server import start_fhir_server

    server = start_fhir_server([REPO / "tests" / "scenarios" / "data" / "county-cws.json"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synthetic_sqlite(tmp_path_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The four synthetic agency databases (connectors/synthetic) as SQLite files: source -> URL."""
    from connectors import synthetic

    return synthetic.build_sqlite(tmp_path_factory.mktemp("synthetic-sqlite"))


@pytest.fixture(scope="session")
def synthetic_pg(pg_server: PostgresServer) -> dict[str, str]:
    """The four synthetic agency databases, one PostgreSQL database each: source -> URL."""
    from connectors import synthetic

    urls = {source: pg_server.create_database() for source in synthetic.SOURCES}
    synthetic.build(urls)
    return urls


@pytest.fixture(autouse=True)
def _collector_as_found() -> Iterator[None]:
    """``broker serve`` and ``broker demo`` tune the cyclic collector for the process they serve in
    (broker.cli.tune_gc_for_serving); a test that runs them in this process gets it back as it was."""
    import gc

    before = gc.get_threshold()
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.set_threshold(*before)
