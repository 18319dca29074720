"""The glossary every policy file, the engine and the API share, loaded from vocabulary.yaml.

County counsel defines a word here before a policy line may use it; a load that finds a
typo, a duplicate or a missing label refuses to start with ``PolicyError(file, line, msg)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from broker.policy.errors import PolicyError

VOCABULARY_FILE = "vocabulary.yaml"
CONFIDENTIALITY_CODES = ("U", "L", "M", "N", "R", "V")
LOCAL_PREFIX = "local:"
# Words the policy language reserves: "*" is the wildcard, "none" the ground of a groundless request.
RESERVED = frozenset({"*", "none"})

_SLUG = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
_GROUND = re.compile(r"^[a-z][a-z0-9]*(?:[-:][a-z0-9]+)*$")
_PURPOSE = re.compile(r"^[A-Z][A-Z0-9]*$")
_CODE = re.compile(r"^(?:local:)?[A-Za-z][A-Za-z0-9_-]*$")
_STR_TAG = "tag:yaml.org,2002:str"
_SECTIONS = ("roles", "admin_roles", "categories", "purposes", "grounds", "consent_grounds", "labels")
# Categories no consent may ever cover: never released through the broker (LEGAL.md matrix "N").
NEVER_CONSENTED = {"psychotherapy-notes": "45 CFR 164.508(a)(2); Evid. Code 1014"}
# A consent yields a consent ground, never a standing, court-order or emergency ground.
CONSENT_GROUND_PREFIXES = ("consent-", "consent:")
_LABEL_KEYS = ("confidentiality_system", "sensitivity_system", "obligation_system", "local_system",
               "categories", "obligation_text")


@dataclass(frozen=True, slots=True)
class Purpose:
    """A purpose of use as a coding, so responses and audit events can carry the HL7 code."""

    code: str
    system: str
    display: str


@dataclass(frozen=True, slots=True)
class CategoryLabelSpec:
    """The security labels one category's released items carry."""

    confidentiality: str
    sensitivity: tuple[str, ...]
    obligations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """Label codes per category plus the code systems they come from (``local:`` = local_system)."""

    confidentiality_system: str
    sensitivity_system: str
    obligation_system: str
    local_system: str
    categories: dict[str, CategoryLabelSpec]
    obligation_text: dict[str, str]


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """Roles, categories, purposes, grounds and labels that policy lines may name."""

    roles: dict[str, str]
    admin_roles: dict[str, str]
    categories: dict[str, str]
    purposes: dict[str, Purpose]
    grounds: dict[str, str]
    labels: LabelSpec
    # category → the ground a valid consent covering that category yields (absent: no consent covers it)
    consent_grounds: dict[str, str]

    @classmethod
    def load(cls, policy_dir: Path) -> Vocabulary:
        """Read and validate ``policy_dir/vocabulary.yaml``; any defect is a PolicyError."""
        path = Path(policy_dir) / VOCABULARY_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(path, None, f"cannot read the vocabulary ({type(exc).__name__})") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> Vocabulary:
        """Validate vocabulary text already read (the engine hashes and parses the same bytes)."""
        return _Reader(Path(path)).vocabulary(text)


class _Reader:
    """Walks the YAML node tree so every error can name the line it comes from."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: Node | None, message: str) -> PolicyError:
        """An error pointing at ``node``'s line (1-based)."""
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(self.path, line, message)

    def vocabulary(self, text: str) -> Vocabulary:
        """Parse the whole document into a Vocabulary."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            raise PolicyError(self.path, line, f"invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise PolicyError(self.path, None, f"invalid YAML ({type(exc).__name__})") from None
        if root is None:
            raise PolicyError(self.path, None, "the vocabulary is empty")
        sections = dict((k, (v, line)) for k, v, line in self.mapping(root, "the vocabulary"))
        for key, (_node, line) in sections.items():
            if key not in _SECTIONS:
                raise PolicyError(self.path, line, f"unknown section {key!r} (expected one of {', '.join(_SECTIONS)})")
        for key in _SECTIONS:
            if key not in sections:
                raise self.fail(root, f"missing section {key!r}")
        roles = self.glossary(sections["roles"][0], "roles", _SLUG)
        admin_roles = self.glossary(sections["admin_roles"][0], "admin_roles", _SLUG)
        for key, node in self._keys(sections["admin_roles"][0]):
            if key in roles:
                raise self.fail(node, f"admin role {key!r} is also a team role")
        categories = self.glossary(sections["categories"][0], "categories", _SLUG)
        grounds = self.glossary(sections["grounds"][0], "grounds", _GROUND)
        purposes = self.purposes(sections["purposes"][0])
        consent_grounds = self.consent_grounds(sections["consent_grounds"][0], categories, grounds)
        labels = self.labels(sections["labels"][0], categories)
        return Vocabulary(roles=roles, admin_roles=admin_roles, categories=categories,
                          purposes=purposes, grounds=grounds, labels=labels, consent_grounds=consent_grounds)

    def mapping(self, node: Node, what: str) -> list[tuple[str, Node, int]]:
        """(key, value node, key line) for a mapping with unique string keys."""
        if not isinstance(node, MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        seen: dict[str, int] = {}
        out = []
        for key_node, value_node in node.value:
            key = self.string(key_node, f"a key in {what}")
            line = key_node.start_mark.line + 1
            if key in seen:
                raise PolicyError(self.path, line, f"duplicate key {key!r} in {what} (first on line {seen[key]})")
            seen[key] = line
            out.append((key, value_node, line))
        return out

    def _keys(self, node: Node) -> list[tuple[str, Node]]:
        """Keys with their own nodes, for errors about a key rather than its value."""
        return [(k.value, k) for k, _v in node.value] if isinstance(node, MappingNode) else []

    def string(self, node: Node, what: str) -> str:
        """A non-empty plain string (not a number, boolean or null)."""
        if not isinstance(node, ScalarNode) or node.tag != _STR_TAG or not node.value.strip():
            raise self.fail(node, f"{what} must be a non-empty string")
        return node.value.strip()

    def strings(self, node: Node, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        """A list of codes, each matching ``pattern``, without repeats."""
        if not isinstance(node, SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        out: list[str] = []
        for item in node.value:
            code = self.string(item, f"an entry of {what}")
            if not pattern.match(code):
                raise self.fail(item, f"{code!r} in {what} is not a valid code")
            if code in out:
                raise self.fail(item, f"{code!r} appears twice in {what}")
            out.append(code)
        return tuple(out)

    def glossary(self, node: Node, section: str, pattern: re.Pattern[str]) -> dict[str, str]:
        """A section of name → description, names restricted so policy lines stay unambiguous."""
        out: dict[str, str] = {}
        for key, value, line in self.mapping(node, section):
            if key in RESERVED or not pattern.match(key):
                raise PolicyError(self.path, line, f"{key!r} is not a valid name in {section}")
            out[key] = self.string(value, f"the description of {key!r}")
        if not out:
            raise self.fail(node, f"{section} must not be empty")
        return out

    def consent_grounds(self, node: Node, categories: dict[str, str], grounds: dict[str, str]) -> dict[str, str]:
        """category → consent ground; known names only, and never a category no consent may cover.

        An empty mapping is valid (no consent unlocks anything); a missing category simply has
        no consent ground, which is the conservative reading.
        """
        out: dict[str, str] = {}
        for category, value, line in self.mapping(node, "consent_grounds"):
            if category in NEVER_CONSENTED:
                raise PolicyError(self.path, line, f"{category!r} must not appear in consent_grounds: no consent "
                                                   f"ever covers it ({NEVER_CONSENTED[category]})")
            if category not in categories:
                raise PolicyError(self.path, line, f"consent_grounds names unknown category {category!r}")
            ground = self.string(value, f"the consent ground of {category!r}")
            if ground not in grounds:
                raise self.fail(value, f"consent_grounds maps {category!r} to unknown ground {ground!r} "
                                       "(define it under grounds)")
            if not ground.startswith(CONSENT_GROUND_PREFIXES):
                raise self.fail(value, f"consent_grounds maps {category!r} to {ground!r}, which is not a "
                                       "consent ground (its name must start with 'consent-')")
            out[category] = ground
        return out

    def purposes(self, node: Node) -> dict[str, Purpose]:
        """Purpose codes with their coding system and display text."""
        out: dict[str, Purpose] = {}
        for code, value, line in self.mapping(node, "purposes"):
            if not _PURPOSE.match(code):
                raise PolicyError(self.path, line, f"{code!r} is not a valid purpose code (upper case)")
            fields = dict((k, v) for k, v, _l in self.mapping(value, f"purpose {code}"))
            for key in fields:
                if key not in ("system", "display"):
                    raise self.fail(value, f"purpose {code} has an unknown field {key!r}")
            for key in ("system", "display"):
                if key not in fields:
                    raise self.fail(value, f"purpose {code} needs a {key}")
            out[code] = Purpose(code=code, system=self.string(fields["system"], f"the system of {code}"),
                                display=self.string(fields["display"], f"the display of {code}"))
        if not out:
            raise self.fail(node, "purposes must not be empty")
        return out

    def labels(self, node: Node, categories: dict[str, str]) -> LabelSpec:
        """Labels for every category, each obligation explained in obligation_text."""
        entries = {k: (v, line) for k, v, line in self.mapping(node, "labels")}
        for key, (_v, line) in entries.items():
            if key not in _LABEL_KEYS:
                raise PolicyError(self.path, line, f"unknown labels field {key!r}")
        for key in _LABEL_KEYS:
            if key not in entries:
                raise self.fail(node, f"labels needs {key!r}")
        systems = {k: self.string(entries[k][0], f"labels.{k}") for k in _LABEL_KEYS[:4]}
        text_node = entries["obligation_text"][0]
        text = {code: self.string(v, f"the text of obligation {code}")
                for code, v, _l in self.mapping(text_node, "labels.obligation_text")}
        cats_node = entries["categories"][0]
        specs: dict[str, CategoryLabelSpec] = {}
        for category, value, line in self.mapping(cats_node, "labels.categories"):
            if category not in categories:
                raise PolicyError(self.path, line, f"labels for unknown category {category!r}")
            specs[category] = self.category_labels(category, value, text)
        for category in categories:
            if category not in specs:
                raise self.fail(cats_node, f"category {category!r} has no labels")
        return LabelSpec(categories=specs, obligation_text=text, **systems)

    def category_labels(self, category: str, node: Node, text: dict[str, str]) -> CategoryLabelSpec:
        """One category's confidentiality, sensitivity and obligation codes."""
        fields = {k: v for k, v, _l in self.mapping(node, f"labels of {category}")}
        for key in fields:
            if key not in ("confidentiality", "sensitivity", "obligations"):
                raise self.fail(node, f"labels of {category} have an unknown field {key!r}")
        for key in ("confidentiality", "sensitivity", "obligations"):
            if key not in fields:
                raise self.fail(node, f"labels of {category} need {key!r}")
        conf = self.string(fields["confidentiality"], f"the confidentiality of {category}")
        if conf not in CONFIDENTIALITY_CODES:
            raise self.fail(fields["confidentiality"],
                            f"confidentiality {conf!r} of {category} is not one of {', '.join(CONFIDENTIALITY_CODES)}")
        sensitivity = self.strings(fields["sensitivity"], f"the sensitivity of {category}", _CODE)
        obligations = self.strings(fields["obligations"], f"the obligations of {category}", _CODE)
        for code, item in zip(obligations, fields["obligations"].value):
            if code not in text:
                raise self.fail(item, f"obligation {code!r} of {category} has no obligation_text")
        return CategoryLabelSpec(confidentiality=conf, sensitivity=sensitivity, obligations=obligations)
