"""A defective policy refuses to load and names the file and line counsel must fix."""

from __future__ import annotations

import pytest

from broker.policy import CasbinPolicyEngine, PolicyError

GOOD = 'p, mental-health-clinician, mental-health, TREAT, mdt-member, allow, "W&IC 5328(a)(1)"\n'

# (id, bad line, fragment of the message). The bad line is always line 3 of policy.csv.
BAD_LINES = [
    ("unknown-role", 'p, social-worker, mental-health, COC, mdt-member, allow, "W&IC 5328.04"', "unknown role"),
    ("unknown-category", 'p, casa, mental-heath, COC, mdt-member, allow, "W&IC 5328.04"', "unknown category"),
    ("unknown-purpose", 'p, casa, mental-health, TREATMENT, mdt-member, allow, "W&IC 5328.04"', "unknown purpose"),
    ("unknown-ground", 'p, casa, mental-health, COC, consent-mh, allow, "Civ. Code 56.11"', "unknown ground"),
    ("missing-citation", 'p, casa, mental-health, COC, mdt-member, allow, ""', "citation"),
    ("blank-citation", 'p, casa, mental-health, COC, mdt-member, allow, "   "', "citation"),
    ("bad-effect", 'p, casa, mental-health, COC, mdt-member, permit, "W&IC 5328.04"', "effect must be allow or deny"),
    ("too-few-fields", 'p, casa, mental-health, COC, mdt-member, allow', "needs 6 fields"),
    ("too-many-fields", 'p, casa, mental-health, COC, mdt-member, allow, "a", "b"', "needs 6 fields"),
    ("unquoted-comma-splits", 'p, casa, hiv, TREAT, own-statute, allow, H&S 120985, 120980', "needs 6 fields"),
    ("allow-without-ground", 'p, casa, hiv, TREAT, *, allow, "H&S 120985"', "must name the ground"),
    ("admin-role", 'p, registry-admin, hiv, *, *, deny, "H&S 120975"', "admin role"),
    ("unknown-rule-type", 'p2, casa, hiv, TREAT, own-statute, allow, "H&S 120985"', "unknown rule type"),
    ("bad-quoting", 'p, casa, hiv, TREAT, own-statute, allow, "H&S "120985""', "malformed"),
    ("duplicate", GOOD.strip(), "duplicate of the rule on line 2"),
    ("g-unknown-member", "g, social-worker, line-staff", "unknown role"),
    ("g2-unknown-member", "g2, mental-heath, health", "unknown category"),
    ("g-wrong-fields", "g, casa", "needs 2 fields"),
    ("g-self", "g, casa, casa", "member of itself"),
    ("g-reserved-group", "g, casa, *", "not a valid role group name"),
]


@pytest.mark.parametrize(("bad", "fragment"), [b[1:] for b in BAD_LINES], ids=[b[0] for b in BAD_LINES])
def test_bad_policy_line_names_file_and_line(policy_dir, bad: str, fragment: str) -> None:
    """Each defect is a PolicyError at policy.csv:3 with a message that says what is wrong."""
    d = policy_dir("# header comment\n" + GOOD + bad + "\n")
    with pytest.raises(PolicyError) as info:
        CasbinPolicyEngine.load(d)
    err = info.value
    assert err.file == str(d / "policy.csv")
    assert err.line == 3
    assert "policy.csv:3: " in str(err)
    assert fragment in err.message


def test_quoted_citation_may_contain_commas(policy_dir) -> None:
    """CSV quoting keeps a citation with commas in one field, reported without its quotes."""
    d = policy_dir('p, casa, hiv, TREAT, own-statute, allow, "H&S 120985(a), 120980"\n')
    engine = CasbinPolicyEngine.load(d)
    decision = engine.decide(role="casa", category="hiv", purpose="TREAT", grounds=frozenset({"own-statute"}))
    assert decision.allowed
    assert decision.citation == "H&S 120985(a), 120980"
    assert decision.rule == ("casa", "hiv", "TREAT", "own-statute", "allow", "H&S 120985(a), 120980")


def test_group_names_are_usable_in_rules(policy_dir) -> None:
    """A role group declared by a g line is a valid role in p lines (and nowhere else)."""
    d = policy_dir('g, casa, advocates\np, advocates, hiv, TREAT, own-statute, allow, "H&S 120985"\n')
    CasbinPolicyEngine.load(d)
    d2 = policy_dir('p, advocates, hiv, TREAT, own-statute, allow, "H&S 120985"\n')
    with pytest.raises(PolicyError, match=r"policy\.csv:1: unknown role 'advocates'"):
        CasbinPolicyEngine.load(d2)


@pytest.mark.parametrize("name", ["policy.csv", "model.conf", "vocabulary.yaml"])
def test_missing_file_is_a_policy_error(policy_dir, name: str) -> None:
    """A missing file names itself (no line)."""
    d = policy_dir(GOOD)
    (d / name).unlink()
    with pytest.raises(PolicyError) as info:
        CasbinPolicyEngine.load(d)
    assert info.value.file == str(d / name)
    assert info.value.line is None


def test_model_request_shape(policy_dir) -> None:
    """A model whose request lacks the ground is refused at its r = line."""
    d = policy_dir(GOOD)
    text = (d / "model.conf").read_text()
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.startswith("r ="))
    (d / "model.conf").write_text(text.replace("r = role, category, purpose, ground", "r = role, category, purpose"))
    with pytest.raises(PolicyError) as info:
        CasbinPolicyEngine.load(d)
    assert info.value.file.endswith("model.conf")
    assert info.value.line == number
    assert "request_definition" in info.value.message


def test_model_effect_must_be_deny_overrides(policy_dir) -> None:
    """An allow-overrides effect would let an allow beat a deny: refused."""
    d = policy_dir(GOOD)
    text = (d / "model.conf").read_text()
    (d / "model.conf").write_text(text.replace(
        "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))", "e = some(where (p.eft == allow))"))
    with pytest.raises(PolicyError, match=r"model\.conf:\d+: \[policy_effect\]"):
        CasbinPolicyEngine.load(d)


def test_policy_error_str_without_line() -> None:
    """Errors about a whole file print just the file."""
    assert str(PolicyError("policies/model.conf", None, "missing")) == "policies/model.conf: missing"
    assert str(PolicyError("policies/policy.csv", 7, "bad")) == "policies/policy.csv:7: bad"


def test_a_consent_ground_on_another_category_is_refused(tmp_path):
    """An HIV authorization can never unlock Part 2 records: such a rule is a load error."""
    from broker.policy.engine import CasbinPolicyEngine
    from broker.policy.errors import PolicyError
    from broker.settings import REPO_POLICY_DIR

    for name in ("model.conf", "vocabulary.yaml"):
        (tmp_path / name).write_text((REPO_POLICY_DIR / name).read_text())
    (tmp_path / "policy.csv").write_text(
        'p, probation-officer, sud-part2, COC, consent-hiv, allow, "H&S 120980"\n')
    try:
        CasbinPolicyEngine.load(tmp_path)
    except PolicyError as err:
        assert err.line == 1 and "consent-hiv" in str(err) and "policy.csv:1" in str(err)
    else:
        raise AssertionError("the rule was accepted")
