"""County overrides layered on the state baseline: precedence, attribution and versioning."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.policy import CasbinPolicyEngine, PolicyError
from broker.policy.layers import LayeredRule

BASELINE = """\
# state baseline
p, mental-health-clinician, mental-health, TREAT, mdt-member, allow, "W&IC 5328(a)(1)"
p, child-welfare-worker, general-health, COC, mdt-member, allow, "Civ. Code 56.103(a)"
p, district-attorney, hiv, *, *, deny, "H&S 120975"
"""
MH = dict(role="mental-health-clinician", category="mental-health", purpose="TREAT",
          grounds=frozenset({"mdt-member"}))
CW = dict(role="child-welfare-worker", category="general-health", purpose="COC", grounds=frozenset({"mdt-member"}))


def _county(tmp_path: Path, text: str, name: str = "county.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_override_deny_narrows_the_baseline(policy_dir, tmp_path) -> None:
    """A county deny beats a baseline allow (deny overrides), and cites the county's file."""
    d = policy_dir(BASELINE)
    assert CasbinPolicyEngine.load(d).decide(**MH).allowed
    county = _county(tmp_path, '# county\np, mental-health-clinician, mental-health, *, *, deny, "County Res. 12"\n')
    engine = CasbinPolicyEngine.load(d, override=county)
    decision = engine.decide(**MH)
    assert not decision.allowed and decision.citation == "County Res. 12"
    assert engine.decide(**CW).allowed, "rules the county did not touch still hold"
    added = [r for r in engine.rules if isinstance(r, LayeredRule) and r.file == "county.csv"]
    assert [r.location for r in added] == ["county.csv:2"]


def test_override_allow_widens_only_where_no_baseline_deny(policy_dir, tmp_path) -> None:
    """An added allow releases a new cell but cannot lift a baseline deny."""
    county = _county(tmp_path, 'p, casa, general-health, COC, mdt-member, allow, "County Res. 3"\n'
                               'p, district-attorney, hiv, TREAT, mdt-member, allow, "County Res. 4"\n')
    engine = CasbinPolicyEngine.load(policy_dir(BASELINE), override=county)
    assert engine.decide(role="casa", category="general-health", purpose="COC",
                         grounds=frozenset({"mdt-member"})).allowed
    da = engine.decide(role="district-attorney", category="hiv", purpose="TREAT", grounds=frozenset({"mdt-member"}))
    assert not da.allowed and da.citation == "H&S 120975"


def test_remove_line_takes_out_exactly_one_baseline_rule(policy_dir, tmp_path) -> None:
    """``# remove:`` deletes the named baseline rule; a county may then replace it."""
    d = policy_dir(BASELINE)
    county = _county(tmp_path, "# remove: district-attorney, hiv, *, *, deny\n"
                               "# remove: child-welfare-worker, general-health, COC, mdt-member, allow\n"
                               'p, district-attorney, hiv, TREAT, consent-hiv, allow, "County Res. 9"\n')
    engine = CasbinPolicyEngine.load(d, override=county)
    assert not engine.decide(**CW).allowed and engine.decide(**CW).rule is None
    da = engine.decide(role="district-attorney", category="hiv", purpose="TREAT",
                       grounds=frozenset({"consent-hiv"}))
    assert da.allowed and da.citation == "County Res. 9"
    assert all(r.fields[:5] != ("district-attorney", "hiv", "*", "*", "deny") for r in engine.rules)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("# ok\n\np, social-worker, mental-health, TREAT, mdt-member, allow, \"X 1\"\n", 3, "unknown role"),
    ("# remove: casa, hiv, TREAT, mdt-member, allow\n", 1, "removes no rule"),
    ("# remove: casa, hiv, TREAT\n", 1, "needs 5 fields"),
    ("\np, child-welfare-worker, general-health, COC, mdt-member, allow, \"Civ. Code 56.103(a)\"\n", 2,
     "duplicate of policy.csv:3"),
    ('p, casa, hiv, TREAT, own-statute, allow, "A"\np, casa, hiv, TREAT, own-statute, allow, "A"\n', 2,
     "duplicate of the rule on line 1"),
])
def test_override_errors_name_the_override_file_and_line(policy_dir, tmp_path, text, line, fragment) -> None:
    """Counsel is sent to the county file and line, not to the baseline."""
    county = _county(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        CasbinPolicyEngine.load(policy_dir(BASELINE), override=county)
    assert info.value.file == str(county)
    assert info.value.line == line
    assert fragment in info.value.message


def test_baseline_groups_are_usable_in_the_override(policy_dir, tmp_path) -> None:
    """A role group declared by the baseline may be named by county rules."""
    d = policy_dir(BASELINE + "g, casa, line-staff\n")
    county = _county(tmp_path, 'p, line-staff, general-health, COC, mdt-member, allow, "County Res. 5"\n')
    engine = CasbinPolicyEngine.load(d, override=county)
    assert engine.decide(role="casa", category="general-health", purpose="COC",
                         grounds=frozenset({"mdt-member"})).allowed


def test_version_and_files_cover_the_override(policy_dir, tmp_path) -> None:
    """The version changes with the override's bytes, so audit events name what was in force."""
    d = policy_dir(BASELINE)
    base = CasbinPolicyEngine.load(d)
    county = _county(tmp_path, '# county\np, casa, general-health, COC, mdt-member, allow, "County Res. 3"\n')
    first = CasbinPolicyEngine.load(d, override=county)
    assert first.version != base.version
    assert "override/county.csv" in first.files() and "override/county.csv" not in base.files()
    assert CasbinPolicyEngine.load(d, override=county).version == first.version
    county.write_text(county.read_text() + "# a comment is still a change of the file\n", encoding="utf-8")
    assert CasbinPolicyEngine.load(d, override=county).version not in (first.version, base.version)
    empty = _county(tmp_path, "", name="empty.csv")
    assert CasbinPolicyEngine.load(d, override=empty).version != base.version


def test_settings_refuse_an_unreadable_override(tmp_path) -> None:
    """A configured override that cannot be read stops start-up rather than running the baseline."""
    from pydantic import ValidationError

    from tests.scenarios.harness import make_settings

    with pytest.raises(ValidationError, match="policy_override_file"):
        make_settings(tmp_path, "sqlite://", "http://127.0.0.1:1", policy_override_file=tmp_path / "missing.csv")
    county = _county(tmp_path, "")
    assert make_settings(tmp_path, "sqlite://", "http://127.0.0.1:1",
                         policy_override_file=county).policy_override_file == county
