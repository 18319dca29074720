"""A realistic audit event as the pipeline builds it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


def make_event(i: int = 1, **overrides: Any) -> dict[str, Any]:
    """A realistic pipeline event; ``i`` varies the per-request fields."""
    event: dict[str, Any] = {
        "time": datetime(2025, 3, 1, 17, 30, tzinfo=UTC) + timedelta(seconds=i, microseconds=i),
        "request_id": f"req-{i:05d}",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "youth_id": f"Y-{i % 3}",
        "mdt_id": "MDT-7",
        "actor": {"sub": "staff-42", "agency": "probation", "role": "probation-officer"},
        "client_id": "probation-cms",
        "purpose": "treatment",
        "action": "record.read",
        "outcome": 200,
        "policy_version": "a" * 64,
        "grounds": {"consent_ids": ["c-1"], "court_order_id": None, "break_glass_id": None},
        "categories_requested": {"general-health", "mental-health", "substance-use"},
        "categories_released": {"general-health"},
        "categories_withheld": {"mental-health", "substance-use"},
        "decisions": [
            {"category": "general-health", "effect": "allow", "rule": ("p", "mdt-member"),
             "citation": "WIC 18961.7"},
            {"category": "mental-health", "effect": "deny", "rule": None, "citation": None},
        ],
        "obligations": ["no-redisclosure"],
    }
    event.update(overrides)
    return event
