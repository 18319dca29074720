"""Each role on the team reads the youth's health record: released exactly per the matrix.

The ``allowed`` column is written from shared/LEGAL.md by hand (not read from the policy),
so a policy or pipeline change that releases more or less fails here. Consent-needing
categories (sud-part2, hiv, reproductive-health, sti for most roles) stay withheld until the
consent issue; psychotherapy notes are never released.
"""

from __future__ import annotations

import pytest

from tests.scenarios.harness import EHR_TYPES
from tests.scenarios.records import expected_ids, records

GH, MH, SUD, HIV, REPRO, STI, YS, PN = ("general-health", "mental-health", "sud-part2", "hiv",
                                        "reproductive-health", "sti", "youth-statement", "psychotherapy-notes")
S = frozenset

# alias, purpose, categories the policy allows (the EHR's default general-health travels with every item)
MATRIX = [
    ("cw", "COC", S({GH, MH, YS})),          # Civ. 56.103; W&IC 5328.04 coordination; W&IC 18961.7
    ("cw", "TREAT", S({YS})),                # coordination only: nothing from the EHR
    ("po", "COC", S({GH, MH, YS})),
    ("po", "TREAT", S({YS})),
    ("mh", "TREAT", S({GH, MH, HIV, REPRO, STI, YS})),  # treating clinician (own statute)
    ("mh-team", "TREAT", S({GH, MH, YS})),   # a clinician on the team who is not treating
    ("sud", "TREAT", S({GH, MH, SUD, YS})),  # the Part 2 program's own counselor: 42 CFR 2.12(c)(3)
    ("sud-team", "TREAT", S({GH, MH, YS})),  # not the program: no Part 2 without consent
    ("phn", "TREAT", S({GH, MH, HIV, REPRO, STI, YS})),
    ("phn", "COC", S({GH, MH, YS})),
    ("ed", "COC", S({YS})),
    ("advocate", "COC", S({YS})),
    ("depatty", "HLEGAL", S({YS})),
    ("caregiver", "COC", S()),
]


async def released(broker, alias: str, purpose: str, mdt: str = "mdt-alpha") -> dict[str, dict]:
    """Every resource released across the facade's resource types."""
    token = await broker.token(alias)
    out = {}
    for rtype in EHR_TYPES:
        r = await broker.get(f"/mdts/{mdt}/fhir/{rtype}", token=token, purpose=purpose)
        assert r.status_code == 200, (rtype, r.status_code, r.text)
        bundle = r.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        assert "total" not in bundle
        for entry in bundle.get("entry", []):
            assert entry["search"]["mode"] == "match"
            out[entry["resource"]["id"]] = entry["resource"]
    return out


@pytest.mark.parametrize(("alias", "purpose", "allowed"), MATRIX, ids=[f"{a}-{p}" for a, p, _ in MATRIX])
async def test_member_reads_exactly_what_the_matrix_allows(broker, alias, purpose, allowed):
    got = await released(broker, alias, purpose)
    assert set(got) == expected_ids("pt-alpha", allowed)
    for rid, resource in got.items():
        assert PN not in records()[rid][2]
        codes = {(s["system"], s["code"]) for s in resource["meta"]["security"]}
        assert any(system.endswith("v3-Confidentiality") for system, _ in codes), rid


async def test_psychotherapy_notes_are_never_released(broker):
    for alias, purpose in (("mh", "TREAT"), ("phn", "TREAT"), ("depatty", "HLEGAL"), ("cw", "COC")):
        token = await broker.token(alias)
        r = await broker.get("/mdts/mdt-alpha/fhir/DocumentReference/alpha-doc-psychnote-2025", token=token,
                             purpose=purpose)
        assert r.status_code == 404
        assert "psych" not in r.text.lower()


async def test_released_items_carry_obligations(broker):
    got = await released(broker, "mh", "TREAT")
    hiv = got["alpha-obs-hiv-2025"]
    codes = {s["code"] for s in hiv["meta"]["security"]}
    assert {"V", "HIV", "NORDSCLCD", "NOUSEAGAINSTYOUTH"} <= codes
    weight = got["alpha-obs-weight-2025"]
    assert "NOUSEAGAINSTYOUTH" not in {s["code"] for s in weight["meta"]["security"]}


@pytest.mark.parametrize("alias", ["da", "le", "po-ended", "cw-other"])
async def test_non_members_get_the_same_403_as_for_a_missing_team(broker, alias):
    token = await broker.token(alias)
    real = await broker.get("/mdts/mdt-alpha/fhir/Observation", token=token, purpose="TREAT")
    missing = await broker.get("/mdts/mdt-does-not-exist/fhir/Observation", token=token, purpose="TREAT")
    assert real.status_code == missing.status_code == 403
    assert real.content == missing.content
    assert real.json()["resourceType"] == "OperationOutcome"


async def test_reading_one_resource_follows_the_same_rules(broker):
    token = await broker.token("po")
    ok = await broker.get("/mdts/mdt-alpha/fhir/Observation/alpha-obs-weight-2025", token=token, purpose="COC")
    assert ok.status_code == 200 and ok.json()["id"] == "alpha-obs-weight-2025"
    withheld = await broker.get("/mdts/mdt-alpha/fhir/Observation/alpha-obs-hiv-2025", token=token, purpose="COC")
    missing = await broker.get("/mdts/mdt-alpha/fhir/Observation/no-such-observation", token=token, purpose="COC")
    assert withheld.status_code == missing.status_code == 404
    assert withheld.content == missing.content
    other_youth = await broker.get("/mdts/mdt-bravo/fhir/Observation/alpha-obs-weight-2025", token=token,
                                   purpose="COC")
    assert other_youth.status_code == 404
