"""The committed OpenAPI document is the app's: regenerate it and compare."""

from __future__ import annotations

import json
from pathlib import Path

from broker.openapi_doc import generate

COMMITTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_app():
    current = generate()
    committed = json.loads(COMMITTED.read_text())
    assert committed == current, "openapi/openapi.json is stale: run `broker openapi > openapi/openapi.json`"


def test_every_route_is_documented_with_errors():
    doc = generate()
    assert "/mdts/{mdt_id}/fhir/{resource_type}" in doc["paths"]
    assert "/oauth/token" in doc["paths"]
    assert {"/youth", "/youth/{youth_id}/identifiers", "/youth/{youth_id}/identifiers/{source}"} <= set(doc["paths"])
    assert [p["name"] for p in doc["paths"]["/youth"]["get"]["parameters"]] == ["identifier"]
    for name in ("YouthIn", "IdentifiersIn", "YouthLookupOut", "MdtIn", "MembershipIn", "CourtOrderIn", "BreakGlassIn", "DecideIn"):
        assert name in doc["components"]["schemas"]
