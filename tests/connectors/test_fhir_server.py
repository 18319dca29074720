"""The Node FHIR test server wrapper and its Python launcher."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.connectors.conftest import DEMO_FHIR
from tests.support.fhir_server import start_fhir_server


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_seed_ids_and_last_updated_are_kept_and_sigterm_exits_cleanly():
    server = start_fhir_server([DEMO_FHIR / "county-ehr-pt-charlie.json"])
    try:
        assert server.base_url == f"http://127.0.0.1:{server.port}/fhir/R4"
        status, obs = get(f"{server.base_url}/Observation/charlie-obs-hiv-2026")
        assert status == 200 and obs["meta"]["lastUpdated"] == "2026-01-13T09:00:00Z"
        status, outcome = get(f"{server.base_url}/Observation/alpha-obs-hiv-2024")  # not in this seed
        assert status == 404 and outcome["resourceType"] == "OperationOutcome"
        assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, {"status": "ok"})
        assert get(f"http://127.0.0.1:{server.port}/elsewhere")[0] == 404
    finally:
        server.stop()
    assert server.process.returncode == 0


@pytest.mark.parametrize(
    ("bundle", "message"),
    [
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "not a transaction or batch Bundle"),
        ({"resourceType": "Bundle", "type": "transaction",
          "entry": [{"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]},
         "has no resource with resourceType and id"),
        ({"resourceType": "Bundle", "type": "batch",
          "entry": [{"resource": {"resourceType": "Patient", "id": "a"},
                     "request": {"method": "PUT", "url": "Patient/b"}}]},
         "does not match Patient/a"),
    ],
)
def test_bad_seed_fails_start_with_the_servers_stderr(tmp_path, bundle, message):
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(bundle))
    with pytest.raises(RuntimeError, match="did not become ready") as info:
        start_fhir_server([seed])
    assert message in str(info.value)
