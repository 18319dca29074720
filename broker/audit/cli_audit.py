"""`broker audit export|archive|checkpoint` and the offline `broker audit verify --export FILE`.

Settings come from BROKER_* variables (``broker.settings.Settings``), exactly as for
`broker serve`; only ``verify --export`` works without them, because an auditor verifies
an export on their own machine with nothing but the file and the public key.
"""

from __future__ import annotations

import argparse
import getpass
import gzip
import sys
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["add_parsers", "add_verify_arguments", "cmd_archive", "cmd_checkpoint", "cmd_export", "run_verify",
           "run_verify_export"]

FORMATS = ("ndjson", "csv", "fhir")


def add_parsers(audit_subparsers: Any) -> None:
    """Add export, archive and checkpoint under `broker audit`."""
    export = audit_subparsers.add_parser("export", help="export the audit log (NDJSON, CSV or FHIR AuditEvent)")
    export.add_argument("--format", choices=FORMATS, default="ndjson")
    export.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    export.add_argument("--since-seq", type=int, default=1)
    export.add_argument("--database-url", default=None)
    export.set_defaults(func=cmd_export)

    arch = audit_subparsers.add_parser("archive", help="move events past the retention window to a signed archive")
    arch.add_argument("--older-than-days", type=int, default=None,
                      help="default: BROKER_AUDIT_RETENTION_DAYS")
    arch.add_argument("--dir", type=Path, default=None, help="default: BROKER_AUDIT_ARCHIVE_DIR")
    arch.add_argument("--actor", default=None, help="recorded as created_by (default: cli:<login name>)")
    arch.set_defaults(func=cmd_archive)

    cp = audit_subparsers.add_parser("checkpoint", help="sign a checkpoint of the chain head now")
    cp.set_defaults(func=cmd_checkpoint)


def add_verify_arguments(verify_parser: argparse.ArgumentParser) -> None:
    """The offline options to merge into the existing `broker audit verify` parser."""
    verify_parser.add_argument("--export", type=Path, default=None,
                               help="verify an NDJSON export (or .gz archive) offline instead of the database")
    verify_parser.add_argument("--public-key", type=Path, default=None,
                               help="checkpoint public key PEM (GET /audit/checkpoint-key); needed to check signatures")


def run_verify_export(args: argparse.Namespace) -> int:
    """Offline verification of ``args.export`` with ``args.public_key``; exit 0 ok, 1 broken, 2 unusable input."""
    from broker.audit.checkpoint import AuditKeyError
    from broker.audit.export import verify_export
    from broker.audit.verify import format_report

    pem = None
    if getattr(args, "public_key", None) is not None:
        try:
            pem = Path(args.public_key).read_bytes()
        except OSError as err:
            print(f"cannot read the public key ({type(err).__name__})", file=sys.stderr)
            return 2
    else:
        print("warning: no --public-key: checkpoint signatures are not checked, so a consistent rewrite "
              "would pass", file=sys.stderr)
    try:
        with _open_text(Path(args.export)) as lines:
            report = verify_export(lines, pem)
    except AuditKeyError as err:
        print(f"unusable public key: {err}", file=sys.stderr)
        return 2
    except (OSError, EOFError, UnicodeDecodeError) as err:
        print(f"cannot read the export ({type(err).__name__})", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


def run_verify(args: argparse.Namespace) -> int:
    """`broker audit verify`: offline with --export, else the database, checking signatures with the configured key."""
    if getattr(args, "export", None) is not None:
        return run_verify_export(args)
    from broker.audit.verify import format_report, verify_chain

    settings = _settings()
    key = _audit_key(settings, required=False)
    with _sessions(getattr(args, "database_url", None) or settings.database_url) as sessions:
        report = verify_chain(sessions, from_seq=getattr(args, "from_seq", 1),
                              public_key=key.public_key if key else None)
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Stream an export to --out or stdout; memory stays flat however long the log is."""
    from broker.audit.export import export_csv, export_fhir, export_ndjson

    settings = _settings() if args.database_url is None else None
    url = args.database_url or settings.database_url
    key = _audit_key(settings, required=False) if settings is not None else None
    with _sessions(url) as sessions:
        if args.format == "ndjson":
            lines = export_ndjson(sessions, since_seq=args.since_seq, key=key)
        elif args.format == "csv":
            lines = export_csv(sessions, since_seq=args.since_seq)
        else:
            lines = export_fhir(sessions, since_seq=args.since_seq)
        with _open_out(args.out, newline="" if args.format == "csv" else None) as out:
            for line in lines:
                out.write(line)
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Archive events older than the retention window; exit 1 (nothing deleted) if anything fails."""
    from broker.audit.archive import ArchiveError, archive

    settings = _settings()
    key = _audit_key(settings, required=True)
    directory = args.dir or settings.audit_archive_dir
    if directory is None:
        print("no archive directory: pass --dir or set BROKER_AUDIT_ARCHIVE_DIR", file=sys.stderr)
        return 2
    days = args.older_than_days if args.older_than_days is not None else settings.audit_retention_days
    if days < 1:
        print("--older-than-days must be positive", file=sys.stderr)
        return 2
    cutoff = datetime.now(UTC) - timedelta(days=days)
    actor = args.actor or f"cli:{getpass.getuser()}"
    with _sessions(settings.database_url) as sessions:
        try:
            row = archive(sessions, key, older_than=cutoff, directory=Path(directory), actor=actor)
        except ArchiveError as err:
            print(f"archive failed: {err}", file=sys.stderr)
            return 1
    if row is None:
        print(f"nothing to archive: no event is older than {days} days")
    else:
        print(f"archived events {row.first_seq}..{row.last_seq} to {row.path} (sha256 {row.sha256})")
    return 0


def cmd_checkpoint(_args: argparse.Namespace) -> int:
    """Sign the current head now (reason "manual")."""
    from broker.audit.checkpoint import write_checkpoint

    settings = _settings()
    key = _audit_key(settings, required=True)
    with _sessions(settings.database_url) as sessions:
        cp = write_checkpoint(sessions, key, reason="manual")
    if cp is None:
        print("the chain is empty: nothing to sign")
    else:
        print(f"checkpoint {cp.id}: sequence {cp.seq}, head {cp.head_hash}, key {cp.key_id}")
    return 0


def _settings():  # type: ignore[no-untyped-def]
    from broker.cli import _settings_from_env

    return _settings_from_env()


def _audit_key(settings: Any, *, required: bool):  # type: ignore[no-untyped-def]
    """The configured checkpoint key; exits 2 when it is required and missing or unusable."""
    from broker.audit.checkpoint import AuditKeyError, load_audit_key

    path = getattr(settings, "audit_key_file", None)
    if path is None:
        if required:
            print("no audit key: set BROKER_AUDIT_KEY_FILE", file=sys.stderr)
            raise SystemExit(2)
        return None
    try:
        return load_audit_key(path)
    except (OSError, AuditKeyError) as err:
        print(f"unusable audit key ({type(err).__name__})", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def _sessions(url: str) -> Iterator[Any]:
    from broker.store.db import make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    """Exports as written by `export` or `archive` (gzip when the name ends in .gz)."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield f
    else:
        with open(path, encoding="utf-8", newline="") as f:
            yield f


@contextmanager
def _open_out(path: Path | None, *, newline: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8", newline=newline if newline is not None else "\n") as f:
        yield f
