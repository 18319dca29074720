"""Policy case tables (policies/tests/*.yaml) as data, shared by the pytest runner and ``broker policy test``.

Block tables (``blocks:``) are expanded to every role x purpose x grounds set, so a failure
names the exact tuple, e.g. ``probation-officer/mental-health/TREAT/[mdt-member]``. A grounds
set may be limited to some purposes (``{grounds: [...], purposes: [...]}``) and may name
``<consent>``: the category's own consent ground from vocabulary.yaml (``consent_grounds``), or
every consent ground at once for a category that no consent covers.
Explicit tables (``cases:``) are run as written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from broker.domain import Decision
from broker.vocabulary import Vocabulary

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


@dataclass(frozen=True)
class CaseTables:
    """Every case of a case directory: expanded blocks, explicit cases, and the categories blocks cover."""

    matrix: tuple[Case, ...]
    explicit: tuple[Case, ...]
    block_categories: tuple[str, ...]

    @property
    def all(self) -> tuple[Case, ...]:
        """Matrix cases then explicit ones, in file order."""
        return self.matrix + self.explicit


@dataclass(frozen=True)
class CaseFailure:
    """A case the policy answered differently, with the decision it actually made."""

    case: Case
    message: str
    decision: Decision


class SpecError(ValueError):
    """A case table is malformed; raised at load so the run fails loudly."""


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


def expand_blocks(doc: dict, vocab: Vocabulary, source: str) -> list[Case]:
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


def explicit_cases(doc: dict, vocab: Vocabulary, source: str) -> list[Case]:
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


def load_tables(case_dir: Path, vocab: Vocabulary) -> CaseTables:
    """Every ``*.yaml`` table of ``case_dir``, expanded; duplicate tuples are a SpecError."""
    matrix: list[Case] = []
    explicit: list[Case] = []
    block_categories: list[str] = []
    for path in sorted(Path(case_dir).glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"{path.name}: invalid YAML ({type(exc).__name__})") from None
        if "blocks" in doc:
            matrix += expand_blocks(doc, vocab, path.name)
            block_categories += [b["category"] for b in doc["blocks"]]
        if "cases" in doc:
            explicit += explicit_cases(doc, vocab, path.name)
    for table in (matrix, explicit):
        ids = [c.id for c in table]
        dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
        if dupes:
            raise SpecError(f"duplicate cases: {dupes[:5]}")
    return CaseTables(tuple(matrix), tuple(explicit), tuple(block_categories))


def decide(engine, case: Case) -> Decision:
    """The engine's decision on a case's tuple."""
    return engine.decide(role=case.role, category=case.category, purpose=case.purpose,
                         grounds=frozenset(case.grounds))


def check(engine, case: Case) -> CaseFailure | None:
    """None when the policy answers as the table says; else the failure, showing the rule that decided."""
    decision = decide(engine, case)
    got = f"got {decision.effect} on ground {decision.ground!r} by rule {decision.rule!r}"
    message = None
    if decision.effect != case.expect:
        message = f"{case.id} ({case.source}): expected {case.expect}; {got}"
    elif case.check_citation and case.citation is None and decision.rule is not None:
        message = f"{case.id} ({case.source}): expected no matching rule; {got}"
    elif case.check_citation and case.citation is not None and decision.citation != case.citation:
        message = f"{case.id} ({case.source}): expected citation {case.citation!r}; {got}"
    elif decision.allowed and not (decision.rule is not None and decision.citation):
        message = f"{case.id}: an allow must cite its rule; {got}"
    return None if message is None else CaseFailure(case, message, decision)


def run(engine, cases: Iterable[Case]) -> list[CaseFailure]:
    """Every failing case, in order."""
    return [f for f in (check(engine, c) for c in cases) if f is not None]
