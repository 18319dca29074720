"""Element-level redaction: remove the parts of a released record the requester may not see.

A source marks an element that is more sensitive than its record with the HL7 DS4P inline
security label extension (``extension-inline-sec-label``) whose ``valueCoding`` names a data
category, e.g. the reporter inside a CANRA referral (``reporter-identity``) or the placement
address inside a placement (``placement-location``). When the category is not allowed, the
element is *removed*: no marker, no empty shell, nothing that shows it was there. What is left
empty by the removal is pruned too (an extension without its value, an empty list or object),
so the record reads as if the element had never been recorded. The audit event gets the
element's path (``Communication.sender``), never its value.

A label the broker cannot read (another code system, no code, a category the vocabulary does
not define) counts as not allowed: an element is released only if the broker understood why
it was labelled and the policy allows that.

The caller passes a deep copy (broker.pipeline.filtering); this module mutates it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INLINE_LABEL_URL = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
CATEGORY_SYSTEM = "https://mdt-broker.example.org/CodeSystem/category"
_MAX_DEPTH = 32
_UNREADABLE = "(unreadable label)"


@dataclass
class Redaction:
    """What one resource lost (paths and categories, for the audit) and which labelled categories it kept."""

    paths: list[str] = field(default_factory=list)
    withheld: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)


def redact_labelled_elements(resource: dict[str, Any], allowed: frozenset[str], known: frozenset[str]) -> Redaction:
    """Remove every inline-labelled element whose categories are not all allowed; prune what empties.

    ``known`` is the vocabulary's categories: a label naming anything else is unreadable.
    """
    out = Redaction()
    root = str(resource.get("resourceType") or "Resource")
    _walk(resource, root, allowed, known, out, 0)
    return out


def _label_categories(element: dict[str, Any], known: frozenset[str]) -> set[str] | None:
    """The categories of the element's inline labels; None if it has none."""
    extensions = element.get("extension")
    if not isinstance(extensions, list):
        return None
    found: set[str] | None = None
    for ext in extensions:
        if not isinstance(ext, dict) or ext.get("url") != INLINE_LABEL_URL:
            continue
        found = found if found is not None else set()
        coding = ext.get("valueCoding")
        code = coding.get("code") if isinstance(coding, dict) else None
        system = coding.get("system") if isinstance(coding, dict) else None
        found.add(code if system == CATEGORY_SYSTEM and isinstance(code, str) and code in known else _UNREADABLE)
    return found


def _walk(node: dict[str, Any], path: str, allowed: frozenset[str], known: frozenset[str], out: Redaction,
          depth: int) -> bool:
    """Depth-first; children are judged before the parent is pruned. True if anything was removed.

    Only what a removal emptied is pruned; an element the source sent empty is left alone.
    A primitive's extensions live in its ``_name`` sibling (FHIR JSON): when ``_name`` (or an
    item of a ``_name`` list) carries a label that is not allowed, the value in ``name`` (or at
    the same index) goes with it.
    """
    if depth > _MAX_DEPTH:  # deeper than any FHIR resource: refuse rather than release unexamined
        raise ValueError("resource nested too deeply to redact")
    changed = False
    for key in list(node):
        if key not in node:  # removed with its _primitive sibling
            continue
        child = node[key]
        primitive = key[1:] if key.startswith("_") else None
        child_path = f"{path}.{primitive or key}"
        if isinstance(child, dict):
            if _remove_if_labelled(child, child_path, allowed, known, out):
                del node[key]
                if primitive is not None:
                    node.pop(primitive, None)
                changed = True
            elif _walk(child, child_path, allowed, known, out, depth + 1):
                changed = True
                if not child:
                    del node[key]
        elif isinstance(child, list):
            values = node.get(primitive) if primitive is not None else None
            kept, kept_values, removed = [], [], False
            for i, item in enumerate(child):
                if isinstance(item, dict):
                    if _remove_if_labelled(item, child_path, allowed, known, out):
                        removed = True
                        continue
                    if _walk(item, child_path, allowed, known, out, depth + 1):
                        removed = True
                        if primitive is None and (not item or _is_empty_extension(item)):
                            continue
                kept.append(item)
                if isinstance(values, list) and i < len(values):
                    kept_values.append(values[i])
            if not removed:
                continue
            changed = True
            if isinstance(values, list):
                if kept_values:
                    node[primitive] = kept_values
                else:
                    node.pop(primitive, None)
            if not kept or (primitive is not None and all(item is None for item in kept)):
                del node[key]
            else:
                node[key] = kept
    return changed


def _remove_if_labelled(element: dict[str, Any], path: str, allowed: frozenset[str], known: frozenset[str],
                        out: Redaction) -> bool:
    categories = _label_categories(element, known)
    if categories is None:
        return False
    if categories <= allowed:
        out.kept.update(categories)
        return False
    out.paths.append(path)
    out.withheld.update(c for c in categories - allowed if c != _UNREADABLE)
    return True


def _is_empty_extension(item: dict[str, Any]) -> bool:
    """An extension left with a url and neither a value nor nested extensions says only that something was removed."""
    if "url" not in item:
        return False
    return not any(k.startswith("value") or k == "extension" for k in item)
