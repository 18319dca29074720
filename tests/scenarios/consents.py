"""Build FHIR R4 Consent resources the way an agency system files them (see docs/consents.md)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

SD = "https://mdt-broker.example.org/StructureDefinition"
CATEGORY_SYSTEM = "https://mdt-broker.example.org/CodeSystem/category"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def recipient(kind: str, value: str) -> dict:
    """A provision actor naming a person (staff sub), a team role or an agency."""
    system = {"person": "staff", "role": "team-role", "agency": "agency"}[kind]
    return {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP"}]},
            "reference": {"identifier": {"system": f"https://mdt-broker.example.org/{system}", "value": value}}}


def consent(youth_id: str, *, categories: list[str], recipients: list[tuple[str, str]], purposes: list[str],
            signer: str = "youth", start: datetime | None = None, end: datetime | None = None) -> dict:
    """A complete consent carrying every element that 42 CFR 2.31 and Civ. Code 56.11 ask for."""
    now = datetime.now(timezone.utc)
    start = start or now - timedelta(days=1)
    end = end or now + timedelta(days=180)
    signer_ref = {"reference": f"Patient/{youth_id}"} if signer == "youth" else \
        {"identifier": {"system": "urn:test:related-person", "value": "rp-0001"}}
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{youth_id}"},
        "dateTime": _iso(start),
        "performer": [signer_ref],
        "organization": [{"identifier": {"system": "https://mdt-broker.example.org/agency", "value": "bh"}}],
        "sourceAttachment": {"contentType": "application/pdf", "title": "Signed authorization (synthetic)",
                             "data": "JVBERi0xLjQKJSBzeW50aGV0aWMK"},
        "extension": [
            {"url": f"{SD}/signer-capacity", "valueCode": signer},
            {"url": f"{SD}/revocation-notice",
             "valueString": "You may revoke this at any time by telling your social worker or program."},
            {"url": f"{SD}/use-limitation", "valueString": "Only for coordinating the youth's care and services."},
            {"url": f"{SD}/copy-provided", "valueBoolean": True},
        ],
        "provision": {
            "type": "permit",
            "period": {"start": _iso(start), "end": _iso(end)},
            "actor": [recipient(kind, value) for kind, value in recipients],
            "purpose": [{"system": REASON, "code": p} for p in purposes],
            "securityLabel": [{"system": CATEGORY_SYSTEM, "code": c} for c in categories],
            "code": [{"text": "Treatment records from the county SUD program, 2025-2026 (synthetic)"}],
        },
    }


def without(resource: dict, *path: str) -> dict:
    """A copy with one element removed."""
    out = copy.deepcopy(resource)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out
