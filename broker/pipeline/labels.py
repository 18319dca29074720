"""HL7 security labels and obligations on released items and on the response."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENTIALITY_ORDER = ("U", "L", "M", "N", "R", "V")
MAX_REMEMBERED_SETS = 4096
"""Category sets whose labels a Labeller remembers (each is a few short tuples); beyond it, computed each time."""


@dataclass(frozen=True)
class CategoryLabels:
    """The labels one category's items carry."""

    confidentiality: str
    sensitivity: tuple[str, ...]
    obligations: tuple[str, ...]


class Labeller:
    """Adds confidentiality, sensitivity and obligation codes; safe for concurrent use."""

    def __init__(self, *, spec: dict[str, CategoryLabels], confidentiality_system: str,
                 sensitivity_system: str, obligation_system: str, local_system: str,
                 obligation_text: dict[str, str]) -> None:
        self._spec = spec
        self._conf_system = confidentiality_system
        self._sens_system = sensitivity_system
        self._obl_system = obligation_system
        self._local_system = local_system
        self._text = obligation_text
        self._wanted: dict[frozenset[str], tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {}
        """Per category set: the (system, code) labels its items carry and their obligations."""

    def _coding(self, code: str, default_system: str) -> dict:
        if code.startswith("local:"):
            return {"system": self._local_system, "code": code.removeprefix("local:")}
        return {"system": default_system, "code": code}

    def summarize(self, categories: Iterable[str]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """Highest confidentiality, sensitivity codes and obligation codes for these categories.

        A category without a label spec gets the strictest labels (fail safe).
        """
        conf, sens, obl = "N", set(), set()
        for c in categories:
            spec = self._spec.get(c) or CategoryLabels("V", (), ("NORDSCLCD",))
            if CONFIDENTIALITY_ORDER.index(spec.confidentiality) > CONFIDENTIALITY_ORDER.index(conf):
                conf = spec.confidentiality
            sens.update(spec.sensitivity)
            obl.update(spec.obligations)
        return conf, tuple(sorted(sens)), tuple(sorted(obl))

    def _labels_for(self, categories: frozenset[str]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """(system, code) of every label items of these categories carry, and their obligations.

        Remembered per category set (a release has a handful), so each item costs only the copy.
        """
        if not isinstance(categories, frozenset):
            categories = frozenset(categories)
        found = self._wanted.get(categories)
        if found is None:
            conf, sens, obl = self.summarize(categories)
            codings = [{"system": self._conf_system, "code": conf}]
            codings += [self._coding(c, self._sens_system) for c in sens]
            codings += [self._coding(c, self._obl_system) for c in obl]
            found = (tuple((c["system"], c["code"]) for c in codings), obl)
            if len(self._wanted) < MAX_REMEMBERED_SETS:
                self._wanted[categories] = found
        return found

    def label(self, resource: dict, categories: frozenset[str]) -> tuple[str, ...]:
        """Add labels to a (copied) resource in place; return its obligation codes."""
        wanted, obl = self._labels_for(categories)
        meta = resource.setdefault("meta", {})
        security = [s for s in meta.get("security", []) if isinstance(s, dict)
                    and s.get("system") != self._conf_system]
        have = {(s.get("system"), s.get("code")) for s in security}
        for system, code in wanted:
            if (system, code) not in have:
                security.append({"system": system, "code": code})
                have.add((system, code))
        meta["security"] = security
        return obl

    def bundle_security(self, categories: Iterable[str]) -> list[dict]:
        """Labels for the response Bundle: the union over everything released."""
        conf, _sens, obl = self.summarize(categories)
        return [{"system": self._conf_system, "code": conf}] + [self._coding(c, self._obl_system) for c in obl]

    def obligation_notices(self, obligations: Iterable[str]) -> list[dict]:
        """Human-readable obligations for the agency system to show its user."""
        return [{"code": self._coding(o, self._obl_system), "text": self._text.get(o, "")}
                for o in sorted(set(obligations))]
