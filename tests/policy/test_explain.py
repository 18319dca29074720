"""Explanations name the rule that decided (file, line, citation) and, for a deny, what would allow it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.policy import CasbinPolicyEngine
from broker.policy.explain import UnknownTerm, explain, explain_text

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
YOUTH_STATEMENT_DENY = "W&IC 18961.7; 42 CFR 2.12(d); In re Wayne H. (1979) 24 Cal.3d 595"


@pytest.fixture(scope="module")
def engine() -> CasbinPolicyEngine:
    """The default policy as shipped."""
    return CasbinPolicyEngine.load(REPO_POLICY_DIR)


def _line_of(*fields: str) -> int:
    """The policy.csv line whose first fields are these, read independently of the engine."""
    text = (REPO_POLICY_DIR / "policy.csv").read_text(encoding="utf-8")
    hits = [n for n, raw in enumerate(text.splitlines(), start=1)
            if [t.strip() for t in raw.split(",")][1:1 + len(fields)] == list(fields) and raw.startswith("p,")]
    assert len(hits) == 1, (fields, hits)
    return hits[0]


def _explain(engine, role, category, purpose, *grounds):
    return explain(engine, role=role, category=category, purpose=purpose, grounds=frozenset(grounds),
                   vocabulary=engine.vocabulary)


def test_allow_names_the_rule_its_line_and_citation(engine):
    e = _explain(engine, "child-welfare-worker", "mental-health", "COC", "mdt-member")
    line = _line_of("child-welfare-worker", "mental-health", "COC", "mdt-member", "allow")
    assert e.effect == "allow" and e.ground == "mdt-member"
    assert e.rule is not None and (e.rule.file, e.rule.line) == ("policy.csv", line)
    assert e.citation == e.rule.citation == "W&IC 5328.04(a); Civ. Code 56.103"
    assert e.policy_version == engine.version and e.grounds_tried == ("mdt-member",)
    assert e.would_allow == () and not e.denied_by_rule
    data = json.loads(json.dumps(e.to_dict()))
    assert data["rule"]["location"] == f"policy.csv:{line}" and data["effect"] == "allow"
    text = explain_text(e)
    assert f"policy.csv:{line}" in text and "W&IC 5328.04(a); Civ. Code 56.103" in text


def test_part2_deny_points_to_a_part2_consent(engine):
    e = _explain(engine, "probation-officer", "sud-part2", "COC", "mdt-member")
    assert e.effect == "deny" and e.rule is None and not e.denied_by_rule
    assert "no rule allows probation-officer" in e.reason
    grounds = [a.ground for a in e.would_allow]
    assert grounds[0] == "consent-part2" and "mdt-member" not in grounds
    part2 = e.would_allow[0]
    assert "COC" in part2.purposes and not part2.held
    assert part2.description == "a 42 CFR 2.31 consent naming probation-officer (consent-part2)"
    line = _line_of("probation-officer", "sud-part2", "COC", "consent-part2", "allow")
    assert part2.rule is not None and part2.rule.line == line and part2.citation == "42 CFR 2.31; 42 CFR 2.35"
    assert "42 CFR 2.31 consent naming probation-officer" in explain_text(e)


def test_every_alternative_really_allows_and_nothing_else_does(engine):
    role, category, purpose, held = "probation-officer", "sud-part2", "COC", frozenset({"mdt-member"})
    e = _explain(engine, role, category, purpose, *held)
    listed = {(a.ground, p) for a in e.would_allow for p in a.purposes}
    expected = set()
    for ground in engine.vocabulary.grounds:
        for p in engine.vocabulary.purposes:
            for tried in (frozenset({ground}), held | {ground}):
                d = engine.decide(role=role, category=category, purpose=p, grounds=tried)
                if d.allowed and d.ground == ground:
                    expected.add((ground, p))
    assert listed == expected and ("consent-part2", "COC") in listed


def test_a_held_ground_can_open_another_purpose(engine):
    e = _explain(engine, "child-welfare-worker", "mental-health", "TREAT", "mdt-member")
    member = [a for a in e.would_allow if a.ground == "mdt-member"]
    assert member and member[0].held and member[0].purposes == ("COC",)
    assert "already held" in explain_text(e)


def test_deny_rule_says_no_ground_lifts_it(engine):
    e = _explain(engine, "district-attorney", "youth-statement", "HLEGAL", "court-order")
    line = _line_of("district-attorney", "youth-statement", "*", "*", "deny")
    assert e.effect == "deny" and e.denied_by_rule
    assert e.rule is not None and e.rule.line == line and e.citation == YOUTH_STATEMENT_DENY
    assert e.would_allow == ()
    assert e.reason.startswith(f"denied by rule on line {line} of policy.csv")
    assert "no consent, order or emergency overrides it" in e.reason
    text = explain_text(e)
    assert "no ground lifts this deny rule" in text and YOUTH_STATEMENT_DENY in text


@pytest.mark.parametrize("role", ["mental-health-clinician", "dependency-attorney", "child-welfare-worker",
                                  "substance-use-counselor"])
def test_psychotherapy_notes_have_no_alternatives(engine, role):
    e = _explain(engine, role, "psychotherapy-notes", "TREAT", "mdt-member", "own-statute", "break-glass")
    assert e.effect == "deny" and e.denied_by_rule and e.would_allow == ()
    assert e.citation == "45 CFR 164.508(a)(2); Evid. Code 1014"


def test_unknown_terms_name_the_field_never_the_value(engine):
    with pytest.raises(UnknownTerm) as info:
        _explain(engine, "jane-doe-123", "mental-health", "COC", "mdt-member", "secret-ground-x")
    assert info.value.fields == ["role", "grounds"]
    assert "jane-doe-123" not in str(info.value) and "secret-ground-x" not in str(info.value)
    with pytest.raises(UnknownTerm):  # an admin role never reads records, so it is no team role here
        _explain(engine, "registry-admin", "mental-health", "COC", "mdt-member")


def test_a_deny_rule_on_one_ground_leaves_the_others_open(policy_dir):
    d = policy_dir("""\
        # header
        p, casa, hiv, COC, own-statute, allow, "W&IC 827"
        p, casa, hiv, *, consent-hiv, deny, "H&S 120980"
        """)
    engine = CasbinPolicyEngine.load(d)
    e = _explain(engine, "casa", "hiv", "COC", "consent-hiv")
    assert e.denied_by_rule and e.rule is not None and e.rule.line == 3
    assert "it applies whenever consent-hiv is relied on" in e.reason
    assert [(a.ground, a.purposes, a.rule.line) for a in e.would_allow] == [("own-statute", ("COC",), 2)]
    assert e.would_allow[0].description == "a roster entry recording casa's own statutory access (own-statute)"


def test_a_county_override_rule_is_located_in_its_own_file(policy_dir, tmp_path):
    d = policy_dir("""\
        p, casa, hiv, COC, own-statute, allow, "W&IC 827"
        """)
    county = tmp_path / "county.csv"
    county.write_text('# county rules\np, casa, hiv, *, consent-hiv, deny, "H&S 120980"\n', encoding="utf-8")
    engine = CasbinPolicyEngine.load(d, override=county)
    e = _explain(engine, "casa", "hiv", "COC", "consent-hiv")
    assert e.rule is not None and e.rule.location == "county.csv:2"
    assert e.would_allow[0].rule.location == "policy.csv:1"
    assert "line 2 of county.csv" in e.reason
