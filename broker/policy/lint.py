"""Check county counsel's policy files and report every defect at once, in words counsel can act on.

The loader (``broker/policy/rules.py``) refuses a policy at its first defect. Lint reads every
file, keeps going, and also finds rules that load but can never matter: an allow that a deny
always overrides, a repeated rule, a category no rule mentions. ``lint_sources`` is a pure
function of the files' contents (no Casbin, no file system), so it works on any merge of a
baseline and county files; ``lint`` only reads a policy directory and hands the texts over.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode

from broker.policy.errors import PolicyError
from broker.policy.rules import _GROUP_NAME, EFFECTS, GROUPING, P_FIELDS, WILDCARD
from broker.vocabulary import CONSENT_GROUND_PREFIXES, RESERVED, VOCABULARY_FILE, Vocabulary

POLICY_FILE = "policy.csv"
VALUESET_DIR = "valuesets"

# Error codes (stable: scripts and the other tools may match on them).
UNREADABLE_FILE = "unreadable-file"
SYNTAX = "syntax"
BAD_VOCABULARY = "bad-vocabulary"
UNKNOWN_ROLE = "unknown-role"
UNKNOWN_CATEGORY = "unknown-category"
UNKNOWN_PURPOSE = "unknown-purpose"
UNKNOWN_GROUND = "unknown-ground"
BAD_GROUP = "bad-group"
MISSING_CITATION = "missing-citation"
BAD_EFFECT = "bad-effect"
DUPLICATE_RULE = "duplicate-rule"
DEAD_ALLOW = "dead-allow"
UNUSED_CATEGORY = "unused-category"
CONSENT_GROUND_MISMATCH = "consent-ground-mismatch"
ADMIN_ROLE = "admin-role"
ALLOW_WILDCARD_GROUND = "allow-wildcard-ground"
BAD_REMOVAL = "bad-removal"
# Warning codes.
WILDCARD_ROLE_PROTECTED = "wildcard-role-protected"
DAGGER_MISSING = "dagger-missing"
CITATION_FORMAT = "citation-format"

# Categories whose release needs a specific statute or the youth's own authorization.
PROTECTED_CATEGORIES = frozenset({
    "sud-part2", "hiv", "reproductive-health", "sti", "mental-health", "psychotherapy-notes",
    "youth-statement", "reporter-identity", "placement-location",
})
# Health data: the LEGAL.md dagger rule limits it, for the prosecution, to a case against the exploiter.
HEALTH_CATEGORIES = frozenset({
    "general-health", "mental-health", "psychotherapy-notes", "sud-part2", "hiv", "reproductive-health", "sti",
})
PROSECUTION_ROLES = {"district-attorney": "the district attorney", "law-enforcement": "law enforcement"}
LEGAL_PURPOSE = "HLEGAL"
DAGGER_MARKS = ("†", "dagger")

# A county file may take a lower layer's rule out (as broker/policy/layers.py does):
#     # remove: role, category, purpose, ground, effect
_REMOVE = re.compile(r"^#\s*remove\s*:(?P<rest>.*)$", re.IGNORECASE)
_KINDS = ("role", "category", "purpose", "ground")
_SECTION = {"role": "roles", "category": "categories", "purpose": "purposes", "ground": "grounds"}
_UNKNOWN_CODE = {"role": UNKNOWN_ROLE, "category": UNKNOWN_CATEGORY, "purpose": UNKNOWN_PURPOSE,
                 "ground": UNKNOWN_GROUND}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, at the file and line counsel must edit (line None: the whole file)."""

    file: str
    line: int | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class LintReport:
    """Every error (the policy must not be deployed) and warning (counsel should look) found."""

    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing blocks the policy (warnings allowed)."""
        return not self.errors


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A policy file's text as read, under the name findings will use; text None = not readable."""

    name: str
    text: str | None
    problem: str = "the file is missing"


@dataclass(frozen=True, slots=True)
class _Rule:
    """One parsed policy line, with the comment paragraph directly above it (its note)."""

    file: str
    line: int
    ptype: str
    fields: tuple[str, ...]
    note: str
    layer: int = 0  # 0 = the baseline; county files count up from 1

    def at(self, other: _Rule | Finding | str) -> str:
        """'line 17', or 'line 17 of policy.csv' when read from a different file."""
        file = other if isinstance(other, str) else other.file
        return f"line {self.line}" if file == self.file else f"line {self.line} of {self.file}"


def lint(policy_dir: Path, *, override: Path | None = None) -> LintReport:
    """Read policy.csv, vocabulary.yaml, valuesets/*.yaml and an optional county file, then lint them."""
    policy_dir = Path(policy_dir)
    policies = [_read(policy_dir / POLICY_FILE, POLICY_FILE)]
    if override is not None:
        policies.append(_read(Path(override), _display_name(policy_dir, Path(override))))
    valuesets = []
    vs_dir = policy_dir / VALUESET_DIR
    if vs_dir.is_dir():
        valuesets = [_read(p, f"{VALUESET_DIR}/{p.name}") for p in sorted(vs_dir.glob("*.yaml"))]
    return lint_sources(vocabulary=_read(policy_dir / VOCABULARY_FILE, VOCABULARY_FILE),
                        policies=policies, valuesets=valuesets)


def lint_sources(*, vocabulary: SourceFile, policies: Sequence[SourceFile],
                 valuesets: Sequence[SourceFile] = ()) -> LintReport:
    """Lint file contents: the baseline policy first, then county files layered on it.

    A county file's rules are added to the layers below it, and its ``# remove: role, category,
    purpose, ground, effect`` lines take a lower layer's rule out (as broker/policy/layers.py does);
    duplicates, dead allows and unused categories are judged on the merged result.
    """
    linter = _Linter(vocabulary, policies, valuesets)
    linter.run()
    order = {name: i for i, name in enumerate([*(p.name for p in policies), vocabulary.name,
                                               *(v.name for v in valuesets)])}

    def key(f: Finding) -> tuple[int, int]:
        return (order.get(f.file, len(order)), f.line or 0)

    return LintReport(errors=sorted(linter.errors, key=key), warnings=sorted(linter.warnings, key=key))


def format_report(report: LintReport) -> str:
    """'file:line: LEVEL code: message' per finding, errors first, then a one-line summary."""
    lines = []
    for level, findings in (("ERROR", report.errors), ("WARNING", report.warnings)):
        for f in findings:
            where = f.file if f.line is None else f"{f.file}:{f.line}"
            lines.append(f"{where}: {level} {f.code}: {f.message}")
    summary = f"{_count(len(report.errors), 'error')}, {_count(len(report.warnings), 'warning')}"
    lines.append(summary + (": fix the errors before deploying this policy" if report.errors else ""))
    return "\n".join(lines)


def _count(n: int, word: str) -> str:
    """'no errors', '1 error', '3 errors'."""
    return f"no {word}s" if n == 0 else f"1 {word}" if n == 1 else f"{n} {word}s"


def _read(path: Path, name: str) -> SourceFile:
    """A file's UTF-8 text, or why it could not be read."""
    try:
        return SourceFile(name, path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return SourceFile(name, None, "the file is missing")
    except UnicodeDecodeError:
        return SourceFile(name, None, "the file is not UTF-8 text; save it as UTF-8")
    except OSError as exc:
        return SourceFile(name, None, f"the file cannot be read ({type(exc).__name__})")


def _display_name(policy_dir: Path, path: Path) -> str:
    """A county file inside the policy directory is named relative to it, else as given."""
    try:
        return path.resolve().relative_to(policy_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


class _Linter:
    """Collects findings over all files; every check runs even when earlier ones failed."""

    def __init__(self, vocabulary: SourceFile, policies: Sequence[SourceFile],
                 valuesets: Sequence[SourceFile]) -> None:
        self.vocab_file = vocabulary
        self.policy_files = list(policies)
        self.valueset_files = list(valuesets)
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []
        self.vocab: Vocabulary | None = None
        self.vocab_lines: dict[str, int] = {}
        self.parsed: list[_Rule] = []  # every rule line of every file, each checked on its own
        self.rules: list[_Rule] = []  # the merged policy: baseline minus removals plus county rules
        self.removals: list[tuple[int, str, int, tuple[str, ...]]] = []
        self.members: dict[str, dict[str, set[str]]] = {"g": {}, "g2": {}}

    def error(self, file: str, line: int | None, code: str, message: str) -> None:
        """Record an error."""
        self.errors.append(Finding(file, line, code, message))

    def warn(self, file: str, line: int | None, code: str, message: str) -> None:
        """Record a warning."""
        self.warnings.append(Finding(file, line, code, message))

    def run(self) -> None:
        """Every check, in the order counsel would fix things."""
        self.load_vocabulary()
        for layer, source in enumerate(self.policy_files):
            self.parse_policy(source, layer)
        self.apply_removals()
        for rule in self.rules:
            if rule.ptype in GROUPING:
                self.members[rule.ptype].setdefault(rule.fields[1], set()).add(rule.fields[0])
        for rule in self.parsed:
            if rule.ptype in GROUPING:
                self.check_grouping(rule)
            else:
                self.check_rule(rule)
        self.check_duplicates()
        self.check_dead_allows()
        valueset_categories = self.check_valuesets()
        self.check_unused_categories(valueset_categories)

    # --- reading -------------------------------------------------------------------------------

    def load_vocabulary(self) -> None:
        """The glossary, or an error that says the terms could not be checked."""
        src = self.vocab_file
        if src.text is None:
            self.error(src.name, None, UNREADABLE_FILE,
                       f"{src.problem}; without the glossary no role, category, purpose or ground can be checked")
            return
        try:
            self.vocab = Vocabulary.parse(src.text, Path(src.name))
        except PolicyError as err:
            code = SYNTAX if err.message.startswith("invalid YAML") else BAD_VOCABULARY
            self.error(src.name, err.line, code, f"{err.message}. Until this is fixed, the roles, categories, "
                                                 "purposes and grounds in the rules cannot be checked")
            return
        self.vocab_lines = _section_key_lines(src.text, "categories")

    def parse_policy(self, source: SourceFile, layer: int) -> None:
        """Each rule line, with the comment paragraph above it; a bad line is reported and skipped."""
        if source.text is None:
            self.error(source.name, None, UNREADABLE_FILE, source.problem)
            return
        comments: list[str] = []
        note = ""
        for number, raw in enumerate(source.text.splitlines(), start=1):
            line = raw.strip()
            if not line:
                comments, note = [], ""
                continue
            if line.startswith("#"):
                comments.append(line.lstrip("#").strip())
                removal = _REMOVE.match(line) if layer > 0 else None
                if removal is not None:
                    self.parse_removal(layer, source.name, number, removal["rest"])
                continue
            if comments:
                note, comments = " ".join(comments), []
            rule = self.parse_line(source.name, number, line, note, layer)
            if rule is not None:
                self.parsed.append(rule)

    def parse_removal(self, layer: int, file: str, number: int, rest: str) -> None:
        """A county '# remove:' line naming the role, category, purpose, ground and effect of a baseline rule."""
        try:
            tokens = [t.strip() for t in next(csv.reader([rest.strip()], skipinitialspace=True, strict=True), [])]
        except csv.Error as exc:
            tokens = [f"({exc})"]
        if len(tokens) != 5 or not all(tokens):
            self.error(file, number, BAD_REMOVAL,
                       "a '# remove:' line names the rule it takes out by its role, category, purpose, ground "
                       f"and effect (5 values); found {len(tokens)}")
            return
        self.removals.append((layer, file, number, tuple(tokens)))

    def apply_removals(self) -> None:
        """Take out the earlier-layer rules each removal names; a removal that names none is an error."""
        taken: set[int] = set()
        seen: dict[tuple[int, tuple[str, ...]], int] = {}
        for layer, file, number, key in self.removals:
            hits = [r for r in self.parsed if r.ptype == "p" and r.layer < layer and r.fields[:5] == key]
            if (layer, key) in seen:
                self.error(file, number, BAD_REMOVAL, f"this removes the same rule as line {seen[layer, key]}")
            elif not hits:
                below = ", ".join(src.name for src in self.policy_files[:layer])
                self.error(file, number, BAD_REMOVAL, f"this removes nothing: {below} has no rule "
                                                      f"{', '.join(key)} - check the spelling of each value")
            else:
                seen[layer, key] = number
                taken.update(id(r) for r in hits)
        self.rules = [r for r in self.parsed if id(r) not in taken]

    def parse_line(self, file: str, number: int, line: str, note: str, layer: int = 0) -> _Rule | None:
        """One CSV rule line, read exactly as the loader reads it."""
        try:
            tokens = next(csv.reader([line], skipinitialspace=True, strict=True))
        except csv.Error as exc:
            self.error(file, number, SYNTAX, f"this line is not valid CSV ({exc}). A citation must be wrapped in "
                                             'double quotes, and a quote inside it written twice ("")')
            return None
        tokens = [t.strip() for t in tokens]
        ptype, fields = tokens[0], tuple(tokens[1:])
        if ptype == "p":
            if len(fields) != len(P_FIELDS):
                self.error(file, number, SYNTAX,
                           f"a rule needs {len(P_FIELDS)} values after 'p' ({', '.join(P_FIELDS)}); this line has "
                           f"{len(fields)}. A citation that contains commas must be wrapped in double quotes")
                return None
        elif ptype in GROUPING:
            if len(fields) != 2:
                self.error(file, number, SYNTAX, f"a {ptype} line needs 2 values after '{ptype}' (the member "
                                                 f"{GROUPING[ptype]} and the group); this line has {len(fields)}")
                return None
        else:
            self.error(file, number, SYNTAX, f"a line must start with p (a rule), g (a role group) or g2 "
                                             f"(a category group), not {ptype!r}")
            return None
        return _Rule(file=file, line=number, ptype=ptype, fields=fields, note=note, layer=layer)

    # --- one rule at a time --------------------------------------------------------------------

    def known(self, kind: str) -> set[str] | None:
        """Names a rule may use for ``kind`` (vocabulary plus declared groups); None if unknown."""
        if self.vocab is None:
            return None
        base = {"role": self.vocab.roles, "category": self.vocab.categories,
                "purpose": self.vocab.purposes, "ground": self.vocab.grounds}[kind]
        groups = {"role": self.members["g"], "category": self.members["g2"]}.get(kind, {})
        return set(base) | set(groups)

    def unknown(self, rule: _Rule, kind: str, value: str, what: str = "") -> None:
        """Report a term the glossary lacks, naming the file and section to edit."""
        known = self.known(kind) or set()
        hint = difflib.get_close_matches(value, sorted(known), n=1)
        label = {"purpose": "purpose of use"}.get(kind, kind)
        shown = repr(value) if value else "(empty)"
        message = (f"unknown {label} {shown}{what}: define it under {_SECTION[kind]} in {self.vocab_file.name} "
                   "(the one glossary the engine, this check and the API read)")
        if kind in ("role", "category") and rule.ptype == "p":
            message += f", or declare it as a {kind} group with a {'g' if kind == 'role' else 'g2'} line"
        if hint:
            message += f". Did you mean {hint[0]!r}?"
        self.error(rule.file, rule.line, _UNKNOWN_CODE[kind], message)

    def check_grouping(self, rule: _Rule) -> None:
        """A g/g2 line: a valid group name, not itself, and a known member."""
        kind = GROUPING[rule.ptype]
        member, group = rule.fields
        admin = self.vocab.admin_roles if self.vocab else {}
        if group in RESERVED or group in admin or not _GROUP_NAME.match(group):
            self.error(rule.file, rule.line, BAD_GROUP,
                       f"{group!r} cannot be a {kind} group name: use lower-case words joined by hyphens, "
                       "not * or none, and not an administrator role")
        if member == group:
            self.error(rule.file, rule.line, BAD_GROUP, f"the {kind} {member!r} cannot be a member of itself")
        if rule.ptype == "g" and member in admin:
            self.error(rule.file, rule.line, ADMIN_ROLE, _admin_message(member, self.vocab_file.name))
            return
        known = self.known(kind)
        if known is not None and member not in known:
            self.unknown(rule, kind, member, f" in this {kind} group")

    def check_rule(self, rule: _Rule) -> None:
        """A p line: known terms, a real effect, a citation, a named ground, and the warnings."""
        role, category, purpose, ground, effect, citation = rule.fields
        vocab = self.vocab
        if vocab is not None and role in vocab.admin_roles:
            self.error(rule.file, rule.line, ADMIN_ROLE, _admin_message(role, self.vocab_file.name))
        for kind, value in zip(_KINDS, (role, category, purpose, ground)):
            known = self.known(kind)
            if kind == "role" and vocab is not None and value in vocab.admin_roles:
                continue
            if known is not None and value != WILDCARD and value not in known:
                self.unknown(rule, kind, value)
        if effect not in EFFECTS:
            self.error(rule.file, rule.line, BAD_EFFECT,
                       f"the effect must be allow or deny, not {effect or '(empty)'!r}")
        if not citation:
            self.error(rule.file, rule.line, MISSING_CITATION,
                       "this rule has no citation: name the statute or regulation it encodes, in double quotes")
        elif not any(c.isdigit() for c in citation):
            self.warn(rule.file, rule.line, CITATION_FORMAT,
                      f"the citation {citation!r} does not look like a citation (no section number): "
                      "name the code and section, e.g. \"W&IC 18961.7(b)\"")
        if effect == "allow" and ground == WILDCARD:
            self.error(rule.file, rule.line, ALLOW_WILDCARD_GROUND,
                       "an allow rule must name the legal ground it relies on (mdt-member, own-statute, a consent, "
                       "court-order or break-glass), not * - otherwise membership alone, a consent or an "
                       "emergency would all release the same data")
        self.check_consent_ground(rule)
        if effect == "allow":
            self.check_allow_warnings(rule)

    def check_consent_ground(self, rule: _Rule) -> None:
        """A consent ground only ever holds for the categories vocabulary.yaml says that consent covers."""
        role, category, purpose, ground, effect, _citation = rule.fields
        vocab = self.vocab
        if vocab is None or ground not in vocab.grounds or not ground.startswith(CONSENT_GROUND_PREFIXES):
            return
        categories = self.concrete("category", category)
        if not categories or any(vocab.consent_grounds.get(c) == ground for c in categories):
            return
        where = f"{self.vocab_file.name}, consent_grounds"
        if category != WILDCARD and category in vocab.categories:
            actual = vocab.consent_grounds.get(category)
            detail = (f"no consent ever covers {category} (not listed in {where})" if actual is None
                      else f"a consent covering {category} yields {actual}, not {ground} ({where})")
        else:
            detail = f"no category this rule covers is unlocked by a {ground} consent ({where})"
        self.error(rule.file, rule.line, CONSENT_GROUND_MISMATCH, f"this {effect} rule can never apply: {detail}")

    def check_allow_warnings(self, rule: _Rule) -> None:
        """Allows counsel should look at twice: every role on protected data; the prosecution on health data."""
        role, category, purpose, _ground, _effect, _citation = rule.fields
        categories = self.concrete("category", category) or {category}
        protected = sorted(categories & PROTECTED_CATEGORIES)
        if role == WILDCARD and protected:
            self.warn(rule.file, rule.line, WILDCARD_ROLE_PROTECTED,
                      f"this allow releases protected data ({', '.join(protected)}) to every role (*), including "
                      "roles added later. Name each role that may see it")
        health = sorted(categories & HEALTH_CATEGORIES)
        roles = self.concrete("role", role) or {role}
        prosecution = [r for r in PROSECUTION_ROLES if r in roles]
        if prosecution and health and purpose != LEGAL_PURPOSE and not _has_dagger(rule.note):
            who = " and ".join(PROSECUTION_ROLES[r] for r in prosecution)
            self.warn(rule.file, rule.line, DAGGER_MISSING,
                      f"this allow releases health data ({', '.join(health)}) to {who} for purpose "
                      f"{purpose}. Under the dagger rule (LEGAL.md) health data reaches the prosecution only for "
                      f"a case against the exploiter, never against the youth, and the youth decides with counsel: "
                      f"limit the purpose to {LEGAL_PURPOSE}, or record counsel's reasoning in a comment directly "
                      "above the rule marked † (dagger)")

    # --- across rules --------------------------------------------------------------------------

    def expand(self, kind: str, value: str) -> set[str]:
        """A name and every member of it, transitively, when it is a group."""
        ptype = {"role": "g", "category": "g2"}.get(kind)
        if ptype is None:
            return {value}
        out, todo = set(), [value]
        while todo:
            name = todo.pop()
            if name not in out:
                out.add(name)
                todo.extend(self.members[ptype].get(name, ()))
        return out

    def universe(self, kind: str) -> set[str]:
        """Every name ``kind`` can take: the glossary's, or (without one) every name the rules use."""
        vocab = self.vocab
        if vocab is not None:
            return set({"role": vocab.roles, "category": vocab.categories,
                        "purpose": vocab.purposes, "ground": vocab.grounds}[kind])
        index = _KINDS.index(kind)
        names = {r.fields[index] for r in self.rules if r.ptype == "p"} - {WILDCARD}
        ptype = {"role": "g", "category": "g2"}.get(kind)
        for r in self.rules:
            if r.ptype == ptype:
                names.update(r.fields)
        return names

    def concrete(self, kind: str, value: str) -> set[str]:
        """The requestable names a rule's value matches (the engine never asks about a group itself)."""
        universe = self.universe(kind)
        if value == WILDCARD:
            return universe
        return self.expand(kind, value) & universe if self.vocab is not None else self.expand(kind, value)

    def check_duplicates(self) -> None:
        """The same role, category, purpose, ground and effect twice (or the same grouping twice)."""
        seen: dict[tuple[str, ...], _Rule] = {}
        for rule in self.rules:
            key = (rule.ptype, *rule.fields[:5]) if rule.ptype == "p" else (rule.ptype, *rule.fields)
            first = seen.setdefault(key, rule)
            if first is rule:
                continue
            if rule.ptype != "p":
                self.error(rule.file, rule.line, DUPLICATE_RULE,
                           f"this grouping repeats the one on {first.at(rule)}; delete one of them")
                continue
            message = (f"this rule repeats the rule on {first.at(rule)} (same role, category, purpose, ground "
                       "and effect); delete one of them")
            if first.fields[5] != rule.fields[5]:
                message += (f". Their citations differ ({first.fields[5]!r} and {rule.fields[5]!r}): keep the "
                            "one counsel relies on")
            self.error(rule.file, rule.line, DUPLICATE_RULE, message)

    def check_dead_allows(self) -> None:
        """An allow whose every request a single deny also matches can never release anything."""
        p_rules = [r for r in self.rules if r.ptype == "p"]
        denies = [r for r in p_rules if r.fields[4] == "deny"]
        for allow in (r for r in p_rules if r.fields[4] == "allow"):
            covered = [self.concrete(k, v) for k, v in zip(_KINDS, allow.fields[:4])]
            if not all(covered):
                continue  # an unknown term: reported already, and it matches nothing
            for deny in denies:
                if all(c <= self.concrete(k, v) for c, k, v in zip(covered, _KINDS, deny.fields[:4])):
                    self.error(allow.file, allow.line, DEAD_ALLOW,
                               f"this allow rule can never take effect: the deny rule on {deny.at(allow)} "
                               f"({deny.fields[5]}) always overrides it, and no consent, court order or emergency "
                               "lifts a deny. Delete this allow, or narrow the deny if counsel has decided the law "
                               "permits this release")
                    break

    def check_valuesets(self) -> dict[str, tuple[str, int]]:
        """Each value set's category must be in the glossary; returns category -> (file, line)."""
        found: dict[str, tuple[str, int]] = {}
        for src in self.valueset_files:
            if src.text is None:
                self.error(src.name, None, UNREADABLE_FILE, src.problem)
                continue
            try:
                root = yaml.compose(src.text, Loader=yaml.SafeLoader)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                self.error(src.name, mark.line + 1 if mark else None, SYNTAX,
                           f"this value set is not valid YAML ({exc.problem or exc.context})")
                continue
            except yaml.YAMLError as exc:
                self.error(src.name, None, SYNTAX, f"this value set is not valid YAML ({type(exc).__name__})")
                continue
            node = _mapping_value(root, "category")
            if not isinstance(node, ScalarNode) or not node.value.strip():
                self.error(src.name, node.start_mark.line + 1 if node is not None else None, SYNTAX,
                           "a value set must name its data category on a 'category:' line")
                continue
            category, line = node.value.strip(), node.start_mark.line + 1
            found.setdefault(category, (src.name, line))
            if self.vocab is not None and category not in self.vocab.categories:
                hint = difflib.get_close_matches(category, sorted(self.vocab.categories), n=1)
                self.error(src.name, line, UNKNOWN_CATEGORY,
                           f"this value set sorts records into category {category!r}, which {self.vocab_file.name} "
                           "does not define: add it under categories there, or fix the spelling"
                           + (f". Did you mean {hint[0]!r}?" if hint else ""))
        return found

    def check_unused_categories(self, valueset_categories: dict[str, tuple[str, int]]) -> None:
        """A category no rule names is silently denied to everyone: usually a forgotten block of rules."""
        mentioned: set[str] = set()
        for rule in self.rules:
            if rule.ptype == "p" and rule.fields[1] != WILDCARD:
                mentioned |= self.expand("category", rule.fields[1])
        if self.vocab is not None:
            candidates = {c: (self.vocab_file.name, self.vocab_lines.get(c)) for c in self.vocab.categories}
        else:
            candidates = dict(valueset_categories)
        for category, (file, line) in candidates.items():
            if category in mentioned:
                continue
            valueset = valueset_categories.get(category)
            also = f" (value set {valueset[0]} sorts records into it)" if valueset else ""
            self.error(file, line, UNUSED_CATEGORY,
                       f"no rule mentions category {category!r}{also}: every request for it is denied by default. "
                       "Add the rules that release it, or a deny rule with a citation if it must never be released")


def _admin_message(role: str, vocab_name: str) -> str:
    """Why an administrator role may not appear in a rule."""
    return (f"{role!r} is an administrator role ({vocab_name}, admin_roles): administrators manage the team "
            "rosters and never read records, so no rule may name them")


def _has_dagger(note: str) -> bool:
    """Counsel marked the rule's comment with the dagger (†) rule."""
    lowered = note.lower()
    return any(mark in lowered for mark in DAGGER_MARKS)


def _mapping_value(root: object, key: str) -> object | None:
    """The value node of ``key`` in a top-level YAML mapping, if any."""
    if not isinstance(root, MappingNode):
        return None
    for k, v in root.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return v
    return None


def _section_key_lines(text: str, section: str) -> dict[str, int]:
    """name -> 1-based line of each key in one section of vocabulary.yaml."""
    node = _mapping_value(yaml.compose(text, Loader=yaml.SafeLoader), section)
    if not isinstance(node, MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _v in node.value if isinstance(k, ScalarNode)}

