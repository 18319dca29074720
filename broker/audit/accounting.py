"""Accounting of disclosures: who received which categories of a youth's records, when, why, on what ground.

Built only from the audit log, so it lists exactly what was released: a data request
(``fhir.search``/``fhir.read``) answered 200 that released at least one item. Requests that
were denied, or released nothing because everything was withheld, are not disclosures and
never appear — the accounting must not reveal that a withheld record exists.

Two lists (shared/LEGAL.md "Audit, accounting, retention"):
- HIPAA 45 CFR 164.528: every disclosure in the past 6 years.
- 42 CFR 2.24: Part 2 (``sud-part2``) disclosures made under a consent's general designation
  (a consent naming an agency or a team role rather than a person) in the past 3 years.

Functions are synchronous (run them in a worker thread) and only read.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.domain import Principal
from broker.registry.service import active_membership
from broker.store.models import AuditEventRow, ConsentRow, Mdt

DATA_ACTIONS = ("fhir.search", "fhir.read")
PART2 = "sud-part2"
HIPAA_YEARS, PART2_YEARS = 6, 3
WINDOWS = {"hipaa": (HIPAA_YEARS, False), "part2": (PART2_YEARS, True)}
WINDOW_TITLES = {"hipaa": "HIPAA accounting of disclosures (45 CFR 164.528), past 6 years",
                 "part2": "Part 2 list of disclosures under a general designation (42 CFR 2.24), past 3 years"}
AUDITOR_ROLES = frozenset({"auditor", "privacy-officer"})
REPRESENTATIVE_ROLES = frozenset({"dependency-attorney", "child-welfare-worker"})
"""The youth's representatives: may ask for the youth's accounting while active on the youth's team."""
BATCH = 500


@dataclass(frozen=True, slots=True)
class Recipient:
    """The person who received the records, in the role and agency they acted in, through which system."""

    sub: str | None
    role: str | None
    agency: str | None
    client_id: str | None


@dataclass(frozen=True, slots=True)
class Release:
    """One released category and the ground and policy citation it was released under."""

    category: str
    ground: str | None
    citation: str | None


@dataclass(frozen=True, slots=True)
class Disclosure:
    """One disclosure as the accounting lists it; identifiers and categories, never record content."""

    sequence: int
    request_id: str
    time: datetime
    mdt_id: str | None
    recipient: Recipient
    categories: tuple[str, ...]
    purpose: str | None
    grounds: tuple[str, ...]
    consent_ids: tuple[str, ...]
    court_order_ids: tuple[str, ...]
    break_glass_id: str | None
    releases: tuple[Release, ...]

    @property
    def citations(self) -> tuple[str, ...]:
        """The distinct policy citations the released categories were allowed under."""
        return tuple(dict.fromkeys(r.citation for r in self.releases if r.citation))

    def as_json(self) -> dict[str, Any]:
        """Plain JSON for the API."""
        out = asdict(self)
        out["time"] = self.time.astimezone(UTC).isoformat().replace("+00:00", "Z")
        out["citations"] = list(self.citations)
        return out


def window_start(now: datetime, years: int) -> datetime:
    """The same calendar instant ``years`` earlier (29 February falls back to the 28th)."""
    try:
        return now.replace(year=now.year - years)
    except ValueError:
        return now.replace(year=now.year - years, day=28)


def accounting(sessions: sessionmaker[Session], *, youth_id: str, now: datetime, years: int | None = None,
               part2_only: bool = False) -> list[Disclosure]:
    """The youth's disclosures from ``years`` before ``now`` (default 6, or 3 for the Part 2 list) to ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    years = years if years is not None else (PART2_YEARS if part2_only else HIPAA_YEARS)
    start = window_start(now, years)
    out = []
    general: dict[str, bool] = {}
    for seq, event in _events(sessions, youth_id=youth_id, start=start, end=now):
        disclosure = to_disclosure(seq, event)
        if disclosure is None:
            continue
        if part2_only and not _part2_general(sessions, disclosure, general):
            continue
        out.append(disclosure)
    return out


def _events(sessions: sessionmaker[Session], *, youth_id: str, start: datetime,
            end: datetime) -> Iterator[tuple[int, dict[str, Any]]]:
    """Successful data requests about the youth in the window, by sequence, one batch per read."""
    after = 0
    while True:
        q = (select(AuditEventRow.seq, AuditEventRow.body)
             .where(AuditEventRow.youth_id == youth_id, AuditEventRow.action.in_(DATA_ACTIONS),
                    AuditEventRow.outcome == 200, AuditEventRow.time >= start, AuditEventRow.time <= end,
                    AuditEventRow.seq > after)
             .order_by(AuditEventRow.seq).limit(BATCH))
        with sessions() as session:
            rows = session.execute(q).all()
        for seq, body in rows:
            yield seq, json.loads(body)
        if len(rows) < BATCH:
            return
        after = rows[-1][0]


def to_disclosure(seq: int, event: Mapping[str, Any]) -> Disclosure | None:
    """The disclosure an audit event records, or None when nothing was released."""
    released = sorted((event.get("categories") or {}).get("released") or ())
    if not released or not event.get("released_count"):
        return None
    decisions = {d.get("category"): d for d in event.get("decisions") or () if isinstance(d, Mapping)}
    releases = tuple(Release(category=c, ground=(decisions.get(c) or {}).get("ground"),
                             citation=(decisions.get(c) or {}).get("citation")) for c in released)
    relied = tuple(dict.fromkeys(r.ground for r in releases if r.ground))
    grounds = event.get("grounds") or {}
    actor = event.get("actor") or {}
    on_consent = any(g.startswith("consent-") for g in relied)
    return Disclosure(
        sequence=seq, request_id=str(event.get("request_id")),
        time=datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")),
        mdt_id=event.get("mdt_id"),
        recipient=Recipient(sub=actor.get("sub"), role=actor.get("role"), agency=actor.get("agency"),
                            client_id=event.get("client_id")),
        categories=tuple(released), purpose=event.get("purpose"), grounds=relied,
        consent_ids=tuple(grounds.get("consent_ids") or ()) if on_consent else (),
        court_order_ids=tuple(grounds.get("court_order_ids") or ()) if "court-order" in relied else (),
        break_glass_id=grounds.get("break_glass_id") if "break-glass" in relied else None,
        releases=releases)


def _part2_general(sessions: sessionmaker[Session], d: Disclosure, cache: dict[str, bool]) -> bool:
    """Part 2 records released under a consent that designates recipients generally (not by name)."""
    part2 = next((r for r in d.releases if r.category == PART2), None)
    if part2 is None or not (part2.ground or "").startswith("consent-"):
        return False
    for consent_id in d.consent_ids:
        if consent_id not in cache:
            with sessions() as session:
                row = session.get(ConsentRow, consent_id)
                cache[consent_id] = bool(row is not None and PART2 in (row.categories or ()) and any(
                    r.get("kind") != "person" for r in row.recipients or ()))
        if cache[consent_id]:
            return True
    return False


def may_request(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> bool:
    """Auditors, or the youth's attorney or social worker while active on one of the youth's open teams."""
    if principal.role in AUDITOR_ROLES:
        return True
    if principal.role not in REPRESENTATIVE_ROLES:
        return False
    teams = session.scalars(select(Mdt).where(Mdt.youth_id == youth_id)).all()
    return any(active_membership(session, mdt=mdt, principal=principal, now=now) is not None for mdt in teams)


# ---- the printable form ----------------------------------------------------------------

_CSS = """
body { font-family: Georgia, 'Times New Roman', serif; color: #000; background: #fff; margin: 2em; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.meta { margin: 0.2em 0; }
table { border-collapse: collapse; width: 100%; margin-top: 1em; font-size: 0.9em; }
th, td { border: 1px solid #444; padding: 0.3em 0.4em; text-align: left; vertical-align: top; }
th { background: #eee; }
tr { page-break-inside: avoid; }
footer { margin-top: 2em; font-size: 0.85em; }
@media print { body { margin: 0.5in; } a { color: #000; text-decoration: none; } }
"""

PLAIN_GROUNDS = {
    "mdt-member": "The recipient was an active member of the youth's multidisciplinary team, which the law "
                  "allows to share information for the youth's protection and treatment (W&IC 18961.7).",
    "own-statute": "The recipient's own agency already had a legal right to these records (for example the "
                   "assigned social worker or the treating provider).",
    "consent-part2": "A written consent for substance use treatment records (42 CFR Part 2), listed by its id.",
    "consent-hiv": "A written authorization for HIV-related records, good for one disclosure, listed by its id.",
    "consent-cmia": "A written authorization to release health records (Civil Code 56.11), listed by its id.",
    "consent-education": "A written consent from the holder of education rights (FERPA), listed by its id.",
    "consent-release": "A written authorization from the person who holds the right to release, listed by its id.",
    "court-order": "A court order naming the recipient and the kinds of records, listed by its id.",
    "break-glass": "An emergency: the recipient stated a reason, access lasted a short time, and a privacy "
                   "officer reviews every such use afterwards.",
}


PART2_NOTE = (" Only Part 2 substance use records released under a consent that names an agency or a team role, "
              "rather than a person, are listed.")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render_html(disclosures: list[Disclosure], *, youth_id: str, window: str, now: datetime,
                category_names: Mapping[str, str] | None = None,
                purpose_names: Mapping[str, str] | None = None) -> str:
    """A plain, printable page: header (window, date produced), one row per disclosure, grounds explained."""
    category_names = category_names or {}
    purpose_names = purpose_names or {}
    years, part2_only = WINDOWS[window]
    produced = now.astimezone(UTC)
    start = window_start(produced, years)
    rows = []
    for d in disclosures:
        recipient = f"{_e(d.recipient.sub)}<br>{_e(d.recipient.role)}, {_e(d.recipient.agency)}" \
                    f"<br><small>via {_e(d.recipient.client_id)}</small>"
        cats = "<br>".join(_e(category_names.get(c, c)) for c in d.categories)
        purpose = _e(purpose_names.get(d.purpose or "", d.purpose))
        basis = [_e(g) for g in d.grounds]
        basis += [f"consent {_e(i)}" for i in d.consent_ids] + [f"court order {_e(i)}" for i in d.court_order_ids]
        if d.break_glass_id:
            basis.append(f"emergency grant {_e(d.break_glass_id)}")
        rows.append(f"<tr><td>{_e(d.time.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC'))}</td><td>{recipient}</td>"
                    f"<td>{cats}</td><td>{purpose}</td><td>{'<br>'.join(basis)}</td>"
                    f"<td>{'<br>'.join(_e(c) for c in d.citations)}</td></tr>")
    body = "\n".join(rows) or '<tr><td colspan="6">No disclosures in this period.</td></tr>'
    used = sorted({g for d in disclosures for g in d.grounds} or PLAIN_GROUNDS)
    explained = "\n".join(f"<li><b>{_e(g)}</b>: {_e(PLAIN_GROUNDS.get(g, 'See the policy citation.'))}</li>"
                          for g in used)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Accounting of disclosures</title>
<style>{_CSS}</style></head><body>
<header><h1>Accounting of disclosures</h1>
<p class="meta">Youth (broker id): {_e(youth_id)}</p>
<p class="meta">{_e(WINDOW_TITLES[window])}: {_e(start.strftime('%Y-%m-%d'))} to {_e(produced.strftime('%Y-%m-%d'))}</p>
<p class="meta">Produced: {_e(produced.strftime('%Y-%m-%d %H:%M UTC'))}</p></header>
<table><thead><tr><th>Date</th><th>Recipient</th><th>Kinds of records</th><th>Purpose</th>
<th>Ground relied on</th><th>Policy citation</th></tr></thead>
<tbody>
{body}
</tbody></table>
<footer><p>Each row is one time that records about the youth were released by the county's information-sharing
broker. It lists the kinds of records, never their content. Requests that were refused, or that released nothing,
are not disclosures and are not listed.{PART2_NOTE if part2_only else ''}</p>
<p>What the grounds mean:</p><ul>
{explained}
</ul></footer>
</body></html>
"""
