"""Retention: move the oldest events into a signed, compressed NDJSON archive, never losing one.

Order of work, so that a crash or a bad write at any step loses nothing: verify the live
chain; sign a checkpoint at the run's last event; write the archive (gzip NDJSON, the export
format, including that checkpoint) to a temporary name, fsync it, rename it, fsync the
directory; read it back and verify it offline with the public key; only then, in one
transaction, record the AuditArchive row and delete exactly the archived events.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.checkpoint import AuditKey, sign_checkpoint
from broker.audit.export import ExportRange, checkpoint_line, export_range, ndjson_lines, verify_export
from broker.audit.verify import format_report, verify_chain
from broker.store.models import AuditArchive, AuditEventRow

__all__ = ["ArchiveError", "archive", "write_archive_file"]


class ArchiveError(Exception):
    """Archiving stopped before deleting anything; the live chain is as it was."""


def archive(sessions: sessionmaker[Session], key: AuditKey, *, older_than: datetime, directory: Path,
            actor: str, now: datetime | None = None, batch: int = 1000) -> AuditArchive | None:
    """Archive the oldest contiguous run of events with time < ``older_than``; None if there is none.

    Raises ArchiveError (having deleted nothing) when the live chain does not verify, the file
    cannot be written, or the written file does not verify.
    """
    now = now or datetime.now(UTC)
    report = verify_chain(sessions, public_key=key.public_key, batch=batch)
    if not report.ok:
        raise ArchiveError(f"the live chain does not verify, refusing to archive: {format_report(report)}")
    rng = export_range(sessions, until=older_than)
    if rng.empty:
        return None
    last_hash = _hash_at(sessions, rng.last_seq)
    with sessions.begin() as session:
        checkpoint = sign_checkpoint(session, key, seq=rng.last_seq, head_hash=last_hash, reason="archive", now=now)
    run = ExportRange(rng.first_seq, rng.last_seq, rng.first_prev_hash, (checkpoint_line(checkpoint),))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"audit-{run.first_seq:012d}-{run.last_seq:012d}.ndjson.gz"
    if path.exists():
        raise ArchiveError(f"{path.name} already exists; refusing to overwrite an archive")
    try:
        digest = write_archive_file(path, ndjson_lines(sessions, run, key=key, batch=batch))
    except OSError as err:
        raise ArchiveError(f"could not write the archive ({type(err).__name__})") from err
    _verify_file(path, key, run)
    with sessions.begin() as session:
        row = AuditArchive(first_seq=run.first_seq, last_seq=run.last_seq, first_prev_hash=run.first_prev_hash,
                           last_hash=last_hash, path=str(path), sha256=digest, checkpoint_id=checkpoint.id,
                           created_at=now, created_by=actor)
        session.add(row)
        session.flush()
        deleted = session.execute(delete(AuditEventRow).where(AuditEventRow.seq >= run.first_seq,
                                                              AuditEventRow.seq <= run.last_seq)).rowcount
        expected = run.last_seq - run.first_seq + 1
        if deleted != expected:  # raising rolls back the row and the delete together
            raise ArchiveError(f"expected to delete {expected} events, found {deleted}; nothing deleted")
    return row


def write_archive_file(path: Path, lines: Iterable[str]) -> str:
    """Write gzip NDJSON durably (temp name, fsync, rename, fsync dir); return the sha256 of the file."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                for line in lines:
                    gz.write(line.encode("utf-8"))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return _sha256(path)


def _verify_file(path: Path, key: AuditKey, run: ExportRange) -> None:
    """Read back what is on disk and prove it holds exactly the run, signed, before anything goes."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            report = verify_export(f, key.public_pem())
    except (OSError, EOFError, UnicodeDecodeError) as err:
        _reject(path, f"the archive cannot be read back ({type(err).__name__})")
        return
    expected = run.last_seq - run.first_seq + 1
    if not report.ok:
        _reject(path, f"the archive does not verify: {format_report(report)}")
    if report.first_seq != run.first_seq or report.count != expected or report.signed_through != run.last_seq:
        _reject(path, "the archive does not hold exactly the run it was written for")


def _reject(path: Path, message: str) -> None:
    """Keep the bad file for inspection under another name, so it is never mistaken for an archive."""
    try:
        os.replace(path, path.with_name(path.name + ".rejected"))
    except OSError:
        pass
    raise ArchiveError(message + "; nothing was deleted")


def _hash_at(sessions: sessionmaker[Session], seq: int) -> str:
    with sessions() as session:
        value = session.execute(select(AuditEventRow.hash).where(AuditEventRow.seq == seq)).scalar_one()
        session.rollback()
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """The rename is durable only once the directory entry is."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

