"""The registry's gRPC edge: registration with leases, heartbeats, lookups, watches.

Lookups (GetAgent, ListAgents, WatchAgents snapshots) are answered from
watch-fed caches of ``P/agents/`` and ``P/agent-load/`` (no etcd read per
call); writes go to etcd in transactions (:mod:`.store`). Supervision lives in
:mod:`.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from mabeam import errors, telemetry
from mabeam.runtime import validate
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import UNREACHABLE, EtcdClient, KeepAliveStream, ResumingWatch, WatchCompacted
from mabeam.server import MeshServer
from mabeam.services.registry import prober
from mabeam.services.registry import supervisor as supervision
from mabeam.services.registry.store import RegistryStore, decode_agent, decode_load, new_token
from mabeam.v1 import common_pb2, registry_pb2, registry_pb2_grpc

SERVICE_NAME = "mabeam.v1.RegistryService"
DEFAULT_TTL = 5.0
MIN_TTL, MAX_TTL = 1.0, 300.0
# Beats of one Heartbeat stream handled at once (each is an etcd lease refresh).
HEARTBEAT_CONCURRENCY = 64
# After a bad beat, the beats the client is still sending are read (not handled) until it
# pauses this long, at most HEARTBEAT_DRAIN_S, before the error ends the stream (see Heartbeat).
HEARTBEAT_DRAIN_QUIET_S, HEARTBEAT_DRAIN_S = 0.25, 1.0


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _matches(agent: registry_pb2.Agent, capability: str, labels: Any) -> bool:
    if capability and capability not in agent.capabilities:
        return False
    return all(agent.labels.get(k) == v for k, v in labels.items())


class AgentDirectory:
    """The watch-fed view of registered agents and their loads."""

    def __init__(self, etcd: EtcdClient, store: RegistryStore) -> None:
        self.agents: PrefixCache[registry_pb2.Agent] = PrefixCache(etcd, store.keys.agents, decode_agent)
        self.loads: PrefixCache[common_pb2.AgentLoad] = PrefixCache(etcd, store.keys.loads, decode_load)
        self._store = store
        # capability ("" = every agent) -> agent_id -> agent, kept by the cache
        # listener, and the sorted lists derived from it (dropped on change).
        self._index: dict[str, dict[str, registry_pb2.Agent]] = {"": {}}
        self._sorted: dict[str, list[registry_pb2.Agent]] = {}
        self._views: dict[str, tuple[Any, Any, registry_pb2.Agent]] = {}
        self.agents.add_listener(self._reindex)

    def _reindex(
        self, kind: str, key: bytes, old: registry_pb2.Agent | None, new: registry_pb2.Agent | None, rev: int
    ) -> None:
        for agent in (old,):
            if agent is not None:
                for cap in ("", *agent.capabilities):
                    self._index.get(cap, {}).pop(agent.agent_id, None)
                    self._sorted.pop(cap, None)
        if new is not None:
            for cap in ("", *new.capabilities):
                self._index.setdefault(cap, {})[new.agent_id] = new
                self._sorted.pop(cap, None)

    def with_capability(self, capability: str) -> list[registry_pb2.Agent]:
        """Registered agents offering ``capability`` ("" = all), by id, as stored."""
        found = self._sorted.get(capability)
        if found is None:
            found = [a for _, a in sorted(self._index.get(capability, {}).items())]
            self._sorted[capability] = found
        return found

    async def start(self) -> None:
        await self.agents.start()
        await self.loads.start()

    async def stop(self) -> None:
        await self.agents.stop()
        await self.loads.stop()

    def view(self, agent: registry_pb2.Agent) -> registry_pb2.Agent:
        """The agent as callers see it: with its latest load and a status.

        Views are cached per (record, load) pair, both immutable cache entries;
        only the time-dependent status is set again.
        """
        load = self.loads.get(self._store.keys.load(agent.agent_id))
        cached = self._views.get(agent.agent_id)
        if cached is not None and cached[0] is agent and cached[1] is load:
            out = cached[2]
        else:
            out = registry_pb2.Agent()
            out.CopyFrom(agent)
            if load is not None:
                out.load.CopyFrom(load)
                out.last_heartbeat_at.CopyFrom(load.reported_at)
            if len(self._views) > 4 * len(self.agents) + 1024:
                self._views.clear()
            self._views[agent.agent_id] = (agent, load, out)
        out.status = self.status(out)  # type: ignore[assignment]
        return out

    def status(self, agent: registry_pb2.Agent) -> int:
        """The probe's verdict; else SERVING while beats are recent, UNKNOWN after two TTLs without."""
        if agent.status in (registry_pb2.AGENT_STATUS_NOT_SERVING, registry_pb2.AGENT_STATUS_UNKNOWN):
            return agent.status
        ttl = agent.lease_ttl.seconds + agent.lease_ttl.nanos / 1e9 or DEFAULT_TTL
        last = agent.last_heartbeat_at.seconds + agent.last_heartbeat_at.nanos / 1e9
        if last and time.time() - last > 2 * ttl:
            return registry_pb2.AGENT_STATUS_UNKNOWN
        return registry_pb2.AGENT_STATUS_SERVING

    def get(self, agent_id: str) -> registry_pb2.Agent | None:
        agent = self.agents.get(self._store.keys.agent(agent_id))
        return self.view(agent) if agent is not None else None


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """mabeam.v1.RegistryService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd
        self.store = RegistryStore(etcd, server.config)
        self.directory = AgentDirectory(etcd, self.store)
        self.supervisor = supervision.Supervisor(server, etcd, self.store, self.directory)
        # Heartbeats refresh agents' leases over shared streams, not a stream per beat.
        self.keepalives = KeepAliveStream(etcd)

    # -- registration -------------------------------------------------------

    async def RegisterAgent(
        self, request: registry_pb2.RegisterAgentRequest, context: Any
    ) -> registry_pb2.RegisterAgentResponse:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        endpoint = validate.endpoint(request.endpoint, "endpoint")
        capabilities = validate.strings(request.capabilities, "capabilities")
        for k in request.labels:
            validate.strings([k], "labels")
        ttl = validate.seconds(
            request.lease_ttl, "lease_ttl", default=DEFAULT_TTL, minimum=MIN_TTL, maximum=MAX_TTL
        )
        for name, value in request.resources.custom.items():
            validate.finite(value, f"resources.custom[{name}]", minimum=0)
        validate.finite(request.resources.cpu, "resources.cpu", minimum=0)

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
        lease = await self._etcd.lease(max(1, round(ttl)))
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
            supervised=await self.supervisor.is_supervised(agent_id),
        )
        try:
            ok, revision = await self.store.register(agent, token, lease.id, create_revision)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._etcd.revoke_lease(lease.id)
            raise
        if not ok:
            with contextlib.suppress(Exception):
                await self._etcd.revoke_lease(lease.id)
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
                await self._etcd.revoke_lease(existing.lease_id)
        return registry_pb2.RegisterAgentResponse(agent=self.directory.view(agent), token=token)

    async def Heartbeat(
        self, request_iterator: AsyncIterator[registry_pb2.HeartbeatRequest], context: Any
    ) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
        """Refresh leases as beats come; answer each beat once its lease is refreshed.

        The beats of one stream (an AgentHost's, one per agent every TTL/3) are
        handled concurrently, up to HEARTBEAT_CONCURRENCY at once, and answered
        in the order they finish: handled one after another, a host of 1,000
        agents would queue 1,000 etcd round trips, and under load the last beat
        of a burst would be answered after the lease it refreshes had lapsed.
        The first error (unknown agent, wrong token, etcd unreachable) ends the
        stream, as before.
        """
        verified: dict[str, tuple[str, int, float]] = {}  # agent_id -> (token, lease, ttl)
        last_put: dict[str, float] = {}
        answers: asyncio.Queue[registry_pb2.HeartbeatResponse | Exception | None] = asyncio.Queue()
        slots = asyncio.Semaphore(HEARTBEAT_CONCURRENCY)
        running: set[asyncio.Task[None]] = set()
        failed = False  # a beat failed: the stream ends once the client pauses
        beat_read = asyncio.Event()

        async def answer(beat: registry_pb2.HeartbeatRequest) -> None:
            try:
                answers.put_nowait(await self._beat(beat, verified, last_put))
            except Exception as exc:
                answers.put_nowait(exc)
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for beat in request_iterator:
                    beat_read.set()
                    if failed:
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(answer(beat))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
                answers.put_nowait(None)  # the client is done: end after the last answer
            except Exception as exc:
                answers.put_nowait(exc)
            finally:
                beat_read.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await answers.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    # Read what the client is still sending before the status goes out: a
                    # grpc.aio client whose write fails after the status replaces it with
                    # "INTERNAL: Internal error from Core" (grpc/grpc#36066), and an AgentHost
                    # would never learn which agent to register again.
                    failed = True
                    deadline = time.monotonic() + HEARTBEAT_DRAIN_S
                    while not reader.done() and time.monotonic() < deadline:
                        beat_read.clear()
                        try:
                            await asyncio.wait_for(beat_read.wait(), HEARTBEAT_DRAIN_QUIET_S)
                        except TimeoutError:
                            break  # the client paused
                    raise item
                yield item
        finally:
            for task in (reader, *running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _beat(
        self,
        beat: registry_pb2.HeartbeatRequest,
        verified: dict[str, tuple[str, int, float]],
        last_put: dict[str, float],
    ) -> registry_pb2.HeartbeatResponse:
        """One beat of a Heartbeat stream: check the token (once per stream), refresh the lease."""
        agent_id = validate.identifier(beat.agent_id, "agent_id")
        # A NaN or negative load would be stored and then mislead least-loaded assignment.
        validate.finite(beat.load.load, "load.load", minimum=0)
        known = verified.get(agent_id)
        if known is None or known[0] != beat.token:
            agent, _ = await self.store.get_agent(agent_id)
            if agent is None:
                raise errors.NotFound(
                    f"agent {agent_id!r} is not registered (its lease lapsed?): register again",
                    reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
                    metadata={"agent_id": agent_id},
                )
            if not await self.store.token_matches(agent_id, beat.token):
                raise errors.PermissionDenied(
                    f"wrong or missing token for agent {agent_id!r}", metadata={"agent_id": agent_id}
                )
            ttl = agent.lease_ttl.seconds or DEFAULT_TTL
            known = (beat.token, agent.lease_id, float(ttl))
            verified[agent_id] = known
        _, lease_id, ttl = known
        remaining = await self.keepalives.refresh(lease_id)
        if remaining <= 0:
            verified.pop(agent_id, None)
            raise errors.NotFound(
                f"lease of agent {agent_id!r} lapsed: register again with its token",
                reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
                metadata={"agent_id": agent_id},
            )
        # The load key is rewritten at most every TTL/2 unless the load moved:
        # a beat must not cost an etcd write (and a watch event) every time.
        load = common_pb2.AgentLoad()
        load.CopyFrom(beat.load)
        load.reported_at.GetCurrentTime()
        stored = self.directory.loads.get(self.store.keys.load(agent_id))
        now = time.monotonic()
        changed = stored is None or (
            abs(stored.load - load.load) > 0.05
            or stored.queue_length != load.queue_length
            or abs(int(stored.memory_bytes) - int(load.memory_bytes)) > 1 << 20
        )
        if changed or now - last_put.get(agent_id, 0.0) > ttl / 2:
            last_put[agent_id] = now
            await self.store.put_load(agent_id, load, lease_id)
        return registry_pb2.HeartbeatResponse(
            agent_id=agent_id, lease_id=lease_id, ttl=duration_pb2.Duration(seconds=remaining)
        )

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
        await self._etcd.revoke_lease(agent.lease_id)
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
            matching = [a for a in matching if _matches(a, "", request.labels)]
        if request.status != registry_pb2.AGENT_STATUS_UNSPECIFIED:
            matching = [
                a for a in matching if self.directory.status(self.directory.view(a)) == request.status
            ]
        chunk, token = validate.page(matching, lambda a: a.agent_id, size, request.page_token, filters)
        return registry_pb2.ListAgentsResponse(
            agents=[self.directory.view(a) for a in chunk], next_page_token=token
        )

    async def WatchAgents(
        self, request: registry_pb2.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchAgentsResponse]:
        if request.after_revision < 0:
            raise errors.InvalidArgument("after_revision", "must not be negative")
        queue: asyncio.Queue[registry_pb2.WatchAgentsResponse] = asyncio.Queue()
        cache = self.directory.agents

        def wanted(agent: registry_pb2.Agent | None) -> bool:
            return agent is not None and _matches(agent, request.capability, request.labels)

        def on_change(
            kind: str, key: bytes, old: registry_pb2.Agent | None, new: registry_pb2.Agent | None, rev: int
        ) -> None:
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
            while True:
                yield await queue.get()
        finally:
            cache.remove_listener(on_change)

    async def _resume(
        self, request: registry_pb2.WatchAgentsRequest, wanted: Any
    ) -> AsyncIterator[registry_pb2.WatchAgentsResponse]:
        """Changes after a revision, straight from etcd's history."""
        known: dict[bytes, registry_pb2.Agent] = {}
        try:
            async for event in ResumingWatch(
                self._etcd, self.store.keys.agents, start_revision=request.after_revision + 1
            ):
                if event.kind == "PUT":
                    agent = decode_agent(event.key, event.value)
                    if not wanted(agent):
                        continue
                    assert agent is not None
                    etype = (
                        registry_pb2.AGENT_EVENT_TYPE_ADDED
                        if event.version == 1
                        else registry_pb2.AGENT_EVENT_TYPE_UPDATED
                    )
                    known[event.key] = agent
                    yield registry_pb2.WatchAgentsResponse(
                        type=etype, agent=self.directory.view(agent), revision=event.mod_revision
                    )
                else:
                    old = known.pop(event.key, None) or registry_pb2.Agent(
                        agent_id=event.key[len(self.store.keys.agents) :].decode()
                    )
                    if request.capability or request.labels:
                        if not wanted(old if old.capabilities else None):
                            continue
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
        agent, token = await self.supervisor.start_agent(request)
        return registry_pb2.StartAgentResponse(agent=agent, token=token)

    async def StopAgent(
        self, request: registry_pb2.StopAgentRequest, context: Any
    ) -> registry_pb2.StopAgentResponse:
        return registry_pb2.StopAgentResponse(agent=await self.supervisor.stop_agent(request))

    async def RestartAgent(
        self, request: registry_pb2.RestartAgentRequest, context: Any
    ) -> registry_pb2.RestartAgentResponse:
        return registry_pb2.RestartAgentResponse(agent=await self.supervisor.restart_agent(request))

    async def ListSupervisedAgents(
        self, request: registry_pb2.ListSupervisedAgentsRequest, context: Any
    ) -> registry_pb2.ListSupervisedAgentsResponse:
        size = validate.page_size(request.page_size)
        items = [
            a
            for a in self.supervisor.all()
            if request.state == registry_pb2.SUPERVISION_STATE_UNSPECIFIED or a.state == request.state
        ]
        chunk, token = validate.page(items, lambda a: a.agent_id, size, request.page_token, [request.state])
        return registry_pb2.ListSupervisedAgentsResponse(agents=chunk, next_page_token=token)

    async def MigrateAgent(
        self, request: registry_pb2.MigrateAgentRequest, context: Any
    ) -> registry_pb2.MigrateAgentResponse:
        return await self.supervisor.migrate_agent(request)


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the registry servicer to ``server`` (called by mabeam.runtime.service.start_service)."""
    servicer = RegistryServicer(server, etcd)
    await servicer.directory.start()
    server.on_stop(servicer.directory.stop)
    server.on_stop(servicer.keepalives.close)
    await servicer.supervisor.start()
    server.spawn(prober.Prober(server, etcd, servicer.store, servicer.directory).run(), "prober")
    directory = servicer.directory
    telemetry.observe("mabeam.registry.agents", "registered agents", lambda: len(directory.agents))
    telemetry.observe(
        "mabeam.registry.leases",
        "live agent leases",
        lambda: len({a.lease_id for _, a in directory.agents.items()}),
    )
    telemetry.observe(
        "mabeam.registry.supervised", "supervised agents", lambda: len(servicer.supervisor.records)
    )
    server.add_service(SERVICE_NAME, registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer)


__all__ = ["SERVICE_NAME", "UNREACHABLE", "RegistryServicer", "build"]
