"""``POST /policy/decide`` and ``GET /policy/version``: authenticated, audited dry runs of the policy in force."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from broker.policy import CasbinPolicyEngine
from broker.store.models import AuditEventRow
from tests.scenarios.harness import PERSONAS, Broker

DECIDE = "/policy/decide"
PO_PART2 = {"role": "probation-officer", "category": "sud-part2", "purpose": "COC", "grounds": ["mdt-member"]}


@pytest.fixture
def pb(fresh_broker: Broker) -> Broker:
    """The scenarios' fresh broker, once per backend."""
    return fresh_broker


async def _auth(b: Broker, alias: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {await b.token(alias)}"}


def _events(b: Broker, action: str) -> list[dict]:
    with b.runtime.sessions() as s:
        return [json.loads(row.body) for row in s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))
                if json.loads(row.body)["action"] == action]


async def test_decide_needs_a_token(pb):
    r = await pb.client.post(DECIDE, json=PO_PART2)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = await pb.client.post(DECIDE, json=PO_PART2, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    assert [e["outcome"] for e in _events(pb, "policy.decide")] == [401, 401]


async def test_decide_explains_and_is_audited(pb):
    r = await pb.client.post(DECIDE, json=PO_PART2, headers=await _auth(pb, "cw"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["effect"] == "deny" and body["rule"] is None
    assert body["policy_version"] == pb.runtime.policy.version
    alt = body["would_allow"][0]
    assert alt["ground"] == "consent-part2" and "COC" in alt["purposes"]
    assert alt["description"] == "a 42 CFR 2.31 consent naming probation-officer (consent-part2)"
    assert alt["rule"]["location"].startswith("policy.csv:") and alt["citation"] == "42 CFR 2.31; 42 CFR 2.35"

    allowed = dict(PO_PART2, grounds=["consent-part2", "mdt-member"])
    r = await pb.client.post(DECIDE, json=allowed, headers=await _auth(pb, "po"))
    assert r.status_code == 200 and r.json()["effect"] == "allow" and r.json()["ground"] == "consent-part2"

    events = _events(pb, "policy.decide")
    assert [e["outcome"] for e in events] == [200, 200]
    first = events[0]
    assert first["actor"]["sub"] == PERSONAS["cw"].sub and first["route"] == DECIDE
    assert first["purpose"] == "COC" and first["policy_version"] == pb.runtime.policy.version
    assert first["detail"] == {"role": "probation-officer", "category": "sud-part2", "grounds": ["mdt-member"]}
    assert first["youth_id"] is None and first["mdt_id"] is None and first["decisions"] == []
    assert events[1]["detail"]["grounds"] == ["consent-part2", "mdt-member"]


async def test_deny_rule_is_final(pb):
    body = {"role": "district-attorney", "category": "youth-statement", "purpose": "HLEGAL",
            "grounds": ["court-order"]}
    r = await pb.client.post(DECIDE, json=body, headers=await _auth(pb, "da"))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["denied_by_rule"] and data["would_allow"] == []
    assert "no consent, order or emergency overrides it" in data["reason"]


@pytest.mark.parametrize("body, field", [
    (dict(PO_PART2, role="Jane Placeholder"), "role"),
    (dict(PO_PART2, category="diary-of-jane"), "category"),
    (dict(PO_PART2, purpose="SNOOP"), "purpose"),
    (dict(PO_PART2, grounds=["mdt-member", "friend-of-jane"]), "grounds"),
    (dict(PO_PART2, role="registry-admin"), "role"),
])
async def test_unknown_terms_are_400_naming_the_field_only(pb, body, field):
    r = await pb.client.post(DECIDE, json=body, headers=await _auth(pb, "po"))
    assert r.status_code == 400
    assert field in r.json()["issue"][0]["diagnostics"]
    assert "Jane" not in r.text and "jane" not in r.text and "SNOOP" not in r.text
    event = _events(pb, "policy.decide")[-1]
    assert event["outcome"] == 400 and "jane" not in json.dumps(event).lower()


async def test_malformed_bodies_are_400(pb):
    headers = await _auth(pb, "po")
    r = await pb.client.post(DECIDE, json=dict(PO_PART2, youth_id="y-alpha"), headers=headers)
    assert r.status_code == 400 and "youth_id" in r.text and "y-alpha" not in r.text
    r = await pb.client.post(DECIDE, json={"role": "probation-officer"}, headers=headers)
    assert r.status_code == 400 and "category" in r.text
    r = await pb.client.post(DECIDE, content=b"{nope", headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400


async def test_version_matches_the_engine_in_force(pb, tmp_path):
    assert (await pb.client.get("/policy/version")).status_code == 401
    r = await pb.client.get("/policy/version", headers=await _auth(pb, "mh"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == pb.runtime.policy.version
    assert body["files"] == pb.runtime.policy.files() and "policy.csv" in body["files"]
    assert body["loaded_at"] and body["loaded_at"].endswith("Z")
    assert [e["outcome"] for e in _events(pb, "policy.version")] == [401, 200]

    # a reload swaps runtime.policy: both routes answer from the engine in force at request time
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("model.conf", "vocabulary.yaml"):
        (edited / name).write_bytes((pb.runtime.settings.policy_dir / name).read_bytes())
    (edited / "policy.csv").write_text('p, probation-officer, sud-part2, COC, mdt-member, allow, "test only"\n',
                                       encoding="utf-8")
    original = pb.runtime.policy
    pb.runtime.policy = CasbinPolicyEngine.load(edited)
    try:
        r = await pb.client.get("/policy/version", headers=await _auth(pb, "mh"))
        assert r.json()["version"] == pb.runtime.policy.version != original.version
        r = await pb.client.post(DECIDE, json=PO_PART2, headers=await _auth(pb, "po"))
        assert r.json()["effect"] == "allow" and r.json()["rule"]["line"] == 1
        assert _events(pb, "policy.decide")[-1]["policy_version"] == pb.runtime.policy.version
    finally:
        pb.runtime.policy = original
