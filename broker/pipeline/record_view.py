"""The one-MDT record view: every released item from every source in one Bundle, grouped by category.

Shape (FHIR R4 ``Bundle`` of type ``collection``):

- entries ordered by group (the vocabulary's category order), then resource type and id; each
  entry carries a ``record-category`` extension naming its group;
- a final ``OperationOutcome`` entry with one issue per configured source: ``ok``,
  ``unavailable`` or ``timeout`` (code ``informational``, ``transient`` or ``timeout``). A
  source the broker did not ask -- the youth has no link there, or nothing it holds could be
  released to this requester -- is ``ok`` like one that answered with nothing, so the list is
  the same for every requester and reveals neither links nor policy;
- no ``total`` and no counts per group.

An item's group is the first of its categories in ``GROUP_PRECEDENCE``: the most specific
reason it is sensitive. Element-level categories (``reporter-identity``,
``placement-location``) come last so that a referral stays with the referrals and a placement
with the case file when the requester may also see the labelled element.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from broker.pipeline.sources import OK, TIMEOUT, UNAVAILABLE

GROUP_URL = "https://mdt-broker.example.org/StructureDefinition/record-category"
SOURCE_STATUS_SYSTEM = "https://mdt-broker.example.org/CodeSystem/source-status"
GROUP_PRECEDENCE = (
    "psychotherapy-notes", "sud-part2", "hiv", "sti", "reproductive-health", "mental-health",
    "youth-statement", "canra-report", "education", "juvenile-court", "probation",
    "child-welfare-case", "general-health", "reporter-identity", "placement-location",
)
_ISSUE = {OK: ("information", "informational", "answered"),
          UNAVAILABLE: ("warning", "transient", "is unavailable"),
          TIMEOUT: ("warning", "timeout", "did not answer in time")}


def group_of(categories: frozenset[str]) -> str:
    """The group an item is listed under."""
    for category in GROUP_PRECEDENCE:
        if category in categories:
            return category
    return min(categories) if categories else "general-health"


def group(items: Iterable[tuple[dict, frozenset[str]]],
          vocabulary_order: Mapping[str, Any]) -> list[tuple[dict, frozenset[str]]]:
    """Items sorted by group (vocabulary order), then resource type and id."""
    rank = {c: i for i, c in enumerate(vocabulary_order)}

    def key(item: tuple[dict, frozenset[str]]) -> tuple[int, str, str, str]:
        resource, categories = item
        g = group_of(categories)
        return rank.get(g, len(rank)), g, str(resource.get("resourceType")), str(resource.get("id"))

    return sorted(items, key=key)


def bundle(*, base: str, bundle_id: str, items: list[tuple[dict, frozenset[str]]], categories: set[str],
           statuses: Mapping[str, str],
           labeller: Any, now: str, released_under_url: str, notice_url: str) -> dict:
    """The collection Bundle described in the module docstring."""
    entries = []
    for resource, item_categories in items:
        entries.append({"extension": [{"url": GROUP_URL, "valueCode": group_of(item_categories)}],
                        "fullUrl": f"{base}/{resource.get('resourceType')}/{resource.get('id')}",
                        "resource": resource})
    entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
        _source_issue(name, status) for name, status in sorted(statuses.items())]}})
    result: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"lastUpdated": now, "security": labeller.bundle_security(categories)},
        "type": "collection",
        "timestamp": now,
        "entry": entries,
    }
    extensions = meta_extensions(labeller, [r for r, _c in items], categories, notice_url=notice_url,
                                 released_under_url=released_under_url)
    if extensions:
        result["meta"]["extension"] = extensions
    return result


def meta_extensions(labeller: Any, resources: Iterable[dict], categories: set[str], *, notice_url: str,
                    released_under_url: str) -> list[dict]:
    """A Bundle's obligation notices, and the consents and orders its items were released under."""
    extensions = [{"url": notice_url, "valueString": n["text"]} for n in
                  labeller.obligation_notices(labeller.summarize(categories)[2]) if n["text"]]
    documents = dict.fromkeys(e["valueReference"]["reference"]
                              for r in resources for e in r.get("meta", {}).get("extension", [])
                              if e.get("url") == released_under_url)
    extensions += [{"url": released_under_url, "valueReference": {"reference": ref}} for ref in documents]
    return extensions


def _source_issue(name: str, status: str) -> dict:
    severity, code, text = _ISSUE.get(status, _ISSUE[UNAVAILABLE])
    status = status if status in _ISSUE else UNAVAILABLE
    return {"severity": severity, "code": code,
            "details": {"coding": [{"system": SOURCE_STATUS_SYSTEM, "code": status}], "text": name},
            "diagnostics": f"source {name} {text}"}
