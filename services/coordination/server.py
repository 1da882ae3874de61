"""The coordination service's gRPC edge: sessions of auctions, markets, votes and plugins.

Validation happens before any message is sent (a bad parameter is
INVALID_ARGUMENT naming it); participants are resolved through the registry
(:mod:`.participants`: explicit ids, or a capability selector); the run itself
is :mod:`.runs` (built-in protocols) or :mod:`.plugins` (registered ones) on
:mod:`.engine`; sessions live in etcd (:mod:`.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from mabeam import errors
from mabeam.client import ChannelPool, MeshClient
from mabeam.runtime import validate
from mabeam.runtime.cache import PrefixCache, report_health
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.idempotency import idempotent
from mabeam.runtime.retention import Retention, expired_message
from mabeam.server import MeshServer
from mabeam.services.coordination import messaging, runs
from mabeam.services.coordination.deadlines import current_call, deadline_s, within_deadline
from mabeam.services.coordination.engine import FanOut, Session, finish_reserve
from mabeam.services.coordination.orphans import Orphans
from mabeam.services.coordination.participants import resolve
from mabeam.services.coordination.plugins import run_plugin
from mabeam.services.coordination.protocols.errors import ProtocolParamError
from mabeam.services.coordination.store import MAX_TRANSCRIPT_BYTES, SessionStore, decode_protocol
from mabeam.services.coordination.subscriptions.store import SubscriptionStore
from mabeam.v1 import (
    common_pb2,
    coordination_pb2,
    coordination_pb2_grpc,
    protocol_plugin_pb2,
    protocol_plugin_pb2_grpc,
)

SERVICE_NAME = "mabeam.v1.CoordinationService"
PROTOCOL_NAME_RE = re.compile(r"^[a-z0-9_]{1,64}\Z")
MAX_CONTEXT_BYTES = 64 * 1024  # RunRequest.context, serialized
ONE_SHOT = {"first_price", "vickrey", "contract_net", "call_market", "consensus"}
# How often the elected replica enforces MABEAM_SESSION_RETENTION_COUNT (when set).
PRUNE_INTERVAL_S = 30.0

AUCTIONS = {
    coordination_pb2.AUCTION_TYPE_FIRST_PRICE: "first_price",
    coordination_pb2.AUCTION_TYPE_SECOND_PRICE: "vickrey",
    coordination_pb2.AUCTION_TYPE_ENGLISH: "english",
    coordination_pb2.AUCTION_TYPE_DUTCH: "dutch",
}
MARKETS = {
    coordination_pb2.MARKET_TYPE_TATONNEMENT: "tatonnement",
    coordination_pb2.MARKET_TYPE_CALL: "call_market",
}
TIES = {
    coordination_pb2.TIE_RULE_UNSPECIFIED: "no_decision",
    coordination_pb2.TIE_RULE_NO_DECISION: "no_decision",
    coordination_pb2.TIE_RULE_FIRST_OPTION: "first_option",
}


def _param_error(exc: ProtocolParamError) -> errors.InvalidArgument:
    return errors.InvalidArgument(exc.field, exc.message)


class CoordinationServicer(coordination_pb2_grpc.CoordinationServiceServicer):
    """mabeam.v1.CoordinationService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient, retention: Retention | None = None) -> None:
        self._server = server
        self.retention = retention if retention is not None else Retention.load("session", os.environ)
        self.store = SessionStore(etcd, server.config, retention=self.retention)
        # Sessions of a replica that died are ended by another (docs/decisions.md, "No orphaned sessions").
        self.orphans = Orphans(self.store, server.instance_id, server.config.service_ttl)
        self.pool = ChannelPool(server.config.client_tls(), server.config.agent_credential())
        self.fanout = FanOut(self.pool)
        self.plugins: PrefixCache[coordination_pb2.ProtocolInfo] = PrefixCache(
            etcd, self.store.protocols, decode_protocol
        )
        self._mesh: MeshClient | None = None

    async def start(self) -> None:
        await self.plugins.start()
        await self.store.backfill_index()  # sessions stored before the index: once per mesh
        self._mesh = await self._server.connect_mesh()
        await self.orphans.start()

    async def stop(self) -> None:
        await self.orphans.stop()
        await self.plugins.stop()
        if self._mesh is not None:
            await self._mesh.close()
        await self.pool.close()

    # -- running -------------------------------------------------------------------

    async def _run(
        self,
        settings: coordination_pb2.SessionSettings,
        protocol: str,
        params: dict[str, Any],
        out: coordination_pb2.Session,
        context: struct_pb2.Struct | None = None,
    ) -> None:
        """Run a session and fill ``out`` (a response's session) as ``settings.view`` asks."""
        if settings.view not in coordination_pb2.SessionView.values():
            raise errors.InvalidArgument("settings.view", f"unknown view {settings.view}")
        call = current_call()
        try:
            session = await self._session(settings, protocol, params, context)
        except errors.DeadlineExceeded as exc:
            if call is not None:
                call.error = exc
            raise
        session.answer(out, settings.view)
        if call is not None:
            call.session = out

    async def _session(
        self,
        settings: coordination_pb2.SessionSettings,
        protocol: str,
        params: dict[str, Any],
        context: struct_pb2.Struct | None = None,
    ) -> Session:
        """Run a session within its deadline: lookups, claim, rounds and the outcome's write."""
        call = current_call()
        started = call.started if call is not None else time.monotonic()
        selector = settings.participants
        if not selector.agent_ids and not selector.capability and not selector.labels:
            raise errors.InvalidArgument("settings.participants", "give agent ids or a capability")
        deadline = deadline_s(settings)
        round_timeout = validate.seconds(
            settings.round_timeout, "settings.round_timeout", default=2.0, minimum=0.001, maximum=600
        )
        if settings.session_id:
            validate.identifier(settings.session_id, "settings.session_id")
        builtin = runs.BUILTINS.get(protocol)
        plugin = self.plugins.get(self.store.protocols + protocol.encode()) if builtin is None else None
        if builtin is None and plugin is None:
            raise errors.NotFound(
                f"protocol {protocol!r} is neither built in nor registered (see ListProtocols)",
                reason=common_pb2.ERROR_REASON_PROTOCOL_NOT_FOUND,
            )
        if builtin is not None:
            try:
                builtin.validate(params)
            except ProtocolParamError as exc:
                raise _param_error(exc) from None
        assert self._mesh is not None
        # The rounds' share of the deadline bounds the lookups and the claim too.
        budget_end = started + deadline - finish_reserve(deadline)
        try:
            async with asyncio.timeout(max(budget_end - time.monotonic(), 0.001)):
                participants, missing = await resolve(self._mesh.registry, selector)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"the session's deadline ({deadline:g} s) passed while its participants were looked up "
                "in the registry; nothing ran"
            ) from None
        if not participants and not missing:
            raise errors.FailedPrecondition(
                f"no live agent matches the participants (capability {selector.capability!r})",
                reason=common_pb2.ERROR_REASON_NO_CAPABLE_AGENT,
            )
        session = Session(
            self.store,
            self.fanout,
            protocol,
            params,
            participants,
            session_id=settings.session_id,
            deadline_s=deadline,
            round_timeout_s=round_timeout,
            coordinator_id=self._server.instance_id,
            stream_rounds=protocol not in ONE_SHOT,
            notify=settings.notify_outcome,
            started=started,
        )
        if context is not None:
            session.proto.context.CopyFrom(context)
        session.proto.participants.extend(e.agent_id for e in missing)
        for exclusion in missing:
            session.exclude(exclusion)
        if settings.session_id or protocol not in ONE_SHOT:
            # Claimed up front: an explicit id must be unique, and watchers of an
            # iterative session need it to exist while it runs.
            try:
                async with asyncio.timeout(max(session.remaining(), 0.001)):
                    claimed = await session.claim(await self.orphans.current_keeper())
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"the session's deadline ({deadline:g} s) passed while session "
                    f"{session.session_id} was being claimed in etcd; nothing ran",
                    metadata={"session_id": session.session_id},
                ) from None
            if not claimed:
                raise errors.AlreadyExists(f"session {session.session_id!r} exists already")
        if not participants:
            await session.finish(
                coordination_pb2.Outcome(decided=False, reason="no participant is registered")
            )
            return session
        try:
            if builtin is not None:
                outcome = await asyncio.wait_for(
                    builtin.driver(session, params), timeout=max(session.hard_limit(), 0.001)
                )
            else:
                assert plugin is not None
                outcome = await asyncio.wait_for(
                    run_plugin(self.pool, session, plugin, params), timeout=max(session.hard_limit(), 0.001)
                )
        except ProtocolParamError as exc:
            await session.finish(
                coordination_pb2.Outcome(decided=False, reason=str(exc)),
                coordination_pb2.SESSION_STATE_FAILED,
            )
            raise _param_error(exc) from None
        except TimeoutError:
            session.cut_off()
            await session.finish(
                coordination_pb2.Outcome(
                    decided=False,
                    reason=f"session deadline ({deadline:g} s) reached after {session.proto.round_count} "
                    "round(s); no decision",
                )
            )
            return session
        except errors.MabeamError as exc:
            await session.finish(
                coordination_pb2.Outcome(decided=False, reason=exc.message),
                coordination_pb2.SESSION_STATE_FAILED,
            )
            return session
        await session.finish(outcome)
        return session

    # -- retention ---------------------------------------------------------------------

    async def run_pruner(self) -> None:
        """While leading (etcd election), delete the oldest finished sessions beyond the count cap."""
        await self.store.while_leading_pruner(
            self._server.instance_id, self._server.config.service_ttl, self.prune_once, PRUNE_INTERVAL_S
        )

    async def prune_once(self) -> int:
        """One tick of the count cap: at most PRUNE_EXAMINED sessions examined."""
        return await self.store.prune_oldest(self.retention.max_count)

    # -- RPCs ------------------------------------------------------------------------

    @within_deadline(coordination_pb2.RunAuctionResponse)
    @idempotent(coordination_pb2.RunAuctionResponse)
    async def RunAuction(
        self, request: coordination_pb2.RunAuctionRequest, context: Any
    ) -> coordination_pb2.RunAuctionResponse:
        protocol = AUCTIONS.get(request.type)
        if protocol is None:
            raise errors.InvalidArgument("type", "choose FIRST_PRICE, SECOND_PRICE, ENGLISH or DUTCH")
        params: dict[str, Any] = {"item": request.item, "reserve_price": request.reserve_price}
        if request.HasField("item_attributes"):
            params["item_attributes"] = json_format.MessageToDict(request.item_attributes)
        if protocol == "english":
            params.update(
                start_price=request.start_price,
                increment=request.increment or 1.0,
                max_rounds=request.max_rounds or 100,
            )
        if protocol == "dutch":
            if not request.start_price:
                raise errors.InvalidArgument("start_price", "is required for a Dutch auction (> floor_price)")
            params.update(
                start_price=request.start_price,
                decrement=request.decrement or 1.0,
                floor_price=request.floor_price,
                max_rounds=request.max_rounds or 100,
            )
        if not request.item:
            raise errors.InvalidArgument("item", "is required")
        reply = coordination_pb2.RunAuctionResponse()
        await self._run(request.settings, protocol, params, reply.session)
        return reply

    @within_deadline(coordination_pb2.RunMarketResponse)
    @idempotent(coordination_pb2.RunMarketResponse)
    async def RunMarket(
        self, request: coordination_pb2.RunMarketRequest, context: Any
    ) -> coordination_pb2.RunMarketResponse:
        protocol = MARKETS.get(request.type)
        if protocol is None:
            raise errors.InvalidArgument("type", "choose TATONNEMENT or CALL")
        params: dict[str, Any] = {"goods": list(request.goods)}
        if protocol == "tatonnement":
            params.update(
                initial_prices=dict(request.initial_prices),
                step=request.step or 0.1,
                tolerance=request.tolerance or 0.01,
                max_rounds=request.max_rounds or 100,
                min_price=request.min_price or 1e-4,
            )
        reply = coordination_pb2.RunMarketResponse()
        await self._run(request.settings, protocol, params, reply.session)
        return reply

    @within_deadline(coordination_pb2.RunConsensusResponse)
    @idempotent(coordination_pb2.RunConsensusResponse)
    async def RunConsensus(
        self, request: coordination_pb2.RunConsensusRequest, context: Any
    ) -> coordination_pb2.RunConsensusResponse:
        rule = runs.RULE_NAMES.get(request.rule)
        if rule is None:
            raise errors.InvalidArgument("rule", "choose MAJORITY, SUPERMAJORITY, UNANIMITY or PLURALITY")
        if not request.question:
            raise errors.InvalidArgument("question", "is required")
        params: dict[str, Any] = {
            "question": request.question,
            "options": list(request.options) or ["yes", "no"],
            "rule": rule,
            "threshold": request.threshold
            if request.rule == coordination_pb2.CONSENSUS_RULE_SUPERMAJORITY
            else 2 / 3,
            "quorum": request.quorum,
            "weights": dict(request.weights),
            "tie_rule": TIES.get(request.tie_rule, "no_decision"),
        }
        reply = coordination_pb2.RunConsensusResponse()
        await self._run(request.settings, "consensus", params, reply.session)
        return reply

    @within_deadline(coordination_pb2.RunResponse)
    @idempotent(coordination_pb2.RunResponse)
    async def Run(self, request: coordination_pb2.RunRequest, context: Any) -> coordination_pb2.RunResponse:
        if not request.protocol:
            raise errors.InvalidArgument("protocol", "is required")
        params = json_format.MessageToDict(request.parameters) if request.HasField("parameters") else {}
        if request.HasField("context") and request.context.ByteSize() > MAX_CONTEXT_BYTES:
            raise errors.InvalidArgument(
                "context", f"is {request.context.ByteSize()} bytes, over the limit of {MAX_CONTEXT_BYTES}"
            )
        reply = coordination_pb2.RunResponse()
        context = request.context if request.HasField("context") else None
        await self._run(request.settings, request.protocol, params, reply.session, context)
        return reply

    @idempotent(coordination_pb2.RegisterProtocolResponse)
    async def RegisterProtocol(
        self, request: coordination_pb2.RegisterProtocolRequest, context: Any
    ) -> coordination_pb2.RegisterProtocolResponse:
        if not PROTOCOL_NAME_RE.match(request.name):
            raise errors.InvalidArgument("name", "must be 1-64 characters of [a-z0-9_]")
        if request.name in runs.BUILTINS:
            raise errors.AlreadyExists(f"{request.name!r} is a built-in protocol")
        endpoint = validate.endpoint(request.endpoint, "endpoint")
        stub = protocol_plugin_pb2_grpc.ProtocolPluginServiceStub(self.pool.get(endpoint))
        try:
            described = await stub.Describe(protocol_plugin_pb2.DescribeRequest(), timeout=5)
        except grpc.RpcError as exc:
            raise errors.FailedPrecondition(
                f"no ProtocolPluginService answers at {endpoint}: {exc.details()}"
            ) from None
        info = coordination_pb2.ProtocolInfo(
            name=request.name,
            description=request.description or described.description,
            builtin=False,
            endpoint=endpoint,
            parameters=described.parameters,
            iterative=described.iterative,
        )
        if not await self.store.put_protocol(info, request.replace):
            raise errors.AlreadyExists(
                f"protocol {request.name!r} is registered already (set replace to change it)"
            )
        return coordination_pb2.RegisterProtocolResponse(protocol=info)

    async def ListProtocols(
        self, request: coordination_pb2.ListProtocolsRequest, context: Any
    ) -> coordination_pb2.ListProtocolsResponse:
        size = validate.page_size(request.page_size)
        infos = [runs.protocol_info(b) for b in runs.BUILTINS.values()]
        infos += [info for _, info in self.plugins.items()]
        infos.sort(key=lambda i: i.name)
        chunk, token = validate.page(infos, lambda i: i.name, size, request.page_token, [])
        return coordination_pb2.ListProtocolsResponse(protocols=chunk, next_page_token=token)

    @idempotent(coordination_pb2.UnregisterProtocolResponse)
    async def UnregisterProtocol(
        self, request: coordination_pb2.UnregisterProtocolRequest, context: Any
    ) -> coordination_pb2.UnregisterProtocolResponse:
        if request.name in runs.BUILTINS:
            raise errors.FailedPrecondition(f"{request.name!r} is built in and cannot be unregistered")
        if not await self.store.delete_protocol(request.name):
            raise errors.NotFound(
                f"protocol {request.name!r} is not registered",
                reason=common_pb2.ERROR_REASON_PROTOCOL_NOT_FOUND,
            )
        return coordination_pb2.UnregisterProtocolResponse()

    def _not_found(self, session_id: str) -> errors.NotFound:
        """A session id not in etcd: it never existed, or retention deleted it (the message says which
        retention: the period, the count cap)."""
        return errors.NotFound(
            expired_message(f"session {session_id!r}", self.retention),
            reason=common_pb2.ERROR_REASON_SESSION_NOT_FOUND,
        )

    async def GetSession(
        self, request: coordination_pb2.GetSessionRequest, context: Any
    ) -> coordination_pb2.GetSessionResponse:
        validate.identifier(request.session_id, "session_id")
        session = await self.store.get(
            request.session_id, full=request.view != coordination_pb2.SESSION_VIEW_BASIC
        )
        if session is None:
            raise self._not_found(request.session_id)
        return coordination_pb2.GetSessionResponse(session=session)

    async def ListSessions(
        self, request: coordination_pb2.ListSessionsRequest, context: Any
    ) -> coordination_pb2.ListSessionsResponse:
        size = validate.page_size(request.page_size)
        after = request.started_after.ToNanoseconds() if request.HasField("started_after") else None
        before = request.started_before.ToNanoseconds() if request.HasField("started_before") else None
        # Newest first: the store reads one page of its time-ordered index (docs/decisions.md,
        # "Paging that pages"); the token is the index position the next page starts after.
        if request.participant:
            validate.identifier(request.participant, "participant")
        filters = [request.protocol, after, before, request.view]
        if request.participant:  # tokens of lists without it stay what they were
            filters.append(request.participant)
        position = validate.decode_page_token(request.page_token, filters)
        chunk, following = await self.store.list_page(
            size=size,
            after=position,
            protocol=request.protocol,
            started_after_ns=after,
            started_before_ns=before,
            participant=request.participant,
        )
        token = validate.encode_page_token(following, filters) if following is not None else ""
        if request.view == coordination_pb2.SESSION_VIEW_FULL:
            budget = [MAX_TRANSCRIPT_BYTES]  # shared by the page's sessions
            for s in chunk:
                s.rounds.extend(await self.store.get_rounds(s.session_id, budget))
        return coordination_pb2.ListSessionsResponse(sessions=chunk, next_page_token=token)

    async def WatchSession(
        self, request: coordination_pb2.WatchSessionRequest, context: Any
    ) -> AsyncIterator[coordination_pb2.WatchSessionResponse]:
        validate.identifier(request.session_id, "session_id")
        rounds, finished, revision = await self.store.rounds_so_far(request.session_id)
        summary = await self.store.get(request.session_id, full=False)
        if summary is None:
            raise self._not_found(request.session_id)
        for record in rounds:
            yield coordination_pb2.WatchSessionResponse(
                type=coordination_pb2.SESSION_EVENT_TYPE_ROUND, round=record
            )
        if not finished:
            async with contextlib.aclosing(
                self.store.follow_rounds(request.session_id, revision + 1)
            ) as following:
                async for record in following:
                    yield coordination_pb2.WatchSessionResponse(
                        type=coordination_pb2.SESSION_EVENT_TYPE_ROUND, round=record
                    )
        final = await self.store.get(request.session_id, full=False)
        yield coordination_pb2.WatchSessionResponse(
            type=coordination_pb2.SESSION_EVENT_TYPE_FINISHED, session=final
        )


def builder(retention: Retention) -> Callable[[MeshServer, EtcdClient], Awaitable[None]]:
    """The build function of a coordination service keeping finished sessions as ``retention`` says."""

    async def build_coordination(server: MeshServer, etcd: EtcdClient) -> None:
        await build(server, etcd, retention)

    return build_coordination


async def build(server: MeshServer, etcd: EtcdClient, retention: Retention | None = None) -> None:
    """Add the coordination servicer to ``server`` (called by mabeam.runtime.service.start_service).

    ``retention``: of finished sessions; default: ``$MABEAM_SESSION_RETENTION`` (7 days) and
    ``$MABEAM_SESSION_RETENTION_COUNT`` (no cap). With a cap, one elected replica enforces it.
    """
    servicer = CoordinationServicer(server, etcd, retention)
    await servicer.start()
    server.on_stop(servicer.stop)
    server.on_stop(servicer.store.requests.stop)
    if servicer.retention.max_count:
        server.spawn(servicer.run_pruner(), "session retention")
    report_health(server, servicer.plugins)
    server.add_service(
        SERVICE_NAME, coordination_pb2_grpc.add_CoordinationServiceServicer_to_server, servicer
    )
    # MessagingService shares the process, its channels to the agents and its etcd client.
    await messaging.build(server, SubscriptionStore(etcd, server.config), servicer.pool)
