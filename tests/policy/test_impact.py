"""Impact replay over a real broker's audit log equals a brute-force, unmemoized re-decision."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from broker.policy import CasbinPolicyEngine
from broker.policy.impact import ALLOW_TO_DENY, format_impact, impact
from broker.store.models import AuditEventRow
from tests.policy.copies import MH_TREAT_ALLOW, append_line, copy_policies, remove_line
from tests.scenarios.harness import start_broker

ALIASES = ("cw", "po", "mh", "mh-team", "sud", "phn", "ed", "advocate", "depatty", "caregiver", "da", "po-ended")
PURPOSES = ("TREAT", "COC", "CHILDPROT")
ADDED_DENY = 'p, probation-officer, general-health, *, *, deny, "County Res. 2"'


@pytest.fixture(scope="module")
async def audited(tmp_path_factory, fhir_server):  # type: ignore[no-untyped-def]
    """A broker that served 36 real requests (members and non-members, three purposes)."""
    tmp = tmp_path_factory.mktemp("impact")
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url)
    for alias in ALIASES:
        token = await b.token(alias)
        for purpose in PURPOSES:
            r = await b.get("/mdts/mdt-alpha/fhir/Condition", token=token, purpose=purpose)
            assert r.status_code in (200, 403), r.text
    candidate = copy_policies(tmp / "candidate", spotlight_only=False)
    remove_line(candidate, MH_TREAT_ALLOW)
    append_line(candidate, ADDED_DENY)
    yield b, candidate
    await b.aclose()


def _brute_force(sessions, candidate_dir) -> tuple[Counter, dict]:  # type: ignore[no-untyped-def]
    """Every recorded decision re-decided by a freshly loaded engine per event (no shared memo)."""
    counts: Counter = Counter()
    examples: dict = {}
    with sessions() as s:
        rows = list(s.execute(select(AuditEventRow.seq, AuditEventRow.body).order_by(AuditEventRow.seq)))
    for seq, body in rows:
        event = json.loads(body)
        if not event.get("decisions"):
            continue
        engine = CasbinPolicyEngine.load(candidate_dir)
        for d in event["decisions"]:
            now = engine.decide(role=event["actor"]["role"], category=d["category"], purpose=event["purpose"],
                                grounds=frozenset(d["grounds_evaluated"])).effect
            if now != d["effect"]:
                key = (event["actor"]["role"], d["category"], f"{d['effect']}->{now}")
                counts[key] += 1
                examples.setdefault(key, [])
                if len(examples[key]) < 5:
                    examples[key].append(seq)
    return counts, examples


async def test_impact_equals_brute_force(audited) -> None:
    """Counts and example sequences per (role, category, direction) match an independent replay."""
    b, candidate_dir = audited
    report = impact(b.runtime.sessions, CasbinPolicyEngine.load(candidate_dir), batch=7)
    counts, examples = _brute_force(b.runtime.sessions, candidate_dir)
    assert {k: g.count for k, g in report.flips.items()} == dict(counts)
    assert {k: g.examples for k, g in report.flips.items()} == examples
    assert ("mental-health-clinician", "general-health", ALLOW_TO_DENY) in counts
    assert ("probation-officer", "general-health", ALLOW_TO_DENY) in counts
    assert report.events_replayed == sum(1 for a in ALIASES if a not in ("da", "po-ended")) * len(PURPOSES)
    assert report.decisions_replayed == report.events_replayed * len(b.runtime.categories)
    text = format_impact(report)
    assert "probation-officer" in text and f"flips: {report.total_flips}" in text


async def test_unchanged_candidate_flips_nothing_and_since_filters(audited) -> None:
    """The policy in force replays with no flips; a future --since sees no events."""
    b, _candidate = audited
    same = impact(b.runtime.sessions, CasbinPolicyEngine.load(b.runtime.settings.policy_dir))
    assert same.decisions_replayed > 0 and same.total_flips == 0
    future = impact(b.runtime.sessions, b.runtime.policy, since=datetime.now(timezone.utc) + timedelta(days=1))
    assert future.events_scanned == 0


async def test_cli_prints_the_report(audited, capsys) -> None:
    """``broker policy impact`` loads the candidate, reads the given database and prints the table."""
    import argparse

    from broker.policy import cli_impact

    b, candidate_dir = audited
    parser = argparse.ArgumentParser(prog="broker policy")
    cli_impact.add_parser(parser.add_subparsers(dest="policy_command", required=True))
    args = parser.parse_args(["impact", "--candidate", str(candidate_dir), "--since", "2000-01-01",
                              "--database-url", str(b.runtime.engine.url), "--fail-on-flips"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "mental-health-clinician" in out and "allow->deny" in out
