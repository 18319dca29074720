"""Serve FHIR resources from JSON Bundles on disk, so the demo runs without a FHIR server.

It answers the small search subset the demo uses, with the same meaning a FHIR server gives
it (``connectors.search``): ``_id``; ``code`` (``system|code`` or ``code``, comma = OR,
case-insensitive like medplum); ``date`` and ``_lastUpdated`` with prefixes eq/ne/lt/le/gt/ge
compared as ranges (a day or a dateTime at its precision); ``_count`` caps the result; ``_sort``
is accepted and ignored. Any other parameter raises ``SourceUnavailable`` rather than silently
returning too much.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from connectors.base import SourceQuery, SourceUnavailable, belongs_to_patient
from connectors.search import compile_search, to_range

if TYPE_CHECKING:
    from broker.settings import SourceConfig

__all__ = ["StaticFhirConnector", "to_range"]


class StaticFhirConnector:
    """An in-memory FHIR source loaded once from a directory of Bundle JSON files."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        identifier_system: str,
        default_categories: Iterable[str],
        resource_types: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.identifier_system = identifier_system
        self.default_categories = frozenset(default_categories)
        self._by_type: dict[str, dict[str, dict]] = {}
        for path in sorted(Path(data_dir).glob("*.json")):
            for resource in _bundle_resources(path):
                self._by_type.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        if not self._by_type:
            raise ValueError(f"source {name}: no FHIR resources found in {data_dir}")
        self.resource_types = frozenset(resource_types) or frozenset(self._by_type)

    @classmethod
    def from_config(cls, cfg: "SourceConfig") -> "StaticFhirConnector":
        """Build from a ``SourceConfig`` whose ``data_dir`` holds the Bundles."""
        if cfg.data_dir is None:
            raise ValueError(f"source {cfg.name}: kind static-fhir needs data_dir")
        return cls(
            name=cfg.name,
            data_dir=cfg.data_dir,
            identifier_system=cfg.identifier_system,
            default_categories=cfg.default_categories,
            resource_types=cfg.resource_types,
        )

    async def search(self, query: SourceQuery, *, timeout: float) -> list[dict]:
        """Matching resources of the patient, in file order, as copies."""
        if query.resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {query.resource_type} not served")
        search = compile_search(self.name, query.params)
        mine = (r for r in self._by_type.get(query.resource_type, {}).values()
                if belongs_to_patient(r, query.patient_id))
        return [copy.deepcopy(r) for r in search.apply(mine, query.limit)]

    async def read(self, resource_type: str, resource_id: str, *, timeout: float) -> dict | None:
        """One resource by id, None if there is none."""
        if resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {resource_type} not served")
        found = self._by_type.get(resource_type, {}).get(resource_id)
        return copy.deepcopy(found) if found is not None else None

    async def aclose(self) -> None:
        """Nothing to release; part of the Protocol."""


def _bundle_resources(path: Path) -> Iterator[dict]:
    try:
        bundle = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValueError(f"{path}: not a FHIR Bundle")
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("resourceType") or not resource.get("id"):
            raise ValueError(f"{path}: entry {i} has no resource with resourceType and id")
        yield resource
