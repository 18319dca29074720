"""Classify, filter and redact fetched resources: the last gate before labelling.

An item is released only if it provably belongs to the youth and every category it
carries is allowed. Everything is deep-copied first so that a connector's cache is
never mutated, unless the connector declares ``fresh_results`` (its items were built for
this call alone and share nothing), in which case they are redacted and labelled in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson

from broker.pipeline.redaction import INLINE_LABEL_URL, redact_labelled_elements
from connectors.base import belongs_to_patient

# Patient elements that can reveal where the youth lives or is placed.
PATIENT_LOCATION_ELEMENTS = ("address", "telecom", "contact")


@dataclass
class FilterOutcome:
    """What survived the filter and, for the audit only, what did not (categories, paths)."""

    released: list[tuple[dict, frozenset[str]]] = field(default_factory=list)
    withheld_categories: set[str] = field(default_factory=set)
    foreign_dropped: int = 0
    redactions: list[str] = field(default_factory=list)
    released_redactions: list[tuple[str, ...]] = field(default_factory=list)
    """Per released item (same order as ``released``), the paths removed from it."""

    def extend(self, other: "FilterOutcome") -> None:
        """Append another batch's outcome (a later source, or more of the same one)."""
        self.released.extend(other.released)
        self.released_redactions.extend(other.released_redactions)
        self.withheld_categories |= other.withheld_categories
        self.foreign_dropped += other.foreign_dropped
        self.redactions.extend(other.redactions)

    def window(self, start: int, stop: int) -> None:
        """Keep only released items [start, stop); ``redactions`` becomes what was removed from those."""
        self.released = self.released[start:stop]
        self.released_redactions = self.released_redactions[start:stop]
        self.redactions = [p for paths in self.released_redactions for p in paths]


def filter_resources(
    items: Iterable[tuple[dict, str, frozenset[str]]],
    *,
    classify: Callable[[dict, frozenset[str]], frozenset[str]],
    allowed: frozenset[str],
    known: frozenset[str] = frozenset(),
    fresh: bool = False,
) -> FilterOutcome:
    """Release (deep copies of) items whose categories are all allowed, minus labelled elements that are not.

    ``items`` yields (resource, source patient id, source default categories). ``known`` is
    the vocabulary's categories (an element labelled with anything else is removed). A
    labelled element that stays adds its category to the item's, so it is labelled too.
    ``fresh``: the items are the caller's alone (see the module docstring), released as they
    are instead of copied.
    """
    out = FilterOutcome()
    for resource, patient_id, defaults in items:
        if not isinstance(resource, dict) or not belongs_to_patient(resource, patient_id):
            out.foreign_dropped += 1
            continue
        categories = classify(resource, defaults)
        if not categories or not categories <= allowed:
            out.withheld_categories.update(categories - allowed)
            continue
        released, labelled = _own(resource) if fresh else _copy(resource)
        paths: list[str] = []
        if labelled:
            redaction = redact_labelled_elements(released, allowed, known)
            paths.extend(redaction.paths)
            out.withheld_categories.update(redaction.withheld)
            categories = categories | redaction.kept
        if released.get("resourceType") == "Patient" and "placement-location" not in allowed:
            for element in PATIENT_LOCATION_ELEMENTS:
                if element in released:
                    del released[element]
                    paths.append(f"Patient.{element}")
        out.redactions.extend(paths)
        out.released.append((released, categories))
        out.released_redactions.append(tuple(paths))
    return out


_LABEL_MARK = INLINE_LABEL_URL.encode()


def _copy(resource: dict) -> tuple[dict, bool]:
    """A deep copy, and whether it may carry inline security labels (else there is nothing to redact).

    An orjson round trip copies JSON about seven times faster than ``copy.deepcopy`` and gives
    the serialized text to look for the label URL in; anything orjson cannot serialize is
    copied the slow way and always walked.
    """
    try:
        text = orjson.dumps(resource)
    except (orjson.JSONEncodeError, TypeError):
        return copy.deepcopy(resource), True
    return orjson.loads(text), _LABEL_MARK in text


def _own(resource: dict) -> tuple[dict, bool]:
    """A fresh item itself, and whether it may carry inline security labels (as ``_copy`` tells)."""
    try:
        return resource, _LABEL_MARK in orjson.dumps(resource)
    except (orjson.JSONEncodeError, TypeError):
        return resource, True
