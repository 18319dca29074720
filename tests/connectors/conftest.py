"""Fixtures for the connector tests: the demo data's ground truth and connectors on it.

The session-scoped ``fhir_server`` fixture (the real Node FHIR R4 server seeded with
connectors/demo_data/fhir) lives in tests/conftest.py so that every test package shares one
server process.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connectors.classify import Classifier
from connectors.fhir import DEFAULT_RESOURCE_TYPES, FhirConnector
from connectors.static import StaticFhirConnector

REPO = Path(__file__).resolve().parents[2]
DEMO_FHIR = REPO / "connectors" / "demo_data" / "fhir"
VALUESETS = REPO / "policies" / "valuesets"
EHR_SYSTEM = "urn:mdt-broker:demo:county-ehr"
DEFAULTS = frozenset({"general-health"})
_ROW = re.compile(
    r"^\| `(?P<id>[^`]+)` \| (?P<type>\w+) \| `(?P<patient>[^`]+)` \| (?P<date>[\d-]+) \| "
    r"(?P<updated>[\d-]+) \| (?P<cats>[a-z0-9\-, ]+) \|"
)


@dataclass(frozen=True)
class Row:
    """One line of the demo data README table."""

    id: str
    type: str
    patient: str
    date: str
    updated: str
    categories: frozenset[str]


def demo_rows() -> list[Row]:
    """The README table, in file order (which is also the seed order)."""
    rows = []
    for line in (DEMO_FHIR / "README.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            cats = frozenset(c.strip() for c in m["cats"].split(",") if c.strip())
            rows.append(Row(m["id"], m["type"], m["patient"], m["date"], m["updated"], cats))
    assert len(rows) == 35, "the demo data README table could not be read"
    return rows


def expected_ids(patient: str, rtype: str, keep=lambda row: True) -> list[str]:
    """Ids of one patient's resources of one type, in seed order, that pass ``keep``."""
    return [r.id for r in demo_rows() if r.patient == patient and r.type == rtype and keep(r)]


def known_categories() -> set[str]:
    """The category names in policies/vocabulary.yaml."""
    return set(yaml.safe_load((REPO / "policies" / "vocabulary.yaml").read_text())["categories"])


@pytest.fixture(scope="session")
def classifier() -> Classifier:
    """The county's value sets, as the broker loads them."""
    return Classifier.from_dir(VALUESETS, known_categories())


@pytest.fixture(scope="session")
async def fhir_connector(fhir_server) -> AsyncIterator[FhirConnector]:  # type: ignore[no-untyped-def]
    """A FhirConnector pointed at the real Node FHIR server."""
    conn = FhirConnector("county-ehr", fhir_server.base_url, EHR_SYSTEM, DEFAULTS, DEFAULT_RESOURCE_TYPES)
    yield conn
    await conn.aclose()


@pytest.fixture(scope="session")
def static_connector() -> StaticFhirConnector:
    """A StaticFhirConnector on the same files the Node server was seeded with."""
    return StaticFhirConnector("county-ehr", DEMO_FHIR, EHR_SYSTEM, DEFAULTS)


# ---- the synthetic SQL sources ------------------------------------------------------------------
# Ground truth for the SQL connector, computed in Python from the generator's rows, independently
# of the SQL and templates in connectors/mappings/: (table, id prefix, id column, sort key, filter).

def _term_start(source_rows: dict) -> object:
    starts = {e["enrollment_id"]: e["term_start"] for e in source_rows["edu_enrollment"]}
    return lambda r: starts[r["enrollment_id"]]


def _truth_plan(source: str, rtype: str, rows: dict) -> list[tuple]:
    every = None
    plans = {
        ("cws-cms", "EpisodeOfCare"): [("cws_case", "cws-case-", "case_id", lambda r: r["opened_on"], every),
                                       ("cws_placement", "cws-placement-", "placement_id",
                                        lambda r: r["start_on"], every)],
        ("cws-cms", "Communication"): [
            ("cws_referral", "cws-referral-", "referral_id", lambda r: r["received_at"], every),
            ("cws_contact_note", "cws-statement-", "note_id", lambda r: r["contact_at"], lambda r: r["youth_spoke"]),
            ("cws_contact_note", "cws-contact-", "note_id", lambda r: r["contact_at"],
             lambda r: not r["youth_spoke"])],
        ("probation-cms", "EpisodeOfCare"): [("prb_case", "prb-case-", "case_id", lambda r: r["opened_on"], every)],
        ("probation-cms", "CarePlan"): [("prb_condition", "prb-condition-", "condition_id",
                                         lambda r: r["start_on"], every)],
        ("probation-cms", "Communication"): [("prb_interview", "prb-interview-", "interview_id",
                                              lambda r: r["interview_at"], every)],
        ("juvenile-court", "Encounter"): [("crt_hearing", "crt-hearing-", "hearing_id", lambda r: r["starts_at"],
                                           every)],
    }
    if source == "school-district" and rtype == "Observation":
        return [("edu_enrollment", "edu-enrollment-", "enrollment_id", lambda r: r["term_start"], every),
                ("edu_attendance", "edu-attendance-", "attendance_id", _term_start(rows), every),
                ("edu_credits", "edu-credits-", "credit_id", _term_start(rows), every),
                ("edu_iep", "edu-iep-", "iep_id", lambda r: r["as_of"], every)]
    return plans.get((source, rtype), [])


SQL_TYPES = {
    "cws-cms": ("EpisodeOfCare", "Communication"),
    "probation-cms": ("EpisodeOfCare", "CarePlan", "Communication"),
    "juvenile-court": ("Encounter",),
    "school-district": ("Observation",),
}


def sql_expected(source: str, patient: str, rtype: str, keep=lambda row: True) -> list[str]:
    """Ids the SQL connector must return for one youth and type, in order, for rows that pass ``keep``."""
    from connectors import synthetic

    rows = synthetic.dataset()[source]
    out = []
    for table, prefix, id_col, sort_key, only in _truth_plan(source, rtype, rows):
        mine = [r for r in rows.get(table, []) if r["youth_id"] == patient and (only is None or only(r))]
        for r in sorted(mine, key=lambda r: (sort_key(r), r[id_col])):
            if keep(r):
                out.append(f"{prefix}{r[id_col]}")
    return out


def sql_youth(source: str) -> list[str]:
    """Every synthetic youth's id in one source."""
    from connectors import synthetic

    return [synthetic.source_ids(n)[source] for n in range(1, synthetic.youth_count() + 1)]


def sql_connector(source: str, url: str, **overrides):  # type: ignore[no-untyped-def]
    """A SqlConnector on one synthetic source, configured as the demo configures it."""
    from connectors import synthetic
    from connectors.sql import SqlConnector

    cfg = synthetic.source_configs({source: url})[0]
    return SqlConnector.from_config(cfg.model_copy(update=overrides))
