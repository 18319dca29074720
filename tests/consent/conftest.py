"""A real broker, once per backend, on the real FHIR server."""

from __future__ import annotations

import pytest

from tests.scenarios.harness import Broker, start_broker


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def fresh_broker(request, tmp_path, fhir_server) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on a fresh database, once per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_broker(tmp_path, url, fhir_server.base_url)
    yield b
    await b.aclose()
