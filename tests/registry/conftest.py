"""A real broker (real keys, tokens, database) with two sources and an auditor, once per backend per module.

No test here reads records, so the sources never have to answer: nothing listens on their port.
Tests that write make their own youth and teams, so one broker serves a whole module.
"""

from __future__ import annotations

import pytest

from tests.audit.auditors import start_audit_broker
from tests.scenarios.harness import Broker

NO_FHIR = "http://127.0.0.1:9/fhir"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def linking_broker(request, tmp_path_factory) -> Broker:  # type: ignore[no-untyped-def]
    """The harness broker with the county-ehr and county-cws sources and the audit office's staff."""
    tmp = tmp_path_factory.mktemp(f"linking-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_audit_broker(tmp, url, NO_FHIR, cws_base_url=NO_FHIR)
    yield b
    await b.aclose()
