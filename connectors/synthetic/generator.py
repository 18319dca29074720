"""A deterministic, obviously fake data set for the four synthetic agency systems.

The three test youth get hand-written histories that exercise every category; twenty more get
random histories from a fixed seed. Every name, address and statement is invented. The same
rows fill SQLite files (demo) and PostgreSQL databases (tests).
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

SEED = 20260115
EXTRA_YOUTH = 20

Rows = dict[str, list[dict]]

# Source ids of the youth the scenario tests name; the other youth follow the same numbering.
TEST_YOUTH = {
    "y-alpha": {"cws-cms": "CWS-1001", "probation-cms": "PRB-2001", "juvenile-court": "CRT-3001",
                "school-district": "EDU-4001"},
    "y-bravo": {"cws-cms": "CWS-1002", "probation-cms": "PRB-2002", "juvenile-court": "CRT-3002",
                "school-district": "EDU-4002"},
    "y-charlie": {"cws-cms": "CWS-1003", "probation-cms": "PRB-2003", "juvenile-court": "CRT-3003",
                  "school-district": "EDU-4003"},
}

PLACEMENT_TYPES = {
    "resource-family-home": "Resource family home",
    "strtp": "Short-term residential therapeutic program",
    "kin": "Relative or non-relative extended family member",
    "thp": "Transitional housing placement",
}
GIVEN = ["Testy", "Sample", "Fakey", "Mocky", "Dummy", "Notta", "Examply", "Fictiona", "Synthia", "Madeup",
         "Pretendo", "Testina"]
FAMILY = ["McFakerson", "Notreal", "Examplesson", "Fakename", "Doesnotexist", "Placeholderton", "Synthetico",
          "Mockworth"]
WORKERS = ["Worker Nobody", "Caseworker Fakeperson", "Social Worker Imaginary"]
OFFICERS = ["Officer Notreal", "Officer Pretendsworth"]
# Reporter names come from their own pools so that a test can prove they appear nowhere else.
REPORTER_GIVEN = ["Reporta", "Whistle", "Callie", "Tipster", "Noticia"]
REPORTER_FAMILY = ["Tattleton", "McBlowerface", "Reportsworth", "Hotlineson", "Alertson"]
REPORTER_ROLES = ["school counselor", "emergency room nurse", "teacher", "therapist", "neighbor"]
STREETS = ["Nowhere Ln", "Nonexistent Ave", "Imaginary Blvd", "Fictional Ct", "Pretend Pl"]
CITIES = ["Faketown", "Notaville", "Sampleton"]
CAREGIVERS = {
    "resource-family-home": ["The Fakename Resource Family", "The Notreal Resource Family"],
    "strtp": ["Placeholder Group Home", "Imaginary Youth Village STRTP"],
    "kin": ["Auntie Notreal", "Grandpa Examplesson"],
    "thp": ["Pretend Transitional Housing"],
}
CASE_TYPES = ["emergency-response", "family-maintenance", "family-reunification", "permanent-placement"]
ALLEGATIONS = {
    "csec": "Concern that the youth is being commercially sexually exploited (synthetic example).",
    "general-neglect": "Concern about lack of supervision at home (synthetic example).",
    "caretaker-absence": "Caretaker absent for several days (synthetic example).",
    "physical-abuse": "Unexplained bruising noticed (synthetic example).",
}
DISPOSITIONS = ["substantiated", "inconclusive", "unfounded", "evaluated-out"]
STATEMENTS = [
    "Youth said they feel safe at the placement and want to keep going to school.",
    "Youth said they do not want to go back to the old neighborhood.",
    "Youth said they would like to see their younger sibling more often.",
    "Youth said an older friend offered them rides and gifts.",
    "Youth said they have been sleeping better since the move.",
]
NOTES = [
    "Home visit; placement stable, no concerns noted.",
    "Collateral contact with school; attendance improving.",
    "Transport to medical appointment completed.",
]
SUPERVISION = ["wardship-602", "informal-654-2", "non-ward-725a"]
CONDITIONS = {
    "school-attendance": "Attend school every school day unless excused.",
    "curfew": "Be home between 8 pm and 6 am unless with caregiver.",
    "counseling": "Participate in counseling as directed by the probation officer.",
    "no-contact": "No contact with adults identified by the probation officer.",
    "community-service": "Complete 20 hours of community service.",
}
HEARINGS = ["detention", "jurisdiction", "disposition", "review", "joint-assessment-241-1"]


def _at(day: date, hour: int = 10, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


class _Builder:
    """Appends rows with global ids per table, so that ids are unique across youth."""

    def __init__(self) -> None:
        self.rows: dict[str, Rows] = {"cws-cms": {}, "probation-cms": {}, "juvenile-court": {},
                                      "school-district": {}}
        self.next_id: dict[str, int] = {}

    def add(self, source: str, table: str, id_column: str | None, row: dict) -> dict:
        if id_column is not None:
            start = {"cws_case": 5001, "cws_placement": 6001, "cws_referral": 7001, "cws_contact_note": 8001,
                     "prb_case": 9001, "prb_condition": 9501, "prb_interview": 9801, "crt_hearing": 11001,
                     "edu_enrollment": 12001, "edu_attendance": 13001, "edu_credits": 14001,
                     "edu_iep": 15001}[table]
            row = {id_column: self.next_id.setdefault(table, start), **row}
            self.next_id[table] += 1
        self.rows[source].setdefault(table, []).append(row)
        return row


def _ids(n: int) -> dict[str, str]:
    return {"cws-cms": f"CWS-{1000 + n}", "probation-cms": f"PRB-{2000 + n}", "juvenile-court": f"CRT-{3000 + n}",
            "school-district": f"EDU-{4000 + n}"}


def _stamp(day: date, days: int = 3) -> datetime:
    return _at(day + timedelta(days=days), 17)


# ---- one table at a time ---------------------------------------------------------------------

def _youth(b: _Builder, ids: dict[str, str], given: str, family: str, born: date) -> None:
    b.add("cws-cms", "cws_youth", None, {"youth_id": ids["cws-cms"], "given_name": given, "family_name": family,
                                         "birth_date": born})


def _case(b: _Builder, ids: dict, case_type: str, opened: date, closed: date | None, worker: str) -> dict:
    return b.add("cws-cms", "cws_case", "case_id", {
        "youth_id": ids["cws-cms"], "case_type": case_type, "status": "closed" if closed else "open",
        "opened_on": opened, "closed_on": closed, "worker_name": worker, "updated_at": _stamp(closed or opened)})


def _placement(b: _Builder, ids: dict, case: dict, ptype: str, start: date, end: date | None,
               caregiver: str | None, address: tuple[str, str, str] | None) -> dict:
    line, city, postal = address if address else (None, None, None)
    return b.add("cws-cms", "cws_placement", "placement_id", {
        "youth_id": ids["cws-cms"], "case_id": case["case_id"], "placement_type": ptype, "start_on": start,
        "end_on": end, "caregiver_name": caregiver, "address_line": line, "city": city,
        "state": "CA" if address else None, "postal_code": postal, "updated_at": _stamp(end or start)})


def _referral(b: _Builder, ids: dict, received: datetime, code: str, reporter: str, role: str,
              disposition: str) -> dict:
    return b.add("cws-cms", "cws_referral", "referral_id", {
        "youth_id": ids["cws-cms"], "received_at": received, "allegation_code": code,
        "allegation_summary": ALLEGATIONS[code], "reporter_name": reporter, "reporter_role": role,
        "disposition": disposition, "updated_at": _stamp(received.date(), 10)})


def _note(b: _Builder, ids: dict, case: dict, at: datetime, worker: str, spoke: bool, text: str) -> dict:
    return b.add("cws-cms", "cws_contact_note", "note_id", {
        "youth_id": ids["cws-cms"], "case_id": case["case_id"], "contact_at": at,
        "contact_type": "face-to-face" if spoke else "collateral", "worker_name": worker, "youth_spoke": spoke,
        "note_text": text, "updated_at": _stamp(at.date(), 1)})


def _prb_case(b: _Builder, ids: dict, kind: str, opened: date, closed: date | None, officer: str) -> dict:
    return b.add("probation-cms", "prb_case", "case_id", {
        "youth_id": ids["probation-cms"], "supervision_type": kind, "status": "closed" if closed else "open",
        "opened_on": opened, "closed_on": closed, "officer_name": officer, "updated_at": _stamp(closed or opened)})


def _condition(b: _Builder, ids: dict, case: dict, code: str, start: date, end: date | None) -> dict:
    return b.add("probation-cms", "prb_condition", "condition_id", {
        "case_id": case["case_id"], "youth_id": ids["probation-cms"], "condition_code": code,
        "condition_text": CONDITIONS[code], "status": "completed" if end else "active", "start_on": start,
        "end_on": end, "updated_at": _stamp(end or start)})


def _interview(b: _Builder, ids: dict, case: dict, at: datetime, officer: str, text: str) -> dict:
    return b.add("probation-cms", "prb_interview", "interview_id", {
        "case_id": case["case_id"], "youth_id": ids["probation-cms"], "interview_at": at, "officer_name": officer,
        "statement_text": text, "updated_at": _stamp(at.date(), 2)})


def _hearing(b: _Builder, ids: dict, number: str, kind: str, starts: datetime, held: bool) -> dict:
    return b.add("juvenile-court", "crt_hearing", "hearing_id", {
        "youth_id": ids["juvenile-court"], "case_number": number, "hearing_type": kind,
        "status": "finished" if held else "planned", "starts_at": starts,
        "ends_at": starts + timedelta(minutes=45) if held else None, "department": "Dept. 7 (synthetic)",
        "updated_at": _stamp(starts.date(), 1 if held else -20)})


def _term(b: _Builder, ids: dict, year: int, fall: bool, grade: int, present: int | None,
          credits: float | None) -> dict:
    start, end = (date(year, 8, 15), date(year, 12, 19)) if fall else (date(year, 1, 8), date(year, 6, 5))
    school_year = f"{year}-{year + 1}" if fall else f"{year - 1}-{year}"
    enrollment = b.add("school-district", "edu_enrollment", "enrollment_id", {
        "youth_id": ids["school-district"], "school_year": school_year, "term": "fall" if fall else "spring",
        "term_start": start, "term_end": end, "grade_level": grade, "status": "enrolled",
        "updated_at": _stamp(start, 1)})
    if present is not None:
        b.add("school-district", "edu_attendance", "attendance_id", {
            "enrollment_id": enrollment["enrollment_id"], "youth_id": ids["school-district"], "days_enrolled": 80,
            "days_present": present, "updated_at": _stamp(end, 2)})
    if credits is not None:
        b.add("school-district", "edu_credits", "credit_id", {
            "enrollment_id": enrollment["enrollment_id"], "youth_id": ids["school-district"],
            "credits_earned": credits, "updated_at": _stamp(end, 5)})
    return enrollment


def _iep(b: _Builder, ids: dict, has_iep: bool, as_of: date) -> None:
    b.add("school-district", "edu_iep", "iep_id", {"youth_id": ids["school-district"], "has_iep": has_iep,
                                                   "as_of": as_of, "updated_at": _stamp(as_of, 0)})


# ---- the youth ---------------------------------------------------------------------------------

def _alpha(b: _Builder) -> None:
    ids = TEST_YOUTH["y-alpha"]
    _youth(b, ids, "Testy", "McFakerson", date(2010, 4, 1))
    first = _case(b, ids, "emergency-response", date(2023, 1, 23), date(2023, 8, 15), "Worker Nobody")
    second = _case(b, ids, "family-reunification", date(2024, 5, 10), None, "Caseworker Fakeperson")
    _placement(b, ids, first, "kin", date(2023, 1, 24), date(2023, 8, 15), None, None)
    _placement(b, ids, second, "strtp", date(2024, 5, 12), date(2025, 1, 20), "Placeholder Group Home",
               ("123 Nowhere Ln", "Faketown", "99901"))
    _placement(b, ids, second, "resource-family-home", date(2025, 1, 20), None, "The Fakename Resource Family",
               ("456 Nonexistent Ave", "Notaville", "99902"))
    _referral(b, ids, _at(date(2023, 1, 20), 9, 30), "general-neglect", "Reporta Tattleton", "school counselor",
              "substantiated")
    _referral(b, ids, _at(date(2024, 5, 8), 22, 15), "csec", "Whistle McBlowerface", "emergency room nurse",
              "substantiated")
    _note(b, ids, first, _at(date(2023, 2, 2), 15), "Worker Nobody", True, STATEMENTS[1])
    _note(b, ids, second, _at(date(2024, 6, 3), 16), "Caseworker Fakeperson", False, NOTES[0])
    _note(b, ids, second, _at(date(2025, 3, 14), 16, 30), "Caseworker Fakeperson", True, STATEMENTS[0])
    prb = _prb_case(b, ids, "wardship-602", date(2024, 9, 3), None, "Officer Notreal")
    _condition(b, ids, prb, "school-attendance", date(2024, 9, 3), None)
    _condition(b, ids, prb, "curfew", date(2024, 9, 3), date(2025, 3, 3))
    _condition(b, ids, prb, "counseling", date(2024, 9, 3), None)
    _interview(b, ids, prb, _at(date(2024, 9, 10), 11), "Officer Notreal", STATEMENTS[3])
    _hearing(b, ids, "JV-24-0101", "detention", _at(date(2024, 5, 13), 9), True)
    _hearing(b, ids, "JV-24-0101", "jurisdiction", _at(date(2024, 6, 10), 13, 30), True)
    _hearing(b, ids, "JV-24-0101", "review", _at(date(2026, 6, 1), 9), False)
    _term(b, ids, 2024, True, 9, 71, 25.0)
    _term(b, ids, 2025, False, 9, 76, 30.0)
    _iep(b, ids, True, date(2024, 10, 1))


def _bravo(b: _Builder) -> None:
    ids = TEST_YOUTH["y-bravo"]
    _youth(b, ids, "Sample", "Notreal", date(2009, 11, 12))
    case = _case(b, ids, "family-maintenance", date(2025, 2, 1), None, "Worker Nobody")
    _placement(b, ids, case, "resource-family-home", date(2025, 2, 2), None, "The Notreal Resource Family",
               ("789 Imaginary Blvd", "Sampleton", "99903"))
    _referral(b, ids, _at(date(2025, 1, 28), 14), "caretaker-absence", "Callie Reportsworth", "teacher",
              "inconclusive")
    _note(b, ids, case, _at(date(2025, 2, 20), 10), "Worker Nobody", False, NOTES[1])
    prb = _prb_case(b, ids, "informal-654-2", date(2025, 4, 1), None, "Officer Pretendsworth")
    _condition(b, ids, prb, "community-service", date(2025, 4, 1), None)
    _hearing(b, ids, "JV-25-0202", "joint-assessment-241-1", _at(date(2025, 3, 18), 10), True)
    _term(b, ids, 2025, False, 10, 64, None)


def _charlie(b: _Builder) -> None:
    ids = TEST_YOUTH["y-charlie"]
    _youth(b, ids, "Fakey", "Examplesson", date(2011, 6, 30))
    # Little, and no Observation: the demo and scenarios show charlie as the youth whose only
    # Observations are protected ones in the health record.
    case = _case(b, ids, "emergency-response", date(2022, 9, 1), date(2022, 10, 1), "Social Worker Imaginary")
    _placement(b, ids, case, "kin", date(2022, 9, 2), date(2022, 10, 1), "Grandpa Examplesson",
               ("321 Fictional Ct", "Sampleton", "99904"))
    _referral(b, ids, _at(date(2022, 8, 30), 16), "physical-abuse", "Noticia Alertson", "neighbor", "unfounded")


def _random_youth(b: _Builder, rng: random.Random, n: int) -> None:
    ids = _ids(n)
    _youth(b, ids, rng.choice(GIVEN), rng.choice(FAMILY), date(2008 + rng.randrange(5), rng.randrange(1, 13),
                                                                 rng.randrange(1, 29)))
    day = date(2021, 1, 4) + timedelta(days=rng.randrange(600))
    cases = []
    for _ in range(rng.randint(1, 3)):
        length = rng.randrange(60, 400)
        closed = day + timedelta(days=length)
        closed_on = closed if closed < date(2025, 10, 1) else None
        cases.append(_case(b, ids, rng.choice(CASE_TYPES), day, closed_on, rng.choice(WORKERS)))
        placed = day + timedelta(days=1)
        for _ in range(rng.randint(1, 2)):
            ptype = rng.choice(sorted(PLACEMENT_TYPES))
            end = placed + timedelta(days=rng.randrange(30, 200))
            address = None if rng.random() < 0.2 else (f"{rng.randrange(100, 999)} {rng.choice(STREETS)}",
                                                       rng.choice(CITIES), f"999{rng.randrange(10, 99)}")
            caregiver = rng.choice(CAREGIVERS[ptype]) if address else None
            _placement(b, ids, cases[-1], ptype, placed, end if end < date(2025, 10, 1) else None, caregiver,
                       address)
            placed = end
        day = closed + timedelta(days=rng.randrange(20, 200))
    for _ in range(rng.randint(1, 3)):
        received = _at(cases[0]["opened_on"] - timedelta(days=rng.randrange(1, 200)), rng.randrange(7, 23))
        _referral(b, ids, received, rng.choice(sorted(ALLEGATIONS)),
                  f"{rng.choice(REPORTER_GIVEN)} {rng.choice(REPORTER_FAMILY)}", rng.choice(REPORTER_ROLES),
                  rng.choice(DISPOSITIONS))
    for _ in range(rng.randint(0, 4)):
        case = rng.choice(cases)
        at = _at(case["opened_on"] + timedelta(days=rng.randrange(1, 60)), rng.randrange(8, 18))
        spoke = rng.random() < 0.5
        _note(b, ids, case, at, case["worker_name"], spoke, rng.choice(STATEMENTS if spoke else NOTES))
    if rng.random() < 0.5:
        opened = date(2023, 1, 2) + timedelta(days=rng.randrange(700))
        prb = _prb_case(b, ids, rng.choice(SUPERVISION), opened, None, rng.choice(OFFICERS))
        for code in rng.sample(sorted(CONDITIONS), rng.randint(1, 4)):
            _condition(b, ids, prb, code, opened, None)
        for _ in range(rng.randint(0, 2)):
            _interview(b, ids, prb, _at(opened + timedelta(days=rng.randrange(1, 90)), 11), prb["officer_name"],
                       rng.choice(STATEMENTS))
    number = f"JV-{21 + rng.randrange(4)}-{rng.randrange(1000, 9999):04d}"
    when = _at(date(2021, 3, 1) + timedelta(days=rng.randrange(1500)), 9)
    for kind in HEARINGS[: rng.randint(1, 5)]:
        _hearing(b, ids, number, kind, when, when < _at(date(2026, 1, 15)))
        when += timedelta(days=rng.randrange(14, 120))
    year, fall = 2022 + rng.randrange(2), True
    for _ in range(rng.randint(2, 6)):
        _term(b, ids, year, fall, 7 + (year - 2022), rng.randrange(40, 81), round(rng.uniform(10, 32), 1))
        year, fall = (year + 1, False) if fall else (year, True)
    _iep(b, ids, rng.random() < 0.3, date(2023, 9, 1))


@lru_cache(maxsize=4)
def _dataset(seed: int) -> dict[str, Rows]:
    b = _Builder()
    for code, display in PLACEMENT_TYPES.items():
        b.add("cws-cms", "cws_placement_type", None, {"code": code, "display": display})
    _alpha(b)
    _bravo(b)
    _charlie(b)
    rng = random.Random(seed)
    for n in range(4, 4 + EXTRA_YOUTH):
        _random_youth(b, rng, n)
    return b.rows


def dataset(seed: int = SEED) -> dict[str, Rows]:
    """Every row of every source (source -> table -> rows), the same for the same seed; a copy."""
    return {source: {t: [dict(r) for r in rows] for t, rows in tables.items()}
            for source, tables in _dataset(seed).items()}


def fingerprint(source: str, seed: int = SEED) -> str:
    """A hash of one source's rows: a database built from other rows is rebuilt."""
    rows = _dataset(seed)[source]
    text = repr(sorted((t, [sorted(r.items()) for r in rs]) for t, rs in rows.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def youth_count() -> int:
    """How many youth the data set has."""
    return 3 + EXTRA_YOUTH


def source_ids(n: int) -> dict[str, str]:
    """The source ids of the n-th synthetic youth (1, 2, 3 are y-alpha, y-bravo, y-charlie)."""
    return _ids(n)
