"""Tamper-evident audit log: canonical JSON, a SHA-256 hash chain, the SQL sink and its verifier."""

from broker.audit.canonical import GENESIS_HASH, canonical_json, chain_hash
from broker.audit.sink import AuditSink, AuditWriteError, SqlAuditSink
from broker.audit.verify import VerifyReport, format_report, verify_chain

__all__ = [
    "GENESIS_HASH",
    "AuditSink",
    "AuditWriteError",
    "SqlAuditSink",
    "VerifyReport",
    "canonical_json",
    "chain_hash",
    "format_report",
    "verify_chain",
]
