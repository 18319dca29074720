"""The demo seeds, serves the synthetic records without Node, and its printed tokens work."""

from __future__ import annotations

import re

import httpx
import pytest

from broker import demo
from broker.app import create_app
from broker.cli import main


@pytest.fixture
def demo_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BROKER_DEMO_ROOT", str(tmp_path))
    directory = demo.state_dir()
    demo.ensure_keys(directory)
    return directory


async def test_demo_banner_requests_show_an_allowed_and_a_withheld_category(demo_dir):
    settings = demo.demo_settings(demo_dir)
    demo.seed(settings, demo_dir)
    demo.seed(settings, demo_dir)  # idempotent
    app = create_app(settings)
    text = demo.banner(settings)
    assert "http://127.0.0.1:8000" in text
    token = re.search(r"Bearer (\S+)'", text).group(1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=settings.public_url) as c:
        headers = {"Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "COC"}
        r = await c.get("/mdts/mdt-demo-alpha/fhir/Condition", headers=headers)
        assert r.status_code == 200, r.text
        ids = {e["resource"]["id"] for e in r.json()["entry"]}
        assert "alpha-cond-ptsd" in ids            # mental health, care coordination: released
        assert "alpha-cond-cannabis" not in ids    # Part 2: withheld
        r = await c.get("/mdts/mdt-demo-charlie/fhir/Observation", headers=headers)
        assert r.status_code == 200 and "entry" not in r.json()
        # the record view the banner shows: referrals without their reporter, every system ok
        mh = re.findall(r"Bearer (\S+)' -H 'X-Purpose-Of-Use: COC' \\\n\s+\S+/record", text)
        assert len(mh) == 1
        r = await c.get("/mdts/mdt-demo-alpha/record",
                        headers={"Authorization": f"Bearer {mh[0]}", "X-Purpose-Of-Use": "COC"})
        assert r.status_code == 200, r.text
        entries = r.json()["entry"]
        referrals = [e["resource"] for e in entries if e.get("extension", [{}])[0].get("valueCode") == "canra-report"]
        assert referrals and all("sender" not in ref for ref in referrals)
        statuses = {i["details"]["text"]: i["details"]["coding"][0]["code"] for i in entries[-1]["resource"]["issue"]}
        assert set(statuses.values()) == {"ok"} and len(statuses) == 5
    await app.state.runtime.aclose()
    assert main(["audit", "verify", "--demo"]) == 0


def test_token_command_uses_the_dev_client_against_the_running_demo(demo_dir, capsys):
    import threading
    import time

    import uvicorn

    from tests.support.ports import free_port

    port = free_port()
    settings = demo.demo_settings(demo_dir, port=port)
    demo.seed(settings, demo_dir)
    assert main(["token", "--as", "mh", "--port", str(port)]) == 2  # not running yet
    assert "is it running" in capsys.readouterr().err
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        assert main(["token", "--as", "mh", "--port", str(port), "--purpose", "TREAT"]) == 0
        token = capsys.readouterr().out.strip()
        principal = app.state.runtime.verifier.verify(token)
        assert (principal.sub, principal.client_id, principal.purpose) == ("staff-mh-0001", "demo-bh-system", "TREAT")
        assert main(["token", "--as", "nobody", "--port", str(port)]) == 2
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert main(["token", "--as", "po", "--offline"]) == 0
    assert capsys.readouterr().out.count(".") == 2


def test_demo_key_is_refused_outside_demo_mode(demo_dir):
    from pydantic import ValidationError

    settings = demo.demo_settings(demo_dir)
    with pytest.raises(ValidationError, match="demo signing key"):
        type(settings)(**{**settings.model_dump(), "mode": "production"})


async def test_demo_youth_are_linked_to_the_synthetic_sql_sources(demo_dir):
    from sqlalchemy import select

    from broker.store.db import make_engine, make_sessionmaker
    from broker.store.models import YouthIdentifier
    from connectors import synthetic

    settings = demo.demo_settings(demo_dir)
    assert {s.name for s in settings.sources if s.kind == "sql"} == set(synthetic.SOURCES)
    demo.seed(settings, demo_dir)
    demo.seed(settings, demo_dir)  # idempotent: no second link, databases left as they are
    for url in demo.source_databases(demo_dir).values():
        assert (demo_dir / "sources").is_dir() and url.startswith(f"sqlite:///{demo_dir / 'sources'}")
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        links = {(r.source, r.value) for r in s.scalars(
            select(YouthIdentifier).where(YouthIdentifier.youth_id == "y-demo-alpha"))}
    engine.dispose()
    assert links == {("county-ehr", "pt-alpha"), *synthetic.TEST_YOUTH["y-alpha"].items()}

    app = create_app(settings)
    cases = synthetic.dataset()["cws-cms"]["cws_case"]
    expected = {f"cws-case-{c['case_id']}" for c in cases if c["youth_id"] == "CWS-1001"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=settings.public_url) as c:
        headers = {"Authorization": f"Bearer {demo.mint_token(settings, 'cw')}", "X-Purpose-Of-Use": "COC"}
        r = await c.get("/mdts/mdt-demo-alpha/fhir/EpisodeOfCare", headers=headers)
        assert r.status_code == 200, r.text
        found = {e["resource"]["id"] for e in r.json()["entry"]}
        assert expected and expected <= found
        owners = {e["resource"]["patient"]["reference"] for e in r.json()["entry"]}
        assert owners == {"Patient/CWS-1001", "Patient/PRB-2001"}  # the child welfare and probation cases
    await app.state.runtime.aclose()
