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
