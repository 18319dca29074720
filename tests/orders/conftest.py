"""A real broker (real keys, tokens and database) with the court order routes, once per backend."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from broker.app import create_app
from broker.orders.views import router
from tests.scenarios.harness import PUBLIC_URL, Broker, start_broker

# No test here reads records, so the source never has to answer: nothing listens on this port.
NO_FHIR = "http://127.0.0.1:9/fhir"


def with_routes(app: FastAPI) -> FastAPI:
    """Add the court order routes unless the app factory already includes them."""
    paths = {getattr(r, "path", None) for r in app.routes}
    if "/court-orders" not in paths:
        app.include_router(router)
    return app


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def orders_broker(request, tmp_path) -> Broker:  # type: ignore[no-untyped-def]
    """A broker on a fresh database whose HTTP client reaches an app that serves /court-orders."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_broker(tmp_path, url, NO_FHIR)
    await b.client.aclose()
    app = with_routes(create_app(runtime=b.runtime))
    b.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    yield b
    await b.aclose()
