"""An ordinary FHIR client library, pointed at /mdts/{id}/fhir over real HTTP, can search and read."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvicorn
from fhirpy import AsyncFHIRClient

from broker.app import create_app
from broker.runtime import build_runtime
from tests.support.ports import free_port


@pytest.fixture
async def served(broker):
    """The scenario broker's runtime behind uvicorn on a loopback port."""
    port = free_port()
    settings = broker.runtime.settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}"})
    runtime = build_runtime(settings)
    config = uvicorn.Config(create_app(runtime=runtime), host="127.0.0.1", port=port, lifespan="off",
                            log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    await runtime.aclose()


async def test_fhirpy_search_and_read(broker, served):
    token = await broker.token("mh")
    client = AsyncFHIRClient(f"{served}/mdts/mdt-alpha/fhir", authorization=f"Bearer {token}",
                             extra_headers={"X-Purpose-Of-Use": "TREAT"})
    weights = await client.resources("Observation").search(code="http://loinc.org|29463-7").fetch_all()
    assert sorted(o["id"] for o in weights) == ["alpha-obs-weight-2024", "alpha-obs-weight-2025",
                                                "alpha-obs-weight-2026"]
    # fetch_all follows the facade's next links
    paged = await client.resources("Observation").limit(3).fetch_all()
    unpaged = await client.resources("Observation").fetch_all()
    assert len(paged) == len(unpaged) > 3
    one = await client.reference("Observation", "alpha-obs-hiv-2025").to_resource()
    assert one["id"] == "alpha-obs-hiv-2025"
