"""Benchmark: `impact()` over a 100,000-event audit log, next to the time to merely stream the rows.

    .venv/bin/python bench/policy_impact.py [--events 100000] [--db PATH] [--keep]

Events are realistic: every category decided by the shipped policy for a role, a purpose and
a tier of grounds a real request would have, ~10% without decisions (refusals, registry
calls). They go through ``SqlAuditSink`` so the chain is valid (checked at the end of the
generation). The candidate policy is the shipped one with one rule removed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import event, func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.audit.sink import SqlAuditSink  # noqa: E402
from broker.domain import Principal  # noqa: E402
from broker.pipeline.exchange import Exchange  # noqa: E402
from broker.policy.engine import CasbinPolicyEngine  # noqa: E402
from broker.policy.impact import format_impact, impact, stream_bodies  # noqa: E402
from broker.settings import REPO_POLICY_DIR  # noqa: E402
from broker.store.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from broker.store.models import AuditEventRow  # noqa: E402

CHANGED_RULE = ('p, mental-health-clinician,  general-health,       TREAT,     mdt-member,  allow, '
                '"Civ. Code 56.10(c)(1); 45 CFR 164.506(c)"')
# A county's traffic: each role asks for the purposes its work has, mostly as a team member.
PROFILES = {
    "child-welfare-worker": ("COC", "CHILDPROT"), "probation-officer": ("COC", "CHILDPROT"),
    "mental-health-clinician": ("TREAT", "COC"), "substance-use-counselor": ("TREAT",),
    "public-health-nurse": ("TREAT", "COC"), "education-liaison": ("COC",), "survivor-advocate": ("CAREMGT",),
    "dependency-attorney": ("HLEGAL",), "caregiver": ("CAREMGT",), "casa": ("CHILDPROT",),
    "district-attorney": ("HLEGAL",), "law-enforcement": ("HLEGAL",),
}
TIERS = ((("mdt-member",), 0.7), (("mdt-member", "own-statute"), 0.2), (("court-order",), 0.05),
         (("break-glass", "mdt-member"), 0.05))


def generate(sessions, engine: CasbinPolicyEngine, n: int, seed: int = 7) -> None:  # type: ignore[no-untyped-def]
    """Append ``n`` events through the sink (one short transaction each, as in production)."""
    rng = random.Random(seed)
    sink = SqlAuditSink(sessions)
    categories = sorted(engine.vocabulary.categories)
    for i in range(n):
        role = rng.choice(list(PROFILES))
        ex = Exchange.start(action="fhir.search", method="GET", route="/mdts/{id}/fhir/{type}")
        ex.principal = Principal(sub=f"staff-{rng.randrange(400)}", agency="agency", role=role,
                                 client_id="agency-system")
        ex.mdt_id, ex.youth_id = f"mdt-{rng.randrange(2000)}", f"y-{rng.randrange(2000)}"
        ex.purpose = rng.choice(PROFILES[role])
        ex.resource_type = "Condition"
        ex.policy_version = engine.version
        status = 403
        if rng.random() >= 0.1:
            tier = frozenset(rng.choices([t for t, _w in TIERS], [w for _t, w in TIERS])[0])
            ex.decisions = engine.decide_all(role=role, categories=categories, purpose=ex.purpose, grounds=tier)
            ex.evaluated = {c: sorted(tier) for c in categories}
            ex.released_categories = set(ex.decisions.allowed_categories())
            status = 200
        sink.append(ex.audit_event(status))
        if (i + 1) % 10_000 == 0:
            print(f"  generated {i + 1} events", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--db", type=Path, default=None, help="reuse (or create) this SQLite file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="policy-impact-"))
    db = args.db or tmp / "audit.sqlite"
    url = f"sqlite:///{db}"
    try:
        baseline = CasbinPolicyEngine.load(REPO_POLICY_DIR)
        candidate_dir = tmp / "candidate"
        shutil.copytree(REPO_POLICY_DIR, candidate_dir)
        policy = candidate_dir / "policy.csv"
        lines = policy.read_text(encoding="utf-8").splitlines(keepends=True)
        policy.write_text("".join(x for x in lines if x.rstrip("\n") != CHANGED_RULE), encoding="utf-8")
        candidate = CasbinPolicyEngine.load(candidate_dir)
        assert candidate.version != baseline.version

        upgrade(url)
        db_engine = make_engine(url)
        event.listen(db_engine, "connect", _fast_writes)  # generation only; the sink itself is unchanged
        sessions = make_sessionmaker(db_engine)
        with sessions() as s:
            existing = s.scalar(select(func.count()).select_from(AuditEventRow)) or 0
        if existing < args.events:
            print(f"generating {args.events - existing} events through SqlAuditSink ...", flush=True)
            t = time.perf_counter()
            generate(sessions, baseline, args.events - existing)
            print(f"  {args.events - existing} appends in {time.perf_counter() - t:.1f} s", flush=True)
        with sessions() as s:
            total = s.scalar(select(func.count()).select_from(AuditEventRow))
        from broker.audit.verify import verify_chain

        assert verify_chain(sessions, batch=5000).ok, "the generated chain must verify"

        t = time.perf_counter()
        streamed = sum(1 for _ in stream_bodies(sessions))
        stream_s = time.perf_counter() - t
        t = time.perf_counter()
        report = impact(sessions, candidate)
        impact_s = time.perf_counter() - t
        print()
        print(format_impact(report))
        print()
        print(f"events in log        : {total}")
        print(f"stream rows only     : {stream_s:6.2f} s  ({streamed / stream_s:,.0f} events/s)")
        print(f"impact() full replay : {impact_s:6.2f} s  ({report.events_scanned / impact_s:,.0f} events/s, "
              f"{report.decisions_replayed / impact_s:,.0f} decisions/s)")
        print(f"target < 10 s        : {'met' if impact_s < 10 else 'MISSED'}")
        db_engine.dispose()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


def _fast_writes(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    """A throwaway benchmark database need not fsync each of 100k commits."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA synchronous=OFF")
    cur.close()


if __name__ == "__main__":
    raise SystemExit(main())
