"""Proves the default county policy against the case tables in policies/tests/*.yaml.

The tables are expanded by ``broker.policy.cases`` (shared with ``broker policy test``), so a
failure names the exact tuple, e.g. ``probation-officer/mental-health/TREAT/[mdt-member]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.policy import CasbinPolicyEngine
from broker.policy.cases import Case, check, load_tables
from broker.vocabulary import Vocabulary

CASE_DIR = Path(__file__).resolve().parent
POLICY_DIR = CASE_DIR.parent

_TABLES = load_tables(CASE_DIR, Vocabulary.load(POLICY_DIR))
MATRIX, EXPLICIT, BLOCK_CATEGORIES = list(_TABLES.matrix), list(_TABLES.explicit), list(_TABLES.block_categories)


@pytest.fixture(scope="module")
def engine() -> CasbinPolicyEngine:
    """The default policy exactly as shipped."""
    return CasbinPolicyEngine.load(POLICY_DIR)


def _check(engine: CasbinPolicyEngine, case: Case) -> None:
    """Assert one case; the message shows the rule that actually decided."""
    failure = check(engine, case)
    assert failure is None, failure.message


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_matrix(engine: CasbinPolicyEngine, case: Case) -> None:
    """Each cell of the expanded matrix decides as the table says, by the cited rule."""
    _check(engine, case)


@pytest.mark.parametrize("case", EXPLICIT, ids=[c.id for c in EXPLICIT])
def test_spotlight(engine: CasbinPolicyEngine, case: Case) -> None:
    """Hand-picked flips (purpose, grounds) decide as written."""
    _check(engine, case)


def test_blocks_cover_every_category_once() -> None:
    """A category without a block would leave its rules unproven."""
    vocab = Vocabulary.load(POLICY_DIR)
    assert sorted(BLOCK_CATEGORIES) == sorted(vocab.categories)


def test_every_rule_decides_some_case(engine: CasbinPolicyEngine) -> None:
    """A rule no case exercises is either dead or untested; both need counsel's attention."""
    used = set()
    for case in MATRIX + EXPLICIT:
        decision = engine.decide(role=case.role, category=case.category, purpose=case.purpose,
                                 grounds=frozenset(case.grounds))
        if decision.rule is not None:
            used.add(decision.rule)
    unused = [f"policy.csv:{r.line}" for r in engine.rules if r.ptype == "p" and r.fields not in used]
    assert not unused, f"rules no case exercises: {unused}"


def test_every_rule_is_cited(engine: CasbinPolicyEngine) -> None:
    """Counsel's bar: no rule without the statute or regulation it encodes."""
    rules = [r for r in engine.rules if r.ptype == "p"]
    assert rules
    assert all(r.fields[5].strip() and '"' not in r.fields[5] for r in rules)


# ---- Structural guarantees of the consent, court-order and break-glass rules -----------------
# These hold for every rule, whatever the case tables say, so a future line that breaks one is
# caught even before a case exercises it.

COUNSEL = frozenset({"dependency-attorney", "public-defender"})
DAGGER = frozenset({"district-attorney", "law-enforcement"})  # only a case against the exploiter
EMERGENCY_PURPOSES = frozenset({"ETREAT", "THREAT"})


def _allows(engine: CasbinPolicyEngine):
    """Every allow rule as (line, role, category, purpose, ground)."""
    return [(r.line, *r.fields[:4]) for r in engine.rules if r.ptype == "p" and r.fields[4] == "allow"]


def test_consent_grounds_unlock_only_their_own_category(engine: CasbinPolicyEngine) -> None:
    """A consent ground releases only the category whose consent yields it (no cross-category leak)."""
    vocab = engine.vocabulary
    consent_grounds = set(vocab.consent_grounds.values())
    assert consent_grounds, "vocabulary.yaml maps no category to a consent ground"
    wrong = [f"policy.csv:{line}" for line, _role, category, _purpose, ground in _allows(engine)
             if ground in consent_grounds and vocab.consent_grounds.get(category) != ground]
    assert not wrong, f"consent ground used for a category its consent does not cover: {wrong}"


def test_no_allow_rule_for_a_category_no_consent_covers(engine: CasbinPolicyEngine) -> None:
    """Psychotherapy notes: no allow rule at all, and a deny for every role, purpose and ground."""
    vocab = engine.vocabulary
    closed = [c for c in vocab.categories if c not in vocab.consent_grounds]
    assert "psychotherapy-notes" in closed
    for line, _role, category, _purpose, _ground in _allows(engine):
        assert category not in closed and category != "*", f"policy.csv:{line} allows {category}"
    deny_all = {r.fields[1] for r in engine.rules
                if r.ptype == "p" and r.fields[4] == "deny" and r.fields[0] == r.fields[2] == r.fields[3] == "*"}
    assert "psychotherapy-notes" in deny_all


def test_break_glass_only_for_emergencies(engine: CasbinPolicyEngine) -> None:
    """break-glass allows only emergency treatment or averting an imminent threat, never a wildcard."""
    bad = [f"policy.csv:{line}" for line, _r, _c, purpose, ground in _allows(engine)
           if ground == "break-glass" and purpose not in EMERGENCY_PURPOSES]
    assert not bad, f"break-glass rules outside ETREAT/THREAT: {bad}"


def test_consent_never_serves_a_legal_purpose_except_for_counsel_or_dagger(engine: CasbinPolicyEngine) -> None:
    """HLEGAL on a consent only for the youth's counsel or (dagger) DA/LE; DA/LE consents only HLEGAL."""
    consent_grounds = set(engine.vocabulary.consent_grounds.values())
    bad = []
    for line, role, _category, purpose, ground in _allows(engine):
        if ground not in consent_grounds:
            continue
        if purpose in ("HLEGAL", "*") and role not in COUNSEL | DAGGER:
            bad.append(f"policy.csv:{line} ({role} {purpose})")
        if role in DAGGER | {"*"} and purpose != "HLEGAL":
            bad.append(f"policy.csv:{line} ({role} {purpose})")
    assert not bad, f"consent rules that could serve a case against the youth: {bad}"


def test_new_grounds_are_exercised_for_every_category() -> None:
    """The tables run every category with its consent ground, a court order and break-glass."""
    vocab = Vocabulary.load(POLICY_DIR)
    consent_grounds = set(vocab.consent_grounds.values())
    for category in vocab.categories:
        seen = {g for c in MATRIX if c.category == category for g in c.grounds}
        assert {"court-order", "break-glass"} <= seen, category
        own = vocab.consent_grounds.get(category)
        assert (own in seen) if own else consent_grounds <= seen, category
