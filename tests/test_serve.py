"""What ``broker serve`` and ``broker demo`` set up in the process before uvicorn takes over."""

from __future__ import annotations

import gc

import uvicorn

from tests.scenarios.harness import write_key
from tests.support.ports import free_port


def test_serve_freezes_what_start_up_built_and_collects_young_objects_less_often(tmp_path, monkeypatch):
    from broker import cli

    port = free_port()
    for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path / 'broker.sqlite'}",
                        "PUBLIC_URL": f"http://127.0.0.1:{port}", "ISSUER": f"http://127.0.0.1:{port}",
                        "SIGNING_KEY_FILE": str(write_key(tmp_path / "key.pem")), "LOG_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    seen: dict = {}

    def run(app, **_options):  # type: ignore[no-untyped-def]
        seen["threshold"], seen["frozen"] = gc.get_threshold(), gc.get_freeze_count()
        app.state.runtime.engine.dispose()

    monkeypatch.setattr(uvicorn, "run", run)
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0  # tests/conftest.py gives every test the collector as it found it
    assert cli.main(["serve", "--migrate", "--port", str(port)]) == 0
    assert seen["threshold"] == cli.GC_THRESHOLDS != before
    assert seen["frozen"] > 10_000  # the app, its runtime and every module imported to build them
