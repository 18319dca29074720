"""Policy decisions: the Casbin engine county counsel's files drive, behind one Protocol.

The engine names are imported lazily so that ``broker.vocabulary`` can import
``broker.policy.errors`` without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.policy.errors import PolicyError

if TYPE_CHECKING:
    from broker.policy.engine import CasbinPolicyEngine, PolicyEngine
    from broker.policy.rules import PolicyRule

__all__ = ["CasbinPolicyEngine", "PolicyEngine", "PolicyError", "PolicyRule"]

_LAZY = {
    "CasbinPolicyEngine": "broker.policy.engine",
    "PolicyEngine": "broker.policy.engine",
    "PolicyRule": "broker.policy.rules",
}


def __getattr__(name: str) -> Any:
    """Import engine names on first use (PEP 562) to break the vocabulary/errors cycle."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
