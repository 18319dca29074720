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
