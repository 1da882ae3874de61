"""The registry's gRPC edge: registration with leases, heartbeats, lookups, watches.

Requests are validated here and turned into calls on the registry's pieces:
the agent directory (:mod:`.directory`, watch-fed caches that answer lookups
with no etcd read per call), heartbeats (:mod:`.heartbeats`), supervision
(:mod:`.supervisor`), the health prober (:mod:`.prober`); writes go to etcd in
transactions (:mod:`.store`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from mabeam import auth, errors, telemetry
from mabeam.runtime import idempotency, validate
from mabeam.runtime.cache import report_health
from mabeam.runtime.etcd import UNREACHABLE, EtcdClient, WatchCompacted
from mabeam.runtime.idempotency import idempotent
from mabeam.runtime.retention import Retention
from mabeam.runtime.watchqueue import BoundedQueue
from mabeam.server import MeshServer
from mabeam.services.registry import auth_service, catalog, heartbeats, migration, nodes, prober
from mabeam.services.registry import supervisor as supervision
from mabeam.services.registry.directory import DEFAULT_TTL, AgentDirectory, checked_registration, matches
from mabeam.services.registry.store import RegistryStore, decode_agent, new_token
from mabeam.v1 import common_pb2, registry_pb2, registry_pb2_grpc

SERVICE_NAME = "mabeam.v1.RegistryService"
log = logging.getLogger("mabeam.registry")


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _without_token(answer: registry_pb2.StartAgentResponse) -> registry_pb2.StartAgentResponse:
    """The StartAgent answer as recorded by request_id: no token in etcd in the clear."""
    recorded = registry_pb2.StartAgentResponse()
    recorded.CopyFrom(answer)
    recorded.token = ""
    return recorded


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """mabeam.v1.RegistryService."""

    def __init__(
        self,
        server: MeshServer,
        etcd: EtcdClient,
        policy: catalog.LaunchPolicy | None = None,
        retention: Retention | None = None,
        node: nodes.NodeSpec | None = None,
    ) -> None:
        self._server = server
        # Stopped and failed supervised records are kept for ``retention`` (runtime/retention.py).
        self.store = RegistryStore(etcd, server.config, retention)
        self.directory = AgentDirectory(etcd, self.store)
        self.supervisor = supervision.Supervisor(server, etcd, self.store, self.directory, policy, node)
        # Heartbeats refresh agents' leases over shared streams, not a stream per beat.
        self.keepalives = self.store.keepalive_stream()
        self._verified = heartbeats.VerifiedTokens()  # shared by every Heartbeat stream
        self.directory.on_token_change(self._verified.forget)  # a changed token is checked again

    # -- registration -------------------------------------------------------

    async def RegisterAgent(
        self, request: registry_pb2.RegisterAgentRequest, context: Any
    ) -> registry_pb2.RegisterAgentResponse:
        # The outcome (by request_id) is written in the registration's own transaction.
        answer = await self.store.requests.run(
            "RegisterAgent",
            request,
            registry_pb2.RegisterAgentResponse,
            lambda: self._register(request),
            atomic=True,
            replayed=lambda answer: self._replayed_registration(request, answer),
        )
        # Current, not recorded: a replay gets the digests of today's service tokens.
        del answer.service_token_digests[:]
        answer.service_token_digests.extend(self._service_digests())
        return answer

    async def _replayed_registration(
        self, request: registry_pb2.RegisterAgentRequest, answer: registry_pb2.RegisterAgentResponse
    ) -> registry_pb2.RegisterAgentResponse:
        """A replayed registration's answer: its token is not recorded, so give one again.

        The caller's own token when it sent one (the same request, so the same
        token); else a new one, made the registration's token if that
        registration is still live (the first answer's token stops working:
        whoever resends lost it). Empty when the registration is gone.
        """
        if request.token:
            answer.token = request.token
            return answer
        token = new_token()
        if await self.store.rotate_token(answer.agent.agent_id, answer.agent.lease_id, token):
            answer.token = token
        return answer

    def _service_digests(self) -> list[str]:
        """The digests agents check the mesh's calls against (none without auth)."""
        book = auth_service.book_of(self._server)
        return book.service_digests() if book is not None else []

    async def _register(
        self, request: registry_pb2.RegisterAgentRequest, *, strong: bool = False
    ) -> registry_pb2.RegisterAgentResponse:
        """Register (or take over, with the agent's token) ``request.agent_id``.

        An id this replica's directory does not hold is taken as absent without
        reading etcd first (a re-registration of a thousand lapsed agents saves
        a round trip each); the write's compare on the key's create revision
        catches a directory that lags, and the call then runs again with a
        strong read (``strong``).
        """
        agent_id, endpoint, capabilities, ttl = checked_registration(request)

        assumed_absent = not strong and self.directory.agents.get(self.store.keys.agent(agent_id)) is None
        if assumed_absent:
            existing, create_revision = None, 0
        else:
            existing, create_revision = await self.store.get_agent(agent_id)
        generation = 1
        if existing is not None:
            if not await self.store.token_matches(agent_id, request.token):
                raise errors.AlreadyExists(
                    f"agent {agent_id!r} is registered and live; present its token to take it over",
                    reason=common_pb2.ERROR_REASON_AGENT_ALREADY_REGISTERED,
                )
            generation = existing.generation + 1
        token = request.token or new_token()
        lease = await self.store.grant_lease(max(1, round(ttl)))
        agent = registry_pb2.Agent(
            agent_id=agent_id,
            endpoint=endpoint,
            capabilities=capabilities,
            labels=dict(request.labels),
            resources=request.resources,
            status=registry_pb2.AGENT_STATUS_SERVING,
            lease_id=lease.id,
            # etcd may grant more than asked (its minimum TTL is 1.5 election timeouts).
            lease_ttl=duration_pb2.Duration(seconds=max(int(lease.ttl), 1)),
            registered_at=_now(),
            generation=generation,
            node=request.node,
            supervised=await self.supervisor.is_supervised(agent_id),
        )
        guard = idempotency.current()
        record = None
        answer = None
        if guard is not None:
            # The answer, known before the write: the agent as the directory shows it once
            # registered (its fresh load key says it beat at registration).
            # Recorded without the token (no secret in etcd in the clear): see _replayed_registration.
            answer = registry_pb2.RegisterAgentResponse()
            answer.agent.CopyFrom(agent)
            answer.agent.load.reported_at.CopyFrom(agent.registered_at)
            answer.agent.last_heartbeat_at.CopyFrom(agent.registered_at)
            record = await guard.txn_ops(answer)
        try:
            ok, revision = await self.store.register(agent, token, lease.id, create_revision, record)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(lease.id)
            raise
        if not ok:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(lease.id)
            if assumed_absent:
                return await self._register(request, strong=True)  # the directory lagged: read etcd
            raise errors.AlreadyExists(
                f"agent {agent_id!r} was registered concurrently; retry with its token",
                reason=common_pb2.ERROR_REASON_AGENT_ALREADY_REGISTERED,
            )
        # Read-your-writes on this replica: lookups that follow see the registration.
        with contextlib.suppress(TimeoutError):
            await self.directory.agents.wait_revision(revision, timeout=2.0)
        if existing is not None and existing.lease_id and existing.lease_id != lease.id:
            # The old registration's keys moved to the new lease; drop the old one.
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(existing.lease_id)
        if answer is not None:
            answer.token = token  # what was recorded has none; this caller gets it
            return answer
        return registry_pb2.RegisterAgentResponse(agent=self.directory.view(agent), token=token)

    async def Heartbeat(
        self, request_iterator: AsyncIterator[registry_pb2.HeartbeatRequest], context: Any
    ) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
        """Refresh leases as beats come; answer each beat once its lease is refreshed.

        The beats of one stream are handled concurrently and answered in the
        order they finish (:func:`.heartbeats.answer_concurrently`); the first
        error (bad beat, unknown agent, wrong token, etcd unreachable) ends the
        stream, except an unknown agent's or a wrong token's when the beat set
        ``answer_refusals``: that beat is answered with a refusal.
        """
        stream = heartbeats.HeartbeatStream(self.store, self.directory, self.keepalives, self._verified)
        told: list[str] = []  # the service token digests this stream was last given

        async def handle(beat: registry_pb2.HeartbeatRequest) -> registry_pb2.HeartbeatResponse:
            agent_id = validate.identifier(beat.agent_id, "agent_id")
            auth.require_agent(agent_id)  # an agent token beats only for the ids it may act for
            # A NaN or negative load would be stored and then mislead least-loaded assignment.
            validate.finite(beat.load.load, "load.load", minimum=0)
            try:
                answer = await stream.beat(agent_id, beat.token, beat.load)
            except (errors.NotFound, errors.PermissionDenied) as exc:
                if not beat.answer_refusals:
                    raise  # ends the stream with that status
                answer = heartbeats.refusal(agent_id, exc)
            digests = self._service_digests()
            if digests != told:
                told[:] = digests
                answer.service_token_digests.extend(digests)
            return answer

        try:
            async with contextlib.aclosing(
                heartbeats.answer_concurrently(request_iterator, handle)
            ) as answers:
                async for answer in answers:
                    yield answer
        finally:
            await stream.close()

    @idempotent(registry_pb2.DeregisterAgentResponse)
    async def DeregisterAgent(
        self, request: registry_pb2.DeregisterAgentRequest, context: Any
    ) -> registry_pb2.DeregisterAgentResponse:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        agent, _ = await self.store.get_agent(agent_id)
        if agent is None:
            raise errors.NotFound(
                f"agent {agent_id!r} is not registered", reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND
            )
        if not await self.store.token_matches(agent_id, request.token):
            raise errors.PermissionDenied(f"wrong or missing token for agent {agent_id!r}")
        await self.store.revoke_lease(agent.lease_id)
        return registry_pb2.DeregisterAgentResponse()

    # -- lookups ------------------------------------------------------------

    async def GetAgent(
        self, request: registry_pb2.GetAgentRequest, context: Any
    ) -> registry_pb2.GetAgentResponse:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        agent = self.directory.get(agent_id)
        if agent is None:
            # Not in the cache yet (registered through another replica a moment
            # ago?): one strong read settles it.
            stored, _ = await self.store.get_agent(agent_id)
            if stored is None:
                raise errors.NotFound(
                    f"agent {agent_id!r} is not registered", reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND
                )
            agent = self.directory.view(stored)
        return registry_pb2.GetAgentResponse(agent=agent)

    async def ListAgents(
        self, request: registry_pb2.ListAgentsRequest, context: Any
    ) -> registry_pb2.ListAgentsResponse:
        size = validate.page_size(request.page_size)
        filters = [request.capability, sorted(request.labels.items()), request.status]
        # Filter the cached records first and build views only for the page:
        # a lookup must not cost a copy of the whole directory.
        matching = self.directory.with_capability(request.capability)
        if request.labels:
            matching = [a for a in matching if matches(a, "", request.labels)]
        if request.status != registry_pb2.AGENT_STATUS_UNSPECIFIED:
            matching = [a for a in matching if self.directory.view(a).status == request.status]
        chunk, token = validate.page(matching, lambda a: a.agent_id, size, request.page_token, filters)
        return registry_pb2.ListAgentsResponse(
            agents=[self.directory.view(a) for a in chunk], next_page_token=token
        )

    async def WatchAgents(
        self, request: registry_pb2.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchAgentsResponse]:
        if request.after_revision < 0:
            raise errors.InvalidArgument("after_revision", "must not be negative")
        # Bounded (mabeam.runtime.watchqueue): a consumer too far behind is cut, never buffered without end.
        resume = "watch again with after_revision = the revision of the last event received"
        queue: BoundedQueue[registry_pb2.WatchAgentsResponse] = BoundedQueue("WatchAgents", resume)
        cache = self.directory.agents

        def wanted(agent: registry_pb2.Agent | None) -> bool:
            return agent is not None and matches(agent, request.capability, request.labels)

        def on_change(
            kind: str, key: bytes, old: registry_pb2.Agent | None, new: registry_pb2.Agent | None, rev: int
        ) -> None:
            if queue.overflowed:  # cut: nothing more is kept for this stream
                return
            if kind == "PUT" and wanted(new):
                assert new is not None
                etype = (
                    registry_pb2.AGENT_EVENT_TYPE_UPDATED
                    if old is not None
                    else registry_pb2.AGENT_EVENT_TYPE_ADDED
                )
                queue.put_nowait(
                    registry_pb2.WatchAgentsResponse(type=etype, agent=self.directory.view(new), revision=rev)
                )
            elif kind == "DELETE" and wanted(old):
                assert old is not None
                queue.put_nowait(
                    registry_pb2.WatchAgentsResponse(
                        type=registry_pb2.AGENT_EVENT_TYPE_REMOVED, agent=old, revision=rev
                    )
                )

        if request.after_revision:
            # Pulled from etcd's history at the consumer's pace: nothing is queued here.
            async for event in self._resume(request, wanted):
                yield event
            return
        cache.add_listener(on_change)
        try:
            revision = cache.revision
            for _, agent in sorted(cache.items()):
                if wanted(agent):
                    yield registry_pb2.WatchAgentsResponse(
                        type=registry_pb2.AGENT_EVENT_TYPE_EXISTING,
                        agent=self.directory.view(agent),
                        revision=revision,
                    )
            yield registry_pb2.WatchAgentsResponse(
                type=registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE, revision=revision
            )
            async for event in queue:
                yield event
        finally:
            cache.remove_listener(on_change)

    async def _resume(
        self, request: registry_pb2.WatchAgentsRequest, wanted: Any
    ) -> AsyncIterator[registry_pb2.WatchAgentsResponse]:
        """Changes after a revision, straight from etcd's history."""
        # Agents written since after_revision: the record if it matched, None if not.
        known: dict[bytes, registry_pb2.Agent | None] = {}
        try:
            async for event in self.store.watch_agents(start_revision=request.after_revision + 1):
                if event.kind == "PUT":
                    agent = decode_agent(event.key, event.value)
                    if not wanted(agent):
                        known[event.key] = None
                        continue
                    assert agent is not None
                    known[event.key] = agent
                    etype = (
                        registry_pb2.AGENT_EVENT_TYPE_ADDED
                        if event.version == 1
                        else registry_pb2.AGENT_EVENT_TYPE_UPDATED
                    )
                    yield registry_pb2.WatchAgentsResponse(
                        type=etype, agent=self.directory.view(agent), revision=event.mod_revision
                    )
                else:
                    if event.key in known and known[event.key] is None:
                        del known[event.key]  # it did not match
                        continue
                    # An agent written before after_revision is not known here: its removal
                    # is sent (only agent_id set) rather than lost, as it may have matched.
                    old = known.pop(event.key, None) or registry_pb2.Agent(
                        agent_id=event.key[len(self.store.keys.agents) :].decode()
                    )
                    yield registry_pb2.WatchAgentsResponse(
                        type=registry_pb2.AGENT_EVENT_TYPE_REMOVED, agent=old, revision=event.mod_revision
                    )
        except WatchCompacted as exc:
            raise errors.OutOfRange(
                f"after_revision {request.after_revision} was compacted (oldest {exc.compact_revision}); "
                "watch again with after_revision 0"
            ) from None

    # -- supervision --------------------------------------------------------

    async def StartAgent(
        self, request: registry_pb2.StartAgentRequest, context: Any
    ) -> registry_pb2.StartAgentResponse:
        return await self.store.requests.run(
            "StartAgent",
            request,
            registry_pb2.StartAgentResponse,
            lambda: self._start_agent(request),
            record_as=_without_token,
            replayed=self._replayed_start,
        )

    async def _start_agent(self, request: registry_pb2.StartAgentRequest) -> registry_pb2.StartAgentResponse:
        agent, token = await self.supervisor.start_agent(request)
        return registry_pb2.StartAgentResponse(agent=agent, token=token)

    async def _replayed_start(
        self, answer: registry_pb2.StartAgentResponse
    ) -> registry_pb2.StartAgentResponse:
        """A replayed StartAgent: its token is not recorded, so a new one replaces it (whoever resends lost it)."""
        if answer.agent.agent_id:  # not a validate_only answer
            token = new_token()
            if await self.store.set_supervised_token(answer.agent.agent_id, token):
                answer.token = token
        return answer

    @idempotent(registry_pb2.StopAgentResponse)
    async def StopAgent(
        self, request: registry_pb2.StopAgentRequest, context: Any
    ) -> registry_pb2.StopAgentResponse:
        return registry_pb2.StopAgentResponse(agent=await self.supervisor.stop_agent(request))

    @idempotent(registry_pb2.RestartAgentResponse)
    async def RestartAgent(
        self, request: registry_pb2.RestartAgentRequest, context: Any
    ) -> registry_pb2.RestartAgentResponse:
        return registry_pb2.RestartAgentResponse(agent=await self.supervisor.restart_agent(request))

    async def ListSupervisedAgents(
        self, request: registry_pb2.ListSupervisedAgentsRequest, context: Any
    ) -> registry_pb2.ListSupervisedAgentsResponse:
        size = validate.page_size(request.page_size)
        filters = [request.state]
        after = validate.decode_page_token(request.page_token, filters)
        # From etcd, one bounded range per page (stopped and failed records are not cached: see supervisor).
        chunk, next_after = await self.store.page_supervised(after, size, request.state)
        for record in chunk:
            measured = self.directory.measured_of(record.agent_id)
            if measured is not None:
                record.measured.CopyFrom(measured)
        token = validate.encode_page_token(next_after, filters) if next_after is not None else ""
        return registry_pb2.ListSupervisedAgentsResponse(agents=chunk, next_page_token=token)

    async def ListNodes(
        self, request: registry_pb2.ListNodesRequest, context: Any
    ) -> registry_pb2.ListNodesResponse:
        wanted = registry_pb2.Placement(node_selector=request.node_selector)
        nodes.check_placement(wanted, "request")
        listed = [n for n in self.supervisor.list_nodes() if nodes.eligible(wanted, n.name, n.labels)]
        return registry_pb2.ListNodesResponse(nodes=listed[: nodes.MAX_NODES])

    @idempotent(registry_pb2.MigrateAgentResponse)
    async def MigrateAgent(
        self, request: registry_pb2.MigrateAgentRequest, context: Any
    ) -> registry_pb2.MigrateAgentResponse:
        return await self.supervisor.migrate_agent(request, migration.placed_node(context))


def builder(
    policy: catalog.LaunchPolicy | None = None,
    retention: Retention | None = None,
    node: nodes.NodeSpec | None = None,
) -> Callable[[MeshServer, EtcdClient], Awaitable[None]]:
    """The build function of a registry that launches what ``policy`` allows, keeps stopped
    supervised records for ``retention`` and runs on ``node`` (defaults: :func:`build`'s)."""

    async def build_registry(server: MeshServer, etcd: EtcdClient) -> None:
        await build(server, etcd, policy, retention, node)

    return build_registry


async def build(
    server: MeshServer,
    etcd: EtcdClient,
    policy: catalog.LaunchPolicy | None = None,
    retention: Retention | None = None,
    node: nodes.NodeSpec | None = None,
) -> None:
    """Add the registry servicer to ``server`` (called by mabeam.runtime.service.start_service).

    ``policy``: what supervised agents may be launched from; default: the
    catalog in ``$MABEAM_AGENT_CATALOG`` and ``$MABEAM_ALLOW_ARGV`` (a bad
    catalog is a ConfigError naming the file, the kind and the problem).
    ``retention``: how long stopped and failed supervised records are kept, and
    how many; default: ``$MABEAM_SUPERVISED_RETENTION`` (7 days) and
    ``$MABEAM_SUPERVISED_RETENTION_COUNT`` (no cap).
    ``node``: the node this replica runs on; default ``$MABEAM_NODE_NAME``
    (else the host name) and ``$MABEAM_NODE_LABELS`` (:mod:`.nodes`).
    """
    if policy is None:
        policy = catalog.policy_from_env()
    if retention is None:
        retention = Retention.load("supervised", os.environ)
    if policy.allow_argv:
        log.warning(
            "registry: --allow-argv is ON: any caller allowed to StartAgent or MigrateAgent can run ANY "
            "command on this host as this user; use it for development only and run an --agent-catalog instead"
        )
    log.info("registry: launching agents from %s", policy.where())
    if node is None:
        node = nodes.NodeSpec.load(os.environ)
    log.info("registry: on node %s %s", node.name, dict(node.labels))
    servicer = RegistryServicer(server, etcd, policy, retention, node)
    await servicer.directory.start()
    server.on_stop(servicer.directory.stop)
    server.on_stop(servicer.keepalives.close)
    server.on_stop(servicer.store.requests.stop)
    await servicer.supervisor.start()
    server.spawn(prober.Prober(server, servicer.store, servicer.directory).run(), "prober")
    supervisor = servicer.supervisor
    report_health(
        server, servicer.directory.agents, servicer.directory.loads, supervisor.records, supervisor.owners
    )
    directory = servicer.directory
    telemetry.observe("mabeam.registry.agents", "registered agents", lambda: len(directory.agents))
    telemetry.observe(
        "mabeam.registry.leases",
        "live agent leases",
        lambda: len({a.lease_id for _, a in directory.agents.items()}),
    )
    telemetry.observe(
        "mabeam.registry.supervised", "active supervised agents", lambda: len(servicer.supervisor.records)
    )
    server.add_service(SERVICE_NAME, registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer)
    auth_service.add(server, etcd)


__all__ = [
    "DEFAULT_TTL",
    "SERVICE_NAME",
    "UNREACHABLE",
    "AgentDirectory",
    "RegistryServicer",
    "build",
    "builder",
]
