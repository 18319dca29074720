"""The Connector contract (connectors/base.py), one suite run against every implementation.

Each implementation is a ``Case``: a connector on real data with known ground truth, plus ways
to make it hang and to make it fail. The same tests then hold for the FHIR connector against the
real Node FHIR server, and for the SQL connector on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connectors.base import Connector, SourceQuery, SourceTimeout, SourceUnavailable, belongs_to_patient
from connectors.fhir import DEFAULT_RESOURCE_TYPES, FhirConnector
from connectors.sql import SqlConnector
from connectors.sqlmap import load_mapping, vocabulary_categories
from tests.connectors.conftest import DEFAULTS, EHR_SYSTEM, demo_rows, expected_ids, sql_expected
from tests.support.ports import free_port

TIMEOUT_MARGIN = 1.0  # seconds a timed-out call may take beyond its timeout


@dataclass
class Case:
    """One implementation under the contract, with its ground truth."""

    kind: str
    connector: Connector
    rtype: str
    patient: str  # has at least three items of rtype
    other_patient: str  # has items of rtype too
    expected: Callable[[str], list[str]]  # patient -> ids of rtype, in order
    cutoff: str  # a date that splits the patient's items
    before: list[str]  # ids whose date is before the cutoff
    hanging: Callable[[], Awaitable[Connector]]  # a connector whose searches hang
    broken: Callable[[], Connector]  # a connector whose source cannot be reached
    after_timeout: Callable[[Connector], Awaitable[None]] | None = None  # the hung connector still works
    made: list[Connector] = field(default_factory=list)


# ---- the FHIR connector -------------------------------------------------------------------------

@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A loopback TCP server that accepts connections and never answers."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/fhir/R4"
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def fhir_case(fhir_connector: FhirConnector, stack: list) -> Case:
    def fhir_ids(patient: str) -> list[str]:
        return expected_ids(patient, "Observation")

    before = [r.id for r in demo_rows() if r.patient == "pt-alpha" and r.type == "Observation"
              and r.date < "2025-01-01"]

    async def hanging() -> Connector:
        cm = silent_server()
        url = await cm.__aenter__()
        stack.append(cm)
        return FhirConnector("county-ehr", url, EHR_SYSTEM, DEFAULTS, DEFAULT_RESOURCE_TYPES)

    def broken() -> Connector:
        return FhirConnector("county-ehr", f"http://127.0.0.1:{free_port()}/fhir/R4", EHR_SYSTEM, DEFAULTS,
                             DEFAULT_RESOURCE_TYPES)

    return Case("fhir", fhir_connector, "Observation", "pt-alpha", "pt-charlie", fhir_ids, "2025-01-01", before,
                hanging, broken)


# ---- the SQL connector --------------------------------------------------------------------------

SLOW_QUERY = {
    # An interruptible busy loop: pure SQL, so sqlite3's interrupt() stops it.
    "sqlite": ("WITH RECURSIVE spin(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM spin WHERE n < 2000000000) "
               "SELECT referral_id, youth_id FROM cws_referral WHERE (SELECT max(n) FROM spin) > 0"),
    "postgresql": "SELECT referral_id, youth_id FROM cws_referral, pg_sleep(30)",
}


def slow_mapping(tmp: Path, dialect: str) -> Path:
    """cws-cms with Communication replaced by a query that runs for a long time."""
    text = f"""
version: 1
records:
  - name: slow
    resource_type: Communication
    categories: [child-welfare-case]
    query: "{SLOW_QUERY[dialect]}"
    columns: {{referral_id: integer, youth_id: string}}
    patient_column: youth_id
    id: slow-{{referral_id}}
    resource:
      status: completed
      subject: {{reference: "Patient/{{youth_id}}"}}
  - name: case
    resource_type: EpisodeOfCare
    categories: [child-welfare-case]
    table: cws_case
    columns: {{case_id: integer, youth_id: string}}
    patient_column: youth_id
    id: cws-case-{{case_id}}
    order_by: [case_id]
    resource:
      status: active
      patient: {{reference: "Patient/{{youth_id}}"}}
"""
    path = tmp / f"slow-{dialect}.yaml"
    path.write_text(text)
    return path


def sql_case(kind: str, urls: dict[str, str], tmp: Path) -> Case:
    from connectors import synthetic

    source = "cws-cms"
    cfg = synthetic.source_configs({source: urls[source]})[0]
    connector = SqlConnector.from_config(cfg)
    dialect = connector.engine.dialect.name

    def dated(r: dict) -> object:
        return r.get("received_at") or r.get("contact_at")

    cutoff = "2024-01-01"
    before = sql_expected(source, "CWS-1001", "Communication", lambda r: dated(r).date().isoformat() < cutoff)

    async def hanging() -> Connector:
        mapping = load_mapping(slow_mapping(tmp, dialect), vocabulary_categories())
        return SqlConnector(source, urls[source], mapping, cfg.identifier_system, cfg.default_categories,
                            pool_size=1)

    async def after_timeout(hung: Connector) -> None:
        # With one worker thread and one connection, this answers only if the slow statement was stopped.
        found = await hung.search(SourceQuery("EpisodeOfCare", "CWS-1001"), timeout=5)
        assert [r["id"] for r in found] == sql_expected(source, "CWS-1001", "EpisodeOfCare")[:len(found)]
        assert found

    def broken() -> Connector:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp / 'no-such-database.sqlite'}"
        else:
            url = f"postgresql+psycopg://postgres:secret-pw@127.0.0.1:{free_port()}/nothing"
        return SqlConnector(source, url, connector.mapping, cfg.identifier_system, cfg.default_categories)

    return Case(kind, connector, "Communication", "CWS-1001", "CWS-1002",
                lambda p: sql_expected(source, p, "Communication"), cutoff, before, hanging, broken, after_timeout)


@pytest.fixture(scope="module", params=[
    pytest.param("fhir", marks=pytest.mark.fhirserver),
    "sql-sqlite",
    pytest.param("sql-postgres", marks=pytest.mark.postgres),
])
def implementation(request):  # type: ignore[no-untyped-def]
    """(kind, what it runs on): resolved here, outside the event loop, so only the needed servers start."""
    fixture = {"fhir": "fhir_connector", "sql-sqlite": "synthetic_sqlite", "sql-postgres": "synthetic_pg"}
    return request.param, request.getfixturevalue(fixture[request.param])


@pytest.fixture(scope="module")
async def case(implementation, tmp_path_factory) -> AsyncIterator[Case]:  # type: ignore[no-untyped-def]
    kind, target = implementation
    stack: list = []
    if kind == "fhir":
        c = await fhir_case(target, stack)
    else:
        c = sql_case(kind, target, tmp_path_factory.mktemp(kind))
    yield c
    for made in c.made:
        await made.aclose()
    for cm in stack:
        await cm.__aexit__(None, None, None)
    if c.kind != "fhir":  # the FHIR connector fixture is shared with other modules and closes itself
        await c.connector.aclose()


def ids(resources: list[dict]) -> list[str]:
    return [r["id"] for r in resources]


async def search(c: Case, patient: str | None = None, params: tuple = (), timeout: float = 5) -> list[dict]:
    return await c.connector.search(SourceQuery(c.rtype, patient or c.patient, params), timeout=timeout)


# ---- the contract -------------------------------------------------------------------------------

async def test_is_a_connector(case: Case):
    assert isinstance(case.connector, Connector)
    assert case.rtype in case.connector.resource_types
    assert isinstance(case.connector.default_categories, frozenset) and case.connector.default_categories


async def test_search_returns_exactly_that_patients_items(case: Case):
    for patient in (case.patient, case.other_patient):
        found = await search(case, patient)
        assert ids(found) == case.expected(patient)
        assert all(r["resourceType"] == case.rtype and belongs_to_patient(r, patient) for r in found)
        assert not any(belongs_to_patient(r, case.other_patient if patient == case.patient else case.patient)
                       for r in found)
    assert len(case.expected(case.patient)) >= 3 and case.expected(case.other_patient)


async def test_unknown_patient_gets_nothing(case: Case):
    assert await search(case, "no-such-youth-0000") == []


async def test_id_selects_only_the_patients_items(case: Case):
    mine, theirs = case.expected(case.patient), case.expected(case.other_patient)
    wanted = f"{mine[-1]},{theirs[0]},{mine[0]},no-such-id"
    found = await search(case, params=(("_id", wanted),))
    assert ids(found) == [mine[0], mine[-1]]  # in the source's order, never the other youth's item


async def test_count_never_drops_or_invents_items(case: Case):
    everything = ids(await search(case))
    found = ids(await search(case, params=(("_count", "2"),)))
    assert len(found) >= 2 and found == everything[:len(found)]


async def test_limit_gives_the_first_matches_or_all_of_them(case: Case):
    everything = ids(await search(case))
    for limit in (1, 2, len(everything) - 1, len(everything), len(everything) + 5):
        found = ids(await case.connector.search(SourceQuery(case.rtype, case.patient, limit=limit), timeout=5))
        # the first `limit` in the source's order (more is allowed); fewer only when there are no more
        assert found == everything[:len(found)]
        assert len(found) >= min(limit, len(everything))
    # with another parameter, the limit counts matches, not rows read
    matching = ids(await search(case, params=(("date", f"ge{case.cutoff}"),)))
    found = ids(await case.connector.search(SourceQuery(case.rtype, case.patient, (("date", f"ge{case.cutoff}"),),
                                                        limit=1), timeout=5))
    assert found[:1] == matching[:1] and found == matching[:len(found)]


async def test_date_splits_at_the_cutoff(case: Case):
    before = ids(await search(case, params=(("date", f"lt{case.cutoff}"),)))
    after = ids(await search(case, params=(("date", f"ge{case.cutoff}"),)))
    assert before == case.before
    assert after == [i for i in case.expected(case.patient) if i not in case.before]
    assert before and after
    both = ids(await search(case, params=(("date", f"ge{case.cutoff}"), ("date", "lt2000-01-01"))))
    assert both == []


async def test_read_by_id_and_unknown_ids(case: Case):
    found = await search(case)
    for resource in found[:3]:
        assert await case.connector.read(case.rtype, resource["id"], timeout=5) == resource
    assert await case.connector.read(case.rtype, "no-such-id", timeout=5) is None
    other_type = sorted(case.connector.resource_types - {case.rtype, "Patient"})[0]
    assert await case.connector.read(other_type, found[0]["id"], timeout=5) is None


async def test_concurrent_searches_give_the_same_answers(case: Case):
    queries = [(p, params) for p in (case.patient, case.other_patient, "no-such-youth-0000")
               for params in ((), (("date", f"ge{case.cutoff}"),))]
    sequential = [ids(await search(case, p, params)) for p, params in queries]
    jobs = [queries[i % len(queries)] for i in range(50)]
    results = await asyncio.gather(*(search(case, p, params, timeout=20) for p, params in jobs))
    for i, found in enumerate(results):
        assert ids(found) == sequential[i % len(queries)]


async def test_returned_dicts_are_fresh(case: Case):
    first = await search(case)
    snapshot = copy.deepcopy(first)
    for r in first:
        r["id"] = "mutated"
        r.setdefault("meta", {}).setdefault("security", []).append({"code": "mutated"})
        r.pop("subject", None)
        r.pop("patient", None)
    assert await search(case) == snapshot
    read = await case.connector.read(case.rtype, snapshot[0]["id"], timeout=5)
    read["id"] = "mutated"
    assert await case.connector.read(case.rtype, snapshot[0]["id"], timeout=5) == snapshot[0]


def _containers(value: object, into: dict[int, object]) -> dict[int, object]:
    """Every dict and list inside ``value`` by id (the objects are kept, so no id is reused meanwhile)."""
    if isinstance(value, (dict, list)):
        into[id(value)] = value
        for child in value.values() if isinstance(value, dict) else value:
            _containers(child, into)
    return into


async def test_fresh_results_share_nothing(case: Case):
    """A connector claiming ``fresh_results`` has its items redacted and labelled in place by the
    pipeline (no copy first), so no dict or list it returns may be shared with another call's."""
    claims = getattr(case.connector, "fresh_results", False) is True
    assert claims == (case.kind == "fhir")  # who claims it; a new claimant belongs in this table
    first, second = await search(case), await search(case)
    read = await case.connector.read(case.rtype, first[0]["id"], timeout=5)
    a, b, c = _containers(first, {}), _containers(second, {}), _containers(read, {})
    if claims:
        assert not (a.keys() & b.keys()) and not (a.keys() & c.keys()) and not (b.keys() & c.keys())
    assert first == second and read == first[0]


async def test_a_hanging_source_times_out_on_time(case: Case):
    hung = await case.hanging()
    case.made.append(hung)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):  # a connector that ignores its timeout fails here instead of hanging
        for _ in range(2):
            started = loop.time()
            with pytest.raises(SourceTimeout) as info:
                await hung.search(SourceQuery(case.rtype, case.patient), timeout=0.5)
            assert loop.time() - started < 0.5 + TIMEOUT_MARGIN
            assert case.patient not in str(info.value)
        if case.after_timeout is not None:
            await case.after_timeout(hung)


async def test_an_unreachable_source_is_unavailable_without_content(case: Case):
    broken = case.broken()
    case.made.append(broken)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as info:
        await broken.search(SourceQuery(case.rtype, case.patient), timeout=5)
    assert time.monotonic() - started < 5 + TIMEOUT_MARGIN
    text = str(info.value)
    assert case.connector.name in text
    assert case.patient not in text and "secret-pw" not in text and "SELECT" not in text.upper()
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    with pytest.raises(SourceUnavailable):
        await broken.read(case.rtype, case.expected(case.patient)[0], timeout=5)
