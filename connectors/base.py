"""The one Protocol every source adapter implements.

Contract for implementers:
- ``search`` and ``read`` are coroutines and must be safe to call concurrently from
  many requests on one event loop.
- They must finish within ``timeout`` seconds or raise ``SourceTimeout``.
- Any transport, HTTP or parse failure raises ``SourceUnavailable``; the message must
  not contain record content (it is logged).
- ``SourceQuery.limit`` lets a search stop once the first matches are in hand (a page of
  the broker's answer rarely needs a youth's whole history); see its docstring.
- They never filter by policy: the broker asks only for categories it may release
  and filters every returned item again. They return plain FHIR R4 JSON dicts which
  the broker deep-copies before it changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class SourceError(Exception):
    """Base class for connector failures."""


class SourceUnavailable(SourceError):
    """The source could not be reached or answered with an error or garbage."""


class SourceTimeout(SourceError):
    """The source did not answer within the timeout."""


@dataclass(frozen=True, slots=True)
class SourceQuery:
    """A FHIR search against one source for one patient.

    ``patient_id`` is the source's own id for the youth (the Patient resource id).
    ``params`` are already validated search parameters, in order, without any
    patient/subject parameter (the connector adds the right one).
    """

    resource_type: str
    patient_id: str
    params: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    """The caller needs only the first ``limit`` matches, in the source's order (None: all).

    A connector may stop early: with more than ``limit`` matches it returns at least the first
    ``limit`` of them (more is allowed); with ``limit`` or fewer it returns them all. So fewer
    than ``limit`` items means there are no more. Connectors that ignore it stay correct.
    """


@runtime_checkable
class Connector(Protocol):
    """A source system the broker reads from."""

    name: str
    """Stable source id, used in audit events and in per-source status."""

    identifier_system: str
    """The identifier system under which the youth is registered for this source."""

    default_categories: frozenset[str]
    """Categories every item from this source carries (e.g. {'general-health'})."""

    resource_types: frozenset[str]
    """FHIR resource types this source can answer."""

    async def search(self, query: SourceQuery, *, timeout: float) -> list[dict]:
        """Return every matching resource (following paging; see ``query.limit``) or raise a SourceError."""
        ...

    async def read(self, resource_type: str, resource_id: str, *, timeout: float) -> dict | None:
        """Return one resource by id, None if the source has no such resource."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def belongs_to_patient(resource: dict, patient_id: str) -> bool:
    """True if the resource is the patient or names them in ``subject`` or ``patient``."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient_id
    target = f"Patient/{patient_id}"
    for field in ("subject", "patient"):
        ref = resource.get(field)
        if not isinstance(ref, dict):
            continue
        value = ref.get("reference")
        if not isinstance(value, str):
            continue
        value = value.split("/_history/", 1)[0]
        if value == target or value.endswith("/" + target):
            return True
    return False
