"""Reads policy.csv line by line so that every defect names the file and line counsel must fix.

Each non-comment line is a Casbin rule, parsed as CSV (a quoted citation may contain commas):

    p, role, category, purpose, ground, effect, "citation"   # a decision rule
    g, member-role, role-group                                # role hierarchy
    g2, member-category, category-group                       # category grouping
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from broker.policy.errors import PolicyError
from broker.vocabulary import RESERVED, Vocabulary

WILDCARD = "*"
EFFECTS = ("allow", "deny")
P_FIELDS = ("role", "category", "purpose", "ground", "effect", "citation")
GROUPING = {"g": "role", "g2": "category"}
_GROUP_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One policy line as written (quotes removed) and the line it came from."""

    ptype: str
    fields: tuple[str, ...]
    line: int


def read_rules(path: Path, text: str, vocabulary: Vocabulary) -> tuple[PolicyRule, ...]:
    """Parse and validate every line of policy.csv against the vocabulary."""
    rules = tuple(_parse(path, text))
    groups = _check_groupings(path, rules, vocabulary)
    seen: dict[tuple[str, ...], int] = {}
    for rule in rules:
        key = (rule.ptype, *rule.fields)
        if key in seen:
            raise PolicyError(path, rule.line, f"duplicate of the rule on line {seen[key]}")
        seen[key] = rule.line
        if rule.ptype == "p":
            _check_p(path, rule, vocabulary, groups)
    return rules


def _parse(path: Path, text: str):
    """Yield one PolicyRule per rule line; comments (#) and blank lines are skipped."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = next(csv.reader([line], skipinitialspace=True, strict=True))
        except csv.Error as exc:
            raise PolicyError(path, number, f"malformed line ({exc})") from None
        tokens = [t.strip() for t in tokens]
        ptype, fields = tokens[0], tuple(tokens[1:])
        if ptype == "p":
            if len(fields) != len(P_FIELDS):
                raise PolicyError(path, number, f"a p line needs {len(P_FIELDS)} fields "
                                                f"({', '.join(P_FIELDS)}); found {len(fields)}")
        elif ptype in GROUPING:
            if len(fields) != 2:
                raise PolicyError(path, number, f"a {ptype} line needs 2 fields (member, group); found {len(fields)}")
        else:
            raise PolicyError(path, number, f"unknown rule type {ptype!r} (expected p, g or g2)")
        yield PolicyRule(ptype=ptype, fields=fields, line=number)


def _check_groupings(path: Path, rules: tuple[PolicyRule, ...], vocabulary: Vocabulary) -> dict[str, set[str]]:
    """Validate g/g2 lines; return the group names each declares (usable in p lines)."""
    known = {"g": set(vocabulary.roles), "g2": set(vocabulary.categories)}
    groups: dict[str, set[str]] = {"g": set(), "g2": set()}
    for rule in rules:
        if rule.ptype in GROUPING:
            groups[rule.ptype].add(rule.fields[1])
    for rule in rules:
        if rule.ptype not in GROUPING:
            continue
        kind = GROUPING[rule.ptype]
        member, group = rule.fields
        if group in RESERVED or group in vocabulary.admin_roles or not _GROUP_NAME.match(group):
            raise PolicyError(path, rule.line, f"{group!r} is not a valid {kind} group name")
        if member == group:
            raise PolicyError(path, rule.line, f"{kind} {member!r} cannot be a member of itself")
        if member not in known[rule.ptype] and member not in groups[rule.ptype]:
            raise PolicyError(path, rule.line, f"unknown {kind} {member!r} (define it in vocabulary.yaml)")
    return groups


def _check_p(path: Path, rule: PolicyRule, vocabulary: Vocabulary, groups: dict[str, set[str]]) -> None:
    """Every term known, effect allow|deny, a citation, and an allow names its ground."""
    role, category, purpose, ground, effect, citation = rule.fields
    line = rule.line
    if role in vocabulary.admin_roles:
        raise PolicyError(path, line, f"admin role {role!r} never reads records; no rule may name it")
    checks = (
        ("role", role, set(vocabulary.roles) | groups["g"]),
        ("category", category, set(vocabulary.categories) | groups["g2"]),
        ("purpose", purpose, set(vocabulary.purposes)),
        ("ground", ground, set(vocabulary.grounds)),
    )
    for kind, value, allowed in checks:
        if value != WILDCARD and value not in allowed:
            raise PolicyError(path, line, f"unknown {kind} {value!r} (define it in vocabulary.yaml or use *)")
    if effect not in EFFECTS:
        raise PolicyError(path, line, f"effect must be allow or deny, not {effect!r}")
    if not citation:
        raise PolicyError(path, line, "every rule needs a citation (the statute or regulation it encodes)")
    if effect == "allow" and ground == WILDCARD:
        raise PolicyError(path, line, "an allow rule must name the ground it relies on (not *)")
    consent_grounds = getattr(vocabulary, "consent_grounds", {}) or {}
    if effect == "allow" and ground in set(consent_grounds.values()) and category in vocabulary.categories \
            and consent_grounds.get(category) != ground:
        raise PolicyError(path, line, f"a {ground} consent never covers {category!r} "
                                      "(see consent_grounds in vocabulary.yaml)")
