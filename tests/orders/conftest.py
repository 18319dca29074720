"""A real broker (real keys, tokens and database) with the court order routes, once per backend."""

from __future__ import annotations

import pytest

from tests.scenarios.harness import Broker, start_broker

# No test here reads records, so the source never has to answer: nothing listens on this port.
NO_FHIR = "http://127.0.0.1:9/fhir"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def orders_broker(request, tmp_path) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on a fresh database whose HTTP client reaches an app that serves /court-orders."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_broker(tmp_path, url, NO_FHIR)
    yield b
    await b.aclose()
