"""Benchmark: in-process policy decisions per second for a realistic request mix, cold and warm.

    .venv/bin/python bench/policy_decisions.py [--seconds 3] [--requests 20000]

Each simulated request is decided exactly as ``Pipeline._decide`` decides a data request: for
every category of the vocabulary, the tiers of grounds (standing, then documents, then
break-glass) are tried in order through ``CasbinPolicyEngine.decide`` until one allows. The
engine is the runtime's, on the shipped ``policies/``, memoized per engine (= per policy
version) and per (role, category, purpose, grounds).

The mix: each role asks for the purposes its work has (as ``bench/policy_impact.py``), with
grounds shaped like ``StoreGrounds`` builds them -- mostly plain membership, statutory
members, members holding a consent for some categories, requesters let in by a court order,
and break-glass grants.

- cold: a freshly loaded engine decides one request of every distinct shape (role, purpose,
  grounds) -- every decision is a first sight and goes to Casbin;
- warm: the same engine then decides ``--requests`` sampled requests over and over for
  ``--seconds``.

Issue 7's target: >= 50,000 decisions/s in-process for a realistic mix.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.grounds import Grounds  # noqa: E402
from broker.policy.engine import CasbinPolicyEngine  # noqa: E402
from broker.settings import REPO_POLICY_DIR  # noqa: E402

TARGET = 50_000
from policy_impact import PROFILES  # noqa: E402  (a county's traffic: each role's purposes)

MEMBER, STATUTE = frozenset({"mdt-member"}), frozenset({"mdt-member", "own-statute"})


def _by(categories: tuple[str, ...], ground: str) -> dict[str, frozenset[str]]:
    return {c: frozenset({ground}) for c in categories}


# Grounds as StoreGrounds builds them, with how often each shape occurs.
SHAPES: tuple[tuple[str, Grounds, float], ...] = (
    ("member", Grounds(items=MEMBER), 0.55),
    ("statutory member", Grounds(items=STATUTE), 0.25),
    ("member + Part 2 consent", Grounds(items=MEMBER, by_category=_by(("sud-part2",), "consent-part2")), 0.05),
    ("member + CMIA consent",
     Grounds(items=MEMBER, by_category=_by(("general-health", "mental-health", "sti"), "consent-cmia")), 0.05),
    ("member + release consent",
     Grounds(items=MEMBER, by_category=_by(("youth-statement", "probation", "juvenile-court"), "consent-release")),
     0.04),
    ("court order, not on the roster",
     Grounds(items=frozenset(), by_category=_by(("juvenile-court", "child-welfare-case", "mental-health"),
                                                "court-order")), 0.03),
    ("member + break-glass", Grounds(items=MEMBER, break_glass_id="bg-bench"), 0.03),
)


@dataclass(frozen=True)
class Request:
    role: str
    purpose: str
    grounds: Grounds


def decide_request(engine: CasbinPolicyEngine, categories: tuple[str, ...], req: Request) -> int:
    """Pipeline._decide's loop; returns how many decisions it took."""
    n = 0
    for category in categories:
        for tier in req.grounds.tiers(category):
            n += 1
            if engine.decide(role=req.role, category=category, purpose=req.purpose, grounds=tier).allowed:
                break
    return n


def distinct_requests() -> list[Request]:
    """One request of every (role, purpose, grounds shape)."""
    return [Request(role, purpose, grounds) for role, purposes in PROFILES.items() for purpose in purposes
            for _name, grounds, _w in SHAPES]


def sample_requests(n: int, seed: int = 11) -> list[Request]:
    """``n`` requests drawn with the mix's weights (roles uniformly, then one of their purposes)."""
    rng = random.Random(seed)
    shapes = [g for _n, g, _w in SHAPES]
    weights = [w for _n, _g, w in SHAPES]
    roles = list(PROFILES)
    out = []
    for _ in range(n):
        role = rng.choice(roles)
        out.append(Request(role, rng.choice(PROFILES[role]), rng.choices(shapes, weights)[0]))
    return out


def run(seconds: float = 3.0, requests: int = 20_000) -> dict[str, float]:
    """Measure and print; returns the numbers."""
    engine = CasbinPolicyEngine.load(REPO_POLICY_DIR)
    categories = tuple(sorted(engine.vocabulary.categories))
    shapes = distinct_requests()
    t = time.perf_counter()
    cold_decisions = sum(decide_request(engine, categories, r) for r in shapes)
    cold_s = time.perf_counter() - t
    casbin_calls = len(engine._verdicts)  # noqa: SLF001 - how many first sights went to Casbin

    mix = sample_requests(requests)
    decisions = reqs = 0
    t = time.perf_counter()
    deadline = t + seconds
    while True:
        for r in mix:
            decisions += decide_request(engine, categories, r)
        reqs += len(mix)
        if time.perf_counter() >= deadline:
            break
    warm_s = time.perf_counter() - t
    warm = decisions / warm_s
    print(f"policy decisions in-process (CasbinPolicyEngine.decide, shipped policy, {len(engine.rules)} rules, "
          f"{len(categories)} categories per request):")
    print(f"  cold (fresh engine, {len(shapes)} distinct request shapes): {cold_decisions:,} decisions, "
          f"{casbin_calls:,} Casbin evaluations in {cold_s:.2f} s = {cold_decisions / cold_s:,.0f} decisions/s "
          f"({cold_s / len(shapes) * 1000:.1f} ms per first-sight request, "
          f"{cold_s / max(casbin_calls, 1) * 1000:.2f} ms per Casbin evaluation)")
    print(f"  warm (memoized, {len(mix):,} sampled requests, looped {warm_s:.1f} s): {decisions:,} decisions = "
          f"{warm:,.0f} decisions/s, {reqs / warm_s:,.0f} requests' decision sets/s "
          f"({decisions / reqs:.1f} decisions per request)  target >= {TARGET:,}/s: "
          f"{'met' if warm >= TARGET else 'NOT MET'}")
    return {"cold_per_s": cold_decisions / cold_s, "warm_per_s": warm, "cold_s": cold_s,
            "casbin_calls": casbin_calls, "per_request": decisions / reqs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to loop the warm mix")
    parser.add_argument("--requests", type=int, default=20_000, help="sampled requests in the warm mix")
    args = parser.parse_args()
    run(args.seconds, args.requests)


if __name__ == "__main__":
    main()
