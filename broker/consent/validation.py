"""Check a filed FHIR Consent against the elements each legal form requires.

A consent is parsed with ``fhir.resources`` (R4B, the closest model to R4) and then read the
way county counsel reads a paper form: which categories it covers, which form that makes it
(42 CFR 2.31, H&S 120980, Civ. 56.11, FERPA 34 CFR 99.30, or a plain release), whether every
element that form needs is there, and whether the person who signed had the capacity to sign
for each category. Every defect found is reported at once, each naming the FHIR element and
the legal element. Messages are fixed strings: they never echo what the filer sent.

Pure functions, no I/O: safe for concurrent use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

from pydantic import ValidationError

from broker.errors import Unprocessable

BASE = "https://mdt-broker.example.org"
SIGNER_CAPACITY_URL = f"{BASE}/StructureDefinition/signer-capacity"
EXPIRY_EVENT_URL = f"{BASE}/StructureDefinition/expiry-event"
REVOCATION_NOTICE_URL = f"{BASE}/StructureDefinition/revocation-notice"
USE_LIMITATION_URL = f"{BASE}/StructureDefinition/use-limitation"
COPY_PROVIDED_URL = f"{BASE}/StructureDefinition/copy-provided"
STAFF_SYSTEM = f"{BASE}/staff"
TEAM_ROLE_SYSTEM = f"{BASE}/team-role"
AGENCY_SYSTEM = f"{BASE}/agency"
CATEGORY_SYSTEM = f"{BASE}/CodeSystem/category"
CONSENT_FORM_SYSTEM = f"{BASE}/CodeSystem/consent-form"
MDT_RELEASE = "mdt-release"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RECIPIENT_ROLE = "IRCP"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONSENT_ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"

SIGNER_CAPACITIES = ("youth", "parent-guardian", "education-rights-holder", "minors-counsel", "court")
RECIPIENT_KINDS = {STAFF_SYSTEM: "person", TEAM_ROLE_SYSTEM: "role", AGENCY_SYSTEM: "agency"}
PSYCHOTHERAPY_NOTES = "psychotherapy-notes"
PSYCHOTHERAPY_REFUSAL = "psychotherapy notes are never released through the broker (45 CFR 164.508(a)(2))"

# HL7 v3-ActCode sensitivity codes -> category, as in policies/valuesets/*.yaml ``security:``.
SECURITY_LABEL_CATEGORIES = {
    "ETH": "sud-part2", "SUD": "sud-part2", "42CFRPart2": "sud-part2",
    "HIV": "hiv",
    "MH": "mental-health", "PSY": "mental-health",
    "PSYTHPN": PSYCHOTHERAPY_NOTES,
    "SEX": "reproductive-health",
    "STD": "sti",
}
# Fallback when the vocabulary has no ``consent_grounds``; any other category is a plain release.
CONSENT_GROUNDS = {
    "sud-part2": "consent-part2", "hiv": "consent-hiv",
    "mental-health": "consent-cmia", "general-health": "consent-cmia",
    "reproductive-health": "consent-cmia", "sti": "consent-cmia",
    "education": "consent-education",
}
DEFAULT_GROUND = "consent-release"
# The legal form each category's authorization takes, strictest first.
FORM_RANK = ("part2", "hiv", "cmia", "education", "release")
CATEGORY_FORMS = {
    "sud-part2": "part2", "hiv": "hiv",
    "mental-health": "cmia", "general-health": "cmia", "reproductive-health": "cmia", "sti": "cmia",
    "education": "education",
}
# Minor-consent categories: from this age the youth alone authorizes (0 = any age).
MINOR_CONSENT = {
    "sud-part2": (12, "Fam. 6929; 42 CFR 2.14"),
    "mental-health": (12, "Fam. 6924; H&S 124260"),
    "hiv": (12, "H&S 121020"),
    "reproductive-health": (0, "Fam. 6925"),
    "sti": (12, "Fam. 6926"),
}
GENERIC_FORM_INVALID = {
    "sud-part2": "42 CFR 2.31: a generic MDT release form is not a valid Part 2 consent",
    "hiv": "H&S 120980: a generic MDT release form is not a valid HIV authorization",
    PSYCHOTHERAPY_NOTES: "45 CFR 164.508(a)(2): a generic MDT release form never covers psychotherapy notes",
}
ADULT_AGE = 18
SIGNING_CLOCK_SKEW = timedelta(minutes=5)


def _county_zone() -> tzinfo:
    """Date-only values are county dates; without tz data, fall back to standard Pacific time."""
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo("America/Los_Angeles")
    except Exception:  # pragma: no cover - depends on the host's tz database
        return timezone(timedelta(hours=-8))


COUNTY_TZ = _county_zone()

# What each form requires: (fact, FHIR element, legal element). Facts are computed in _facts().
SIGNATURE, DATE, ORG, DESCRIPTION, RECIPIENTS, PURPOSES = ("signature", "date", "organization",
                                                           "description", "recipients", "purposes")
REVOCATION, EXPIRY, EXPIRY_DATE, USE_LIMIT, COPY = ("revocation", "expiry", "expiry-date", "use-limitation",
                                                    "copy")
_E = {
    SIGNATURE: "Consent.sourceAttachment", DATE: "Consent.dateTime", ORG: "Consent.organization",
    DESCRIPTION: "Consent.provision.code", RECIPIENTS: "Consent.provision.actor",
    PURPOSES: "Consent.provision.purpose", REVOCATION: "Consent.extension:revocation-notice",
    EXPIRY: "Consent.provision.period.end", EXPIRY_DATE: "Consent.provision.period.end",
    USE_LIMIT: "Consent.extension:use-limitation", COPY: "Consent.extension:copy-provided",
}
REQUIREMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "part2": (
        (ORG, "42 CFR 2.31(a)(2): who may disclose is missing"),
        (DESCRIPTION, "42 CFR 2.31(a)(3): a specific description of the information is missing"),
        (RECIPIENTS, "42 CFR 2.31(a)(4): the recipients are missing"),
        (PURPOSES, "42 CFR 2.31(a)(5): each purpose of the disclosure is missing"),
        (REVOCATION, "42 CFR 2.31(a)(6): the right to revoke and how is missing"),
        (EXPIRY, "42 CFR 2.31(a)(7): an expiration date (or the expiry-event extension) is missing"),
        (SIGNATURE, "42 CFR 2.31(a)(8): the signature (the signed form) is missing"),
        (DATE, "42 CFR 2.31(a)(9): the date signed is missing"),
    ),
    "hiv": (
        (SIGNATURE, "H&S 120980: the signed written authorization is missing"),
        (DATE, "H&S 120980: the date signed is missing"),
        (PURPOSES, "broker rule: an HIV authorization needs a purpose of use to match the one disclosure"),
    ),
    "cmia": (
        (SIGNATURE, "Civ. 56.11(c): the signature (the signed form) is missing"),
        (DATE, "Civ. 56.11(c): the date signed is missing"),
        (PURPOSES, "Civ. 56.11(d): the specific uses are missing"),
        (DESCRIPTION, "Civ. 56.11(d): the types of information to be disclosed are missing"),
        (ORG, "Civ. 56.11(e): the disclosing provider is missing"),
        (RECIPIENTS, "Civ. 56.11(f): the recipients are missing"),
        (USE_LIMIT, "Civ. 56.11(g): the limits on the recipients' use are missing"),
        (EXPIRY_DATE, "Civ. 56.11(h): a specific expiration date is missing"),
        (COPY, "Civ. 56.11(i): the statement of the right to a copy is missing"),
        (REVOCATION, "Civ. 56.15; 45 CFR 164.508(c)(2)(i): the right to revoke and how is missing"),
    ),
    "education": (
        (SIGNATURE, "34 CFR 99.30(a): the signature (the signed form) is missing"),
        (DATE, "34 CFR 99.30(a): the date signed is missing"),
        (DESCRIPTION, "34 CFR 99.30(b)(1): the records that may be disclosed are not described"),
        (PURPOSES, "34 CFR 99.30(b)(2): the purpose of the disclosure is missing"),
        (RECIPIENTS, "34 CFR 99.30(b)(3): the recipients are missing"),
    ),
    "release": (
        (SIGNATURE, "release authorization: the signature (the signed form) is missing"),
        (DATE, "release authorization: the date signed is missing"),
        (RECIPIENTS, "release authorization: the recipients are missing"),
        (PURPOSES, "release authorization: the purposes are missing"),
        (EXPIRY_DATE, "release authorization: the expiration date is missing"),
    ),
}
HIV_ONE_RECIPIENT = "H&S 120980: an HIV authorization names exactly one recipient and covers one disclosure"


@dataclass(frozen=True, slots=True)
class YouthFacts:
    """What the capacity rules need to know about the youth, and nothing more."""

    youth_id: str
    birth_date: date | None
    removed: bool


@dataclass(frozen=True)
class ValidatedConsent:
    """A consent that passed every check: the terms the broker indexes (mirrors ConsentRow)."""

    youth_id: str
    form: str
    signer_capacity: str
    signer_reference: str
    categories: tuple[str, ...]
    recipients: tuple[dict[str, str], ...]
    purposes: tuple[str, ...]
    period_start: datetime
    period_end: datetime | None
    expiry_event: str | None
    disclosure_limit: int | None
    signed_at: datetime
    grounds: dict[str, str]


KnownRecipient = Callable[[str, str], bool]


class _Issues:
    """Issues in the order found, without exact repeats."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, expression: str, text: str) -> None:
        if (expression, text) not in self.items:
            self.items.append((expression, text))


def patient_youth_id(resource: Any) -> str | None:
    """The broker youth id in ``patient.reference`` (``Patient/<id>``), or None if absent or malformed."""
    if not isinstance(resource, dict):
        return None
    patient = resource.get("patient")
    ref = patient.get("reference") if isinstance(patient, dict) else None
    if not isinstance(ref, str) or not ref.startswith("Patient/"):
        return None
    youth_id = ref[len("Patient/"):]
    if not youth_id or len(youth_id) > 64 or "/" in youth_id:
        return None
    return youth_id


def consent_ground(category: str, vocabulary: Any) -> str | None:
    """The policy ground a consent yields for a category; None means no consent can cover it."""
    table = getattr(vocabulary, "consent_grounds", None)
    if table is not None:
        return table.get(category)
    if category == PSYCHOTHERAPY_NOTES:
        return None
    return CONSENT_GROUNDS.get(category, DEFAULT_GROUND)


def form_of(category: str) -> str:
    """The legal form an authorization for this category must take."""
    return CATEGORY_FORMS.get(category, "release")


def validate_consent(resource: dict, *, youth: YouthFacts, vocabulary: Any, now: datetime,
                     known_recipient: KnownRecipient | None = None) -> ValidatedConsent:
    """Parse and check a Consent; raise Unprocessable listing every defect so the filer fixes all at once.

    ``known_recipient(kind, value)`` (optional) says whether a named person or agency is registered.
    """
    consent = _parse(resource)
    issues = _Issues()
    if consent.status != "active":
        issues.add("Consent.status", "the consent must have status active to be filed")
    if patient_youth_id(resource) != youth.youth_id:
        issues.add("Consent.patient", "42 CFR 2.31(a)(1): the patient must be referenced as Patient/<broker youth id>")
    provision = consent.provision
    if consent.modifierExtension:
        issues.add("Consent.modifierExtension", "modifier extensions are not understood by the broker")
    if provision is None or provision.type != "permit":
        issues.add("Consent.provision.type", "the provision must be of type permit")
    _unsupported_provision_parts(provision, issues)
    signed_at = _signed_at(consent, youth, now, issues)
    categories = _categories(provision, vocabulary, issues)
    purposes = _purposes(provision, vocabulary, issues)
    recipients, recipient_actors = _recipients(provision, vocabulary, known_recipient, issues)
    signer_reference = _signer(consent, issues)
    capacity = _capacity(consent, issues)
    ext = _extensions(consent, issues)
    period_start, period_end = _period(provision, signed_at, now, issues)
    forms = sorted({form_of(c) for c in categories}, key=FORM_RANK.index)
    facts = _facts(consent, provision, ext, period_end, recipient_actors, issues)
    for form in forms:
        for fact, text in REQUIREMENTS[form]:
            if not facts[fact]:
                issues.add(_E[fact], text)
    if "hiv" in categories and len(recipients) != 1:
        issues.add("Consent.provision.actor", HIV_ONE_RECIPIENT)
    if ext.get(EXPIRY_EVENT_URL) and any(f != "part2" for f in forms):
        issues.add("Consent.extension:expiry-event", "an expiry event is allowed only for a Part 2 consent; "
                   "the other forms need a specific date in provision.period.end (Civ. 56.11(h))")
    if _is_generic_mdt_release(consent):
        for category in categories:
            if category in GENERIC_FORM_INVALID:
                issues.add("Consent.category", GENERIC_FORM_INVALID[category])
    grounds = _grounds(categories, vocabulary, issues)
    if capacity is not None and signed_at is not None:
        age = _age(youth.birth_date, signed_at)
        for category in categories:
            refusal = capacity_refusal(category, capacity, age=age, removed=youth.removed)
            if refusal:
                issues.add("Consent.extension:signer-capacity", refusal)
    if issues.items:
        raise Unprocessable("the consent is not valid: see each issue", issues=issues.items)
    assert signed_at is not None and capacity is not None and signer_reference is not None
    return ValidatedConsent(
        youth_id=youth.youth_id, form=forms[0], signer_capacity=capacity, signer_reference=signer_reference,
        categories=tuple(categories), recipients=tuple(recipients), purposes=tuple(purposes),
        period_start=period_start or signed_at, period_end=period_end,
        expiry_event=ext.get(EXPIRY_EVENT_URL) or None,
        disclosure_limit=1 if "hiv" in categories else None, signed_at=signed_at, grounds=grounds)


def capacity_refusal(category: str, capacity: str, *, age: int | None, removed: bool) -> str | None:
    """Why this signer may not authorize release of this category, or None if they may.

    ``age`` None (birth date unknown) is treated as a minor of 12 or older.
    """
    if capacity == "minors-counsel":
        return ("W&IC 317(f): minor's counsel asserts the youth's privileges and may not waive them "
                "by signing an authorization")
    if capacity == "court":
        return None  # psychotherapy notes are refused before capacity matters
    if age is not None and age >= ADULT_AGE:
        return None if capacity == "youth" else (
            f"{category}: the youth is 18 or older and alone signs (or the court)")
    if category == "education":
        return None if capacity == "education-rights-holder" else (
            "education: the education-rights holder signs until the youth is 18 (34 CFR 99.30; W&IC 361)")
    if capacity == "education-rights-holder":
        return f"{category}: the education-rights holder signs only for education records"
    if category in MINOR_CONSENT:
        minimum, citation = MINOR_CONSENT[category]
        if age is None or age >= minimum:
            return None if capacity == "youth" else (
                f"{category}: the youth alone may authorize this release ({citation}); "
                "a parent or guardian may not")
        if capacity == "youth":
            return f"{category}: under {minimum} the youth may not sign; a parent or guardian, or the court, signs"
    elif capacity == "youth":
        return f"{category}: a minor may not authorize this release; a parent or guardian, or the court, signs"
    # capacity is parent-guardian, for a minor
    if removed:
        citation = "Civ. 56.106" if category == "mental-health" else "W&IC 362, 369"
        return (f"{category}: the youth was removed from parental custody; a parent or guardian may not "
                f"authorize, a court must ({citation})")
    return None


# ---- parsing -------------------------------------------------------------------------


def _parse(resource: Any) -> Any:
    """The R4B model of the resource; structural errors are reported by element path only."""
    from fhir.resources.R4B.consent import Consent

    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise Unprocessable("not a FHIR Consent", issues=[("Consent.resourceType", "the resource must be a Consent")])
    try:
        return Consent.model_validate(resource)
    except ValidationError as err:
        issues = _Issues()
        for e in err.errors():
            issues.add(_path(e.get("loc", ())), _structural_text(e.get("type", "")))
        raise Unprocessable("the Consent is not structurally valid FHIR", issues=issues.items) from None


def _path(loc: tuple) -> str:
    """A FHIRPath-like element path from a pydantic error location."""
    out = "Consent"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.replace("_", "").isalnum() and part != "root":
            out += "." + ("resourceType" if part == "resource_type" else part)
    return out


def _structural_text(kind: str) -> str:
    """Fixed wording per error type: never the submitted value."""
    if kind == "missing" or kind.endswith(".missing"):
        return "structure: a required element is missing"
    if kind == "extra_forbidden":
        return "structure: this element is not part of a FHIR R4 Consent"
    safe = kind if kind.replace("_", "").replace("-", "").replace(".", "").isalnum() else "invalid"
    return f"structure: invalid value ({safe})"


def _instant(value: Any, *, end: bool = False) -> datetime | None:
    """A dateTime as an aware UTC instant; a date covers the whole county day; partial dates are None."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else None
    if isinstance(value, date):
        day = value + timedelta(days=1) if end else value
        return datetime.combine(day, time(0), tzinfo=COUNTY_TZ).astimezone(timezone.utc)
    return None


def _signed_at(consent: Any, youth: YouthFacts, now: datetime, issues: _Issues) -> datetime | None:
    if consent.dateTime is None:
        return None  # each form reports the missing date with its own citation
    signed = _instant(consent.dateTime)
    if signed is None:
        issues.add("Consent.dateTime", "the date signed must be a full date or a dateTime with a time zone")
        return None
    if signed > now + SIGNING_CLOCK_SKEW:
        issues.add("Consent.dateTime", "the date signed is in the future")
    if youth.birth_date is not None and _county_date(signed) < youth.birth_date:
        issues.add("Consent.dateTime", "the date signed is before the youth's birth date")
    return signed


def _county_date(instant: datetime) -> date:
    return instant.astimezone(COUNTY_TZ).date()


def _age(birth: date | None, signed_at: datetime) -> int | None:
    """Whole years on the county date of signing; None when the birth date is unknown."""
    if birth is None:
        return None
    on = _county_date(signed_at)
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _unsupported_provision_parts(provision: Any, issues: _Issues) -> None:
    """Refuse what the broker cannot enforce rather than silently granting more than was signed."""
    if provision is None:
        return
    if provision.modifierExtension:
        issues.add("Consent.provision.modifierExtension", "modifier extensions are not understood by the broker")
    if provision.provision:
        issues.add("Consent.provision.provision", "nested provisions (exceptions) are not supported: "
                   "file one consent per permission")
    if provision.data:
        issues.add("Consent.provision.data", "consents limited to specific resources are not supported")
    if provision.dataPeriod:
        issues.add("Consent.provision.dataPeriod", "consents limited to a data period are not supported")
    if provision.class_fhir:
        issues.add("Consent.provision.class", "consents limited to resource types are not supported")
    if provision.action:
        codes = {c.code for cc in provision.action for c in (cc.coding or ())}
        if not codes & {"access", "disclose"}:
            issues.add("Consent.provision.action", "the provision must permit disclose or access")


def _categories(provision: Any, vocabulary: Any, issues: _Issues) -> list[str]:
    """The categories covered, from security labels; psychotherapy notes are refused outright."""
    found: list[str] = []
    labels = (provision.securityLabel or []) if provision is not None else []
    for i, coding in enumerate(labels):
        category = None
        if coding.system == ACT_CODE_SYSTEM:
            category = SECURITY_LABEL_CATEGORIES.get(coding.code or "")
        elif coding.system == CATEGORY_SYSTEM and coding.code in vocabulary.categories:
            category = coding.code
        elif coding.system == CONFIDENTIALITY_SYSTEM:
            continue  # a confidentiality level says nothing about what is covered
        if category is None:
            issues.add(f"Consent.provision.securityLabel[{i}]", "unknown security label: use an HL7 v3-ActCode "
                       "sensitivity code or a category of the broker's category code system")
        elif category not in found:
            found.append(category)
    if PSYCHOTHERAPY_NOTES in found:
        issues.add("Consent.provision.securityLabel", PSYCHOTHERAPY_REFUSAL)
    if not found and not any(e.startswith("Consent.provision.securityLabel[") for e, _t in issues.items):
        issues.add("Consent.provision.securityLabel", "the categories of information covered are missing "
                   "(at least one security label)")
    return sorted(found)


def _purposes(provision: Any, vocabulary: Any, issues: _Issues) -> list[str]:
    out: list[str] = []
    for i, coding in enumerate((provision.purpose or []) if provision is not None else []):
        known = vocabulary.purposes.get(coding.code or "")
        if known is None or (coding.system is not None and coding.system != known.system):
            issues.add(f"Consent.provision.purpose[{i}]", "unknown purpose of use")
        elif known.code not in out:
            out.append(known.code)
    return out


def _recipients(provision: Any, vocabulary: Any, known: KnownRecipient | None,
                issues: _Issues) -> tuple[list[dict[str, str]], int]:
    """Recipients named by staff id, team role or agency; returns them and how many IRCP actors there were."""
    out: list[dict[str, str]] = []
    actors = 0
    for i, actor in enumerate((provision.actor or []) if provision is not None else []):
        codes = {(c.system, c.code) for c in (actor.role.coding or ())}
        if (PARTICIPATION_SYSTEM, RECIPIENT_ROLE) not in codes:
            issues.add(f"Consent.provision.actor[{i}].role",
                       "only recipient actors (v3-ParticipationType IRCP) are supported")
            continue
        actors += 1
        ident = actor.reference.identifier
        kind = RECIPIENT_KINDS.get(ident.system) if ident is not None else None
        value = ident.value if ident is not None else None
        if kind is None or not value:
            issues.add(f"Consent.provision.actor[{i}].reference.identifier",
                       "a recipient must be identified by a staff, team-role or agency identifier")
            continue
        if kind == "role" and value not in vocabulary.roles:
            issues.add(f"Consent.provision.actor[{i}].reference.identifier", "unknown team role")
            continue
        if kind != "role" and known is not None and not known(kind, value):
            issues.add(f"Consent.provision.actor[{i}].reference.identifier",
                       "unknown agency" if kind == "agency" else "unknown staff member")
            continue
        entry = {"kind": kind, "value": value}
        if entry not in out:
            out.append(entry)
    return out, actors


def _signer(consent: Any, issues: _Issues) -> str | None:
    """The signer as a reference or identifier; names are never kept."""
    if not consent.performer:
        issues.add("Consent.performer", "the signer (performer) is missing")
        return None
    ref = consent.performer[0]
    if ref.reference:
        value = ref.reference
    elif ref.identifier is not None and ref.identifier.value:
        value = f"{ref.identifier.system or ''}|{ref.identifier.value}"
    else:
        issues.add("Consent.performer", "the signer must be identified by reference or identifier, not by name")
        return None
    if len(value) > 255:
        issues.add("Consent.performer", "the signer's reference is too long")
        return None
    return value


def _capacity(consent: Any, issues: _Issues) -> str | None:
    found = [e for e in (consent.extension or []) if e.url == SIGNER_CAPACITY_URL]
    if not found:
        issues.add("Consent.extension:signer-capacity", "the signer's capacity (signer-capacity extension) is missing")
        return None
    if len(found) > 1:
        issues.add("Consent.extension:signer-capacity", "the signer's capacity is given more than once")
        return None
    code = found[0].valueCode
    if code not in SIGNER_CAPACITIES:
        issues.add("Consent.extension:signer-capacity",
                   "the signer's capacity must be one of " + ", ".join(SIGNER_CAPACITIES))
        return None
    return code


def _extensions(consent: Any, issues: _Issues) -> dict[str, Any]:
    """The broker's own extensions on the Consent, each at most once and of the right type."""
    out: dict[str, Any] = {}
    kinds = {EXPIRY_EVENT_URL: "valueString", REVOCATION_NOTICE_URL: "valueString",
             USE_LIMITATION_URL: "valueString", COPY_PROVIDED_URL: "valueBoolean"}
    for ext in consent.extension or []:
        field = kinds.get(ext.url)
        if field is None:
            continue
        name = "Consent.extension:" + ext.url.rsplit("/", 1)[1]
        if ext.url in out:
            issues.add(name, "this extension is given more than once")
            continue
        value = getattr(ext, field)
        if value is None or (isinstance(value, str) and not value.strip()):
            issues.add(name, f"this extension needs a {field}")
            continue
        if isinstance(value, str) and len(value) > 500 and ext.url == EXPIRY_EVENT_URL:
            issues.add(name, "the expiry event is too long (500 characters at most)")
            continue
        out[ext.url] = value.strip() if isinstance(value, str) else value
    return out


def _period(provision: Any, signed_at: datetime | None, now: datetime,
            issues: _Issues) -> tuple[datetime | None, datetime | None]:
    period = provision.period if provision is not None else None
    if period is None:
        return signed_at, None
    start = end = None
    if period.start is not None:
        start = _instant(period.start)
        if start is None:
            issues.add("Consent.provision.period.start", "the start must be a full date or a dateTime with a time zone")
    if period.end is not None:
        end = _instant(period.end, end=True)
        if end is None:
            issues.add("Consent.provision.period.end", "the end must be a full date or a dateTime with a time zone")
    start = start or signed_at
    if start is not None and end is not None and end <= start:
        issues.add("Consent.provision.period", "the period must end after it starts")
    elif end is not None and end <= now:
        issues.add("Consent.provision.period.end", "the consent has already expired")
    return start, end


def _facts(consent: Any, provision: Any, ext: Mapping[str, Any], period_end: datetime | None,
           recipient_actors: int, issues: _Issues) -> dict[str, bool]:
    """Which legal elements are present; an element present but malformed is reported once, here."""
    attachment = consent.sourceAttachment
    signature = attachment is not None
    if attachment is not None and not (attachment.contentType and (attachment.data or attachment.url)):
        issues.add("Consent.sourceAttachment", "the signed form needs a contentType and its data or url")
    description = bool(provision is not None and provision.code and (provision.code[0].text or "").strip())
    has_end = provision is not None and provision.period is not None and provision.period.end is not None
    return {
        SIGNATURE: signature,
        DATE: consent.dateTime is not None,
        ORG: bool(consent.organization),
        DESCRIPTION: description,
        RECIPIENTS: recipient_actors > 0,
        PURPOSES: bool(provision is not None and provision.purpose),
        REVOCATION: REVOCATION_NOTICE_URL in ext,
        EXPIRY: has_end or EXPIRY_EVENT_URL in ext,
        EXPIRY_DATE: has_end or period_end is not None,
        USE_LIMIT: USE_LIMITATION_URL in ext,
        COPY: ext.get(COPY_PROVIDED_URL) is True,
    }


def _is_generic_mdt_release(consent: Any) -> bool:
    return any(c.system == CONSENT_FORM_SYSTEM and c.code == MDT_RELEASE
               for cc in consent.category or () for c in (cc.coding or ()))


def _grounds(categories: list[str], vocabulary: Any, issues: _Issues) -> dict[str, str]:
    out: dict[str, str] = {}
    for category in categories:
        if category == PSYCHOTHERAPY_NOTES:
            continue
        ground = consent_ground(category, vocabulary)
        if ground is None:
            issues.add("Consent.provision.securityLabel", f"{category}: no consent ground is defined for this category")
        else:
            out[category] = ground
    return out
