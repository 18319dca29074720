"""A real broker (real keys, tokens and database) with the break-glass routes, once per backend."""

from __future__ import annotations

import pytest

from tests.scenarios.harness import Broker, start_broker

# No test here reads records, so the source never has to answer: nothing listens on this port.
NO_FHIR = "http://127.0.0.1:9/fhir"
WINDOW_MINUTES = 7
"""Not the default 60, so a test can tell that the grant window comes from the settings."""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def bg_broker(request, tmp_path) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on a fresh database whose HTTP client reaches an app that serves break-glass."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_broker(tmp_path, url, NO_FHIR, break_glass_minutes=WINDOW_MINUTES)
    yield b
    await b.aclose()
