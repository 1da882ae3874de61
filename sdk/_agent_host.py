"""Many agents on one endpoint: serving them, registering them, keeping their leases.

An :class:`AgentHost` serves the agents it hosts on one gRPC endpoint (their
calls go to :class:`~mabeam._agent_service.AgentServicer`, routed by
``agent_id``), registers each with the registry and keeps every lease alive
on a heartbeat stream per 64 agents (at most 16 streams): a thousand light
agents need one port and 16 streams. A beat the registry refuses (the agent's lease
lapsed) is answered on the stream, which goes on for the others, and that
agent alone is registered again; when the stream breaks it reconnects (to
another registry replica) and registers again the agents the registry lost.
:mod:`mabeam.agent` re-exports it; ``Agent.serve`` is an AgentHost of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import stamina
from google.protobuf import duration_pb2

from mabeam import _usage, auth, errors
from mabeam._agent_service import AgentServicer
from mabeam._heartbeat_stats import HeartbeatStats
from mabeam._heartbeat_streams import HEARTBEAT_CHUNK, IN_FLIGHT, DueBeats, oldest, stream_of, streams_for
from mabeam.client import ChannelPool, MeshClient, list_all
from mabeam.config import MeshConfig, where_from_env
from mabeam.server import MeshServer, announce_ready, serve_until_signalled
from mabeam.tls import TLS
from mabeam.v1 import agent_pb2_grpc, registry_pb2

if TYPE_CHECKING:
    from mabeam.agent import Agent

# The logger of the public module: where an agent author looks.
log = logging.getLogger("mabeam.agent")

AGENT_SERVICE = "mabeam.v1.AgentService"
REGISTER_PATIENCE_S = 30.0


# Registrations an AgentHost has in flight at once, at start and when it registers lost agents again.
REGISTER_CONCURRENCY = 64

# Digests (comma-separated) of the mesh's service tokens, for a host that
# serves before it registers (a migration target): what its launcher knows.
SERVICE_DIGESTS_ENV = "MABEAM_SERVICE_TOKEN_DIGESTS"


class AgentHost:
    """Serves many agents on one endpoint; registers them and keeps their leases.

    Example::

        host = AgentHost([Bidder(f"b{i}") for i in range(1000)], registry="127.0.0.1:50051")
        await host.start()
        ...
        await host.stop()

    ``bind_host`` and ``port`` are where it listens (port 0: any free one);
    ``advertise_host`` (or ``MABEAM_ADVERTISE_HOST``) the address others reach
    it at when it binds ``0.0.0.0``.
    """

    def __init__(
        self,
        agents: Iterable[Agent] = (),
        *,
        registry: str | Sequence[str] | None = None,
        etcd: Sequence[str] | None = None,
        prefix: str | None = None,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        lease_ttl: float = 5.0,
        tls: TLS | None = None,
        client_tls: TLS | None = None,
        advertise_host: str | None = None,
        etcd_tls: TLS | None = None,
    ) -> None:
        self.agents: dict[str, Agent] = {}
        self._standby: set[str] = set()
        # A migration target started by the supervisor (MABEAM_STANDBY=1) serves
        # its agents without registering them: each takes its registration over
        # when its state is imported.
        standby = os.environ.get("MABEAM_STANDBY") == "1"
        for agent in agents:
            self.add(agent, register=not standby)
        registry, etcd, etcd_tls = where_from_env(registry, etcd, etcd_tls)
        self._registry = registry
        self._etcd = etcd
        self._etcd_tls = etcd_tls
        self._prefix = prefix or os.environ.get("MABEAM_PREFIX", "/mabeam")
        self._lease_ttl = lease_ttl
        self._client_tls = client_tls
        # In a container the agent binds 0.0.0.0 and is reached by its service name.
        advertise_host = advertise_host or os.environ.get("MABEAM_ADVERTISE_HOST") or None
        config = MeshConfig(
            host=bind_host, ports={"agent": port}, tls=tls, grace=1.0, advertise_host=advertise_host
        )
        # AgentService answers only the mesh's own services: callers whose bearer
        # token's digest the registry handed over (RegisterAgent, Heartbeat).
        # None known (a registry without auth): nothing is checked.
        self.verifier = auth.ServiceVerifier(
            d.strip() for d in os.environ.get(SERVICE_DIGESTS_ENV, "").split(",") if d.strip()
        )
        self._server = MeshServer("agent", config, authorizer=auth.Authorizer(self.verifier))
        self.servicer = AgentServicer(self)
        self._server.add_service(
            AGENT_SERVICE, agent_pb2_grpc.add_AgentServiceServicer_to_server, self.servicer
        )
        self.channels = ChannelPool(client_tls)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: MeshClient | None = None
        self._beats: list[asyncio.Task[None]] = []
        # Agents being registered again (their lease lapsed): no beats for them meanwhile.
        self._missing: set[str] = set()
        # When each agent's latest registration ended (time.monotonic()): a refusal of a beat
        # sent before it, or a listing begun before it, says nothing about that registration.
        self._registered_at: dict[str, float] = {}
        self._listing: asyncio.Task[None] | None = None  # the listing of _register_missing in flight
        self._register_slots = asyncio.Semaphore(REGISTER_CONCURRENCY)
        self._stopped = False
        self.heartbeat_stats = HeartbeatStats()
        # The node it declares at registration, and its process's RSS and CPU on the beats (mabeam._usage).
        self.node = _usage.node_name()
        self._usage = _usage.ProcessUsage()

    def add(self, agent: Agent, *, register: bool = True) -> None:
        """Host ``agent``. With ``register=False`` it is served but not registered:
        a migration target, which takes the registration over on ImportState."""
        if agent.agent_id in self.agents:
            raise ValueError(f"agent {agent.agent_id!r} is already hosted here")
        agent.host = self
        self.agents[agent.agent_id] = agent
        if not register:
            self._standby.add(agent.agent_id)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        """Run ``coro`` in the background until it ends or the host stops (which cancels it)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set_serving(self, serving: bool) -> None:
        """Report this host's agents as (not) serving on grpc.health.v1; the registry's probe picks it up."""
        await self._server.set_serving(serving)

    @property
    def address(self) -> str:
        """host:port of this host's AgentService."""
        return self._server.address

    @property
    def client(self) -> MeshClient:
        """The host's mesh client (after start)."""
        assert self._client is not None, "start the host first"
        return self._client

    async def start(self) -> None:
        """Serve, register every agent, and keep their leases in the background."""
        await self._server.start()
        self._client = await MeshClient.connect(
            registry=self._registry,
            etcd=self._etcd,
            prefix=self._prefix,
            tls=self._client_tls,
            etcd_tls=self._etcd_tls,
        )

        # Beating starts before the registrations end: each agent's first beat goes with its turn
        # after its registration. A host of many agents on a loaded machine takes
        # longer than a lease TTL to register them all, and the first ones' leases would
        # lapse waiting for the last. Until registered an agent is "missing": no beats, and
        # no second registration when a break makes the host look for agents not listed.
        first = [a for a in self.agents.values() if a.agent_id not in self._standby]
        self._missing.update(a.agent_id for a in first)

        async def register(agent: Agent) -> None:
            try:
                async with self._register_slots:
                    await self._register(agent)
            finally:
                self._missing.discard(agent.agent_id)

        # A stream per AGENTS_PER_STREAM agents: gRPC reads and writes one message of a
        # stream at a time, and one stream of 250 agents' beats queued behind its own
        # messages on a loaded host while the registry handled each beat in tens of ms.
        parts = streams_for(len(self.agents))
        self._beats = [
            asyncio.create_task(self._heartbeat_loop(part, parts), name=f"agent-heartbeats-{part}")
            for part in range(parts)
        ]
        try:
            async with asyncio.TaskGroup() as group:
                for agent in first:
                    group.create_task(register(agent))
        except BaseException as exc:
            await self.stop()  # a failed registration stops the host: beats, server, the others registered
            if isinstance(exc, BaseExceptionGroup):
                raise exc.exceptions[0] from None  # the first refusal, as one registration raises it
            raise

    async def _register(self, agent: Agent) -> registry_pb2.Agent:
        assert self._client is not None
        ttl = duration_pb2.Duration()
        ttl.FromNanoseconds(int(self._lease_ttl * 1e9))
        request = registry_pb2.RegisterAgentRequest(
            agent_id=agent.agent_id,
            endpoint=self.address,
            capabilities=agent.agent_capabilities,
            labels=agent.agent_labels,
            resources=agent.resources,
            lease_ttl=ttl,
            token=agent.token,
            node=self.node,
        )
        # A registry that is not up yet (containers starting together) is waited
        # for, with back-off, for up to REGISTER_PATIENCE_S.
        cut_off = False

        def worth_retrying(exc: Exception) -> bool:
            # After a cut-off call, AlreadyExists is most likely our own registration,
            # whose token never reached us: it lapses within its TTL, then we register.
            return isinstance(exc, errors.Unavailable) or (cut_off and isinstance(exc, errors.AlreadyExists))

        async for attempt in stamina.retry_context(
            on=worth_retrying,
            attempts=None,
            timeout=REGISTER_PATIENCE_S,
            wait_initial=0.1,
            wait_max=2.0,
            wait_jitter=0.0,
        ):
            with attempt:
                try:
                    reply = await self._client.registry.RegisterAgent(request)
                except errors.Unavailable:
                    # Maybe registered: a registry replica that dies mid-call may
                    # have committed the registration before answering.
                    cut_off = True
                    raise
        self.verifier.update(reply.service_token_digests)
        agent.token = reply.token
        self._registered_at[agent.agent_id] = time.monotonic()
        if agent.topics:  # registered anew: its subscriptions went with the old lease
            self.spawn(agent.resubscribe(), name=f"resubscribe:{agent.agent_id}")
        return reply.agent

    async def _beats_stream(
        self, unanswered: dict[str, deque[float]], due: DueBeats, part: int, parts: int, ended: asyncio.Event
    ) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        """The beats of stream ``part`` of ``parts`` (its agents: :func:`~mabeam._heartbeat_streams.stream_of`): each agent's
        every TTL/3, except while IN_FLIGHT of its beats are unanswered (``unanswered``: agent ->
        when its beats in flight were sent, oldest first).

        A beat still waiting to be handled refreshes the lease when it is, as a
        new one would: sending more only queues them. A registry slower than the
        beats (a loaded machine) then sees each agent's beats slow down to its
        pace, instead of a queue that grows until every beat it handles is
        seconds old and the leases lapse behind it. A beat unanswered for a
        whole TTL is given up for lost.
        """
        interval = max(self._lease_ttl / 3.0, 0.1)
        # The host's beats go out about HEARTBEAT_CHUNK at a time, whatever its number of streams.
        chunk = max(1, HEARTBEAT_CHUNK // parts)

        def beat_of(
            agent: Agent, now: float, usage: tuple[int, float], shared: bool
        ) -> registry_pb2.HeartbeatRequest | None:
            sent = unanswered.get(agent.agent_id, ())
            if len(sent) >= IN_FLIGHT and now - sent[-IN_FLIGHT] < self._lease_ttl:
                self.heartbeat_stats.held += 1
                due.held(agent.agent_id)  # beats once answered, not a round later
                return None
            if not agent.token or agent.agent_id in self._missing:
                return None
            due.sent(agent.agent_id)
            self.heartbeat_stats.beat_sent(agent.agent_id)
            unanswered.setdefault(agent.agent_id, deque(maxlen=IN_FLIGHT)).append(time.monotonic())
            # A refused beat is answered on the stream, which goes on for the others.
            load = _usage.fill(agent.load(), *usage, shared=shared)
            return registry_pb2.HeartbeatRequest(
                agent_id=agent.agent_id, token=agent.token, load=load, answer_refusals=True
            )

        def due_now(usage: tuple[int, float], shared: bool) -> Iterator[registry_pb2.HeartbeatRequest]:
            for agent in (self.agents.get(agent_id) for agent_id in due.take()):
                if agent is not None and (beat := beat_of(agent, time.monotonic(), usage, shared)):
                    yield beat  # one at a time: made as it is written

        while True:
            started = time.monotonic()
            shared = len(self.agents) > 1
            agents = [a for a in self.agents.values() if stream_of(a.agent_id, parts) == part]
            usage = self._usage.sample(at_most_every=interval / 2)  # the process's, once a round
            for i, agent in enumerate(agents, 1):
                if (beat := beat_of(agent, started, usage, shared)) is not None:
                    yield beat
                if i % chunk == 0 and i < len(agents):
                    # Many agents: spread the beats over the first half of the
                    # interval, a chunk at a time, instead of one burst that the
                    # registry must get through before the last lease lapses.
                    # Each agent keeps its place, so its beats stay an interval apart.
                    target = started + interval / 2 * i / len(agents)
                    await asyncio.sleep(max(0.0, target - time.monotonic()))  # short: no wake-up needed
                    if ended.is_set():
                        return
                    for beat in due_now(usage, shared):
                        yield beat
            # Until the next round, the beats due go out at once. Ends with its stream:
            # gRPC's task that sends these waits for the next one, which never comes
            # while every agent's last beat is unanswered.
            deadline = started + interval
            while True:
                for beat in due_now(usage, shared):
                    yield beat
                if await due.wait(ended, deadline - time.monotonic()):
                    return
                if time.monotonic() >= deadline:
                    break

    async def _heartbeat_loop(self, part: int, parts: int) -> None:
        """Stream ``part`` of ``parts``; on any break, reconnect (another replica) and re-register."""
        broke = False  # the last stream broke after the registry had answered on it
        while not self._stopped:
            wait_first, broke = broke, False  # after a refusal, the next stream opens at once
            try:
                broke = await self._beat(wait_first, part, parts)
            except asyncio.CancelledError:
                raise
            except errors.NotFound as exc:
                # One lease lapsed, most likely many did (etcd or the registry
                # was away): one listing finds them all, so the next stream
                # beats only for agents still registered, while the lost ones
                # are registered again in the background, many at a time.
                log.info("heartbeat: %s; registering again every agent no longer listed", exc.message)
                self._reregister([exc.metadata.get("agent_id", "")])
                await self._register_missing()
            except errors.PermissionDenied as exc:
                log.warning("heartbeat refused (%s); registering again", exc.message)
                self._reregister([exc.metadata.get("agent_id", "")], forget_token=True)
            except errors.Internal as exc:
                # grpc.aio reports INTERNAL in place of the registry's status when the
                # stream ends while beats are still being written (grpc/grpc#36066):
                # the status named an agent to register again, but which is lost.
                log.info("heartbeat stream broke (%s); registering any agent no longer listed", exc)
                await self._register_missing()

    async def _beat(self, wait_first: bool, part: int, parts: int) -> bool:
        """Beat on one stream after another while they break before the registry answers on them.

        Each break is followed by a wait: 0.1 s, doubling up to 2 s, from the
        start again with each call. Returns True when a stream broke after the
        registry had answered on it (the caller calls again with
        ``wait_first``: the back-off starts over, its first wait included),
        False when a stream ended cleanly. The registry's refusals (NotFound,
        PermissionDenied, INTERNAL) are raised for the caller to register again.
        """
        first_failure = wait_first
        async for attempt in stamina.retry_context(
            on=_StreamBroke, attempts=None, timeout=None, wait_initial=0.1, wait_max=2.0, wait_jitter=0.0
        ):
            with attempt:
                if first_failure:
                    first_failure = False
                    raise _StreamBroke("the previous stream broke")
                return await self._beat_once(part, parts)
        raise AssertionError("unreachable: the retries are unbounded")

    async def _beat_once(self, part: int, parts: int) -> bool:
        """One heartbeat stream, to its end: True if it broke after the registry answered.

        A stream that breaks before any answer raises :class:`_StreamBroke`;
        the registry's refusals and cancellation are raised as they are.
        """
        assert self._client is not None
        stats = self.heartbeat_stats
        answered = False
        unanswered: dict[str, deque[float]] = {}  # agents' beats in flight on this stream: sent at
        due = DueBeats()  # this stream's beats that go out before their agent's turn
        ended = asyncio.Event()
        try:
            beats = self._beats_stream(unanswered, due, part, parts, ended)
            async for reply in self._client.registry.Heartbeat(beats):
                answered = True
                sent_at = oldest(unanswered, reply.agent_id)
                if reply.service_token_digests:
                    self.verifier.update(reply.service_token_digests)
                if reply.HasField("refusal"):
                    self._refused(reply.agent_id, reply.refusal, sent_at)
                else:
                    stats.beat_acked(reply.agent_id)
                due.answered(reply.agent_id)
        except (errors.NotFound, errors.PermissionDenied, errors.Internal):
            stats.stream_broke(unanswered)
            raise  # the registry's refusals: the caller registers again
        except Exception as exc:
            stats.stream_broke(unanswered)
            log.info("heartbeat stream broke (%s); reconnecting", exc)
            if answered:
                return True
            raise _StreamBroke(str(exc)) from exc
        finally:
            ended.set()
        return False

    def _refused(self, agent_id: str, refusal: registry_pb2.HeartbeatRefusal, sent_at: float | None) -> None:
        """The registry refused one beat, sent at ``sent_at`` (its lease lapsed, or its token was
        replaced): register that agent again, unless the beat was sent before its latest registration."""
        self.heartbeat_stats.beat_refused(agent_id)
        if sent_at is not None and sent_at < self._registered_at.get(agent_id, 0.0):
            return  # the refusal of a beat from before: it beats under its new registration
        log.info("heartbeat of %s refused (%s); registering it again", agent_id, refusal.message)
        self._reregister([agent_id], forget_token=refusal.code == grpc.StatusCode.PERMISSION_DENIED.value[0])

    async def _register_missing(self) -> None:
        """Register again every agent of this host that the registry no longer lists; the streams
        that broke at once share one listing."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.create_task(self._list_and_register(), name="agent-listing")
            self._tasks.add(self._listing)
            self._listing.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._listing)

    async def _list_and_register(self) -> None:
        """Register again every agent the registry does not list (and that was not registered since
        the listing began: its registration may be after it)."""
        assert self._client is not None
        before = dict(self._registered_at)
        try:
            agents = await list_all(
                self._client.registry.ListAgents, registry_pb2.ListAgentsRequest(), "agents"
            )
        except errors.MabeamError as exc:
            log.info("cannot list the registered agents (%s); the next stream break tries again", exc)
            return
        listed = {a.agent_id for a in agents}
        self._reregister(
            [a for a in self.agents if a not in listed and self._registered_at.get(a) == before.get(a)]
        )

    def _reregister(self, agent_ids: Iterable[str], forget_token: bool = False) -> None:
        """Register ``agent_ids`` again in the background, at most REGISTER_CONCURRENCY at a time.

        Returns at once: the heartbeats of the other agents go on meanwhile,
        and each of these is left out of them until it is registered again.
        A standby agent (a migration target that has not taken its
        registration over, so holds no token) is never registered here, nor
        is one already being registered again.
        """
        for agent_id in agent_ids:
            agent = self.agents.get(agent_id)
            if agent is None or agent_id in self._missing:
                continue
            if forget_token:
                agent.token = ""
            if agent_id in self._standby and not agent.token:
                continue
            self._missing.add(agent_id)
            self.spawn(self._register_again(agent), name=f"register-again:{agent_id}")

    async def _register_again(self, agent: Agent) -> None:
        try:
            async for attempt in stamina.retry_context(
                on=_worth_registering_again,
                attempts=20,
                timeout=None,
                wait_initial=0.1,
                wait_max=2.0,
                wait_jitter=0.0,
            ):
                with attempt:
                    async with self._register_slots:  # not held through the waits
                        await self._register(agent)
        except errors.MabeamError as exc:
            log.warning("re-registering %s failed: %s", agent.agent_id, exc)
        finally:
            # Beating again: registered, or refused and found again at its next beat.
            self._missing.discard(agent.agent_id)

    async def stop(self, deregister: bool = True) -> None:
        """Deregister every agent (unless told not to), stop beating and serving; safe twice."""
        if self._stopped:
            return
        self._stopped = True
        for task in [*self._tasks, *self._beats]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._beats, return_exceptions=True)
        if deregister and self._client is not None:
            client = self._client

            async def deregister_one(agent: Agent) -> None:
                if agent.token:
                    with contextlib.suppress(errors.MabeamError):
                        await client.registry.DeregisterAgent(
                            registry_pb2.DeregisterAgentRequest(agent_id=agent.agent_id, token=agent.token),
                            timeout=2.0,
                        )

            # An agent being moved away keeps its registration: the new instance owns it.
            staying = [a for a in self.agents.values() if a.agent_id not in self.servicer.migrations]
            await asyncio.gather(*(deregister_one(a) for a in staying))
        if self._client is not None:
            await self._client.close()
        await self._server.stop(1.0)
        await self.servicer.cancel_steps()
        await self.channels.close()

    async def serve(self) -> None:
        """Start, then run until SIGINT/SIGTERM, then stop."""
        await self.start()
        log.info("agents %s serving on %s", ", ".join(self.agents), self.address)
        announce_ready(self.address)
        print(f"mabeam agents serving on {self.address}: {', '.join(self.agents)}", flush=True)
        try:
            await serve_until_signalled([])
        finally:
            await self.stop()

    async def __aenter__(self) -> AgentHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _StreamBroke(Exception):
    """A heartbeat stream broke before the registry answered on it: open another after a wait."""


def _worth_registering_again(exc: Exception) -> bool:
    return isinstance(exc, errors.MabeamError) and (exc.retryable or isinstance(exc, errors.AlreadyExists))
