"""StaticFhirConnector: the same answers as the real FHIR server on the same files."""

from __future__ import annotations

import json

import pytest

from broker.settings import SourceConfig
from connectors.base import Connector, SourceQuery, SourceUnavailable
from connectors.static import StaticFhirConnector, to_range
from tests.connectors.conftest import DEFAULTS, DEMO_FHIR, EHR_SYSTEM, expected_ids

TYPES = ["Patient", "Observation", "Condition", "DocumentReference", "MedicationRequest", "Immunization", "Encounter"]
PATIENTS = ["pt-alpha", "pt-bravo", "pt-charlie", "pt-nobody"]

# Queries whose meaning the static connector and a FHIR R4 server share.
PARITY = [
    *[SourceQuery(t, p) for t in TYPES for p in PATIENTS],
    SourceQuery("Observation", "pt-alpha", (("code", "http://loinc.org|29463-7"),)),
    SourceQuery("Observation", "pt-alpha", (("code", "44249-1,44261-6"),)),
    SourceQuery("Observation", "pt-alpha", (("code", "HTTP://LOINC.ORG|2106-3"),)),
    SourceQuery("Observation", "pt-alpha", (("code", "http://loinc.org|"),)),
    SourceQuery("Observation", "pt-charlie", (("code", "75622-1"),)),
    SourceQuery("Condition", "pt-alpha", (("code", "F43.10,http://hl7.org/fhir/sid/icd-10-cm|F12.20"),)),
    SourceQuery("Condition", "pt-alpha", (("code", "http://snomed.info/sct|F43.10"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "ge2025-01-01"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "lt2025-01-01"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "ge2025-01-01"), ("date", "lt2026-01-01"))),
    SourceQuery("Observation", "pt-alpha", (("date", "le2025-07-01"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "gt2025-07-01"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "ge2025-07-01T17:05:00Z"),)),
    SourceQuery("Observation", "pt-alpha", (("date", "2025"),)),
    SourceQuery("DocumentReference", "pt-alpha", (("date", "ge2026"),)),
    SourceQuery("Immunization", "pt-alpha", (("date", "lt2025-06"),)),
    SourceQuery("Encounter", "pt-alpha", (("date", "ge2025-04-01"),)),
    SourceQuery("Observation", "pt-alpha", (("_lastUpdated", "ge2026-01-01"),)),
    SourceQuery("Condition", "pt-alpha", (("_lastUpdated", "lt2025-01-01"),)),
    SourceQuery("DocumentReference", "pt-charlie", (("_lastUpdated", "gt2026-01-31"),)),
    SourceQuery("Observation", "pt-alpha", (("_id", "alpha-obs-hiv-2024,alpha-obs-hcg-2026,charlie-obs-hiv-2026"),)),
    SourceQuery("Patient", "pt-alpha", (("_id", "pt-alpha"),)),
    SourceQuery("Observation", "pt-alpha", (("code", "http://loinc.org|56888-1"), ("date", "lt2026-01-01"))),
]


def ids(resources: list[dict]) -> list[str]:
    return [r["id"] for r in resources]


@pytest.mark.parametrize("query", PARITY, ids=lambda q: f"{q.resource_type}-{q.patient_id}-{q.params}")
async def test_same_ids_as_the_real_fhir_server(fhir_connector, static_connector, query):
    real = await fhir_connector.search(query, timeout=5)
    static = await static_connector.search(query, timeout=5)
    assert ids(static) == ids(real)
    assert static == [{k: v for k, v in r.items() if k != "meta"} | {"meta": s["meta"]} for r, s in zip(real, static)]


async def test_parity_queries_are_not_trivially_empty(static_connector):
    found = [q for q in PARITY if q.params and await static_connector.search(q, timeout=5)]
    assert len(found) >= 18


async def test_is_a_connector(static_connector):
    assert isinstance(static_connector, Connector)
    assert static_connector.resource_types == set(TYPES)
    assert static_connector.default_categories == DEFAULTS


async def test_count_caps_the_result(static_connector):
    found = await static_connector.search(SourceQuery("Observation", "pt-alpha", (("_count", "4"),)), timeout=5)
    assert ids(found) == expected_ids("pt-alpha", "Observation")[:4]
    assert await static_connector.search(SourceQuery("Observation", "pt-alpha", (("_count", "0"),)), timeout=5) == []


async def test_sort_is_accepted_and_other_parameters_are_refused(static_connector):
    found = await static_connector.search(SourceQuery("Immunization", "pt-alpha", (("_sort", "-date"),)), timeout=5)
    assert ids(found) == ["alpha-imm-tdap", "alpha-imm-flu-2025"]
    with pytest.raises(SourceUnavailable, match="parameter status not supported"):
        await static_connector.search(SourceQuery("Observation", "pt-alpha", (("status", "final"),)), timeout=5)
    for bad in (("date", "yesterday"), ("date", "ge2025-13-01"), ("_count", "-1")):
        with pytest.raises(SourceUnavailable):
            await static_connector.search(SourceQuery("Observation", "pt-alpha", (bad,)), timeout=5)


async def test_date_prefixes_on_a_known_day(static_connector):
    # alpha-obs-hcg-2025 is 2025-07-01T10:00:00-07:00 = 17:00Z; the STI labs are 17:05Z the same day.
    async def day(prefix: str) -> list[str]:
        q = SourceQuery("Observation", "pt-alpha", (("date", f"{prefix}2025-07-01"),))
        return ids(await static_connector.search(q, timeout=5))

    same_day = ["alpha-obs-hcg-2025", "alpha-obs-chlamydia-2025", "alpha-obs-gonorrhea-2025"]
    assert await day("eq") == await day("") == same_day
    assert not set(same_day) & set(await day("ne"))
    assert not set(same_day) & set(await day("lt")) and not set(same_day) & set(await day("gt"))
    assert set(same_day) <= set(await day("le")) and set(same_day) <= set(await day("ge"))
    assert set(await day("sa")) == set(await day("gt")) and set(await day("eb")) == set(await day("lt"))
    exact = SourceQuery("Observation", "pt-alpha", (("date", "eq2025-07-01T17:00:00Z"),))
    assert ids(await static_connector.search(exact, timeout=5)) == ["alpha-obs-hcg-2025"]


async def test_date_uses_recorded_date_and_authored_on_too(static_connector):
    conditions = await static_connector.search(SourceQuery("Condition", "pt-alpha", (("date", "ge2025-07-01"),)),
                                               timeout=5)
    assert ids(conditions) == ["alpha-cond-contraception", "alpha-cond-chlamydia"]
    requests = await static_connector.search(
        SourceQuery("MedicationRequest", "pt-alpha", (("date", "lt2025-01-01"),)), timeout=5)
    assert ids(requests) == ["alpha-medreq-sertraline"]


async def test_read(static_connector):
    found = await static_connector.read("Observation", "alpha-obs-hiv-2024", timeout=5)
    assert found["id"] == "alpha-obs-hiv-2024"
    found["status"] = "entered-in-error"  # a copy: the store is untouched
    again = await static_connector.read("Observation", "alpha-obs-hiv-2024", timeout=5)
    assert again["status"] == "final"
    assert await static_connector.read("Observation", "nope", timeout=5) is None
    assert await static_connector.read("Condition", "alpha-obs-hiv-2024", timeout=5) is None
    with pytest.raises(SourceUnavailable):
        await static_connector.read("Practitioner", "x", timeout=5)


async def test_search_returns_copies(static_connector):
    first = await static_connector.search(SourceQuery("Patient", "pt-bravo"), timeout=5)
    first[0]["name"] = []
    second = await static_connector.search(SourceQuery("Patient", "pt-bravo"), timeout=5)
    assert second[0]["name"][0]["family"] == "Fakename"


async def test_from_config_and_bad_directories(tmp_path):
    cfg = SourceConfig(name="county-ehr", kind="static-fhir", data_dir=DEMO_FHIR, identifier_system=EHR_SYSTEM,
                       resource_types=["Observation", "Patient"])
    conn = StaticFhirConnector.from_config(cfg)
    assert conn.resource_types == {"Observation", "Patient"} and conn.default_categories == DEFAULTS
    assert ids(await conn.search(SourceQuery("Observation", "pt-charlie"), timeout=5)) == ["charlie-obs-hiv-2026"]
    with pytest.raises(SourceUnavailable):
        await conn.search(SourceQuery("Condition", "pt-charlie"), timeout=5)
    await conn.aclose()
    with pytest.raises(ValueError, match="data_dir"):
        StaticFhirConnector.from_config(SourceConfig(name="x", kind="static-fhir", identifier_system=EHR_SYSTEM))
    with pytest.raises(ValueError, match="no FHIR resources"):
        StaticFhirConnector("x", tmp_path, EHR_SYSTEM, DEFAULTS)
    (tmp_path / "bad.json").write_text(json.dumps({"resourceType": "Patient", "id": "p"}))
    with pytest.raises(ValueError, match="not a FHIR Bundle"):
        StaticFhirConnector("x", tmp_path, EHR_SYSTEM, DEFAULTS)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2025", "2025-01-01T00:00:00+00:00", "2025-12-31T23:59:59.999999+00:00"),
        ("2024-02", "2024-02-01T00:00:00+00:00", "2024-02-29T23:59:59.999999+00:00"),
        ("2025-07-01", "2025-07-01T00:00:00+00:00", "2025-07-01T23:59:59.999999+00:00"),
        ("2025-07-01T10:00:00-07:00", "2025-07-01T17:00:00+00:00", "2025-07-01T17:00:00.999999+00:00"),
        ("2025-07-01T10:00:00.250Z", "2025-07-01T10:00:00.250000+00:00", "2025-07-01T10:00:00.250000+00:00"),
    ],
)
def test_to_range(text, start, end):
    rng = to_range(text)
    assert rng is not None and (rng[0].isoformat(), rng[1].isoformat()) == (start, end)


@pytest.mark.parametrize("text", ["", "25", "2025-13", "2025-02-30", "2025-07-01T25:00:00Z", "tomorrow"])
def test_to_range_rejects_garbage(text):
    assert to_range(text) is None
