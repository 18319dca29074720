"""Classify, filter and redact fetched resources: the last gate before labelling.

An item is released only if it provably belongs to the youth and every category it
carries is allowed. Everything is deep-copied first so that a connector's cache is
never mutated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Patient elements that can reveal where the youth lives or is placed.
PATIENT_LOCATION_ELEMENTS = ("address", "telecom", "contact")


@dataclass
class FilterOutcome:
    """What survived the filter and, for the audit only, what did not (categories, paths)."""

    released: list[tuple[dict, frozenset[str]]] = field(default_factory=list)
    withheld_categories: set[str] = field(default_factory=set)
    foreign_dropped: int = 0
    redactions: list[str] = field(default_factory=list)


def belongs_to(resource: dict, patient_id: str) -> bool:
    """True only if the resource names this patient as its subject (or is that Patient)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient_id
    wanted = f"Patient/{patient_id}"
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict):
            value = ref.get("reference")
            if isinstance(value, str) and (value == wanted or value.endswith("/" + wanted)):
                return True
    return False


def filter_resources(
    items: Iterable[tuple[dict, str, frozenset[str]]],
    *,
    classify: Callable[[dict, frozenset[str]], frozenset[str]],
    allowed: frozenset[str],
) -> FilterOutcome:
    """Release (deep copies of) items whose categories are all allowed.

    ``items`` yields (resource, source patient id, source default categories).
    """
    out = FilterOutcome()
    for resource, patient_id, defaults in items:
        if not isinstance(resource, dict) or not belongs_to(resource, patient_id):
            out.foreign_dropped += 1
            continue
        categories = classify(resource, defaults)
        if not categories or not categories <= allowed:
            out.withheld_categories.update(categories - allowed)
            continue
        released = copy.deepcopy(resource)
        if released.get("resourceType") == "Patient" and "placement-location" not in allowed:
            for element in PATIENT_LOCATION_ELEMENTS:
                if element in released:
                    del released[element]
                    out.redactions.append(f"Patient.{element}")
        out.released.append((released, categories))
    return out
