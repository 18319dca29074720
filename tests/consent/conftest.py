"""A real broker, once per backend, on the real FHIR server."""

from __future__ import annotations

import httpx
import pytest

from broker.app import create_app
from broker.auth.keys import BrokerKey
from broker.runtime import build_runtime
from tests.scenarios.harness import AGENCIES, PUBLIC_URL, Broker, make_settings, seed, write_key


async def start_consent_broker(tmp, database_url: str, fhir_base_url: str) -> Broker:
    """``tests.scenarios.harness.start_broker`` plus the consent router."""
    keys = {agency: BrokerKey.from_pem(write_key(tmp / f"{agency}.pem").read_bytes()) for agency in AGENCIES}
    seed(database_url, keys)
    runtime = build_runtime(make_settings(tmp, database_url, fhir_base_url))
    app = create_app(runtime=runtime)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    return Broker(runtime=runtime, client=client, keys=keys)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def fresh_broker(request, tmp_path, fhir_server) -> Broker:  # type: ignore[no-untyped-def]
    """A broker with the consent routes on a fresh database, once per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_consent_broker(tmp_path, url, fhir_server.base_url)
    yield b
    await b.aclose()
