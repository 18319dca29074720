"""FhirConnector against the real Node FHIR R4 server seeded with the demo data."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from broker.settings import SourceConfig
from connectors.base import Connector, SourceQuery, SourceUnavailable
from connectors.fhir import DEFAULT_RESOURCE_TYPES, FhirConnector
from tests.connectors.conftest import DEFAULTS, EHR_SYSTEM, expected_ids
from tests.support.ports import free_port

TYPES = sorted(DEFAULT_RESOURCE_TYPES - {"Patient"})
PATIENTS = ["pt-alpha", "pt-bravo", "pt-charlie"]


def ids(resources: list[dict]) -> list[str]:
    return [r["id"] for r in resources]


async def test_is_a_connector(fhir_connector):
    assert isinstance(fhir_connector, Connector)


@pytest.mark.parametrize("patient", PATIENTS)
async def test_patient_search_finds_only_that_patient(fhir_connector, patient):
    found = await fhir_connector.search(SourceQuery("Patient", patient), timeout=5)
    assert ids(found) == [patient]
    assert found[0]["identifier"][0]["system"] == EHR_SYSTEM


@pytest.mark.parametrize("patient", PATIENTS)
@pytest.mark.parametrize("rtype", TYPES)
async def test_search_per_patient_and_type(fhir_connector, patient, rtype):
    found = await fhir_connector.search(SourceQuery(rtype, patient), timeout=5)
    assert ids(found) == expected_ids(patient, rtype)
    assert all(r["resourceType"] == rtype for r in found)


async def test_bravo_has_no_records(fhir_connector):
    for rtype in TYPES:
        assert await fhir_connector.search(SourceQuery(rtype, "pt-bravo"), timeout=5) == []


async def test_unknown_patient_gets_nothing(fhir_connector):
    assert await fhir_connector.search(SourceQuery("Observation", "pt-nobody"), timeout=5) == []


@pytest.mark.parametrize(
    ("rtype", "code", "expected"),
    [
        ("Observation", "http://loinc.org|29463-7",
         ["alpha-obs-weight-2024", "alpha-obs-weight-2025", "alpha-obs-weight-2026"]),
        ("Observation", "44249-1,44261-6", ["alpha-obs-phq9-2025", "alpha-obs-phq9-2026"]),
        ("Observation", "http://loinc.org|75622-1,http://loinc.org|56888-1",
         ["alpha-obs-hiv-2024", "alpha-obs-hiv-2025", "alpha-obs-hiv-2026"]),
        ("Condition", "F43.10", ["alpha-cond-ptsd"]),
        ("Condition", "http://snomed.info/sct|195967001", ["alpha-cond-asthma"]),
        ("Observation", "http://loinc.org|0000-0", []),
    ],
)
async def test_search_by_code(fhir_connector, rtype, code, expected):
    found = await fhir_connector.search(SourceQuery(rtype, "pt-alpha", (("code", code),)), timeout=5)
    assert ids(found) == expected


async def test_small_count_pages_through_next_links_and_matches_unpaged(fhir_connector):
    unpaged = await fhir_connector.search(SourceQuery("Observation", "pt-alpha"), timeout=5)
    paged = await fhir_connector.search(SourceQuery("Observation", "pt-alpha", (("_count", "2"),)), timeout=5)
    assert len(unpaged) > 6  # several pages at _count=2
    assert ids(paged) == ids(unpaged) == expected_ids("pt-alpha", "Observation")
    assert paged == unpaged


async def test_paging_keeps_the_other_filters(fhir_connector):
    params = (("date", "ge2025-01-01"), ("date", "lt2026-01-01"), ("_count", "1"))
    found = await fhir_connector.search(SourceQuery("Observation", "pt-alpha", params), timeout=5)
    assert ids(found) == expected_ids("pt-alpha", "Observation", lambda r: "2025-01-01" <= r.date < "2026-01-01")


async def test_server_emits_self_and_next_links_only_while_more_exist(fhir_server):
    url = f"{fhir_server.base_url}/Immunization"
    async with aiohttp.ClientSession() as session:
        params = {"patient": "Patient/pt-alpha", "_count": "1"}
        async with session.get(url, params=params) as resp:
            first = await resp.json(content_type=None)
        links = {link["relation"]: link["url"] for link in first["link"]}
        assert links["self"].startswith(fhir_server.base_url)
        assert links["next"].startswith(f"{fhir_server.base_url}/Immunization?")
        assert "_offset=1" in links["next"]
        async with session.get(links["next"]) as resp:
            last = await resp.json(content_type=None)
        assert [e["resource"]["id"] for e in first["entry"] + last["entry"]] == ["alpha-imm-tdap", "alpha-imm-flu-2025"]
        assert "next" not in {link["relation"] for link in last["link"]}
        async with session.get(f"http://127.0.0.1:{fhir_server.port}/healthz") as resp:
            assert resp.status == 200


async def test_more_pages_than_allowed_is_unavailable(fhir_server):
    conn = FhirConnector("county-ehr", fhir_server.base_url, EHR_SYSTEM, DEFAULTS, DEFAULT_RESOURCE_TYPES, max_pages=2)
    try:
        with pytest.raises(SourceUnavailable, match="more than 2 pages"):
            await conn.search(SourceQuery("Observation", "pt-alpha", (("_count", "2"),)), timeout=5)
        # Two pages are enough for charlie's single Observation.
        found = await conn.search(SourceQuery("Observation", "pt-charlie", (("_count", "2"),)), timeout=5)
        assert ids(found) == ["charlie-obs-hiv-2026"]
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ((("date", "ge2025-01-01"),), lambda r: r.date >= "2025-01-01"),
        ((("date", "lt2025-01-01"),), lambda r: r.date < "2025-01-01"),
        ((("date", "ge2025-01-01"), ("date", "lt2026-01-01")), lambda r: "2025-01-01" <= r.date < "2026-01-01"),
        ((("date", "ge2030-01-01"),), lambda r: False),
    ],
)
async def test_date_search(fhir_connector, params, keep):
    found = await fhir_connector.search(SourceQuery("Observation", "pt-alpha", params), timeout=5)
    assert ids(found) == expected_ids("pt-alpha", "Observation", keep)
    assert found or params[0][1] == "ge2030-01-01"


@pytest.mark.parametrize("rtype", ["Observation", "DocumentReference", "Condition"])
async def test_last_updated_search(fhir_connector, rtype):
    params = (("_lastUpdated", "ge2026-01-01"),)
    found = await fhir_connector.search(SourceQuery(rtype, "pt-alpha", params), timeout=5)
    assert ids(found) == expected_ids("pt-alpha", rtype, lambda r: r.updated >= "2026-01-01")
    older = await fhir_connector.search(SourceQuery(rtype, "pt-alpha", (("_lastUpdated", "lt2026-01-01"),)), timeout=5)
    assert sorted(ids(found) + ids(older)) == sorted(expected_ids("pt-alpha", rtype))


async def test_read_found(fhir_connector):
    resource = await fhir_connector.read("Observation", "alpha-obs-hiv-2024", timeout=5)
    assert resource is not None
    assert (resource["resourceType"], resource["id"]) == ("Observation", "alpha-obs-hiv-2024")
    assert resource["subject"] == {"reference": "Patient/pt-alpha"}


@pytest.mark.parametrize(("rtype", "rid"), [("Observation", "no-such-id"), ("Condition", "alpha-obs-hiv-2024"),
                                            ("Observation", "../Patient/pt-alpha")])
async def test_read_not_found(fhir_connector, rtype, rid):
    assert await fhir_connector.read(rtype, rid, timeout=5) is None


async def test_concurrent_searches_share_one_session(fhir_connector):
    queries = [SourceQuery(t, p) for t in TYPES for p in PATIENTS]
    results = await asyncio.gather(*(fhir_connector.search(q, timeout=10) for q in queries))
    for q, found in zip(queries, results, strict=True):
        assert ids(found) == expected_ids(q.patient_id, q.resource_type)


async def test_unreachable_port_is_unavailable_without_phi():
    conn = FhirConnector("county-ehr", f"http://127.0.0.1:{free_port()}/fhir/R4", EHR_SYSTEM, DEFAULTS,
                         DEFAULT_RESOURCE_TYPES)
    try:
        with pytest.raises(SourceUnavailable) as info:
            await conn.search(SourceQuery("Observation", "pt-alpha"), timeout=5)
        assert "pt-alpha" not in str(info.value)
        assert "county-ehr" in str(info.value)
        with pytest.raises(SourceUnavailable):
            await conn.read("Observation", "alpha-obs-hiv-2024", timeout=5)
    finally:
        await conn.aclose()


async def test_unserved_or_malformed_type_is_refused(fhir_server):
    conn = FhirConnector("county-ehr", fhir_server.base_url, EHR_SYSTEM, DEFAULTS, {"Observation"})
    try:
        with pytest.raises(SourceUnavailable, match="not served"):
            await conn.search(SourceQuery("Condition", "pt-alpha"), timeout=5)
        with pytest.raises(SourceUnavailable, match="invalid resource type"):
            await conn.search(SourceQuery("../admin", "pt-alpha"), timeout=5)
        with pytest.raises(SourceUnavailable, match="invalid patient id"):
            await conn.search(SourceQuery("Observation", "pt-alpha&patient=Patient/pt-charlie"), timeout=5)
    finally:
        await conn.aclose()


async def test_from_config(fhir_server):
    cfg = SourceConfig(name="county-ehr", base_url=fhir_server.base_url + "/", identifier_system=EHR_SYSTEM,
                       default_categories=["general-health"], resource_types=["Observation"], max_pages=7)
    conn = FhirConnector.from_config(cfg)
    try:
        assert (conn.name, conn.base_url, conn.max_pages) == ("county-ehr", fhir_server.base_url, 7)
        assert conn.default_categories == DEFAULTS and conn.resource_types == {"Observation"}
        found = await conn.search(SourceQuery("Observation", "pt-charlie"), timeout=5)
        assert ids(found) == ["charlie-obs-hiv-2026"]
    finally:
        await conn.aclose()
    no_types = SourceConfig(name="x", base_url=fhir_server.base_url, identifier_system=EHR_SYSTEM)
    assert FhirConnector.from_config(no_types).resource_types == DEFAULT_RESOURCE_TYPES
    with pytest.raises(ValueError, match="base_url"):
        FhirConnector.from_config(SourceConfig(name="x", identifier_system=EHR_SYSTEM))


async def test_aclose_then_reuse_opens_a_new_session(fhir_server):
    conn = FhirConnector("county-ehr", fhir_server.base_url, EHR_SYSTEM, DEFAULTS, DEFAULT_RESOURCE_TYPES)
    await conn.search(SourceQuery("Patient", "pt-bravo"), timeout=5)
    await conn.aclose()
    await conn.aclose()  # idempotent
    assert ids(await conn.search(SourceQuery("Patient", "pt-bravo"), timeout=5)) == ["pt-bravo"]
    await conn.aclose()
