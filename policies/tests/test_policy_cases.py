"""Proves the default county policy against the case tables in policies/tests/*.yaml.

Block tables (``blocks:``) are expanded to every role x purpose x grounds set, so a failure
names the exact tuple, e.g. ``probation-officer/mental-health/TREAT/[mdt-member]``. A grounds
set may be limited to some purposes (``{grounds: [...], purposes: [...]}``) and may name
``<consent>``: the category's own consent ground from vocabulary.yaml (``consent_grounds``), or
every consent ground at once for a category that no consent covers.
Explicit tables (``cases:``) are run as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from broker.policy import CasbinPolicyEngine
from broker.vocabulary import Vocabulary

CASE_DIR = Path(__file__).resolve().parent
POLICY_DIR = CASE_DIR.parent
EXPECTS = ("allow", "deny")
CONSENT = "<consent>"  # placeholder in grounds_sets for the category's own consent ground


@dataclass(frozen=True)
class Case:
    """One request tuple and what the policy must answer; citation None = no rule may match."""

    role: str
    category: str
    purpose: str
    grounds: tuple[str, ...]
    expect: str
    citation: str | None
    check_citation: bool
    source: str

    @property
    def id(self) -> str:
        """Readable test id: role/category/purpose/[grounds]."""
        return f"{self.role}/{self.category}/{self.purpose}/[{','.join(self.grounds)}]"


class SpecError(ValueError):
    """A case table is malformed; raised at collection so the run fails loudly."""


def _check_terms(vocab: Vocabulary, source: str, kind: str, values: list[str], known) -> None:
    """Every term in a table must exist, or a typo would silently weaken the cases."""
    for value in values:
        if value != "*" and value not in known:
            raise SpecError(f"{source}: unknown {kind} {value!r}")


def _roles(vocab: Vocabulary, source: str, roles) -> list[str]:
    """A role list, or '*' for every role."""
    if roles == "*":
        return list(vocab.roles)
    _check_terms(vocab, source, "role", roles, vocab.roles)
    return list(roles)


def _expected(vocab, source, block, denies, role, purpose, grounds) -> tuple[str, str | None]:
    """What the table says for one tuple: a deny rule first, then the first allowing ground."""
    for entry in denies:
        if role in _roles(vocab, source, entry["roles"]):
            return "deny", entry["citation"]
    for ground in sorted(grounds):
        citations = {
            entry["citation"]
            for entry in block.get("allow", [])
            if role in _roles(vocab, source, entry["roles"])
            and entry["ground"] == ground
            and (purpose in entry["purposes"] or "*" in entry["purposes"])
        }
        if len(citations) > 1:
            raise SpecError(f"{source}: {block['category']} allow entries overlap for {role}/{purpose}/{ground}")
        if citations:
            return "allow", citations.pop()
    return "deny", None


@dataclass(frozen=True)
class GroundsSet:
    """A grounds set as written (may hold ``<consent>``) and the purposes it runs for."""

    grounds: tuple[str, ...]
    purposes: tuple[str, ...]

    def for_category(self, vocab: Vocabulary, category: str) -> tuple[str, ...]:
        """The concrete grounds for one category: ``<consent>`` replaced by its consent ground(s)."""
        out: set[str] = set()
        for ground in self.grounds:
            if ground != CONSENT:
                out.add(ground)
            elif category in vocab.consent_grounds:
                out.add(vocab.consent_grounds[category])
            else:
                out |= set(vocab.consent_grounds.values())
        return tuple(sorted(out))


def _grounds_sets(doc: dict, vocab: Vocabulary, source: str) -> list[GroundsSet]:
    """``grounds_sets`` entries: a list (every purpose) or ``{grounds, purposes}``."""
    out = []
    for raw in doc.get("grounds_sets", []):
        if isinstance(raw, dict):
            if set(raw) != {"grounds", "purposes"} or not raw["purposes"]:
                raise SpecError(f"{source}: a grounds set mapping needs grounds and purposes, not {sorted(raw)}")
            grounds, purposes = list(raw["grounds"]), list(raw["purposes"])
            _check_terms(vocab, source, "purpose", purposes, vocab.purposes)
            if "*" in purposes:
                raise SpecError(f"{source}: write a plain list for a grounds set that runs for every purpose")
        else:
            grounds, purposes = list(raw), list(vocab.purposes)
        _check_terms(vocab, source, "ground", [g for g in grounds if g != CONSENT], vocab.grounds)
        if len(set(grounds)) != len(grounds):
            raise SpecError(f"{source}: grounds set {grounds} repeats a ground")
        out.append(GroundsSet(tuple(grounds), tuple(dict.fromkeys(purposes))))
    return out


def _expand_blocks(doc: dict, vocab: Vocabulary, source: str) -> list[Case]:
    """Every role x purpose x grounds set of every block, with its expected outcome."""
    grounds_sets = _grounds_sets(doc, vocab, source)
    everywhere = doc.get("everywhere", {}).get("deny", [])
    cases: list[Case] = []
    for block in doc["blocks"]:
        category = block["category"]
        _check_terms(vocab, source, "category", [category], vocab.categories)
        for entry in block.get("allow", []):
            _roles(vocab, source, entry["roles"])
            _check_terms(vocab, source, "purpose", entry["purposes"], vocab.purposes)
            _check_terms(vocab, source, "ground", [entry["ground"]], vocab.grounds)
            if not entry.get("citation"):
                raise SpecError(f"{source}: {category} allow entry without a citation")
        denies = list(everywhere) + list(block.get("deny", []))
        for role in vocab.roles:
            for purpose in vocab.purposes:
                for gs in grounds_sets:
                    if purpose not in gs.purposes:
                        continue
                    grounds = gs.for_category(vocab, category)
                    expect, citation = _expected(vocab, source, block, denies, role, purpose, grounds)
                    cases.append(Case(role, category, purpose, grounds, expect, citation, True, source))
    return cases


def _explicit(doc: dict, vocab: Vocabulary, source: str) -> list[Case]:
    """Cases written out one by one; ``citation`` absent means it is not checked."""
    cases = []
    for raw in doc["cases"]:
        _check_terms(vocab, source, "role", [raw["role"]], vocab.roles)
        _check_terms(vocab, source, "category", [raw["category"]], vocab.categories)
        _check_terms(vocab, source, "purpose", [raw["purpose"]], vocab.purposes)
        _check_terms(vocab, source, "ground", raw["grounds"], vocab.grounds)
        if raw["expect"] not in EXPECTS:
            raise SpecError(f"{source}: expect must be allow or deny, not {raw['expect']!r}")
        cases.append(Case(raw["role"], raw["category"], raw["purpose"], tuple(sorted(raw["grounds"])),
                          raw["expect"], raw.get("citation"), "citation" in raw, source))
    return cases


def _load_tables() -> tuple[list[Case], list[Case], list[str]]:
    """(expanded block cases, explicit cases, categories covered by blocks) from every table."""
    vocab = Vocabulary.load(POLICY_DIR)
    matrix: list[Case] = []
    explicit: list[Case] = []
    block_categories: list[str] = []
    for path in sorted(CASE_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "blocks" in doc:
            matrix += _expand_blocks(doc, vocab, path.name)
            block_categories += [b["category"] for b in doc["blocks"]]
        if "cases" in doc:
            explicit += _explicit(doc, vocab, path.name)
    for table in (matrix, explicit):
        ids = [c.id for c in table]
        dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
        if dupes:
            raise SpecError(f"duplicate cases: {dupes[:5]}")
    return matrix, explicit, block_categories


MATRIX, EXPLICIT, BLOCK_CATEGORIES = _load_tables()


@pytest.fixture(scope="module")
def engine() -> CasbinPolicyEngine:
    """The default policy exactly as shipped."""
    return CasbinPolicyEngine.load(POLICY_DIR)


def _check(engine: CasbinPolicyEngine, case: Case) -> None:
    """Assert one case; the message shows the rule that actually decided."""
    decision = engine.decide(role=case.role, category=case.category, purpose=case.purpose,
                             grounds=frozenset(case.grounds))
    got = f"got {decision.effect} on ground {decision.ground!r} by rule {decision.rule!r}"
    assert decision.effect == case.expect, f"{case.id} ({case.source}): expected {case.expect}; {got}"
    if case.check_citation:
        if case.citation is None:
            assert decision.rule is None, f"{case.id} ({case.source}): expected no matching rule; {got}"
        else:
            assert decision.citation == case.citation, (
                f"{case.id} ({case.source}): expected citation {case.citation!r}; {got}")
    if decision.allowed:
        assert decision.rule is not None and decision.citation, f"{case.id}: an allow must cite its rule; {got}"


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
