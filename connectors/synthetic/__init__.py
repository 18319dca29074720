"""Synthetic agency databases for the demo and the tests: build them, and configure SQL sources on them.

    urls = synthetic.build_sqlite(directory)          # four SQLite files, idempotent
    urls = {s: pg.create_database() for s in synthetic.SOURCES}; synthetic.build(urls)
    configs = synthetic.source_configs(urls)          # list[SourceConfig], kind "sql"
    synthetic.TEST_YOUTH["y-alpha"]["cws-cms"]        # "CWS-1001"

Everything in these databases is invented (connectors/synthetic/generator.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, MetaData, create_engine, inspect, make_url, select

from connectors.sqlmap import MAPPINGS_DIR
from connectors.synthetic.generator import SEED, TEST_YOUTH, dataset, fingerprint, source_ids, youth_count
from connectors.synthetic.schema import MARKER_TABLE, METADATA, SOURCES

if TYPE_CHECKING:
    from broker.settings import SourceConfig

__all__ = ["SEED", "SOURCES", "SOURCE_CATEGORIES", "TEST_YOUTH", "build", "build_sqlite", "create_and_fill",
           "dataset", "identifier_system", "mapping_file", "source_configs", "source_ids", "sqlite_urls",
           "youth_count"]

SOURCE_CATEGORIES = {
    "cws-cms": ("child-welfare-case",),
    "probation-cms": ("probation",),
    "juvenile-court": ("juvenile-court",),
    "school-district": ("education",),
}


def identifier_system(source: str) -> str:
    """The identifier system under which a youth is registered for a synthetic source."""
    return f"urn:mdt-broker:demo:{source}"


def mapping_file(source: str) -> Path:
    """The mapping file shipped for a synthetic source."""
    return MAPPINGS_DIR / f"{source}.yaml"


def create_and_fill(source: str, url: str, *, seed: int = SEED) -> None:
    """Create the source's tables in an existing (or, for SQLite, new) database and fill them, once.

    A database already holding exactly these rows (same seed, same content hash) is left alone;
    otherwise the source's tables are dropped and rebuilt.
    """
    if source not in METADATA:
        raise ValueError(f"unknown synthetic source {source!r}")
    metadata = METADATA[source]
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        stamp = fingerprint(source, seed)
        if _is_filled(engine, metadata, seed, stamp):
            return
        rows = dataset(seed)[source]
        with engine.begin() as conn:
            metadata.drop_all(conn)
            metadata.create_all(conn)
            for table in metadata.sorted_tables:
                if rows.get(table.name):
                    conn.execute(table.insert(), rows[table.name])
            conn.execute(metadata.tables[MARKER_TABLE].insert(),
                         {"seed": seed, "fingerprint": stamp})
    finally:
        engine.dispose()


def build(url_by_source: dict[str, str], *, seed: int = SEED) -> None:
    """``create_and_fill`` for each source named in ``url_by_source``."""
    unknown = set(url_by_source) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown synthetic sources: {', '.join(sorted(unknown))}")
    for source, url in url_by_source.items():
        create_and_fill(source, url, seed=seed)


def sqlite_urls(directory: Path) -> dict[str, str]:
    """Where ``build_sqlite`` puts each source's SQLite file."""
    return {s: f"sqlite:///{Path(directory).resolve() / (s + '.sqlite')}" for s in SOURCES}


def build_sqlite(directory: Path, *, seed: int = SEED) -> dict[str, str]:
    """Build (once) the four SQLite source databases in ``directory``; returns their URLs."""
    urls = sqlite_urls(directory)
    build(urls, seed=seed)
    return urls


def source_configs(url_by_source: dict[str, str], *, timeout: float = 5.0,
                   pool_size: int = 4) -> list["SourceConfig"]:
    """One ``kind: sql`` SourceConfig per source in ``url_by_source``, with the shipped mapping files."""
    from broker.settings import SourceConfig

    return [
        SourceConfig(name=source, kind="sql", database_url=url, mapping_file=mapping_file(source),
                     identifier_system=identifier_system(source),
                     default_categories=list(SOURCE_CATEGORIES[source]), timeout=timeout, pool_size=pool_size)
        for source, url in url_by_source.items()
    ]


def _is_filled(engine: Engine, metadata: MetaData, seed: int, stamp: str) -> bool:
    with engine.connect() as conn:
        if not inspect(conn).has_table(MARKER_TABLE):
            return False
        marker = metadata.tables[MARKER_TABLE]
        found = conn.execute(select(marker.c.seed, marker.c.fingerprint)).all()
    return found == [(seed, stamp)]
