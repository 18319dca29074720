"""Streaming audit exports (NDJSON, CSV, FHIR R4 AuditEvent) and the offline NDJSON verifier.

Every exporter reads the chain in keyset-paginated batches, each in its own short session,
so memory stays flat however many events there are and appends are never held up. The
range is fixed when the export starts (up to the head at that moment).

NDJSON layout, one JSON object per line::

    {"type": "mdt-broker-audit-export", "version": 1, "first_seq", "last_seq", "first_prev_hash",
     "checkpoint_key": PEM | null, "checkpoint_seqs": [...]}
    <the canonical body of each event, byte for byte as it was hashed>
    {"type": "checkpoint", "seq", "head_hash", "time", "key_id", "signature", "reason"}   (0..n)
    {"type": "mdt-broker-audit-export-end", "count", "last_seq", "last_hash"}

The header announces which sequences the checkpoints sign, so the one-pass verifier keeps
only those hashes; the end line makes a cut-off file evident even without a checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import GENESIS_HASH, canonical_json, chain_hash, format_time
from broker.audit.checkpoint import AuditKey, load_public_key, public_keys_by_id, verify_checkpoint_signature
from broker.audit import verify as v
from broker.audit.verify import VerifyReport
from broker.store.db import as_utc
from broker.store.models import AuditCheckpoint, AuditEventRow

__all__ = ["CSV_COLUMNS", "EXPORT_END", "EXPORT_TYPE", "ExportRange", "export_csv", "export_fhir", "export_ndjson",
           "export_range", "fhir_audit_event", "ndjson_lines", "verify_export"]

EXPORT_TYPE = "mdt-broker-audit-export"
EXPORT_END = "mdt-broker-audit-export-end"
CHECKPOINT_TYPE = "checkpoint"
CSV_COLUMNS = ("seq", "time", "request_id", "action", "outcome", "actor_sub", "actor_agency", "actor_role",
               "client_id", "youth_id", "mdt_id", "purpose", "grounds_used", "consent_ids", "court_order_ids",
               "break_glass", "categories_released", "categories_withheld", "policy_version", "hash")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_LOOKAHEAD = 10_000

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
LOCAL_PURPOSE = "https://mdt-broker.example.org/CodeSystem/purpose-of-use"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
BROKER_ROLE = "https://mdt-broker.example.org/CodeSystem/role"
BROKER_CATEGORY = "https://mdt-broker.example.org/CodeSystem/data-category"
BROKER_ENTITY_ROLE = "https://mdt-broker.example.org/CodeSystem/audit-entity-role"
YOUTH_SYSTEM = "urn:mdt-broker:youth"
CLIENT_SYSTEM = "urn:mdt-broker:client"
STAFF_SYSTEM = "urn:mdt-broker:staff"
BROKER_NAME = "mdt-broker"
_V3_PURPOSES = frozenset({"TREAT", "ETREAT", "COC", "CAREMGT", "PUBHLTH", "THREAT", "HLEGAL", "HPAYMT", "HOPERAT",
                          "HRESCH", "PATRQT", "HSYSADMIN", "HMARKT", "HDIRECT"})


@dataclass(frozen=True, slots=True)
class ExportRange:
    """The contiguous run of events one export covers, fixed when it starts."""

    first_seq: int
    last_seq: int
    first_prev_hash: str | None
    checkpoints: tuple[dict[str, Any], ...]

    @property
    def empty(self) -> bool:
        return self.last_seq < self.first_seq


# ---- reading ---------------------------------------------------------------------------------


def export_range(sessions: sessionmaker[Session], *, since_seq: int = 1, until: datetime | None = None,
                 last_seq: int | None = None) -> ExportRange:
    """Fix the run: from the first event at or after ``since_seq`` up to the head, stopping before
    the first event at or after ``until`` (so the run stays contiguous and verifiable), or at ``last_seq``."""
    if since_seq < 1:
        raise ValueError("since_seq must be positive")
    with sessions() as session:
        newest = session.execute(select(func.max(AuditEventRow.seq))).scalar_one()
        first = session.execute(select(AuditEventRow.seq, AuditEventRow.prev_hash).where(AuditEventRow.seq >= since_seq)
                                .order_by(AuditEventRow.seq).limit(1)).one_or_none()
        if first is None:
            session.rollback()
            return ExportRange(since_seq, since_seq - 1, None, ())
        last = newest if last_seq is None else min(last_seq, newest)
        if until is not None:
            stop = session.execute(select(func.min(AuditEventRow.seq)).where(
                AuditEventRow.seq >= first.seq, AuditEventRow.time >= until)).scalar_one_or_none()
            if stop is not None:
                last = min(last, stop - 1)
        checkpoints = _covering_checkpoints(session, first.seq, last) if last >= first.seq else ()
        session.rollback()
    prev = GENESIS_HASH if first.seq == 1 else first.prev_hash
    return ExportRange(first.seq, last, prev, checkpoints)


def _covering_checkpoints(session: Session, first: int, last: int) -> tuple[dict[str, Any], ...]:
    """The latest checkpoint inside the run for each key that signed one (several after a rotation)."""
    out = []
    latest = (select(AuditCheckpoint.key_id, func.max(AuditCheckpoint.id).label("id"))
              .where(AuditCheckpoint.seq >= first, AuditCheckpoint.seq <= last)
              .group_by(AuditCheckpoint.key_id).subquery())
    for cp in session.scalars(select(AuditCheckpoint).join(latest, AuditCheckpoint.id == latest.c.id)
                              .order_by(AuditCheckpoint.seq, AuditCheckpoint.id)):
        out.append(checkpoint_line(cp))
    return tuple(out)


def checkpoint_line(cp: AuditCheckpoint) -> dict[str, Any]:
    """A checkpoint as it appears in exports."""
    return {"type": CHECKPOINT_TYPE, "seq": int(cp.seq), "head_hash": cp.head_hash,
            "time": format_time(as_utc(cp.time)), "key_id": cp.key_id, "signature": cp.signature, "reason": cp.reason}


def _rows(sessions: sessionmaker[Session], rng: ExportRange, batch: int) -> Iterator[Any]:
    """Rows of the run by keyset pagination; one short session per batch keeps memory flat."""
    cursor = rng.first_seq - 1
    while cursor < rng.last_seq:
        with sessions() as session:
            rows = list(session.execute(
                select(AuditEventRow.seq, AuditEventRow.body, AuditEventRow.prev_hash, AuditEventRow.hash)
                .where(AuditEventRow.seq > cursor, AuditEventRow.seq <= rng.last_seq)
                .order_by(AuditEventRow.seq).limit(batch)))
            session.rollback()
        if not rows:
            return
        yield from rows
        cursor = rows[-1].seq


# ---- NDJSON ----------------------------------------------------------------------------------


def _line(obj: Any) -> str:
    return canonical_json(obj).decode("utf-8") + "\n"


def export_ndjson(sessions: sessionmaker[Session], *, since_seq: int = 1, until: datetime | None = None,
                  key: AuditKey | None = None, batch: int = 1000) -> Iterator[str]:
    """The canonical events as newline-terminated lines, framed for offline verification."""
    yield from ndjson_lines(sessions, export_range(sessions, since_seq=since_seq, until=until), key=key, batch=batch)


def ndjson_lines(sessions: sessionmaker[Session], rng: ExportRange, *, key: AuditKey | None = None,
                 batch: int = 1000) -> Iterator[str]:
    """Lines for a fixed run (the archive uses this with its own run and checkpoint)."""
    yield _line({"type": EXPORT_TYPE, "version": 1, "first_seq": rng.first_seq, "last_seq": rng.last_seq,
                 "first_prev_hash": rng.first_prev_hash, "checkpoint_key": key.public_pem() if key else None,
                 "checkpoint_seqs": sorted({cp["seq"] for cp in rng.checkpoints})})
    count, last_hash = 0, rng.first_prev_hash
    for row in _rows(sessions, rng, batch):
        count, last_hash = count + 1, row.hash
        yield row.body + "\n"
    for cp in rng.checkpoints:
        yield _line(cp)
    yield _line({"type": EXPORT_END, "count": count, "last_seq": rng.last_seq if count else None,
                 "last_hash": last_hash})


# ---- CSV -------------------------------------------------------------------------------------


def export_csv(sessions: sessionmaker[Session], *, since_seq: int = 1, until: datetime | None = None,
               batch: int = 1000) -> Iterator[str]:
    """Flat rows for spreadsheets: lists joined with ';', cells that a spreadsheet would run as a
    formula are prefixed with a quote."""
    rng = export_range(sessions, since_seq=since_seq, until=until)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield _drain(buffer)
    for row in _rows(sessions, rng, batch):
        body = v._parse(row.body) or {}
        writer.writerow([_safe_cell(value) for value in csv_record(body, row.hash)])
        yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _safe_cell(value: Any) -> Any:
    """OWASP CSV injection: text that starts like a formula is made inert with a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_record(body: dict[str, Any], digest: str) -> list[Any]:
    """One event as CSV_COLUMNS values."""
    actor = body.get("actor") if isinstance(body.get("actor"), dict) else {}
    grounds = body.get("grounds") if isinstance(body.get("grounds"), dict) else {}
    return [body.get("sequence"), body.get("time"), body.get("request_id"), body.get("action"), body.get("outcome"),
            actor.get("sub"), actor.get("agency"), actor.get("role"), body.get("client_id"), body.get("youth_id"),
            body.get("mdt_id"), body.get("purpose"), _joined(grounds.get("used")), _joined(grounds.get("consent_ids")),
            _joined(_court_orders(grounds)), "true" if _break_glass(body) else "false",
            _joined(_categories(body, "released")), _joined(_categories(body, "withheld")),
            body.get("policy_version"), digest]


def _joined(values: Any) -> str:
    if not values:
        return ""
    return ";".join(str(x) for x in (values if isinstance(values, list) else [values]))


def _court_orders(grounds: dict[str, Any]) -> list[Any]:
    orders = list(grounds.get("court_order_ids") or [])
    if grounds.get("court_order_id"):
        orders.append(grounds["court_order_id"])
    return orders


def _break_glass(body: dict[str, Any]) -> bool:
    grounds = body.get("grounds") if isinstance(body.get("grounds"), dict) else {}
    return bool(body.get("break_glass") or grounds.get("break_glass_id"))


def _categories(body: dict[str, Any], which: str) -> list[str]:
    """Pipeline events nest them under ``categories``; older shapes keep ``categories_<which>``."""
    nested = body.get("categories")
    values = nested.get(which) if isinstance(nested, dict) else body.get(f"categories_{which}")
    return sorted(str(x) for x in values or [])


# ---- FHIR AuditEvent (IHE BALP) ----------------------------------------------------------------


def export_fhir(sessions: sessionmaker[Session], *, since_seq: int = 1, until: datetime | None = None,
                batch: int = 1000) -> Iterator[str]:
    """FHIR R4 AuditEvent resources as NDJSON (application/fhir+ndjson), one per event."""
    rng = export_range(sessions, since_seq=since_seq, until=until)
    for row in _rows(sessions, rng, batch):
        body = v._parse(row.body) or {"sequence": row.seq}
        yield json.dumps(fhir_audit_event(body), separators=(",", ":"), ensure_ascii=False) + "\n"


def fhir_audit_event(body: dict[str, Any]) -> dict[str, Any]:
    """One event as an R4 AuditEvent shaped after the IHE Basic Audit Log Patterns."""
    seq = body.get("sequence")
    event_type, subtype, action = _event_type(body)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"mdt-broker-audit-{seq}",
        "type": event_type,
        "subtype": [subtype],
        "action": action,
        "recorded": body.get("time"),
        "outcome": _outcome(body.get("outcome")),
        "outcomeDesc": f"HTTP {body.get('outcome')}",
        "agent": _agents(body),
        "source": {"observer": {"display": BROKER_NAME},
                   "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]},
    }
    purpose = body.get("purpose")
    if purpose:
        system = ACT_REASON if purpose in _V3_PURPOSES else LOCAL_PURPOSE
        resource["purposeOfEvent"] = [{"coding": [{"system": system, "code": str(purpose)}]}]
    entities = _entities(body)
    if entities:
        resource["entity"] = entities
    return resource


def _event_type(body: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], str]:
    """BALP: RESTful reads/searches are type rest; other queries DICOM Query; exports DICOM Export."""
    action = str(body.get("action") or "")
    method = str(body.get("method") or "GET").upper()
    rest = {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
    if action.endswith(".export"):
        return {"system": DCM, "code": "110106", "display": "Export"}, _interaction("search-type"), "R"
    if action.endswith(".read") and action.startswith("fhir."):
        return rest, _interaction("read"), "R"
    if method == "POST":
        return rest, _interaction("create"), "C"
    if method in ("PUT", "PATCH"):
        return rest, _interaction("update"), "U"
    if method == "DELETE":
        return rest, _interaction("delete"), "D"
    if action.startswith("fhir."):
        return rest, _interaction("search-type"), "E"
    return {"system": DCM, "code": "110112", "display": "Query"}, _interaction("search-type"), "E"


def _interaction(code: str) -> dict[str, str]:
    return {"system": RESTFUL, "code": code}


def _outcome(status: Any) -> str:
    """FHIR audit-event-outcome: 0 success, 4 minor (refused/bad request), 8 serious (unavailable), 12 major."""
    if not isinstance(status, int) or status >= 600:
        return "12"
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "12" if status == 500 else "8"


def _agents(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The agency system (application), the staff member (human requestor) and the broker itself."""
    agents: list[dict[str, Any]] = []
    client = body.get("client_id")
    if client:
        agents.append({"type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                       "who": {"identifier": {"system": CLIENT_SYSTEM, "value": str(client)}},
                       "requestor": False})
    actor = body.get("actor") if isinstance(body.get("actor"), dict) else {}
    if actor.get("sub"):
        human: dict[str, Any] = {
            "type": {"coding": [{"system": PARTICIPATION, "code": "IRCP", "display": "information recipient"}]},
            "who": {"identifier": {"system": STAFF_SYSTEM, "value": str(actor["sub"])}},
            "requestor": True}
        if actor.get("agency"):
            human["who"]["display"] = f"{actor['sub']} ({actor['agency']})"
        if actor.get("role"):
            human["role"] = [{"coding": [{"system": BROKER_ROLE, "code": str(actor["role"])}]}]
        if body.get("purpose"):
            system = ACT_REASON if body["purpose"] in _V3_PURPOSES else LOCAL_PURPOSE
            human["purposeOfUse"] = [{"coding": [{"system": system, "code": str(body["purpose"])}]}]
        agents.append(human)
    agents.append({"type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
                   "who": {"display": BROKER_NAME}, "requestor": False})
    return agents


def _entities(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The youth (pseudonymous id, role Patient) and, per the BALP consent pattern, each consent relied on."""
    released = _categories(body, "released")
    withheld = _categories(body, "withheld")
    labels = [{"system": BROKER_CATEGORY, "code": c} for c in released]
    entities: list[dict[str, Any]] = []
    youth = body.get("youth_id")
    if youth:
        patient: dict[str, Any] = {
            "what": {"identifier": {"system": YOUTH_SYSTEM, "value": str(youth)}},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}}
        if labels:
            patient["securityLabel"] = labels
        if withheld:
            patient["detail"] = [{"type": "categories-withheld", "valueString": ";".join(withheld)}]
        entities.append(patient)
    grounds = body.get("grounds") if isinstance(body.get("grounds"), dict) else {}
    consent_categories = sorted({d.get("category") for d in body.get("decisions") or []
                                 if isinstance(d, dict) and str(d.get("ground") or "").startswith("consent")
                                 and d.get("effect") == "allow" and d.get("category")} & set(released)) or released
    for consent_id in grounds.get("consent_ids") or []:
        entity: dict[str, Any] = {
            "what": {"reference": f"Consent/{consent_id}"},
            "type": {"system": RESOURCE_TYPES, "code": "Consent"},
            "role": {"system": BROKER_ENTITY_ROLE, "code": "consent", "display": "consent relied on"}}
        if consent_categories:
            entity["securityLabel"] = [{"system": BROKER_CATEGORY, "code": c} for c in consent_categories]
        entities.append(entity)
    return entities


# ---- offline verification --------------------------------------------------------------------


def verify_export(lines: Iterable[str | bytes], public_key_pem: str | bytes | None) -> VerifyReport:
    """Verify an NDJSON export in one pass: chain hashes from first_prev_hash, continuity, the end
    line, and (with the public key) every checkpoint signature; at least one must cover the export."""
    keys = public_keys_by_id(load_public_key(public_key_pem)) if public_key_pem else {}
    it = iter(lines)
    state = _ExportWalk()
    try:
        header = _header(it)
        state.start = state.expected_seq = int(header["first_seq"])
        state.prev = header.get("first_prev_hash")
        state.watch = {int(s) for s in header.get("checkpoint_seqs") or []}
        trailer = _walk_events(it, state)
        _walk_trailer(it, trailer, state, keys)
    except v._Broken as broken:
        before = min(state.count, max(broken.seq - state.start, 0))
        return VerifyReport(ok=False, count=before, first_bad_seq=broken.seq, problem=broken.problem,
                            kind=broken.kind, detail=broken.detail, checkpoints=state.checkpoints,
                            signed_through=state.signed_through, first_seq=state.start)
    return VerifyReport(ok=True, count=state.count, checkpoints=state.checkpoints,
                        signed_through=state.signed_through, first_seq=state.start)


NOT_AN_EXPORT = "not an mdt-broker audit export"
DUPLICATE = "sequence duplicated or out of order"
EXPORT_CUT = "export ends early"


@dataclass
class _ExportWalk:
    start: int = 0
    expected_seq: int = 0
    prev: str | None = None
    prev_prev: str | None = None
    count: int = 0
    checkpoints: int = 0
    signed_through: int | None = None
    watch: set[int] | None = None
    seen: dict[int, str] | None = None


def _text(line: str | bytes) -> str:
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    return text.rstrip("\r\n")


def _header(it: Iterator[str | bytes]) -> dict[str, Any]:
    for line in it:
        obj = v._parse(_text(line))
        if obj is None or obj.get("type") != EXPORT_TYPE or not isinstance(obj.get("first_seq"), int):
            break
        prev = obj.get("first_prev_hash")
        if prev is not None and not isinstance(prev, str):
            break
        return obj
    raise v._Broken(0, NOT_AN_EXPORT, None, "the first line is not an export header")


def _walk_events(it: Iterator[str | bytes], st: _ExportWalk) -> dict[str, Any] | None:
    """Events up to the first non-event line, which is returned."""
    st.seen = {}
    for line in it:
        text = _text(line)
        body = v._parse(text)
        if body is None:
            raise v._Broken(st.expected_seq, v.BODY_UNREADABLE, v.EDITED, "a line is not a JSON object")
        if "sequence" not in body:
            return body
        seq = body.get("sequence")
        if not isinstance(seq, int) or seq < st.expected_seq:
            raise v._Broken(seq if isinstance(seq, int) else st.expected_seq, DUPLICATE, v.INSERTED,
                            f"a second event claims sequence {seq}")
        if seq > st.expected_seq:
            kind = v.REORDERED if _appears_later(it, st.expected_seq) else v.DELETED
            raise v._Broken(st.expected_seq, v.SEQUENCE_GAP, kind, f"event {st.expected_seq} is not where it belongs")
        if st.prev is not None and body.get("previous_hash") != st.prev:
            if st.prev_prev is not None and body.get("previous_hash") == st.prev_prev:
                kind, detail = v.INSERTED, f"event {seq} links to {seq - 2}: event {seq - 1} was inserted"
            else:
                kind, detail = v.EDITED, f"event {seq - 1} was altered after it was chained"
            raise v._Broken(seq, v.PREVIOUS_HASH_MISMATCH, kind, detail)
        anchor = st.prev if st.prev is not None else body.get("previous_hash")
        if not isinstance(anchor, str):
            raise v._Broken(seq, NOT_AN_EXPORT, None, "the header names no previous hash to start from")
        digest = chain_hash(anchor, text.encode("utf-8"))
        st.prev_prev, st.prev = st.prev, digest
        st.count += 1
        st.expected_seq = seq + 1
        if st.watch and seq in st.watch:
            st.seen[seq] = digest
    return None


def _appears_later(it: Iterator[str | bytes], seq: int) -> bool:
    """After a gap, look a bounded way ahead: the missing event further on means a reorder."""
    for _, line in zip(range(_LOOKAHEAD), it):
        body = v._parse(_text(line))
        if body is not None and body.get("sequence") == seq:
            return True
    return False


def _walk_trailer(it: Iterator[str | bytes], first: dict[str, Any] | None, st: _ExportWalk,
                  keys: dict[str, Any]) -> None:
    """Checkpoint lines, then the end line; nothing may follow."""
    last_seq = st.expected_seq - 1
    line_obj = first
    while line_obj is not None and line_obj.get("type") == CHECKPOINT_TYPE:
        _check_export_checkpoint(line_obj, st, keys, last_seq)
        line_obj = _next_obj(it)
    if line_obj is None or line_obj.get("type") != EXPORT_END:
        raise v._Broken(last_seq + 1, EXPORT_CUT, v.TRUNCATED, "the export has no end line")
    if line_obj.get("count") != st.count or (st.count and (line_obj.get("last_seq") != last_seq
                                                            or line_obj.get("last_hash") != st.prev)):
        raise v._Broken(last_seq + 1, EXPORT_CUT, v.TRUNCATED, "the end line names events the export lacks")
    if _next_obj(it) is not None:
        raise v._Broken(last_seq + 1, NOT_AN_EXPORT, v.INSERTED, "lines follow the end line")
    if keys and st.count and st.signed_through is None:
        raise v._Broken(last_seq, "no signed checkpoint covers the export", v.UNSIGNED,
                        "without a checkpoint signed by the given key the export proves nothing")


def _next_obj(it: Iterator[str | bytes]) -> dict[str, Any] | None:
    for line in it:
        text = _text(line)
        if not text:
            continue
        obj = v._parse(text)
        if obj is None:
            raise v._Broken(0, NOT_AN_EXPORT, v.EDITED, "a trailing line is not a JSON object")
        return obj
    return None


def _check_export_checkpoint(cp: dict[str, Any], st: _ExportWalk, keys: dict[str, Any], last_seq: int) -> None:
    seq = cp.get("seq")
    if not isinstance(seq, int):
        raise v._Broken(last_seq, v.CHECKPOINT_MISMATCH, v.REWRITTEN, "a checkpoint line has no sequence")
    st.checkpoints += 1
    if keys:
        key = keys.get(cp.get("key_id"))
        if key is None:
            raise v._Broken(seq, v.CHECKPOINT_UNKNOWN_KEY, v.UNSIGNED,
                            f"checkpoint key {cp.get('key_id')} is not trusted")
        if not verify_checkpoint_signature(cp, key):
            raise v._Broken(seq, v.CHECKPOINT_BAD_SIGNATURE, v.REWRITTEN, "a checkpoint was altered or forged")
    assert st.seen is not None
    digest = st.seen.get(seq, st.prev if seq == last_seq else None)
    if digest is None:
        raise v._Broken(seq, v.CHECKPOINT_PAST_END if seq > last_seq else v.CHECKPOINT_MISMATCH,
                        v.TRUNCATED if seq > last_seq else v.REWRITTEN,
                        "the checkpoint signs a sequence the export does not hold or did not announce")
    if cp.get("head_hash") != digest:
        raise v._Broken(seq, v.CHECKPOINT_MISMATCH, v.REWRITTEN,
                        "the checkpoint signed another hash: the events up to it were rewritten")
    if keys:
        st.signed_through = max(st.signed_through or 0, seq)
