"""Why a (role, category, purpose, grounds) request is allowed or denied, and what would change it.

County counsel asks "why was this denied?": an ``Explanation`` names the deciding rule with its
file, line and citation, and for a deny lists the grounds (consents, orders, emergencies) that
would open the category and for which purposes. A deny *rule* is reported as final: no ground
lifts it. Everything here is computed by re-asking the engine, so it can never disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from broker.domain import Decision
from broker.policy.rules import P_FIELDS, WILDCARD
from broker.vocabulary import Vocabulary

POLICY_FILE = "policy.csv"
TERM_FIELDS = ("role", "category", "purpose", "grounds")

# Plain words for a lawyer; {role} is the requesting role. A ground not listed here (a county's
# own) falls back to its vocabulary.yaml description.
GROUND_WORDS = {
    "mdt-member": "active membership of {role} on the youth's MDT",
    "own-statute": "a roster entry recording {role}'s own statutory access",
    "consent-part2": "a 42 CFR 2.31 consent naming {role}",
    "consent-hiv": "an H&S 120980 written authorization naming {role}, good for one disclosure",
    "consent-cmia": "a Civ. Code 56.11 authorization naming {role}",
    "consent-education": "a FERPA 34 CFR 99.30 consent by the education-rights holder naming {role}",
    "consent-release": "a written authorization by the holder naming {role}",
    "court-order": "a court order naming {role} and this category",
    "break-glass": "an emergency break-glass grant to {role} (reason stated, time-limited, reviewed)",
}


class _Engine(Protocol):
    """What explain needs from a policy engine (CasbinPolicyEngine satisfies it)."""

    @property
    def version(self) -> str: ...

    @property
    def rules(self) -> tuple[Any, ...]: ...

    def decide(self, *, role: str, category: str, purpose: str, grounds: frozenset[str]) -> Decision: ...


class UnknownTerm(ValueError):
    """A request names a term the vocabulary does not define; carries field names, never values."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        super().__init__("unknown " + ", ".join(fields))


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A policy line as counsel wrote it, with the file and line to edit."""

    file: str
    line: int | None
    role: str
    category: str
    purpose: str
    ground: str
    effect: str
    citation: str

    @property
    def location(self) -> str:
        """``file:line`` (just the file when the line is unknown)."""
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def fields_text(self) -> str:
        """The rule's fields as they read in policy.csv."""
        return ", ".join((self.role, self.category, self.purpose, self.ground, self.effect))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"file": self.file, "line": self.line, "location": self.location, "role": self.role,
                "category": self.category, "purpose": self.purpose, "ground": self.ground,
                "effect": self.effect, "citation": self.citation}


@dataclass(frozen=True, slots=True)
class Alternative:
    """One ground that would open the category, the purposes it opens it for, and the rule that says so."""

    ground: str
    held: bool
    purposes: tuple[str, ...]
    rule: RuleRef | None
    citation: str | None
    description: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"ground": self.ground, "held": self.held, "purposes": list(self.purposes),
                "rule": self.rule.to_dict() if self.rule else None, "citation": self.citation,
                "description": self.description}


@dataclass(frozen=True, slots=True)
class Explanation:
    """The verdict on one request tuple, its reason, and (for a deny) what would allow it."""

    role: str
    category: str
    purpose: str
    grounds_tried: tuple[str, ...]
    effect: str
    ground: str | None
    rule: RuleRef | None
    citation: str | None
    policy_version: str
    denied_by_rule: bool
    reason: str
    would_allow: tuple[Alternative, ...]

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the body of ``POST /policy/decide`` and ``broker policy explain --json``)."""
        return {"role": self.role, "category": self.category, "purpose": self.purpose,
                "grounds_tried": list(self.grounds_tried), "effect": self.effect, "ground": self.ground,
                "rule": self.rule.to_dict() if self.rule else None, "citation": self.citation,
                "policy_version": self.policy_version, "denied_by_rule": self.denied_by_rule,
                "reason": self.reason, "would_allow": [a.to_dict() for a in self.would_allow]}


def unknown_terms(vocabulary: Vocabulary, *, role: str, category: str, purpose: str,
                  grounds: frozenset[str] | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the fields holding a term the vocabulary lacks (admin roles never read records)."""
    bad = []
    if role not in vocabulary.roles:
        bad.append("role")
    if category not in vocabulary.categories:
        bad.append("category")
    if purpose not in vocabulary.purposes:
        bad.append("purpose")
    if any(g not in vocabulary.grounds for g in grounds):
        bad.append("grounds")
    return bad


def explain(engine: _Engine, *, role: str, category: str, purpose: str, grounds: frozenset[str],
            vocabulary: Vocabulary) -> Explanation:
    """Decide once, then re-decide per ground and purpose so a deny says what would open it."""
    grounds = frozenset(grounds)
    bad = unknown_terms(vocabulary, role=role, category=category, purpose=purpose, grounds=grounds)
    if bad:
        raise UnknownTerm(bad)
    decision = engine.decide(role=role, category=category, purpose=purpose, grounds=grounds)
    rule = rule_ref(engine, decision.rule)
    by_rule = decision.effect == "deny" and rule is not None
    alternatives = () if decision.allowed else _alternatives(engine, vocabulary, role, category, purpose, grounds)
    return Explanation(role=role, category=category, purpose=purpose, grounds_tried=tuple(sorted(grounds)),
                       effect=decision.effect, ground=decision.ground, rule=rule, citation=decision.citation,
                       policy_version=engine.version, denied_by_rule=by_rule,
                       reason=_reason(decision, rule, role, category, purpose, grounds), would_allow=alternatives)


def rule_ref(engine: _Engine, fields: tuple[str, ...] | None) -> RuleRef | None:
    """The engine's rule with these fields, located in its file (county layers carry ``file``)."""
    if not fields or len(fields) != len(P_FIELDS):
        return None
    line, file = None, POLICY_FILE
    for candidate in engine.rules:
        if candidate.ptype == "p" and tuple(candidate.fields) == tuple(fields):
            line, file = candidate.line, getattr(candidate, "file", POLICY_FILE) or POLICY_FILE
            break
    return RuleRef(file, line, *fields)


def describe_ground(ground: str, role: str, vocabulary: Vocabulary) -> str:
    """A ground in plain words, naming the role it would have to name, e.g. for a consent."""
    template = GROUND_WORDS.get(ground)
    if template is None:
        words = vocabulary.grounds.get(ground, ground)
        return f"{words[:1].lower()}{words[1:]} ({ground})"
    return f"{template.format(role=role)} ({ground})"


def _alternatives(engine: _Engine, vocabulary: Vocabulary, role: str, category: str, purpose: str,
                  grounds: frozenset[str]) -> tuple[Alternative, ...]:
    """Each ground that would decide an allow, alone or added to the given ones, and for which purposes."""
    found: list[Alternative] = []
    for ground in vocabulary.grounds:
        opened: dict[str, Decision] = {}
        for candidate in vocabulary.purposes:
            for tried in (frozenset({ground}), grounds | {ground}):
                d = engine.decide(role=role, category=category, purpose=candidate, grounds=tried)
                if d.allowed and d.ground == ground:  # credit the ground only when it is the one that allows
                    opened[candidate] = d
                    break
        if not opened:
            continue
        chosen = opened.get(purpose) or next(iter(opened.values()))
        found.append(Alternative(ground=ground, held=ground in grounds, purposes=tuple(opened),
                                 rule=rule_ref(engine, chosen.rule), citation=chosen.citation,
                                 description=describe_ground(ground, role, vocabulary)))
    # what opens the purpose asked about comes first; otherwise vocabulary order (least intrusive first)
    return tuple(sorted(found, key=lambda a: purpose not in a.purposes))


def _reason(decision: Decision, rule: RuleRef | None, role: str, category: str, purpose: str,
            grounds: frozenset[str]) -> str:
    """One sentence a lawyer can read: which rule decided, or that none did."""
    tried = ", ".join(sorted(grounds)) or "no grounds"
    if decision.allowed and rule is not None:
        return (f"allowed by rule on line {rule.line} of {rule.file}: {rule.fields_text()} ({rule.citation}), "
                f"on ground {decision.ground}")
    if rule is not None:
        scope = "no consent, order or emergency overrides it" if rule.ground == WILDCARD else \
            f"it applies whenever {rule.ground} is relied on"
        return f"denied by rule on line {rule.line} of {rule.file}: {rule.fields_text()} ({rule.citation}); {scope}"
    return (f"denied: no rule allows {role} to see {category} for {purpose} on the grounds tried ({tried}); "
            "with no allowing rule the answer is deny")


def explain_text(explanation: Explanation) -> str:
    """The explanation as lines for the terminal."""
    e = explanation
    lines = [f"{e.effect}: {e.role} / {e.category} / {e.purpose} / [{', '.join(e.grounds_tried)}]",
             f"  {e.reason}"]
    if e.rule is not None:
        lines.append(f"  rule:     {e.rule.location}  {e.rule.fields_text()}")
        lines.append(f"  citation: {e.rule.citation}")
    lines.append(f"  policy version: {e.policy_version}")
    if e.allowed:
        return "\n".join(lines)
    if e.would_allow:
        lines.append("would allow:")
        for a in e.would_allow:
            held = " (already held)" if a.held else ""
            where = f"{a.rule.location} ({a.citation})" if a.rule else (a.citation or "")
            lines.append(f"  - {a.description}{held}: for {', '.join(a.purposes)}; {where}")
    elif e.denied_by_rule and e.rule is not None and e.rule.ground == WILDCARD:
        lines.append("would allow: nothing - no ground lifts this deny rule")
    else:
        lines.append("would allow: nothing - no ground in the vocabulary opens this category to this role")
    return "\n".join(lines)
