"""Search pages ask sources only for what the page needs, and still page exactly right.

Two SQL-backed sources on SQLite, both linked to y-alpha: ``bulk-a`` holds 10,000 notes for
the youth, every third of them coded as substance abuse (Part 2, ``sud-part2``), which the child welfare worker
may not see; ``bulk-b`` holds 12 plain notes. The filter therefore drops items the source
returned, so a page must sometimes go back to a source for more, and items from ``bulk-b``
come only after every releasable item of ``bulk-a``.
"""

from __future__ import annotations

import json
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.settings import SourceConfig
from broker.store.models import AuditEventRow, YouthIdentifier
from tests.scenarios.harness import Broker, start_broker


SEARCH = "/mdts/mdt-alpha/fhir/Observation"
BULK_A, BULK_B = 10_000, 12
SYSTEM = "urn:mdt-broker:test:bulk"
MAPPING = """\
version: 1
description: Synthetic notes, some coded as substance abuse (Part 2)
records:
  - name: note
    resource_type: Observation
    categories: [child-welfare-case]
    table: notes
    columns:
      note_id: integer
      youth_id: string
      label: string
    patient_column: youth_id
    id: {prefix}-{{note_id}}
    order_by: [note_id]
    resource:
      status: final
      code:
        coding:
          - system: http://snomed.info/sct
            code: "{{label}}"
      subject:
        reference: "Patient/{{youth_id}}"
      valueString: "Note {{note_id}} for Testy McFakeface"
"""


def _source(tmp: Path, name: str, prefix: str, rows: int, *, every_third_part2: bool) -> SourceConfig:
    db = tmp / f"{name}.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (note_id INTEGER PRIMARY KEY, youth_id TEXT NOT NULL, label TEXT NOT NULL)")
        conn.executemany("INSERT INTO notes VALUES (?, ?, ?)", [
            (i, "BULK-1", "66214007" if every_third_part2 and i % 3 == 0 else "225368008")
            for i in range(1, rows + 1)])
    mapping = tmp / f"{name}.yaml"
    mapping.write_text(MAPPING.format(prefix=prefix))
    return SourceConfig(name=name, kind="sql", database_url=f"sqlite:///{db}", mapping_file=str(mapping),
                        identifier_system=f"{SYSTEM}:{name}", default_categories=["child-welfare-case"],
                        resource_types=["Observation"], timeout=10)


@pytest.fixture(scope="module")
async def bulk_broker(tmp_path_factory) -> Broker:
    tmp = tmp_path_factory.mktemp("paging")
    sources = [_source(tmp, "bulk-a", "a", BULK_A, every_third_part2=True),
               _source(tmp, "bulk-b", "b", BULK_B, every_third_part2=False)]
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", "http://127.0.0.1:9", sources=sources)
    with b.runtime.sessions() as s:
        for name in ("bulk-a", "bulk-b"):
            s.add(YouthIdentifier(youth_id="y-alpha", source=name, system=f"{SYSTEM}:{name}", value="BULK-1"))
        s.commit()
    yield b
    await b.aclose()


def _releasable_a() -> list[str]:
    return [f"a-{i}" for i in range(1, BULK_A + 1) if i % 3 != 0]


def _last_event(b: Broker) -> dict:
    with b.runtime.sessions() as s:
        body = s.scalars(select(AuditEventRow.body).where(AuditEventRow.action == "fhir.search")
                         .order_by(AuditEventRow.seq.desc()).limit(1)).one()
    return json.loads(body)


def _ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _next(bundle: dict) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            return link["url"].removeprefix("http://127.0.0.1:8000")
    return None


async def test_first_page_fetches_a_page_not_the_whole_history(bulk_broker: Broker) -> None:
    tracemalloc.start()
    try:
        r = await bulk_broker.get(f"{SEARCH}?_count=20", alias="cw", purpose="COC")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert _ids(bundle) == _releasable_a()[:20]
    assert _next(bundle) is not None
    fetched = {s["source"]: s["fetched"] for s in _last_event(bulk_broker)["sources"]}
    # 21 asked first (the page and one more, for "next"); 14 of them releasable, so bulk-a is
    # asked once more for four times as many. bulk-b is asked for 21 and has 12.
    assert fetched == {"bulk-a": 84, "bulk-b": 12}
    # Rendering, copying and filtering all 10,000 notes costs several MB; a page, a fraction of one.
    assert peak < 3_000_000, f"peak {peak} bytes for one page"


async def test_walking_the_pages_gives_exactly_the_releasable_items_in_order(bulk_broker: Broker) -> None:
    # Near the end of bulk-a, then across into bulk-b: the page must not skip, repeat or reorder.
    start = len(_releasable_a()) - 10
    seen: list[str] = []
    url: str | None = f"{SEARCH}?_count=7&_offset={start}"
    while url is not None:
        r = await bulk_broker.get(url, alias="cw", purpose="COC")
        assert r.status_code == 200, r.text
        seen += _ids(r.json())
        url = _next(r.json())
    assert seen == _releasable_a()[start:] + [f"b-{i}" for i in range(1, BULK_B + 1)]
    event = _last_event(bulk_broker)
    assert event["categories"]["released"] == ["child-welfare-case"]
    assert event["released_count"] == len(_ids(r.json()))


async def test_a_page_that_only_withheld_items_could_fill_looks_like_the_end(bulk_broker: Broker) -> None:
    # Asking past the end: the same empty page, with no next link and no hint of the Part 2 notes.
    r = await bulk_broker.get(f"{SEARCH}?_count=5&_offset={len(_releasable_a()) + BULK_B}", alias="cw",
                              purpose="COC")
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert _ids(bundle) == [] and _next(bundle) is None
    assert "sud" not in json.dumps(bundle).lower()
