"""The one place that runs a request through the stages, in order.

authenticate → resolve context → establish grounds → decide → fetch → classify and
filter → label → audit → respond. Routes call only ``Pipeline``; stages do not call
each other. Any exception in a stage becomes a deny (403), a clean 4xx, or a 503 —
never data — and every request is audited, durably, before its response is returned.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from urllib.parse import urlencode

import orjson
import structlog
from pydantic import BaseModel, ValidationError
from anyio import CapacityLimiter, to_thread
from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import Response

from broker.audit.sink import append_async
from broker.domain import DecisionSet, Principal, RequestContext
from broker.grounds import Grounds, has_court_order
from broker.errors import (
    FHIR_JSON,
    NO_ACCESS,
    BadRequest,
    BrokerError,
    Forbidden,
    NotFound,
    NotSupported,
    Unauthorized,
    error_response,
    outcome_response,
)
from broker.observability import stage_span
from broker.pipeline import context_cache, record_view, sources
from broker.pipeline.exchange import Exchange
from broker.pipeline.filtering import FilterOutcome, filter_resources
from broker.pipeline.search_params import RESOURCE_ID, RESOURCE_TYPE, SearchRequest, parse_search
from broker.ratelimit import RateLimits
from broker.registry import service as registry
from broker.store.db import read_only
from connectors.base import SourceQuery, SourceTimeout

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = structlog.get_logger("broker.pipeline")
PURPOSE_HEADER = "x-purpose-of-use"
OBLIGATION_NOTICE_URL = "https://mdt-broker.example.org/StructureDefinition/obligation-notice"
# Registry actions whose object id the audit event records (ids only, never content).
DOCUMENT_ACTIONS = {"membership": "membership_id", "consent": "consent_id", "court-order": "court_order_id",
                    "break-glass": "break_glass_id"}
RELEASED_UNDER_URL = "https://mdt-broker.example.org/StructureDefinition/released-under"


class Pipeline:
    """Runs requests; safe for concurrent use (holds no per-request state)."""

    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime
        self.limits = RateLimits.from_settings(runtime.settings)
        self.contexts = context_cache.ContextCache(runtime.settings.context_cache_size)
        self._reads: CapacityLimiter | None = None
        self._inline = context_cache.InlineGeneration.for_engine(runtime.engine)

    async def _generation(self) -> int | None:
        """The registry generation: on the event loop for a SQLite file, else in a worker thread."""
        if self._inline is not None:
            value = self._inline.read()
            if value is not context_cache.UNREAD:
                return value
        return await to_thread.run_sync(context_cache.read_generation, self.rt.engine, limiter=self._read_slots())

    def close(self) -> None:
        """Release what the pipeline holds open itself (the inline generation reader's connection)."""
        if self._inline is not None:
            self._inline.close()

    def _read_slots(self) -> CapacityLimiter:
        """Worker threads reading the registry at once: as many as the engine's pool keeps open,
        so that under load no thread waits for a connection and none is opened only to be closed."""
        if self._reads is None:
            size = getattr(self.rt.engine.pool, "size", None)  # a QueuePool's; other pools have no fixed size
            self._reads = CapacityLimiter(max(1, size()) if callable(size) else DEFAULT_READ_SLOTS)
        return self._reads

    # ---- the frame every audited request runs in -------------------------------------

    async def run(self, request: Request, *, action: str, route: str,
                  handler: Callable[[Exchange], Awaitable[Response]], mdt_id: str | None = None,
                  authenticate: bool = True) -> Response:
        """Authenticate, count against the client's quota, run ``handler``, audit, then respond.

        ``authenticate=False`` only for ``POST /oauth/token``, whose handler authenticates the
        client itself (RFC 7523) and fills in ``ex.principal``; its answers are audited the same way.
        """
        ex = Exchange.start(action=action, method=request.method, route=route)
        ex.mdt_id = mdt_id
        ex.policy_version = self.rt.policy.version
        started = time.perf_counter()
        with stage_span("request", action=action, route=route) as span:
            ex.trace_id = _trace_id(span)
            try:
                if authenticate:
                    ex.principal = await self._authenticate(request)
                    self.limits.admit_client(ex.principal.client_id)
                response = await handler(ex)
            except BrokerError as err:
                ex.error = type(err).__name__
                response = error_response(err)
            except Exception as err:  # fail closed: nothing from a failed stage is released
                ex.error = type(err).__name__
                log.error("stage_failed", error_type=type(err).__name__, request_id=ex.request_id)
                response = outcome_response(503, "transient", "the broker could not complete the request")
            response = await self._audit(ex, response)
        response.headers["X-Request-Id"] = ex.request_id
        p = ex.principal
        log.info("request", request_id=ex.request_id, trace_id=ex.trace_id, route=route, method=request.method,
                 status=response.status_code, client_id=p.client_id if p else None,
                 agency=p.agency if p else None, role=p.role if p else None, purpose=ex.purpose,
                 categories_allowed=sorted(ex.decisions.allowed_categories()) if ex.decisions else None,
                 categories_withheld=sorted(ex.withheld_categories) or None,
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
        return response

    async def _authenticate(self, request: Request) -> Principal:
        with stage_span("authenticate"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("a bearer access token is required", error="invalid_request")
            from broker.auth.tokens import AuthError

            try:
                return await self.rt.verifier.averify(token.strip())
            except AuthError:
                raise Unauthorized() from None

    async def _audit(self, ex: Exchange, response: Response) -> Response:
        with stage_span("audit"):
            try:
                event = ex.audit_event(response.status_code)
                outcome = await append_async(self.rt.audit, event)
            except Exception as err:
                log.error("audit_write_failed", error_type=type(err).__name__, request_id=ex.request_id)
                return outcome_response(503, "transient", "the broker could not record this request; "
                                        "nothing was released")
            log.debug("audited", audit_seq=outcome.sequence, request_id=ex.request_id)
            return response

    # ---- data routes --------------------------------------------------------------------

    async def fhir_search(self, request: Request, *, mdt_id: str, resource_type: str) -> Response:
        """``GET /mdts/{id}/fhir/{type}``: a searchset of what the requester may see."""

        async def handler(ex: Exchange) -> Response:
            search = self._parse(request, ex, resource_type)
            bundle = await self._search(request, ex, search, resource_type)
            return Response(orjson.dumps(bundle), media_type=FHIR_JSON)

        return await self.run(request, action="fhir.search", route="/mdts/{id}/fhir/{type}",
                              handler=handler, mdt_id=mdt_id)

    async def fhir_read(self, request: Request, *, mdt_id: str, resource_type: str, resource_id: str) -> Response:
        """``GET /mdts/{id}/fhir/{type}/{rid}``: one resource, or the same 404 as if it did not exist."""

        async def handler(ex: Exchange) -> Response:
            if not RESOURCE_ID.match(resource_id):
                raise BadRequest("malformed resource id")
            self._check_type(resource_type)
            ex.resource_type = resource_type
            self._purpose(request, ex)
            search = SearchRequest(params=(("_id", resource_id),), count=1, offset=0)
            bundle = await self._search(request, ex, search, resource_type)
            entries = bundle.get("entry") or []
            if not entries:
                raise NotFound("resource not found")
            return Response(orjson.dumps(entries[0]["resource"]), media_type=FHIR_JSON)

        return await self.run(request, action="fhir.read", route="/mdts/{id}/fhir/{type}/{rid}",
                              handler=handler, mdt_id=mdt_id)

    def _check_type(self, resource_type: str) -> None:
        if not RESOURCE_TYPE.match(resource_type) or resource_type not in self.rt.resource_types:
            raise NotSupported("unsupported resource type")

    def _parse(self, request: Request, ex: Exchange, resource_type: str) -> SearchRequest:
        self._check_type(resource_type)
        ex.resource_type = resource_type
        self._purpose(request, ex)
        return parse_search(list(request.query_params.multi_items()), max_count=self.rt.settings.max_count)

    def _purpose(self, request: Request, ex: Exchange) -> str:
        """The purpose of use from the header or the token; both present must agree."""
        header = request.headers.get(PURPOSE_HEADER)
        claimed = ex.principal.purpose if ex.principal else None
        if header and claimed and header != claimed:
            raise BadRequest("the purpose of use in the header differs from the one in the token")
        purpose = header or claimed
        if not purpose:
            raise BadRequest("a purpose of use is required (X-Purpose-Of-Use header or purpose_of_use claim)")
        if purpose not in self.rt.vocabulary.purposes:
            raise BadRequest("unknown purpose of use")
        ex.purpose = purpose
        return purpose

    async def _search(self, request: Request, ex: Exchange, search: SearchRequest, resource_type: str) -> dict:
        ctx, grounds = await self._context(ex)
        decisions = self._decide(ex, ctx, grounds)
        allowed = decisions.allowed_categories()
        stop = search.offset + search.count
        outcome = await self._fetch_page(ex, ctx, search, resource_type, allowed, need=stop + 1)
        has_more = len(outcome.released) > stop
        outcome.window(search.offset, stop)
        outcome = await self._release(ex, decisions, grounds, outcome)
        page, page_categories = self._label(ex, outcome.released)
        return self._bundle(request, ex, resource_type, search, page, page_categories, has_more=has_more)

    def _classify(self, items: Any, allowed: frozenset[str], *, fresh: bool = False) -> FilterOutcome:
        """Classify, drop and redact (on copies, unless the items are ``fresh``: the caller's alone)."""
        with stage_span("filter"):
            return filter_resources(items, classify=self.rt.classifier.classify, allowed=allowed,
                                    known=self.rt.category_set, fresh=fresh)

    async def _release(self, ex: Exchange, decisions: DecisionSet, grounds: Grounds,
                       outcome: FilterOutcome) -> FilterOutcome:
        """Spend single-use consents for what is about to be released; the audit notes what was held back."""
        outcome = await self._spend_limited_consents(ex, decisions, grounds, outcome)
        ex.withheld_categories.update(outcome.withheld_categories)
        ex.redactions.extend(outcome.redactions)
        if outcome.foreign_dropped:
            ex.detail["foreign_items_dropped"] = outcome.foreign_dropped
        return outcome

    def _label(self, ex: Exchange, items: list[tuple[dict, frozenset[str]]]) -> tuple[list[dict], set[str]]:
        """Security labels and obligations on each released item; what the audit records as released."""
        page: list[dict] = []
        page_categories: set[str] = set()
        with stage_span("label"):
            for resource, categories in items:
                ex.obligations.update(self.rt.labeller.label(resource, categories))
                self._cite_documents(resource, categories, ex)
                page_categories.update(categories)
                page.append(resource)
        ex.released_categories = page_categories
        ex.released_count = len(page)
        return page, page_categories

    async def record(self, request: Request, *, mdt_id: str) -> Response:
        """``GET /mdts/{id}/record``: everything the requester may see about the youth, from every source."""

        async def handler(ex: Exchange) -> Response:
            if request.query_params:
                raise BadRequest("the record view takes no query parameters")
            self._purpose(request, ex)
            ctx, grounds = await self._context(ex)
            decisions = self._decide(ex, ctx, grounds)
            allowed = decisions.allowed_categories()
            filtered, statuses = await self._fetch_record(ex, ctx, allowed)
            outcome = await self._release(ex, decisions, grounds, filtered)
            grouped = record_view.group(outcome.released, self.rt.vocabulary.categories)
            _page, categories = self._label(ex, grouped)
            bundle = record_view.bundle(
                base=f"{self.rt.settings.public_url}/mdts/{ex.mdt_id}/fhir", bundle_id=ex.request_id,
                items=grouped, categories=categories, statuses=statuses, labeller=self.rt.labeller,
                now=_now_iso(), released_under_url=RELEASED_UNDER_URL, notice_url=OBLIGATION_NOTICE_URL)
            return Response(orjson.dumps(bundle), media_type=FHIR_JSON)

        return await self.run(request, action="record.read", route="/mdts/{id}/record", handler=handler,
                              mdt_id=mdt_id)

    async def _fetch_record(self, ex: Exchange, ctx: RequestContext,
                            allowed: frozenset[str]) -> tuple[FilterOutcome, dict[str, str]]:
        """Every resource type of every source that could release something, sources in parallel, filtered.

        Each source runs under its own timeout and breaker. The status map lists every configured
        source: one that was not asked (no link to the youth, or nothing it holds could be
        released) is ``ok`` like one that answered, so the map says nothing about policy or links.
        """
        links: dict[str, tuple[Any, str]] = {}
        for connector, patient_id in self._linked(ctx):
            links.setdefault(connector.name, (connector, patient_id))
        statuses = {name: sources.OK for name in sorted(self.rt.connectors)}
        jobs = []
        for name, (connector, patient_id) in sorted(links.items()):
            if not connector.default_categories <= allowed:
                ex.sources.append({"source": name, "status": "not-asked"})
                continue
            types = sorted(connector.resource_types or self.rt.resource_types)
            jobs.append((connector, patient_id, functools.partial(_every_type, connector, patient_id, types)))
        merged = FilterOutcome()
        for (connector, _pid, _fetch), (status, _fetched, out) in zip(jobs, await self._ask(ex, jobs, allowed=allowed)):
            statuses[connector.name] = status
            merged.extend(out)
        return merged, statuses

    async def _context(self, ex: Exchange) -> tuple[RequestContext, Grounds]:
        """Resolve youth, MDT, membership and grounds in one snapshot; anything amiss is the one 403.

        A requester who is not on the roster gets in only if a court order in force names them.
        """
        assert ex.principal is not None and ex.mdt_id is not None and ex.purpose is not None
        principal, mdt_id, purpose = ex.principal, ex.mdt_id, ex.purpose
        now = datetime.now(timezone.utc)

        key = (principal.sub, principal.agency, principal.role, mdt_id, purpose)

        def resolve(session: Any, mdt: Any) -> tuple[RequestContext, Grounds] | None:
            if mdt is None or not registry.mdt_open(mdt, now):
                return None
            membership = registry.active_membership(session, mdt=mdt, principal=principal, now=now)
            if membership is None and not has_court_order(session, youth_id=mdt.youth_id,
                                                          principal=principal, now=now):
                return None
            ctx = RequestContext(request_id=ex.request_id, principal=principal, mdt_id=mdt_id,
                                 youth_id=mdt.youth_id, purpose=purpose, now=now, membership=membership,
                                 links=registry.youth_links(session, youth_id=mdt.youth_id))
            with stage_span("grounds"):
                return ctx, self.rt.grounds.resolve(session, ctx)

        def resolve_and_keep(generation: int | None) -> tuple[RequestContext, Grounds] | None:
            # Read after the generation, so at least as new as what it says; kept under it.
            with read_only(self.rt.engine) as conn, self.rt.sessions(bind=conn) as session:
                mdt = registry.load_mdt(session, mdt_id)
                resolved = resolve(session, mdt)
                # a refusal too ends at the youth's next stored instant (an order naming them that starts)
                youth_id = mdt.youth_id if mdt is not None else None
                until = context_cache.next_boundary(session, youth_id=youth_id, mdt_id=mdt_id, sub=principal.sub,
                                                    now=now)
            value = None if resolved is None else (youth_id, resolved[0].membership, resolved[0].links,
                                                   resolved[1])
            self.contexts.put(key, context_cache.Kept(generation=generation, until=until, value=value))
            return resolved

        with stage_span("context"):
            generation = await self._generation()  # first: what follows is at least as new
            kept = self.contexts.get(key, generation, now)
            if kept is not None:
                loaded = None
                if kept.value is not None:
                    youth_id, membership, links, grounds = kept.value
                    loaded = RequestContext(request_id=ex.request_id, principal=principal, mdt_id=mdt_id,
                                            youth_id=youth_id, purpose=purpose, now=now, membership=membership,
                                            links=links), grounds
            else:
                loaded = await to_thread.run_sync(resolve_and_keep, generation, limiter=self._read_slots())
        if loaded is None:
            raise Forbidden(NO_ACCESS)
        ctx, grounds = loaded
        ex.youth_id = ctx.youth_id
        ex.grounds = grounds
        return ctx, grounds

    def _decide(self, ex: Exchange, ctx: RequestContext, grounds: Grounds) -> DecisionSet:
        """Per category, the least intrusive tier of grounds that the policy accepts."""
        with stage_span("decide"):
            decisions = []
            for category in self.rt.categories:
                decision = None
                for tier in grounds.tiers(category):
                    decision = self.rt.policy.decide(role=ctx.principal.role, category=category,
                                                     purpose=ctx.purpose, grounds=tier)
                    if decision.allowed:
                        break
                assert decision is not None
                ex.evaluated[category] = sorted(tier)  # the exact input, so a candidate policy can replay it
                decisions.append(decision)
            result = DecisionSet(decisions=tuple(decisions), policy_version=self.rt.policy.version)
        ex.decisions = result
        ex.policy_version = result.policy_version
        ex.record_documents(grounds)
        return result

    async def _spend_limited_consents(self, ex: Exchange, decisions: DecisionSet, grounds: Grounds,
                                      outcome: FilterOutcome) -> FilterOutcome:
        """A single-disclosure authorization (HIV) is used up by the request that releases under it.

        The use is taken atomically; if another request took it first, the items it would
        have covered are withheld instead.
        """
        released_categories = {c for _r, cats in outcome.released for c in cats}
        lost: set[str] = set()
        for category in sorted(released_categories):
            d = decisions.for_category(category)
            if d is None or not d.allowed or not (d.ground or "").startswith("consent-"):
                continue
            covering = grounds.consent_ids.get(category, ())
            ids = [i for i in covering if i in grounds.limited_consents]
            if not ids or len(ids) < len(covering):  # an open-ended consent also covers it: spend nothing
                continue

            def spend(candidates: list[str] = ids) -> str | None:
                from broker.consent.service import consume_disclosure

                with self.rt.sessions() as session:
                    for consent_id in candidates:
                        if consume_disclosure(session, consent_id=consent_id):
                            return consent_id
                return None

            used = await to_thread.run_sync(spend)
            if used is None:
                lost.add(category)
            else:
                ex.detail.setdefault("disclosures_spent", []).append(used)
        if not lost:
            return outcome
        keep = [not (cats & lost) for _r, cats in outcome.released]
        outcome.withheld_categories.update(lost)
        outcome.released = [item for item, k in zip(outcome.released, keep) if k]
        outcome.released_redactions = [paths for paths, k in zip(outcome.released_redactions, keep) if k]
        outcome.redactions = [p for paths in outcome.released_redactions for p in paths]
        return outcome

    def _cite_documents(self, resource: dict, categories: frozenset[str], ex: Exchange) -> None:
        """Released under a consent or order: the item names it (42 CFR 2.32 asks for the consent)."""
        refs = []
        for category in sorted(categories):
            d = ex.decisions.for_category(category) if ex.decisions else None
            if d is None or d.ground is None or ex.grounds is None:
                continue
            if d.ground.startswith("consent-"):
                refs += [f"Consent/{i}" for i in ex.grounds.consent_ids.get(category, ())]
            elif d.ground == "court-order":
                refs += [f"court-order/{i}" for i in ex.grounds.court_order_ids.get(category, ())]
        if refs:
            meta = resource.setdefault("meta", {})
            meta.setdefault("extension", []).extend(
                {"url": RELEASED_UNDER_URL, "valueReference": {"reference": ref}} for ref in dict.fromkeys(refs))

    async def _fetch_page(self, ex: Exchange, ctx: RequestContext, search: SearchRequest, resource_type: str,
                          allowed: frozenset[str], *, need: int) -> FilterOutcome:
        """The first ``need`` releasable items (or all there are), asking sources only for what that takes.

        Only sources whose every item could be released are asked, in parallel, each for its
        first ``need`` matches (``SourceQuery.limit``). Items are merged in link order, so a
        source that returned all it was asked for (it may hold more) but released fewer than
        the page still needs after the sources before it is asked again for four times as many,
        until the page is full or the source has no more. Nothing beyond that is fetched, so a
        first page costs the same for a youth with ten records or ten thousand.
        """
        targets = [(c, pid) for c, pid in self._linked(ctx)
                   if (not c.resource_types or resource_type in c.resource_types)
                   and c.default_categories <= allowed]
        limits = [need] * len(targets)
        done: list[tuple[FilterOutcome, bool, str, int]] = []
        ask = list(range(len(targets)))
        for _round in range(MAX_PAGE_ROUNDS):
            jobs = [(targets[i][0], targets[i][1], functools.partial(targets[i][0].search, SourceQuery(
                resource_type=resource_type, patient_id=targets[i][1], params=search.params, limit=limits[i])))
                for i in ask]
            answers = await self._ask(ex, jobs, allowed=allowed, note=False)
            for i, (status, fetched, out) in zip(ask, answers):
                entry = (out, status != sources.OK or fetched < limits[i], status, fetched)
                if i < len(done):
                    done[i] = entry
                else:
                    done.append(entry)
            ask = _short_source(done, need)
            if not ask:
                break
            limits[ask[0]] *= 4
        merged = FilterOutcome()
        for (connector, _pid), (out, _complete, status, fetched) in zip(targets, done):
            ex.sources.append({"source": connector.name, "status": status, "fetched": fetched})
            merged.extend(out)
        return merged

    def _linked(self, ctx: RequestContext) -> Iterator[tuple[Any, str]]:
        """(connector, the source's id for the youth) for each link to a configured source."""
        for link in ctx.links:
            connector = self.rt.connectors.get(link.source)
            if connector is not None and link.system == connector.identifier_system:
                yield connector, link.value

    async def _ask(self, ex: Exchange, jobs: list[tuple[Any, str, Callable[..., Awaitable[Any]]]], *,
                   allowed: frozenset[str], note: bool = True) -> list[tuple[str, int, FilterOutcome]]:
        """Run each ``fetch(timeout=...)`` in parallel behind the source's timeout and breaker.

        Each source's items are classified, filtered and redacted as soon as that source has
        answered, while slower sources are still awaited. Returns (status, items fetched,
        outcome) per job; with ``note`` each is also recorded in the audit event's ``sources``.
        """

        async def one(connector: Any, patient_id: str,
                      fetch: Callable[..., Awaitable[Any]]) -> tuple[str, int, FilterOutcome]:
            timeout = self.rt.source_timeouts.get(connector.name, 5.0)
            with stage_span("fetch", source=connector.name) as span:
                status, found = await self.rt.gate.call(connector.name, functools.partial(fetch, timeout=timeout),
                                                        timeout=timeout, request_id=ex.request_id)
                if status == sources.OK and not isinstance(found, list):
                    status, found = sources.UNAVAILABLE, []
                if status != sources.OK:
                    _set_status(span, status)
            found = found or []
            defaults = connector.default_categories
            fresh = getattr(connector, "fresh_results", False) is True  # a connector's own claim, opt-in
            return status, len(found), self._classify(((r, patient_id, defaults) for r in found), allowed,
                                                      fresh=fresh)

        results = await asyncio.gather(*(one(c, pid, fetch) for c, pid, fetch in jobs))
        if note:
            for (connector, _pid, _fetch), (status, fetched, _out) in zip(jobs, results):
                ex.sources.append({"source": connector.name, "status": status, "fetched": fetched})
        return results

    def _bundle(self, request: Request, ex: Exchange, resource_type: str, search: SearchRequest,
                page: list[dict], categories: set[str], *, has_more: bool) -> dict:
        """A searchset Bundle with no total and nothing that hints at withheld items."""
        base = f"{self.rt.settings.public_url}/mdts/{ex.mdt_id}/fhir"
        query = urlencode(search.params)
        self_url = f"{base}/{resource_type}" + (f"?{query}" if query else "")
        links = [{"relation": "self", "url": self_url}]
        if has_more:
            sep = "&" if query else ""
            links.append({"relation": "next", "url": f"{base}/{resource_type}?{query}{sep}"
                                                      f"_count={search.count}&_offset={search.offset + search.count}"})
        bundle: dict = {
            "resourceType": "Bundle",
            "id": ex.request_id,
            "meta": {"lastUpdated": _now_iso(), "security": self.rt.labeller.bundle_security(categories)},
            "type": "searchset",
            "link": links,
        }
        entries = [{"fullUrl": f"{base}/{r.get('resourceType')}/{r.get('id')}", "resource": r,
                    "search": {"mode": "match"}} for r in page]
        for s in ex.sources:
            if s["status"] != sources.OK:
                entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [{
                    "severity": "warning", "code": "transient" if s["status"] == "unavailable" else "timeout",
                    "diagnostics": f"source {s['source']} {'did not answer in time' if s['status'] == 'timeout' else 'is unavailable'}"}]},
                    "search": {"mode": "outcome"}})
        if entries:
            bundle["entry"] = entries
        extensions = record_view.meta_extensions(self.rt.labeller, page, categories, notice_url=OBLIGATION_NOTICE_URL,
                                                 released_under_url=RELEASED_UNDER_URL)
        if extensions:
            bundle["meta"]["extension"] = extensions
        return bundle

    # ---- registry routes --------------------------------------------------------------

    async def registry_call(self, request: Request, *, action: str, route: str,
                            fn: Callable[..., Any], status_code: int = 200, mdt_id: str | None = None,
                            youth_id: str | None = None, body_model: type[BaseModel] | None = None,
                            json_body: bool = False) -> Response:
        """Run a registry operation in a worker thread, audited like every data request.

        ``fn(session, principal, now)`` or, with ``body_model``, ``fn(session, principal, now, body)``.
        """

        async def handler(ex: Exchange) -> Response:
            assert ex.principal is not None
            principal = ex.principal
            ex.youth_id = youth_id
            now = datetime.now(timezone.utc)
            args: tuple = ()
            if body_model is not None:
                body = await parse_body(request, body_model)
                args = (body,)
                ex.youth_id = getattr(body, "youth_id", youth_id)
            elif json_body:
                args = (await parse_json(request),)

            def work() -> tuple[Any, str | None]:
                with self.rt.sessions() as session:
                    result = fn(session, principal, now, *args)
                    mdt = registry.load_mdt(session, ex.mdt_id) if ex.mdt_id and not ex.youth_id else None
                    return result, (mdt.youth_id if mdt is not None else None)

            with stage_span("registry", action=action):
                result, mdt_youth = await to_thread.run_sync(work)
            data = result if isinstance(result, dict) else result.model_dump(mode="json")
            ex.youth_id = (data.pop("_youth_id", None) or data.get("youth_id")
                           or (data.get("id") if action.startswith("youth.") else None) or ex.youth_id
                           or mdt_youth)
            if action.startswith("mdt.") and data.get("id") and not ex.mdt_id:
                ex.mdt_id = data["id"]
            kind = action.split(".", 1)[0]
            if kind in DOCUMENT_ACTIONS and isinstance(data.get("id"), str):
                ex.detail[DOCUMENT_ACTIONS[kind]] = data["id"]
            return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")

        return await self.run(request, action=action, route=route, handler=handler, mdt_id=mdt_id)


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Parse a JSON body; the error names fields, never the values sent."""
    if request.headers.get("content-type", "").split(";")[0].strip() not in ("application/json",
                                                                               "application/fhir+json"):
        raise BadRequest("the body must be JSON (Content-Type: application/json)")
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        fields = sorted({".".join(str(p) for p in e.get("loc", ())) or "body" for e in err.errors()})
        raise BadRequest("invalid request body: " + ", ".join(fields)[:300]) from None


async def parse_json(request: Request) -> dict:
    """A JSON object body (FHIR resources are parsed by their own validators afterwards)."""
    if request.headers.get("content-type", "").split(";")[0].strip() not in ("application/json",
                                                                               "application/fhir+json"):
        raise BadRequest("the body must be JSON (Content-Type: application/fhir+json)")
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


DEFAULT_READ_SLOTS = 10
MAX_PAGE_ROUNDS = 12  # a source that keeps returning exactly what it was asked for is taken at its word


def _short_source(done: list[tuple[FilterOutcome, bool, str, int]], need: int) -> list[int]:
    """The first source (index) that may hold more and must, for the page to fill; [] if none must."""
    remaining = need
    for i, (out, complete, _status, _fetched) in enumerate(done):
        if len(out.released) >= remaining:
            return []
        if not complete:
            return [i]
        remaining -= len(out.released)
    return []


def _trace_id(_span: Any) -> str | None:
    """The current trace id, when tracing is on."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _set_status(span: Any, status: str) -> None:
    span.set(source_status=status)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _every_type(connector: Any, patient_id: str, types: list[str], *, timeout: float) -> list[dict]:
    """Every listed resource type from one source; one type failing fails (and cancels) the source."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(connector.search(SourceQuery(resource_type=t, patient_id=patient_id),
                                                     timeout=timeout)) for t in types]
    except ExceptionGroup as group:  # the source's status comes from its first failure
        timeouts = group.subgroup((SourceTimeout, TimeoutError))
        raise (timeouts or group).exceptions[0] from None
    found: list[dict] = []
    for task in tasks:
        items = task.result()
        if not isinstance(items, list):
            raise TypeError("connector returned something other than a list")
        found.extend(items)
    return found
