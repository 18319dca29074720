"""Builders for complete, valid consents of each legal form; tests remove or change one element."""

from __future__ import annotations

import copy
from datetime import date, datetime, timezone

from broker.consent import validation as v
from broker.consent.validation import YouthFacts

NOW = datetime(2025, 3, 1, 18, 0, tzinfo=timezone.utc)
SIGNED = "2025-02-20T17:30:00-08:00"
YOUTH_ID = "y-test"


def youth(age: int | None = 15, *, removed: bool = False) -> YouthFacts:
    """A youth who is ``age`` on the signing date (birthday in June), or of unknown age."""
    born = None if age is None else date(2025 - age - 1, 6, 1)
    return YouthFacts(youth_id=YOUTH_ID, birth_date=born, removed=removed)


def label(code: str) -> dict:
    """A security label: an HL7 v3-ActCode sensitivity code, or a broker category name."""
    if code in v.SECURITY_LABEL_CATEGORIES:
        return {"system": v.ACT_CODE_SYSTEM, "code": code}
    return {"system": v.CATEGORY_SYSTEM, "code": code}


def recipient(kind: str, value: str) -> dict:
    """A provision actor naming a recipient by staff id, team role or agency."""
    system = {"person": v.STAFF_SYSTEM, "role": v.TEAM_ROLE_SYSTEM, "agency": v.AGENCY_SYSTEM}[kind]
    return {"role": {"coding": [{"system": v.PARTICIPATION_SYSTEM, "code": v.RECIPIENT_ROLE}]},
            "reference": {"identifier": {"system": system, "value": value}}}


def part2(**changes) -> dict:
    """A complete 42 CFR 2.31 consent signed by the youth for the treating program to tell the social worker."""
    resource = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{YOUTH_ID}"},
        "dateTime": SIGNED,
        "performer": [{"reference": "RelatedPerson/signer-1", "display": "A Name Never Stored"}],
        "organization": [{"identifier": {"system": v.AGENCY_SYSTEM, "value": "bh"}}],
        "sourceAttachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"},
        "extension": [
            {"url": v.SIGNER_CAPACITY_URL, "valueCode": "youth"},
            {"url": v.REVOCATION_NOTICE_URL, "valueString": "You may revoke this consent in writing at any time "
                                                            "by telling the program."},
        ],
        "provision": {
            "type": "permit",
            "period": {"start": "2025-02-20", "end": "2025-08-20"},
            "actor": [recipient("role", "child-welfare-worker")],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "COC"}],
            "securityLabel": [label("SUD")],
            "code": [{"text": "Treatment attendance and progress summaries from the outpatient program"}],
        },
    }
    return _apply(resource, changes)


def hiv(**changes) -> dict:
    """A complete H&S 120980 authorization: one recipient, signed and dated."""
    resource = part2()
    resource["provision"]["securityLabel"] = [label("HIV")]
    resource["provision"]["actor"] = [recipient("person", "staff-phn")]
    del resource["organization"]
    del resource["provision"]["code"]
    resource["extension"] = [{"url": v.SIGNER_CAPACITY_URL, "valueCode": "youth"}]
    return _apply(resource, changes)


def cmia(**changes) -> dict:
    """A complete Civ. 56.11 authorization for mental health records."""
    resource = part2()
    resource["provision"]["securityLabel"] = [label("MH")]
    resource["extension"] += [
        {"url": v.USE_LIMITATION_URL, "valueString": "For care coordination only; no redisclosure."},
        {"url": v.COPY_PROVIDED_URL, "valueBoolean": True},
    ]
    return _apply(resource, changes)


def education(**changes) -> dict:
    """A complete FERPA 34 CFR 99.30 consent signed by the education-rights holder."""
    resource = part2()
    resource["provision"]["securityLabel"] = [label("education")]
    resource["extension"] = [{"url": v.SIGNER_CAPACITY_URL, "valueCode": "education-rights-holder"}]
    resource["provision"]["code"] = [{"text": "Attendance and IEP records for the current school year"}]
    del resource["organization"]
    del resource["provision"]["period"]["end"]
    return _apply(resource, changes)


def release(**changes) -> dict:
    """A complete plain release of the child welfare case file, authorized by the court."""
    resource = part2()
    resource["provision"]["securityLabel"] = [label("child-welfare-case")]
    resource["extension"] = [{"url": v.SIGNER_CAPACITY_URL, "valueCode": "court"}]
    del resource["organization"]
    del resource["provision"]["code"]
    return _apply(resource, changes)


def with_capacity(resource: dict, capacity: str) -> dict:
    """The same consent signed in another capacity."""
    out = copy.deepcopy(resource)
    for ext in out["extension"]:
        if ext["url"] == v.SIGNER_CAPACITY_URL:
            ext["valueCode"] = capacity
    return out


def _apply(resource: dict, changes: dict) -> dict:
    for key, value in changes.items():
        resource[key] = value
    return resource
