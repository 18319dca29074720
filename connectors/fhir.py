"""Read one youth's records from a FHIR R4 server over HTTP.

Safety rules this connector keeps, because the upstream is not trusted:
- paging links are followed only to the same scheme, host and port as ``base_url``;
- every returned resource must be of the asked type and belong to the asked patient,
  otherwise the whole search fails (a server that ignored the patient filter would
  otherwise hand the broker other children's records);
- the timeout covers the whole search, every page included;
- error messages never carry URLs (they contain patient ids) or response content.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from connectors.base import SourceQuery, SourceTimeout, SourceUnavailable, belongs_to_patient

if TYPE_CHECKING:
    from broker.settings import SourceConfig

DEFAULT_RESOURCE_TYPES = frozenset(
    {"Patient", "Observation", "Condition", "DocumentReference", "MedicationRequest", "Immunization", "Encounter"}
)
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# The page size asked of the source when the broker needs only the first matches (query.limit);
# a server may answer with smaller pages, and the connector then follows ``next``.
MAX_PAGE_SIZE = 1000
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ACCEPT = {"Accept": "application/fhir+json"}


class FhirConnector:
    """A FHIR R4 source reached with one shared aiohttp session."""

    fresh_results = True
    """``search`` and ``read`` return objects parsed from that call's response and kept nowhere,
    sharing nothing with any other call: the pipeline redacts and labels them in place instead of
    copying them first (tests/connectors/test_contract.py holds every connector claiming this to it)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        identifier_system: str,
        default_categories: Iterable[str],
        resource_types: Iterable[str],
        max_pages: int = 50,
    ) -> None:
        base = URL(base_url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"source {name}: base_url must be an absolute http(s) URL")
        if max_pages < 1:
            raise ValueError(f"source {name}: max_pages must be at least 1")
        self.name = name
        self.base_url = str(base)
        self.identifier_system = identifier_system
        self.default_categories = frozenset(default_categories)
        self.resource_types = frozenset(resource_types)
        self.max_pages = max_pages
        self._origin = _origin(base)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, cfg: "SourceConfig") -> "FhirConnector":
        """Build from a validated ``SourceConfig``; no resource types means the common clinical ones."""
        if not cfg.base_url:
            raise ValueError(f"source {cfg.name}: kind fhir needs base_url")
        return cls(
            name=cfg.name,
            base_url=cfg.base_url,
            identifier_system=cfg.identifier_system,
            default_categories=cfg.default_categories,
            resource_types=cfg.resource_types or DEFAULT_RESOURCE_TYPES,
            max_pages=cfg.max_pages,
        )

    async def search(self, query: SourceQuery, *, timeout: float) -> list[dict]:
        """Every matching resource for the patient, following same-origin ``next`` links."""
        self._check_type(query.resource_type)
        if not _FHIR_ID.match(query.patient_id):
            raise SourceUnavailable(f"source {self.name}: invalid patient id")
        try:
            async with asyncio.timeout(timeout):
                return await self._search(query)
        except TimeoutError:
            raise SourceTimeout(f"source {self.name}: search timed out after {timeout:g} s") from None

    async def read(self, resource_type: str, resource_id: str, *, timeout: float) -> dict | None:
        """One resource by id; None when the source answers 404/410 or the id cannot exist."""
        self._check_type(resource_type)
        if not _FHIR_ID.match(resource_id):
            return None
        url = URL(f"{self.base_url}/{resource_type}/{resource_id}", encoded=False)
        try:
            async with asyncio.timeout(timeout):
                resource = await self._get_json(url, missing_ok=True)
        except TimeoutError:
            raise SourceTimeout(f"source {self.name}: read timed out after {timeout:g} s") from None
        if resource is None:
            return None
        if resource.get("resourceType") != resource_type or resource.get("id") != resource_id:
            raise SourceUnavailable(f"source {self.name}: read returned a different resource")
        return resource

    async def aclose(self) -> None:
        """Close the session and its pooled connections."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def _search(self, query: SourceQuery) -> list[dict]:
        params = list(query.params)
        if query.resource_type == "Patient":
            params.append(("_id", query.patient_id))
        else:
            params.append(("patient", f"Patient/{query.patient_id}"))
        if query.limit is not None and not any(name == "_count" for name, _ in params):
            params.append(("_count", str(min(max(query.limit, 1), MAX_PAGE_SIZE))))
        url: URL | None = URL(f"{self.base_url}/{query.resource_type}").with_query(params)
        found: list[dict] = []
        seen: set[URL] = set()
        pages = 0
        while url is not None and (query.limit is None or len(found) < query.limit):
            if pages >= self.max_pages:
                raise SourceUnavailable(f"source {self.name}: more than {self.max_pages} pages")
            seen.add(url)
            pages += 1
            bundle = await self._get_json(url, missing_ok=False)
            if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
                raise SourceUnavailable(f"source {self.name}: search did not return a searchset Bundle")
            found.extend(self._matches(bundle, query))
            url = self._next_link(bundle)
            if url is not None and url in seen:
                raise SourceUnavailable(f"source {self.name}: paging links loop")
        return found

    def _matches(self, bundle: dict, query: SourceQuery) -> list[dict]:
        out = []
        for entry in _list(bundle.get("entry")):
            if not isinstance(entry, dict):
                raise SourceUnavailable(f"source {self.name}: malformed Bundle entry")
            search = entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else None
            if mode not in (None, "match"):
                continue
            resource = entry.get("resource")
            if not isinstance(resource, dict):
                continue
            if resource.get("resourceType") != query.resource_type:
                raise SourceUnavailable(f"source {self.name}: search returned another resource type")
            if not belongs_to_patient(resource, query.patient_id):
                raise SourceUnavailable(f"source {self.name}: search returned another patient's record")
            out.append(resource)
        return out

    def _next_link(self, bundle: dict) -> URL | None:
        for link in _list(bundle.get("link")):
            if isinstance(link, dict) and link.get("relation") == "next":
                raw = link.get("url")
                if not isinstance(raw, str) or not raw:
                    raise SourceUnavailable(f"source {self.name}: malformed next link")
                try:
                    url = URL(raw, encoded=True)
                except ValueError:
                    raise SourceUnavailable(f"source {self.name}: malformed next link") from None
                if not url.is_absolute() or _origin(url) != self._origin:
                    raise SourceUnavailable(f"source {self.name}: next link points outside the source")
                return url
        return None

    async def _get_json(self, url: URL, *, missing_ok: bool) -> Any:
        session = self._get_session()
        try:
            async with session.get(url, headers=_ACCEPT, allow_redirects=False) as resp:
                if missing_ok and resp.status in (404, 410):
                    return None
                if resp.status >= 300:
                    raise SourceUnavailable(f"source {self.name}: HTTP {resp.status}")
                content_type = resp.headers.get("Content-Type", "")
                if "json" not in content_type.lower():
                    raise SourceUnavailable(f"source {self.name}: response is not JSON")
                body = await _read_limited(resp)
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"source {self.name}: request failed ({type(exc).__name__})") from None
        if body is None:
            raise SourceUnavailable(f"source {self.name}: response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SourceUnavailable(f"source {self.name}: response is not valid JSON") from None
        if not isinstance(data, dict):
            raise SourceUnavailable(f"source {self.name}: response is not a FHIR resource")
        return data

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use so that it binds to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=32, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._session

    def _check_type(self, resource_type: str) -> None:
        if not _RESOURCE_TYPE.match(resource_type):
            raise SourceUnavailable(f"source {self.name}: invalid resource type")
        if self.resource_types and resource_type not in self.resource_types:
            raise SourceUnavailable(f"source {self.name}: resource type {resource_type} not served")


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None if it is larger than MAX_RESPONSE_BYTES."""
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        return None
    chunks = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


def _list(value: object) -> list:
    return value if isinstance(value, list) else []
