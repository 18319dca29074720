"""Give every FHIR resource its data categories from value sets and security labels.

A resource's categories are the union of its source's default categories, every value set
whose codes match one of its codings, and every category implied by its ``meta.security``
labels. Adding a category only ever makes release harder (the broker releases an item only if
every one of its categories is allowed), so when in doubt the classifier adds, never drops:

- a code of the local category system that names no known category is kept as-is; the
  policy denies a category it does not know;
- an HL7 ActCode sensitivity label without a system is matched as if it had one;
- codings inside ``component`` and ``contained`` resources count too.

Matching is dict and set look-ups precomputed at load time; ICD-10 codes are compared
without dots and in upper case, so ``F43.10`` and ``F4310`` both match prefix ``F43``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

ACT_CODE_SYSTEMS = frozenset(
    {"http://terminology.hl7.org/CodeSystem/v3-ActCode", "http://hl7.org/fhir/v3/ActCode"}
)
LOCAL_CATEGORY_SYSTEM = "https://mdt-broker.example.org/CodeSystem/category"
ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"})

# Elements that hold a CodeableConcept (or a list of them) worth classifying.
CODED_ELEMENTS = (
    "code",
    "valueCodeableConcept",
    "medicationCodeableConcept",
    "type",
    "category",
    "reasonCode",
    "vaccineCode",
)
_MAX_CONTAINED_DEPTH = 3
_TOP_KEYS = frozenset({"category", "citation", "description", "codes", "security"})
_CODE_KEYS = frozenset({"system", "codes", "prefixes"})


@dataclass(frozen=True, slots=True)
class ValueSet:
    """One category's codes as county counsel wrote them, kept for explanations."""

    category: str
    citation: str
    description: str
    codes: Mapping[str, frozenset[str]]
    prefixes: Mapping[str, tuple[str, ...]]
    security: frozenset[str]
    source: Path


def normalize_code(system: str, code: str) -> str:
    """ICD-10 codes are written with and without the dot; compare them one way."""
    code = code.strip()
    if system in ICD10_SYSTEMS:
        return code.replace(".", "").upper()
    return code


class Classifier:
    """Maps codings and security labels to categories with precomputed look-ups."""

    def __init__(self, value_sets: Iterable[ValueSet]) -> None:
        self.value_sets: tuple[ValueSet, ...] = tuple(value_sets)
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, dict[int, dict[str, set[str]]]] = {}
        security: dict[str, set[str]] = {}
        for vs in self.value_sets:
            for system, codes in vs.codes.items():
                for code in codes:
                    exact.setdefault((system, code), set()).add(vs.category)
            for system, prefs in vs.prefixes.items():
                by_len = prefixes.setdefault(system, {})
                for prefix in prefs:
                    by_len.setdefault(len(prefix), {}).setdefault(prefix, set()).add(vs.category)
            for label in vs.security:
                security.setdefault(label, set()).add(vs.category)
        self._exact = {k: frozenset(v) for k, v in exact.items()}
        self._prefixes = {
            system: tuple(
                (length, {p: frozenset(c) for p, c in table.items()})
                for length, table in sorted(by_len.items())
            )
            for system, by_len in prefixes.items()
        }
        self._security = {k: frozenset(v) for k, v in security.items()}

    @classmethod
    def from_dir(cls, valueset_dir: Path, known_categories: set[str]) -> "Classifier":
        """Load and validate every ``*.yaml`` value set; a bad file stops start-up."""
        files = sorted(Path(valueset_dir).glob("*.yaml"))
        if not files:
            raise ValueError(f"{valueset_dir}: no value set files (*.yaml)")
        seen: dict[str, Path] = {}
        value_sets = []
        for path in files:
            vs = _load_value_set(path, known_categories)
            if vs.category in seen:
                raise ValueError(f"{path}: category {vs.category!r} already defined in {seen[vs.category].name}")
            seen[vs.category] = path
            value_sets.append(vs)
        return cls(value_sets)

    def categories_for_coding(self, system: str | None, code: str | None) -> frozenset[str]:
        """The categories one coding implies (empty if none)."""
        if not isinstance(system, str) or not isinstance(code, str):
            return frozenset()
        norm = normalize_code(system, code)
        found = self._exact.get((system, norm), frozenset())
        for length, table in self._prefixes.get(system, ()):
            if length > len(norm):
                break
            hit = table.get(norm[:length])
            if hit:
                found = found | hit
        return found

    def categories_for_label(self, system: str | None, code: str | None) -> frozenset[str]:
        """The categories one ``meta.security`` label implies (empty if none)."""
        if not isinstance(code, str) or not code.strip():
            return frozenset()
        code = code.strip()
        if system == LOCAL_CATEGORY_SYSTEM:
            return frozenset((code,))
        if system is None or system in ACT_CODE_SYSTEMS:
            return self._security.get(code, frozenset())
        return frozenset()

    def classify(self, resource: dict, default_categories: frozenset[str]) -> frozenset[str]:
        """Every category this resource belongs to, the source defaults included."""
        found = set(default_categories)
        self._collect(resource, found, 0)
        return frozenset(found)

    def _collect(self, resource: object, found: set[str], depth: int) -> None:
        if not isinstance(resource, dict):
            return
        meta = resource.get("meta")
        if isinstance(meta, dict):
            for label in _as_list(meta.get("security")):
                if isinstance(label, dict):
                    found.update(self.categories_for_label(label.get("system"), label.get("code")))
        for system, code in _codings(resource):
            found.update(self.categories_for_coding(system, code))
        for component in _as_list(resource.get("component")):
            if isinstance(component, dict):
                for system, code in _codings(component):
                    found.update(self.categories_for_coding(system, code))
        if depth < _MAX_CONTAINED_DEPTH:
            for contained in _as_list(resource.get("contained")):
                self._collect(contained, found, depth + 1)


def _as_list(value: object) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _codings(element: dict) -> Iterator[tuple[object, object]]:
    """(system, code) of every Coding in the coded elements of one resource or component."""
    for name in CODED_ELEMENTS:
        for concept in _as_list(element.get(name)):
            if not isinstance(concept, dict):
                continue
            if "coding" in concept:
                for coding in _as_list(concept.get("coding")):
                    if isinstance(coding, dict):
                        yield coding.get("system"), coding.get("code")
            elif "code" in concept:  # a bare Coding where a CodeableConcept was expected
                yield concept.get("system"), concept.get("code")


def _load_value_set(path: Path, known_categories: set[str]) -> ValueSet:
    """Parse one value set file; every problem names the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}")

    if not isinstance(data, dict):
        raise fail("must be a mapping with category, citation, description, codes, security")
    missing = _TOP_KEYS - {"security"} - data.keys()
    if missing:
        raise fail(f"missing keys: {', '.join(sorted(missing))}")
    unknown = data.keys() - _TOP_KEYS
    if unknown:
        raise fail(f"unknown keys: {', '.join(sorted(map(str, unknown)))}")
    category = data["category"]
    if not isinstance(category, str) or category not in known_categories:
        raise fail(f"category {category!r} is not in the vocabulary")
    if path.stem != category:
        raise fail(f"file name must be {category}.yaml")
    for key in ("citation", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise fail(f"{key} must be a non-empty string")
    codes: dict[str, set[str]] = {}
    prefixes: dict[str, set[str]] = {}
    if not isinstance(data["codes"], list):
        raise fail("codes must be a list")
    for i, entry in enumerate(data["codes"]):
        if not isinstance(entry, dict):
            raise fail(f"codes[{i}] must be a mapping")
        if entry.keys() - _CODE_KEYS:
            raise fail(f"codes[{i}] has unknown keys: {', '.join(sorted(map(str, entry.keys() - _CODE_KEYS)))}")
        system = entry.get("system")
        if not isinstance(system, str) or not system.strip():
            raise fail(f"codes[{i}].system must be a non-empty string")
        if "codes" not in entry and "prefixes" not in entry:
            raise fail(f"codes[{i}] needs codes or prefixes")
        for key, target in (("codes", codes), ("prefixes", prefixes)):
            if key in entry:
                values = _string_list(entry[key])
                if values is None:
                    raise fail(f"codes[{i}].{key} must be a list of non-empty strings")
                target.setdefault(system, set()).update(normalize_code(system, v) for v in values)
    security = _string_list(data.get("security", []))
    if security is None:
        raise fail("security must be a list of non-empty strings")
    if not codes and not prefixes and not security:
        raise fail("needs at least one code, prefix or security label")
    return ValueSet(
        category=category,
        citation=data["citation"].strip(),
        description=" ".join(data["description"].split()),
        codes={s: frozenset(v) for s, v in codes.items()},
        prefixes={s: tuple(sorted(v)) for s, v in prefixes.items()},
        security=frozenset(s.strip() for s in security),
        source=path,
    )


def _string_list(value: object) -> list[str] | None:
    """The list if it is a list of non-empty strings, else None (YAML turns 123 into an int)."""
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) and v.strip() for v in value):
        return None
    return value
