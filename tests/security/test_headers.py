"""Security headers on every response (errors and 500s included), CORS off unless listed, no banners."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from broker.app import API_CSP, create_app
from broker.runtime import build_runtime
from broker.store.db import upgrade
from tests.scenarios.harness import PUBLIC_URL, make_settings, write_key
from tests.support.ports import free_port

NO_FHIR = "http://127.0.0.1:9"  # no request here reaches a source
PATH = "/mdts/mdt-alpha/fhir/Observation"
COUNTY_APP = "https://case-management.county.example"


def build(tmp: Path, **overrides):  # type: ignore[no-untyped-def]
    """An app on a migrated (empty) database, with a route that fails, for the 500 path."""
    url = f"sqlite:///{tmp / 'broker.sqlite'}"
    upgrade(url)
    app = create_app(runtime=build_runtime(make_settings(tmp, url, NO_FHIR, **overrides)))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test-only/boom", boom)
    return app


def client(app, base_url: str = PUBLIC_URL) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=base_url)


@pytest.fixture(scope="module")
def app(tmp_path_factory):  # type: ignore[no-untyped-def]
    return build(tmp_path_factory.mktemp("headers"))


# Every kind of answer: success, each error path, the 500 handler, the documents, a data route.
REQUESTS = [
    pytest.param("GET", "/healthz", {}, 200, id="healthz"),
    pytest.param("GET", "/no-such-route", {}, 404, id="404"),
    pytest.param("DELETE", "/healthz", {}, 405, id="405"),
    pytest.param("POST", "/oauth/token", {"content": b"x" * 1_000_001,
                                          "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
                 413, id="413"),
    pytest.param("GET", "/test-only/boom", {}, 500, id="500"),
    pytest.param("GET", "/openapi.json", {}, 200, id="openapi"),
    pytest.param("GET", "/docs", {}, 404, id="no-docs-ui-in-production"),
    pytest.param("GET", PATH, {"headers": {"Authorization": "Bearer x"}}, 401, id="data-route-401"),
    pytest.param("POST", "/oauth/token", {"data": {"grant_type": "password"}}, 400, id="token-endpoint-400"),
    pytest.param("OPTIONS", PATH, {"headers": {"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "GET"}}, 405, id="preflight"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), REQUESTS)
async def test_every_response_carries_the_security_headers(app, method, path, kwargs, status) -> None:  # type: ignore[no-untyped-def]
    async with client(app) as c:
        r = await c.request(method, path, **kwargs)
    assert r.status_code == status
    h = r.headers
    assert h["x-content-type-options"] == "nosniff"
    assert h["cache-control"] == "no-store"
    assert h["referrer-policy"] == "no-referrer"
    assert h["x-frame-options"] == "DENY"
    assert h["cross-origin-resource-policy"] == "same-origin"
    assert h["content-security-policy"] == API_CSP.decode()
    assert "server" not in h and "x-powered-by" not in h
    assert "strict-transport-security" not in h  # the public URL is plain http on loopback
    assert not any(k.startswith("access-control-") for k in h)  # no CORS unless a county lists origins


async def test_only_the_public_key_set_may_be_cached(app) -> None:  # type: ignore[no-untyped-def]
    async with client(app) as c:
        r = await c.get("/.well-known/jwks.json")
    assert r.headers["cache-control"] == "public, max-age=300"
    assert r.headers["content-security-policy"] == API_CSP.decode()


async def test_hsts_when_the_public_url_is_https(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = build(tmp_path, public_url="https://broker.county.example", issuer="https://broker.county.example")
    async with client(app, "https://broker.county.example") as c:
        for path in ("/healthz", "/no-such-route", "/test-only/boom"):
            assert (await c.get(path)).headers["strict-transport-security"] == "max-age=31536000"


async def test_demo_docs_ui_gets_a_csp_naming_its_inline_script_by_hash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = build(tmp_path, mode="demo")
    async with client(app) as c:
        r = await c.get("/docs")
        redirect = await c.get("/docs/oauth2-redirect")
        api = await c.get("/healthz")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    scripts = re.findall(rb"<script>(.*?)</script>", r.content, re.DOTALL)
    assert scripts
    for script in scripts:
        assert f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" in csp
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert r.headers["cache-control"] == "no-store" and "server" not in r.headers
    assert "'sha256-" in redirect.headers["content-security-policy"]
    assert api.headers["content-security-policy"] == API_CSP.decode()  # relaxed for the docs page only


async def test_cors_for_listed_origins_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = build(tmp_path, cors_allow_origins=[COUNTY_APP])
    preflight = {"Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization, x-purpose-of-use"}
    async with client(app) as c:
        listed = await c.options(PATH, headers={"Origin": COUNTY_APP, **preflight})
        other = await c.options(PATH, headers={"Origin": "https://evil.example", **preflight})
        simple = await c.get("/healthz", headers={"Origin": COUNTY_APP})
        simple_other = await c.get("/healthz", headers={"Origin": "https://evil.example"})
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == COUNTY_APP
    assert "authorization" in listed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in listed.headers
    assert other.status_code == 405
    assert not any(k.startswith("access-control-") for k in other.headers)
    assert simple.headers["access-control-allow-origin"] == COUNTY_APP
    assert "X-Request-Id" in simple.headers["access-control-expose-headers"]
    assert not any(k.startswith("access-control-") for k in simple_other.headers)
    assert listed.headers["x-content-type-options"] == "nosniff"  # preflights get the headers too


@pytest.mark.parametrize("origin", ["*", "http://case.county.example", "https://case.county.example/app",
                                    "https://*.county.example", "case.county.example", "https://x.example:99999"])
def test_cors_origins_must_be_exact_https_origins(tmp_path, origin: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError):
        make_settings(tmp_path, "sqlite://", NO_FHIR, cors_allow_origins=[origin])


def test_broker_serve_sends_no_server_banner(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``broker serve``'s own uvicorn options, on a real uvicorn server: no ``Server`` header at all."""
    import threading

    import uvicorn

    from broker import cli

    port = free_port()
    for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path / 'broker.sqlite'}",
                        "PUBLIC_URL": f"http://127.0.0.1:{port}", "ISSUER": f"http://127.0.0.1:{port}",
                        "SIGNING_KEY_FILE": str(write_key(tmp_path / "key.pem")), "LOG_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    seen: list[httpx.Response] = []

    def run_and_probe(app, **options):  # type: ignore[no-untyped-def]
        server = uvicorn.Server(uvicorn.Config(app, **options))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.02)
            seen.extend(httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5) for path in ("/healthz", "/nope"))
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    monkeypatch.setattr(uvicorn, "run", run_and_probe)
    assert cli.main(["serve", "--migrate", "--port", str(port)]) == 0
    assert [r.status_code for r in seen] == [200, 404]
    for resp in seen:
        assert "server" not in resp.headers
        assert "uvicorn" not in str(resp.headers).lower()
        assert resp.headers["x-content-type-options"] == "nosniff"
