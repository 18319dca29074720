"""SqlConnector on the synthetic agency databases: FHIR validity, categories, element labels,
bound parameters, search parameters and failures. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import text

from broker.runtime import load_connector
from broker.settings import SourceConfig
from connectors import synthetic
from connectors.base import SourceQuery, SourceUnavailable, belongs_to_patient
from connectors.classify import LOCAL_CATEGORY_SYSTEM
from connectors.sql import SqlConnector
from connectors.sqlmap import INLINE_LABEL_URL, load_mapping, vocabulary_categories
from tests.connectors.conftest import SQL_TYPES, sql_connector, sql_expected, sql_youth

ALPHA = synthetic.TEST_YOUTH["y-alpha"]
RECORD_CATEGORIES = {
    "cws-case": {"child-welfare-case"},
    "cws-placement": {"child-welfare-case"},
    "cws-referral": {"child-welfare-case", "canra-report"},
    "cws-statement": {"child-welfare-case", "youth-statement"},
    "cws-contact": {"child-welfare-case"},
    "prb-case": {"probation"},
    "prb-condition": {"probation"},
    "prb-interview": {"probation", "youth-statement"},
    "crt-hearing": {"juvenile-court"},
    "edu-enrollment": {"education"},
    "edu-attendance": {"education"},
    "edu-credits": {"education"},
    "edu-iep": {"education"},
}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def urls(request) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return request.getfixturevalue("synthetic_sqlite" if request.param == "sqlite" else "synthetic_pg")


@pytest.fixture(scope="module")
async def connectors(urls) -> AsyncIterator[dict[str, SqlConnector]]:  # type: ignore[no-untyped-def]
    made = {source: sql_connector(source, url) for source, url in urls.items()}
    yield made
    for c in made.values():
        await c.aclose()


@pytest.fixture(scope="module")
async def everything(connectors) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    """Every resource of every youth from every source: source -> resources."""
    out: dict[str, list[dict]] = {}
    for source, conn in connectors.items():
        out[source] = []
        for patient in sql_youth(source):
            for rtype in SQL_TYPES[source]:
                out[source] += await conn.search(SourceQuery(rtype, patient), timeout=10)
    return out


def prefix(resource_id: str) -> str:
    return resource_id.rsplit("-", 1)[0]


def strip_labelled(node: object, category: str) -> object:
    """A copy without the elements that carry an inline label of ``category`` (what the broker removes)."""
    if isinstance(node, list):
        return [strip_labelled(v, category) for v in node if not is_labelled(v, category)]
    if isinstance(node, dict):
        return {k: strip_labelled(v, category) for k, v in node.items() if not is_labelled(v, category)}
    return node


def is_labelled(node: object, category: str) -> bool:
    return isinstance(node, dict) and any(
        isinstance(e, dict) and e.get("url") == INLINE_LABEL_URL
        and e.get("valueCoding") == {"system": LOCAL_CATEGORY_SYSTEM, "code": category}
        for e in node.get("extension", []))


# ---- what comes out ---------------------------------------------------------------------------

async def test_every_youth_gets_exactly_their_rows(connectors, everything):
    for source, resources in everything.items():
        got = [r["id"] for r in resources]
        want = [i for p in sql_youth(source) for t in SQL_TYPES[source] for i in sql_expected(source, p, t)]
        assert got == want
        assert len(got) == len(set(got))
    assert len(everything["cws-cms"]) >= 150  # enough history to mean something


async def test_every_mapped_resource_is_valid_fhir_and_belongs_to_its_youth(everything):
    for source, resources in everything.items():
        for r in resources:
            get_fhir_model_class(r["resourceType"]).model_validate(r)
            patient = (r.get("subject") or r.get("patient"))["reference"].removeprefix("Patient/")
            assert belongs_to_patient(r, patient) and patient.startswith(ALPHA[source][:4])


async def test_categories_are_in_meta_security_and_the_classifier_sees_them(everything, classifier):
    for source, resources in everything.items():
        defaults = frozenset(synthetic.SOURCE_CATEGORIES[source])
        for r in resources:
            labels = r["meta"]["security"]
            assert all(label["system"] == LOCAL_CATEGORY_SYSTEM for label in labels)
            assert {label["code"] for label in labels} == RECORD_CATEGORIES[prefix(r["id"])]
            assert classifier.classify(r, defaults) == RECORD_CATEGORIES[prefix(r["id"])] | defaults


async def test_alpha_has_every_kind_of_record(connectors):
    async def found(source: str, rtype: str) -> list[dict]:
        return await connectors[source].search(SourceQuery(rtype, ALPHA[source]), timeout=5)

    def count(resources: list[dict], kind: str) -> int:
        return sum(prefix(r["id"]) == kind for r in resources)

    episodes = await found("cws-cms", "EpisodeOfCare")
    messages = await found("cws-cms", "Communication")
    assert count(episodes, "cws-case") >= 2 and count(episodes, "cws-placement") >= 2
    assert count(messages, "cws-referral") >= 2 and count(messages, "cws-statement") >= 2
    assert count(await found("probation-cms", "EpisodeOfCare"), "prb-case") == 1
    assert count(await found("probation-cms", "CarePlan"), "prb-condition") == 3
    assert count(await found("probation-cms", "Communication"), "prb-interview") == 1
    assert count(await found("juvenile-court", "Encounter"), "crt-hearing") == 3
    school = await found("school-district", "Observation")
    assert {prefix(r["id"]) for r in school} == {"edu-enrollment", "edu-attendance", "edu-credits", "edu-iep"}
    iep = next(r for r in school if prefix(r["id"]) == "edu-iep")
    assert iep["valueBoolean"] is True and iep["effectiveDateTime"] == "2024-10-01"
    rates = [r["valueQuantity"]["value"] for r in school if prefix(r["id"]) == "edu-attendance"]
    assert rates == [88.8, 95]  # 71/80 and 76/80 days, rounded by the database


async def test_reporter_name_is_only_in_the_labelled_sender(everything):
    rows = synthetic.dataset()["cws-cms"]["cws_referral"]
    names = {r["reporter_name"] for r in rows}
    referrals = [r for r in everything["cws-cms"] if prefix(r["id"]) == "cws-referral"]
    assert len(referrals) == len(rows)
    by_id = {f"cws-referral-{r['referral_id']}": r for r in rows}
    for r in referrals:
        row = by_id[r["id"]]
        assert is_labelled(r["sender"], "reporter-identity")
        assert r["sender"]["display"] == f"{row['reporter_name']} ({row['reporter_role']})"
        assert set(r["sender"]) == {"display", "extension"}
        rest = json.dumps(strip_labelled(r, "reporter-identity"))
        assert "sender" not in rest and row["reporter_name"] not in rest and row["reporter_role"] not in rest
    others = json.dumps([r for rs in everything.values() for r in rs if prefix(r["id"]) != "cws-referral"])
    assert not any(name in others for name in names)


async def test_placement_address_and_caregiver_only_in_labelled_elements(everything):
    rows = {f"cws-placement-{r['placement_id']}": r for r in synthetic.dataset()["cws-cms"]["cws_placement"]}
    placements = [r for r in everything["cws-cms"] if prefix(r["id"]) == "cws-placement"]
    assert len(placements) == len(rows)
    with_address = 0
    for r in placements:
        row = rows[r["id"]]
        assert r["type"][0]["coding"][0]["code"] == row["placement_type"]
        assert r["type"][0]["coding"][0]["system"] == "https://mdt-broker.example.org/CodeSystem/placement-type"
        if row["address_line"] is None:
            assert "extension" not in r  # a NULL address omits the element and its label
            continue
        with_address += 1
        address = next(e for e in r["extension"] if e["url"].endswith("/placement-address"))["valueAddress"]
        assert is_labelled(address, "placement-location")
        assert address["line"] == [row["address_line"]] and address["city"] == row["city"]
        caregiver = next(e for e in r["extension"] if e["url"].endswith("/placement-caregiver"))["valueReference"]
        assert is_labelled(caregiver, "placement-location") and caregiver["display"] == row["caregiver_name"]
        rest = json.dumps(strip_labelled(r, "placement-location"))
        for secret in (row["address_line"], row["caregiver_name"], row["postal_code"]):
            assert secret not in rest
    assert with_address >= 20


async def test_null_columns_omit_elements(connectors):
    episodes = await connectors["cws-cms"].search(SourceQuery("EpisodeOfCare", ALPHA["cws-cms"]), timeout=5)
    open_case = next(r for r in episodes if r["status"] == "active" and prefix(r["id"]) == "cws-case")
    assert "end" not in open_case["period"] and open_case["period"]["start"]
    hearings = await connectors["juvenile-court"].search(SourceQuery("Encounter", ALPHA["juvenile-court"]), timeout=5)
    planned = [h for h in hearings if h["status"] == "planned"]
    assert planned and all(set(h["period"]) == {"start"} for h in planned)


# ---- search and read ----------------------------------------------------------------------------

async def test_search_parameters_mean_what_they_mean_for_the_static_connector(connectors):
    school = connectors["school-district"]
    pid = ALPHA["school-district"]
    q = lambda *params: SourceQuery("Observation", pid, params)  # noqa: E731
    all_ids = [r["id"] for r in await school.search(q(), timeout=5)]
    assert [r["id"] for r in await school.search(q(("_count", "3")), timeout=5)] == all_ids[:3]
    assert await school.search(q(("_count", "0")), timeout=5) == []
    iep = await school.search(q(("code", "https://mdt-broker.example.org/CodeSystem/education|iep")), timeout=5)
    assert [prefix(r["id"]) for r in iep] == ["edu-iep"]
    assert await school.search(q(("code", "http://loinc.org|iep")), timeout=5) == []
    spring = await school.search(q(("date", "ge2025-01-01"), ("date", "le2025-06-30")), timeout=5)
    assert {prefix(r["id"]) for r in spring} == {"edu-enrollment", "edu-attendance", "edu-credits"}
    updated = await school.search(q(("_lastUpdated", "ge2025-06-01")), timeout=5)
    assert updated and all(r["meta"]["lastUpdated"] >= "2025-06-01" for r in updated)
    assert [r["id"] for r in await school.search(q(("_sort", "-date")), timeout=5)] == all_ids
    for bad in (("status", "final"), ("patient", "Patient/EDU-4002"), ("date", "yesterday"), ("_count", "-1")):
        with pytest.raises(SourceUnavailable):
            await school.search(q(bad), timeout=5)
    with pytest.raises(SourceUnavailable, match="not served"):
        await school.search(SourceQuery("Condition", pid), timeout=5)


@pytest.mark.parametrize("patient", ["x' OR '1'='1", "CWS-1001' --", "CWS-1001'; DROP TABLE cws_case; --",
                                     "%", "CWS-100_"])
async def test_youth_ids_are_bound_parameters(connectors, patient):
    cws = connectors["cws-cms"]
    assert await cws.search(SourceQuery("EpisodeOfCare", patient), timeout=5) == []
    assert await cws.search(SourceQuery("Communication", patient), timeout=5) == []
    assert await cws.search(SourceQuery("EpisodeOfCare", "CWS-1001"), timeout=5)  # still there


@pytest.mark.parametrize("rid", ["cws-case-5001 OR 1=1", "cws-case-5001'", "cws-case-", "cws-case-05001",
                                 "cws-statement-8002", "cws-referral-5001", "CWS-CASE-5001"])
async def test_read_of_ids_no_row_makes_is_none(connectors, rid):
    assert await connectors["cws-cms"].read("EpisodeOfCare" if "case" in rid.lower() else "Communication", rid,
                                            timeout=5) is None


async def test_read_matches_search_for_every_kind(connectors):
    for source, conn in connectors.items():
        for rtype in SQL_TYPES[source]:
            for r in await conn.search(SourceQuery(rtype, ALPHA[source]), timeout=5):
                assert await conn.read(rtype, r["id"], timeout=5) == r


# ---- configuration and failures -----------------------------------------------------------------

async def test_runtime_loads_it_through_the_entry_point(urls):
    cfg = synthetic.source_configs({"juvenile-court": urls["juvenile-court"]})[0]
    conn = load_connector(cfg)
    try:
        assert isinstance(conn, SqlConnector)
        assert conn.resource_types == {"Encounter"} and conn.default_categories == {"juvenile-court"}
        assert conn.identifier_system == "urn:mdt-broker:demo:juvenile-court"
        assert await conn.search(SourceQuery("Encounter", ALPHA["juvenile-court"]), timeout=5)
    finally:
        await conn.aclose()


def test_from_config_refuses_incomplete_configs(urls):
    base = dict(name="cws-cms", kind="sql", identifier_system="urn:x")
    with pytest.raises(ValueError, match="needs database_url"):
        SqlConnector.from_config(SourceConfig(**base, mapping_file="cws-cms.yaml"))
    with pytest.raises(ValueError, match="needs mapping_file"):
        SqlConnector.from_config(SourceConfig(**base, database_url=urls["cws-cms"]))
    with pytest.raises(ValueError, match="resource_types not in cws-cms.yaml: Observation"):
        SqlConnector.from_config(SourceConfig(**base, database_url=urls["cws-cms"], mapping_file="cws-cms.yaml",
                                              resource_types=["Observation"]))
    with pytest.raises(ValueError, match="in-memory"):
        SqlConnector.from_config(SourceConfig(**base, database_url="sqlite://", mapping_file="cws-cms.yaml"))
    conn = SqlConnector.from_config(SourceConfig(**base, database_url=urls["cws-cms"], mapping_file="cws-cms.yaml",
                                                 resource_types=["Communication"]))
    assert conn.resource_types == {"Communication"}


async def test_a_broken_mapping_query_is_unavailable_without_sql_or_ids(urls, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("""
version: 1
records:
  - name: ghost
    resource_type: EpisodeOfCare
    categories: [child-welfare-case]
    query: SELECT case_id, youth_id FROM no_such_table
    columns: {case_id: integer, youth_id: string}
    patient_column: youth_id
    id: ghost-{case_id}
    resource:
      status: active
      patient: {reference: "Patient/{youth_id}"}
""")
    conn = SqlConnector("cws-cms", urls["cws-cms"], load_mapping(path, vocabulary_categories()), "urn:x",
                        ["child-welfare-case"])
    try:
        with pytest.raises(SourceUnavailable, match="database error in record ghost") as info:
            await conn.search(SourceQuery("EpisodeOfCare", "CWS-1001"), timeout=5)
        message = str(info.value)
        assert "CWS-1001" not in message and "no_such_table" not in message and "SELECT" not in message
        assert info.value.__suppress_context__ and info.value.__cause__ is None
    finally:
        await conn.aclose()


async def test_the_database_is_opened_read_only(connectors):
    cws = connectors["cws-cms"]
    with pytest.raises(Exception) as info:  # noqa: PT011 - the driver's own error
        with cws.engine.begin() as conn:
            conn.execute(text("DELETE FROM cws_case"))
    assert "read" in str(info.value).lower()
    assert await cws.search(SourceQuery("EpisodeOfCare", "CWS-1001"), timeout=5)


async def test_a_row_that_names_another_patient_fails_the_search(urls, tmp_path):
    path = tmp_path / "liar.yaml"
    path.write_text("""
version: 1
records:
  - name: liar
    resource_type: EpisodeOfCare
    categories: [child-welfare-case]
    query: SELECT case_id, youth_id, 'CWS-1002' AS other FROM cws_case
    columns: {case_id: integer, youth_id: string, other: string}
    patient_column: youth_id
    id: liar-{case_id}
    resource:
      status: active
      patient: {reference: "Patient/{youth_id}"}
      managingOrganization: {reference: "Organization/{other}"}
""")
    mapping = load_mapping(path, vocabulary_categories())
    # The template is honest; make the rendered resource lie to prove the connector checks its output.
    object.__setattr__(mapping.records[0], "template", {**mapping.records[0].template,
                                                        "patient": {"reference": "Patient/{other}"}})
    conn = SqlConnector("cws-cms", urls["cws-cms"], mapping, "urn:x", ["child-welfare-case"])
    try:
        with pytest.raises(SourceUnavailable, match="another patient"):
            await conn.search(SourceQuery("EpisodeOfCare", "CWS-1001"), timeout=5)
    finally:
        await conn.aclose()
