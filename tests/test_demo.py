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
    await app.state.runtime.aclose()
    assert main(["audit", "verify", "--demo"]) == 0


def test_token_command_prints_a_token(demo_dir, capsys):
    settings = demo.demo_settings(demo_dir)
    demo.seed(settings, demo_dir)
    assert main(["token", "--as", "mh"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.count(".") == 2
    assert main(["token", "--as", "nobody"]) == 2


def test_demo_key_is_refused_outside_demo_mode(demo_dir):
    from pydantic import ValidationError

    settings = demo.demo_settings(demo_dir)
    with pytest.raises(ValidationError, match="demo signing key"):
        type(settings)(**{**settings.model_dump(), "mode": "production"})
