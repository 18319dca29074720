"""Faults under the broker: clean errors, nothing released unaudited, recovery, and a chain that verifies.

Real faults, not mocks: PostgreSQL refusing connections (ALTER DATABASE ... ALLOW_CONNECTIONS
false and terminated backends), an audit table that rejects inserts (a trigger), a policy file
deleted underneath a reload, and a source that closes the connection in the middle of a body.
"""

from __future__ import annotations

import asyncio
import shutil

import psycopg
import pytest
from aiohttp import web
from sqlalchemy import func, make_url, select, text

from broker.audit.verify import verify_chain
from broker.policy.reload import PolicyReloader
from broker.settings import REPO_POLICY_DIR, SourceConfig
from broker.store.models import AuditEventRow, YouthIdentifier
from tests.scenarios.harness import EHR_SYSTEM, EHR_TYPES, Broker, start_broker
from tests.support.ports import free_port

DATA = "/mdts/mdt-alpha/fhir/Observation"


def _events(b: Broker) -> int:
    with b.runtime.sessions() as s:
        return s.scalar(select(func.count()).select_from(AuditEventRow))


def _admin(url: str) -> psycopg.Connection:
    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="postgres", autocommit=True)


@pytest.fixture
async def pg_broker(tmp_path, fhir_server, pg_server) -> Broker:
    b = await start_broker(tmp_path, pg_server.create_database(), fhir_server.base_url)
    yield b
    await b.aclose()


@pytest.mark.postgres
async def test_database_down_is_503_and_the_broker_recovers(pg_broker):
    b = pg_broker
    token = await b.token("mh")
    assert (await b.get(DATA, token=token)).status_code == 200
    name = make_url(b.runtime.settings.database_url).database
    with _admin(b.runtime.settings.database_url) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            for _ in range(3):
                r = await b.get(DATA, token=token)
                assert r.status_code == 503, r.text
                assert r.json()["resourceType"] == "OperationOutcome" and "entry" not in r.text
                assert "alpha" not in r.text and "psycopg" not in r.text.lower()
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    before = _events(b)
    r = await b.get(DATA, token=token)
    assert r.status_code == 200 and r.json().get("entry")
    assert _events(b) == before + 1  # the request that released data was audited
    report = verify_chain(b.runtime.sessions)
    assert report.ok, report


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_audit_write_refused_means_503_and_nothing_released(tmp_path, fhir_server, request, backend):
    url = (f"sqlite:///{tmp_path / 'broker.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("pg_server").create_database())
    b = await start_broker(tmp_path, url, fhir_server.base_url)
    try:
        token = await b.token("mh")
        assert (await b.get(DATA, token=token)).status_code == 200
        before = _events(b)
        with b.runtime.engine.begin() as conn:
            if backend == "sqlite":
                conn.execute(text("CREATE TRIGGER no_audit BEFORE INSERT ON audit_events "
                                  "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"))
            else:
                conn.execute(text("CREATE FUNCTION no_audit() RETURNS trigger AS $$ BEGIN "
                                  "RAISE EXCEPTION 'audit refused'; END $$ LANGUAGE plpgsql"))
                conn.execute(text("CREATE TRIGGER no_audit BEFORE INSERT ON audit_events "
                                  "FOR EACH ROW EXECUTE FUNCTION no_audit()"))
        r = await b.get(DATA, token=token)
        assert r.status_code == 503 and "entry" not in r.json() and "audit refused" not in r.text
        r = await b.get("/mdts/mdt-alpha/record", token=token)
        assert r.status_code == 503 and "entry" not in r.json()
        assert _events(b) == before
        with b.runtime.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER no_audit" + (" ON audit_events" if backend == "postgresql" else "")))
        r = await b.get(DATA, token=token)
        assert r.status_code == 200 and r.json().get("entry")
        assert _events(b) == before + 1
        assert verify_chain(b.runtime.sessions).ok
    finally:
        await b.aclose()


async def test_a_policy_file_deleted_underneath_keeps_the_policy_in_force(tmp_path, fhir_server):
    policies = tmp_path / "policies"
    shutil.copytree(REPO_POLICY_DIR, policies)
    b = await start_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite'}", fhir_server.base_url,
                           policy_dir=policies)
    try:
        token = await b.token("mh")
        first = await b.get(DATA, token=token)
        assert first.status_code == 200
        version = b.runtime.policy.version
        saved = (policies / "policy.csv").read_bytes()
        (policies / "policy.csv").unlink()
        result = await PolicyReloader(b.runtime, policy_dir=policies).areload("test")
        assert not result.accepted and result.errors and b.runtime.policy.version == version
        again = await b.get(DATA, token=token)
        assert again.status_code == 200
        assert [e["resource"]["id"] for e in again.json()["entry"]] == \
            [e["resource"]["id"] for e in first.json()["entry"]]
        (policies / "policy.csv").write_bytes(saved)
        result = await PolicyReloader(b.runtime, policy_dir=policies).areload("test")
        assert result.accepted
        assert verify_chain(b.runtime.sessions).ok
    finally:
        await b.aclose()


async def test_a_source_that_drops_the_connection_mid_body_is_unavailable(tmp_path, fhir_server):
    async def truncated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/fhir+json", "Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType"')
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", truncated)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir_server.base_url,
                            identifier_system=EHR_SYSTEM, default_categories=["general-health"],
                            resource_types=EHR_TYPES, timeout=2),
               SourceConfig(name="cut-off", kind="fhir", base_url=f"http://127.0.0.1:{port}/fhir",
                            identifier_system="urn:test:cut-off", default_categories=["general-health"],
                            resource_types=["Observation"], timeout=2)]
    b = await start_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite'}", fhir_server.base_url,
                           sources=sources)
    try:
        with b.runtime.sessions() as s:
            s.add(YouthIdentifier(youth_id="y-alpha", source="cut-off", system="urn:test:cut-off", value="x1"))
            s.commit()
        r = await asyncio.wait_for(b.get("/mdts/mdt-alpha/record", alias="mh", purpose="TREAT"), 10)
        assert r.status_code == 200
        issues = {i["details"]["text"]: i["details"]["coding"][0]["code"]
                  for i in r.json()["entry"][-1]["resource"]["issue"]}
        assert issues == {"county-ehr": "ok", "cut-off": "unavailable"}
        assert verify_chain(b.runtime.sessions).ok
    finally:
        await b.aclose()
        await runner.cleanup()
