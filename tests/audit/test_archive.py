"""Retention archive: old events move to a verified, signed gzip NDJSON file; nothing is lost on failure."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text

from broker.audit import SqlAuditSink, verify_chain
from broker.audit import archive as archive_module
from broker.audit.archive import ArchiveError, archive
from broker.audit.canonical import GENESIS_HASH
from broker.audit.checkpoint import AuditKey, write_checkpoint
from broker.audit.export import verify_export
from broker.store.models import AuditArchive, AuditCheckpoint, AuditEventRow

from .events import make_event

N = 40


@pytest.fixture
def key() -> AuditKey:
    return AuditKey(Ed25519PrivateKey.generate())


@pytest.fixture
def chain(db, key):
    """Forty events one second apart, signed at the head."""
    sink = SqlAuditSink(db.sessions)
    for i in range(1, N + 1):
        sink.append(make_event(i))
    write_checkpoint(db.sessions, key, reason="manual")
    return db


def _time_of(seq: int):
    return make_event(seq)["time"]


def _live(sessions) -> list[int]:
    with sessions() as s:
        return list(s.scalars(select(AuditEventRow.seq).order_by(AuditEventRow.seq)))


def _hash(sessions, seq: int) -> str:
    with sessions() as s:
        return s.get(AuditEventRow, seq).hash


def _archives(sessions) -> list[AuditArchive]:
    with sessions() as s:
        return list(s.scalars(select(AuditArchive).order_by(AuditArchive.id)))


def test_old_events_move_to_a_verified_archive_and_the_rest_still_verifies(chain, key, tmp_path):
    hash25 = _hash(chain.sessions, 25)
    row = archive(chain.sessions, key, older_than=_time_of(26), directory=tmp_path / "arch", actor="cli:tester")

    assert (row.first_seq, row.last_seq, row.first_prev_hash, row.last_hash) == (1, 25, GENESIS_HASH, hash25)
    path = tmp_path / "arch" / "audit-000000000001-000000000025.ndjson.gz"
    assert row.path == str(path) and row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert row.created_by == "cli:tester" and not list((tmp_path / "arch").glob("*.part"))
    with chain.sessions() as s:
        cp = s.get(AuditCheckpoint, row.checkpoint_id)
        assert (cp.seq, cp.head_hash, cp.reason) == (25, hash25, "archive")
    assert _live(chain.sessions) == list(range(26, N + 1))

    report = verify_chain(chain.sessions, public_key=key.public_key)
    assert report.ok and report.count == N - 25 and report.first_seq == 26 and report.signed_through == N, report
    with gzip.open(path, "rt", encoding="utf-8") as f:
        offline = verify_export(f, key.public_pem())
    assert offline.ok and offline.count == 25 and offline.signed_through == 25, offline
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line).get("sequence") for line in f][1:26] == list(range(1, 26))


def test_archives_chain_onto_each_other_and_appends_continue(chain, key, tmp_path):
    first = archive(chain.sessions, key, older_than=_time_of(11), directory=tmp_path / "arch", actor="a")
    second = archive(chain.sessions, key, older_than=_time_of(31), directory=tmp_path / "arch", actor="a")
    assert (first.last_seq, second.first_seq, second.last_seq) == (10, 11, 30)
    assert second.first_prev_hash == first.last_hash
    assert archive(chain.sessions, key, older_than=_time_of(31), directory=tmp_path / "arch", actor="a") is None

    everything = archive(chain.sessions, key, older_than=_time_of(N) + timedelta(days=1), directory=tmp_path / "arch",
                         actor="a")
    assert (everything.first_seq, everything.last_seq) == (31, N) and _live(chain.sessions) == []
    assert verify_chain(chain.sessions, public_key=key.public_key).ok

    SqlAuditSink(chain.sessions).append(make_event(N + 1))
    for from_seq in (1, 5, N + 1):
        report = verify_chain(chain.sessions, from_seq=from_seq, public_key=key.public_key)
        assert report.ok and report.count == 1, (from_seq, report)
    for archive_row in (first, second, everything):
        with gzip.open(archive_row.path, "rt") as f:
            assert verify_export(f, key.public_pem()).ok


def test_a_corrupted_archive_write_deletes_nothing(chain, key, tmp_path, monkeypatch):
    real_writer = archive_module.write_archive_file

    def dropping_writer(path, lines):
        """Failure injection: lose one event on its way to disk."""
        return real_writer(path, (line for line in lines if '"sequence":7,' not in line))

    monkeypatch.setattr(archive_module, "write_archive_file", dropping_writer)
    with pytest.raises(ArchiveError, match="does not verify"):
        archive(chain.sessions, key, older_than=_time_of(26), directory=tmp_path / "arch", actor="a")

    assert _live(chain.sessions) == list(range(1, N + 1)) and _archives(chain.sessions) == []
    assert [p.name for p in (tmp_path / "arch").iterdir()] == ["audit-000000000001-000000000025.ndjson.gz.rejected"]
    assert verify_chain(chain.sessions, public_key=key.public_key).ok


def test_a_failing_disk_deletes_nothing(chain, key, tmp_path, monkeypatch):
    def full_disk(path, lines):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive_module, "write_archive_file", full_disk)
    with pytest.raises(ArchiveError, match="could not write"):
        archive(chain.sessions, key, older_than=_time_of(26), directory=tmp_path / "arch", actor="a")
    assert _live(chain.sessions) == list(range(1, N + 1)) and _archives(chain.sessions) == []


def test_a_tampered_chain_is_never_archived(chain, key, tmp_path):
    with chain.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET body = replace(body, 'staff-42', 'staff-43') WHERE seq = 3"))
    with pytest.raises(ArchiveError, match="does not verify"):
        archive(chain.sessions, key, older_than=_time_of(26), directory=tmp_path / "arch", actor="a")
    assert len(_live(chain.sessions)) == N and not (tmp_path / "arch").exists()


def test_gaps_at_the_start_are_explained_only_by_an_archive(chain, key, tmp_path):
    row = archive(chain.sessions, key, older_than=_time_of(11), directory=tmp_path / "arch", actor="a")
    with chain.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 11"))
    report = verify_chain(chain.sessions, public_key=key.public_key)
    assert (report.first_bad_seq, report.problem, report.kind) == (11, "sequence gap", "deleted")

    with chain.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_archives"))
    report = verify_chain(chain.sessions, public_key=key.public_key)
    assert (report.first_bad_seq, report.problem, report.kind) == (1, "sequence gap", "deleted")
    assert row.last_seq == 10


def test_an_archive_record_pointing_elsewhere_is_caught_by_its_checkpoint(chain, key, tmp_path):
    archive(chain.sessions, key, older_than=_time_of(11), directory=tmp_path / "arch", actor="a")
    with chain.engine.begin() as conn:
        conn.execute(text("UPDATE audit_archives SET last_hash = :h"), {"h": "ab" * 32})
    report = verify_chain(chain.sessions, public_key=key.public_key)
    assert (report.ok, report.first_bad_seq, report.kind) == (False, 10, "rewritten")
    with chain.sessions() as s:
        assert s.execute(select(func.count()).select_from(AuditEventRow)).scalar_one() == N - 10
