"""One broker per backend for the scenario tables, on the real FHIR server."""

from __future__ import annotations

import pytest

from tests.scenarios.harness import Broker, start_broker


@pytest.fixture(scope="module")
async def broker(tmp_path_factory, fhir_server) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on SQLite, shared by one module's read-only scenarios."""
    tmp = tmp_path_factory.mktemp("broker")
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url)
    yield b
    await b.aclose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def fresh_broker(request, tmp_path, fhir_server) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on a fresh database, once per backend, for tests that write."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_broker(tmp_path, url, fhir_server.base_url)
    yield b
    await b.aclose()
