"""Write agents in a few lines: subclass :class:`Agent`, serve it, see it in the mesh.

Example::

    from mabeam.agent import Agent
    from mabeam.v1 import agent_pb2

    class Bidder(Agent):
        capabilities = ("bid",)

        async def coordinate(self, request):
            if request.HasField("bid_request"):
                return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=10.0))
            return await super().coordinate(request)

        async def execute_step(self, request):
            return {"echo": request.input}

    asyncio.run(Bidder("bidder-1").serve(registry="127.0.0.1:50051"))

``serve()`` starts the agent's gRPC server (health and reflection included),
registers it, keeps its lease alive in the background and registers it again
by itself after a registry replica or etcd restart. An :class:`AgentHost`
serves many agents on one endpoint and one heartbeat stream, routing each call
by its ``agent_id``: a thousand light agents need one port.

Where the mesh is comes from the arguments or the environment:
``MABEAM_REGISTRY`` (host:port, comma-separated), ``MABEAM_ETCD`` (discovery),
``MABEAM_PREFIX``, ``MABEAM_AGENT_ID`` (the id a supervisor gives).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from google.protobuf import duration_pb2, json_format, struct_pb2

from mabeam import errors
from mabeam.client import ChannelPool, MeshClient, list_all
from mabeam.config import MeshConfig
from mabeam.server import MeshServer, serve_until_signalled, to_mabeam_error
from mabeam.tls import TLS
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, registry_pb2

log = logging.getLogger("mabeam.agent")
T = TypeVar("T")

AGENT_SERVICE = "mabeam.v1.AgentService"
REGISTER_PATIENCE_S = 30.0


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-able Python value as a ``google.protobuf.Value``."""
    if isinstance(data, struct_pb2.Value):
        return data
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as plain Python (dict, list, str, float, bool, None)."""
    return json_format.MessageToDict(value)


class Agent:
    """Base class of Python agents.

    Override :meth:`coordinate` (protocol messages: bids, votes, demands, ...),
    :meth:`execute_step` (planner steps) and, for migration,
    :meth:`export_state` / :meth:`import_state`. Class attributes
    ``capabilities`` and ``labels`` declare what the agent offers; the
    constructor may override them per instance.
    """

    capabilities: ClassVar[Sequence[str]] = ()
    labels: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        agent_id: str | None = None,
        *,
        capabilities: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        resources: common_pb2.Resources | None = None,
    ) -> None:
        agent_id = agent_id or os.environ.get("MABEAM_AGENT_ID")
        if not agent_id:
            raise ValueError("an agent needs an id (argument, or MABEAM_AGENT_ID)")
        self.agent_id = agent_id
        self.agent_capabilities: tuple[str, ...] = tuple(
            capabilities if capabilities is not None else type(self).capabilities
        )
        self.agent_labels: dict[str, str] = dict(labels if labels is not None else type(self).labels)
        self.resources = resources or common_pb2.Resources()
        self.in_flight = 0
        # A supervised process registers with the token its supervisor chose.
        self.token = (
            os.environ.get("MABEAM_AGENT_TOKEN", "") if os.environ.get("MABEAM_AGENT_ID") == agent_id else ""
        )
        self.host: AgentHost | None = None

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        """Answer one protocol message. The default declines every request."""
        return agent_pb2.CoordinationResponse(
            agent_id=self.agent_id,
            decline=agent_pb2.Decline(reason=f"{type(self).__name__} does not coordinate"),
        )

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        """Run one goal step and return its output (anything JSON-able)."""
        raise errors.Unimplemented(f"agent {self.agent_id!r} does not execute steps")

    async def export_state(self) -> bytes:
        """The agent's state, for migration (default: no state)."""
        return b""

    async def import_state(self, state: bytes) -> None:
        """Replace the agent's state with an exported one (default: nothing to do)."""

    def load(self) -> common_pb2.AgentLoad:
        """What the next heartbeat reports; by default the calls in flight."""
        return common_pb2.AgentLoad(load=min(1.0, self.in_flight / 16.0), queue_length=self.in_flight)

    async def serve(
        self,
        registry: str | Sequence[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        etcd: Sequence[str] | None = None,
        lease_ttl: float = 5.0,
    ) -> None:
        """Serve this agent until SIGINT/SIGTERM (an AgentHost of one).

        ``MABEAM_ADVERTISE_HOST`` names the address others reach it at when it
        binds ``0.0.0.0`` (in a container: its service name).
        """
        await AgentHost(
            [self], registry=registry, host=host, port=port, etcd=etcd, lease_ttl=lease_ttl
        ).serve()


class _IdempotencyCache:
    """Outputs of recent steps by idempotency key, so a repeated step is not run again."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._done: collections.OrderedDict[str, agent_pb2.ExecuteStepResponse] = collections.OrderedDict()
        self._running: dict[str, asyncio.Future[agent_pb2.ExecuteStepResponse]] = {}

    async def run(self, key: str, step: Any) -> agent_pb2.ExecuteStepResponse:
        if not key:
            return await step()  # type: ignore[no-any-return]
        if key in self._done:
            return self._done[key]
        running = self._running.get(key)
        if running is None:
            # The step runs eagerly and, once it waits for anything, in a task of
            # its own, not in its caller's: when the caller goes away (the planner
            # replica died, its call was cancelled) the step runs on to its own
            # deadline, and the retry with the same key gets its result instead
            # of running it a second time. A step that never waits needs no task.
            started = run_eagerly(self._execute(key, step))
            if isinstance(started, _Finished):
                if started.error is not None:
                    raise started.error
                return started.value  # type: ignore[no-any-return]
            running = started
            running.add_done_callback(_retrieve)
            self._running[key] = running
        return await asyncio.shield(running)

    async def _execute(self, key: str, step: Any) -> agent_pb2.ExecuteStepResponse:
        try:
            result = await step()  # a failure is not cached: the next attempt runs again
        finally:
            self._running.pop(key, None)
        self._done[key] = result
        while len(self._done) > self._size:
            self._done.popitem(last=False)
        return result  # type: ignore[no-any-return]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a step's failure as seen: its caller may be gone, and the next attempt runs it again."""
    if not task.cancelled():
        task.exception()


def _deadline_seconds(request: Any, default: float = 30.0) -> float:
    if request.HasField("deadline"):
        remaining = request.deadline.seconds + request.deadline.nanos / 1e9 - time.time()
        return max(remaining, 0.001)
    return default


class _Finished(NamedTuple):
    """What a coroutine run eagerly ended with, without ever suspending."""

    value: Any
    error: BaseException | None


def run_eagerly(coro: Coroutine[Any, Any, T]) -> _Finished | asyncio.Future[T]:
    """Run ``coro`` now until it first suspends; a task takes over only if it does.

    Most protocol handlers answer without waiting for anything: run that way,
    a batch of 1,000 agents costs no task, no future and no callback per
    agent (Python 3.12's eager task factory does much the same). Returns the
    result (or the exception) when the coroutine finished at once, else a
    future of it.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return _Finished(stop.value, None)
    except Exception as exc:
        return _Finished(None, exc)
    return asyncio.ensure_future(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    """Drive a started coroutine to its end, as a Task would.

    A coroutine suspended on a future yields it (flagged as blocking); a Task
    would clear the flag and resume the coroutine once the future is done.
    """
    loop = asyncio.get_running_loop()
    while True:
        if yielded is None:
            await asyncio.sleep(0)
        else:
            yielded._asyncio_future_blocking = False
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: Any, waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            yielded.add_done_callback(wake)
            try:
                await waiter
            except asyncio.CancelledError as exc:
                yielded.cancel()
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


MIGRATION_CONTENT_TYPE = "application/vnd.mabeam.migration+json"


class _Migration:
    """An agent of this host being moved away: its calls are held, then forwarded."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.forward_to: str | None = None


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """mabeam.v1.AgentService for every agent of a host, routed by agent_id.

    Migration (see :func:`mabeam.services.registry.supervisor.migrate`): on
    ExportState the agent's new calls are held and its calls in flight
    drained, so the exported state is final. The state travels in an envelope
    with the registration token, so the new instance takes the heartbeats
    over on ImportState. Once the registration names the new endpoint, held
    and later calls are forwarded there; callers see one agent throughout.
    """

    def __init__(self, host: AgentHost) -> None:
        self._host = host
        self._steps = _IdempotencyCache()
        self.migrations: dict[str, _Migration] = {}

    def _agent(self, agent_id: str) -> Agent:
        agent = self._host.agents.get(agent_id)
        if agent is None:
            raise errors.NotFound(
                f"agent {agent_id!r} is not hosted here", reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND
            )
        return agent

    async def _route(self, agent_id: str) -> Agent | str:
        """The local agent to call, or the endpoint it moved to."""
        migration = self.migrations.get(agent_id)
        if migration is not None:
            await migration.released.wait()
            if migration.forward_to is not None:
                return migration.forward_to
        return self._agent(agent_id)

    def _forward_stub(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        return agent_pb2_grpc.AgentServiceStub(self._host.channels.get(address))

    async def _coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        target = await self._route(request.agent_id)
        if isinstance(target, str):
            return await self._forward_stub(target).Coordinate(request, timeout=_deadline_seconds(request))  # type: ignore[no-any-return]
        target.in_flight += 1
        try:
            reply = await asyncio.wait_for(target.coordinate(request), _deadline_seconds(request))
        finally:
            target.in_flight -= 1
        if not reply.agent_id:
            reply.agent_id = target.agent_id
        return reply

    async def Coordinate(
        self, request: agent_pb2.CoordinationRequest, context: Any
    ) -> agent_pb2.CoordinationResponse:
        return await self._coordinate(request)

    async def CoordinateBatch(
        self, request: agent_pb2.CoordinateBatchRequest, context: Any
    ) -> agent_pb2.CoordinateBatchResponse:
        def failed(agent_id: str, exc: BaseException) -> agent_pb2.CoordinateBatchEntry:
            err = to_mabeam_error(exc)
            return agent_pb2.CoordinateBatchEntry(
                agent_id=agent_id,
                error=agent_pb2.AgentError(code=errors.status_code_number(err.code), message=err.message),
            )

        # Handlers run eagerly; only those that suspend get a task, and there is
        # one wait per distinct deadline instead of a wait_for (and its extra
        # task) per agent: a batch of 1,000 is one round.
        entries: list[agent_pb2.CoordinateBatchEntry | None] = [None] * len(request.requests)
        tasks: dict[asyncio.Future[agent_pb2.CoordinationResponse], int] = {}
        remote: list[tuple[int, agent_pb2.CoordinationRequest]] = []
        agents, migrations = self._host.agents, self.migrations
        for i, req in enumerate(request.requests):
            agent_id = req.agent_id
            agent = agents.get(agent_id)
            if agent is None or agent_id in migrations:
                remote.append((i, req))
                continue
            started = run_eagerly(self._answer(agent, req))
            if isinstance(started, _Finished):
                if started.error is None:
                    entries[i] = agent_pb2.CoordinateBatchEntry(agent_id=agent_id, response=started.value)
                else:
                    entries[i] = failed(agent_id, started.error)
            else:
                tasks[started] = i
        if tasks:
            # Group by the absolute deadline: a round's requests share one.
            by_deadline: dict[tuple[int, int], list[asyncio.Future[agent_pb2.CoordinationResponse]]] = {}
            for task, i in tasks.items():
                d = request.requests[i].deadline
                by_deadline.setdefault((d.seconds, d.nanos), []).append(task)
            for key in sorted(by_deadline):
                group = by_deadline[key]
                await asyncio.wait(group, timeout=_deadline_seconds(request.requests[tasks[group[0]]]))
            for task, i in tasks.items():
                agent_id = request.requests[i].agent_id
                if not task.done():
                    task.cancel()
                    entries[i] = failed(agent_id, TimeoutError("no answer within the request's deadline"))
                elif task.cancelled() or task.exception() is not None:
                    entries[i] = failed(agent_id, task.exception() or asyncio.CancelledError())
                else:
                    entries[i] = agent_pb2.CoordinateBatchEntry(agent_id=agent_id, response=task.result())

        async def one(i: int, req: agent_pb2.CoordinationRequest) -> None:
            try:
                entries[i] = agent_pb2.CoordinateBatchEntry(
                    agent_id=req.agent_id, response=await self._coordinate(req)
                )
            except Exception as exc:
                entries[i] = failed(req.agent_id, exc)

        await asyncio.gather(*(one(i, r) for i, r in remote))
        return agent_pb2.CoordinateBatchResponse(entries=[e for e in entries if e is not None])

    async def _answer(
        self, agent: Agent, request: agent_pb2.CoordinationRequest
    ) -> agent_pb2.CoordinationResponse:
        agent.in_flight += 1
        try:
            reply = await agent.coordinate(request)
        finally:
            agent.in_flight -= 1
        if not reply.agent_id:
            reply.agent_id = agent.agent_id
        return reply

    async def ExecuteStep(
        self, request: agent_pb2.ExecuteStepRequest, context: Any
    ) -> agent_pb2.ExecuteStepResponse:
        target = await self._route(request.agent_id)
        if isinstance(target, str):
            return await self._forward_stub(target).ExecuteStep(request, timeout=_deadline_seconds(request))  # type: ignore[no-any-return]
        agent = target

        async def step() -> agent_pb2.ExecuteStepResponse:
            agent.in_flight += 1
            try:
                output = await asyncio.wait_for(agent.execute_step(request), _deadline_seconds(request))
            finally:
                agent.in_flight -= 1
            return agent_pb2.ExecuteStepResponse(output=to_value(output))

        key = f"{request.agent_id}/{request.idempotency_key}" if request.idempotency_key else ""
        return await self._steps.run(key, step)

    async def ExportState(
        self, request: agent_pb2.ExportStateRequest, context: Any
    ) -> agent_pb2.ExportStateResponse:
        agent = self._agent(request.agent_id)
        if request.agent_id in self.migrations:
            raise errors.FailedPrecondition(f"agent {request.agent_id!r} is already being migrated")
        migration = _Migration()
        self.migrations[agent.agent_id] = migration
        try:
            while agent.in_flight:  # noqa: ASYNC110 (a short drain; the state must include every accepted call)
                await asyncio.sleep(0.002)
            state = await agent.export_state()
        except BaseException:
            self._release(agent.agent_id, None)
            raise
        self._host.watch_migration(agent, migration)
        envelope = json.dumps({"token": agent.token, "state": base64.b64encode(state).decode()}).encode()
        return agent_pb2.ExportStateResponse(state=envelope, content_type=MIGRATION_CONTENT_TYPE)

    async def ImportState(
        self, request: agent_pb2.ImportStateRequest, context: Any
    ) -> agent_pb2.ImportStateResponse:
        agent = self._agent(request.agent_id)
        state = request.state
        token = ""
        if request.content_type == MIGRATION_CONTENT_TYPE:
            try:
                doc = json.loads(state)
                token, state = str(doc["token"]), base64.b64decode(doc["state"])
            except (ValueError, KeyError, TypeError):
                raise errors.InvalidArgument("state", "is not a migration envelope") from None
        await agent.import_state(state)
        if request.agent_id in self.migrations:
            self._release(request.agent_id, None)  # the move was rolled back: serve here again
        elif token:
            agent.token = token  # this instance now keeps the registration's lease
        return agent_pb2.ImportStateResponse()

    def _release(self, agent_id: str, forward_to: str | None) -> None:
        migration = self.migrations.get(agent_id)
        if migration is None:
            return
        migration.forward_to = forward_to
        migration.released.set()
        if forward_to is None:
            self.migrations.pop(agent_id, None)


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; 0.0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))]


# Beats an AgentHost sends together before it paces the rest of the interval's beats.
HEARTBEAT_CHUNK = 50


class HeartbeatStats:
    """Heartbeat round trips of an :class:`AgentHost` (``host.heartbeat_stats``).

    A beat is timed from the moment the heartbeat stream takes it to the
    registry's ``HeartbeatResponse`` for that agent: the time a lease refresh
    takes as the agent sees it. ``sent``, ``acked`` and ``max_s`` cover every
    beat since the host started (or :meth:`reset`); ``latencies`` keeps the
    last ``keep`` round trips (seconds), for percentiles. ``stream_breaks``
    counts heartbeat streams that ended in an error (each one reconnects);
    ``unanswered`` the beats such a break left without an answer.

    Example::

        stats = host.heartbeat_stats
        print(stats.acked, stats.percentile(99), stats.max_s)
    """

    def __init__(self, keep: int = 100_000) -> None:
        self.latencies: collections.deque[float] = collections.deque(maxlen=keep)
        self.sent = 0
        self.acked = 0
        self.max_s = 0.0
        self.stream_breaks = 0
        self.unanswered = 0
        self._pending: dict[str, collections.deque[float]] = {}

    def reset(self) -> None:
        """Forget the figures so far (beats in flight are still timed)."""
        self.latencies.clear()
        self.sent = self.acked = self.stream_breaks = self.unanswered = 0
        self.max_s = 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the kept round trips; 0.0 with none."""
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, float]:
        """The figures as plain numbers (latencies in seconds), e.g. for a JSON report."""
        return {
            "sent": self.sent,
            "acked": self.acked,
            "p50_s": self.percentile(50),
            "p99_s": self.percentile(99),
            "max_s": self.max_s,
            "stream_breaks": self.stream_breaks,
            "unanswered": self.unanswered,
        }

    def beat_sent(self, agent_id: str) -> None:
        self.sent += 1
        # Per agent, oldest first: an answer is matched with the agent's oldest beat in flight.
        self._pending.setdefault(agent_id, collections.deque(maxlen=64)).append(time.monotonic())

    def beat_acked(self, agent_id: str) -> None:
        pending = self._pending.get(agent_id)
        if not pending:
            return
        latency = time.monotonic() - pending.popleft()
        if not pending:
            del self._pending[agent_id]
        self.acked += 1
        self.latencies.append(latency)
        self.max_s = max(self.max_s, latency)

    def stream_broke(self) -> None:
        self.stream_breaks += 1
        self.unanswered += sum(len(p) for p in self._pending.values())
        self._pending.clear()


class AgentHost:
    """Serves many agents on one endpoint; registers them and keeps their leases.

    Example::

        host = AgentHost([Bidder(f"b{i}") for i in range(1000)], registry="127.0.0.1:50051")
        await host.start()
        ...
        await host.stop()
    """

    def __init__(
        self,
        agents: Iterable[Agent] = (),
        *,
        registry: str | Sequence[str] | None = None,
        etcd: Sequence[str] | None = None,
        prefix: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_ttl: float = 5.0,
        tls: TLS | None = None,
        client_tls: TLS | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self.agents: dict[str, Agent] = {}
        self._standby: set[str] = set()
        # A migration target started by the supervisor (MABEAM_STANDBY=1) serves
        # its agents without registering them: each takes its registration over
        # when its state is imported.
        standby = os.environ.get("MABEAM_STANDBY") == "1"
        for agent in agents:
            self.add(agent, register=not standby)
        env_registry = os.environ.get("MABEAM_REGISTRY", "")
        if registry is None and env_registry:
            registry = [r for r in env_registry.split(",") if r]
        env_etcd = os.environ.get("MABEAM_ETCD", "")
        if etcd is None and env_etcd:
            etcd = [e for e in env_etcd.split(",") if e]
        if not registry and not etcd:
            raise ValueError("where is the mesh? give registry= or etcd= (or MABEAM_REGISTRY / MABEAM_ETCD)")
        self._registry = registry
        self._etcd = etcd
        self._prefix = prefix or os.environ.get("MABEAM_PREFIX", "/mabeam")
        self._lease_ttl = lease_ttl
        self._client_tls = client_tls
        # In a container the agent binds 0.0.0.0 and is reached by its service name.
        advertise_host = advertise_host or os.environ.get("MABEAM_ADVERTISE_HOST") or None
        config = MeshConfig(
            host=host, ports={"agent": port}, tls=tls, grace=1.0, advertise_host=advertise_host
        )
        self._server = MeshServer("agent", config)
        self.servicer = AgentServicer(self)
        self._server.add_service(
            AGENT_SERVICE, agent_pb2_grpc.add_AgentServiceServicer_to_server, self.servicer
        )
        self.channels = ChannelPool(client_tls)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: MeshClient | None = None
        self._beats: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._stopped = False
        self.heartbeat_stats = HeartbeatStats()

    def add(self, agent: Agent, *, register: bool = True) -> None:
        """Host ``agent``. With ``register=False`` it is served but not registered:
        a migration target, which takes the registration over on ImportState."""
        if agent.agent_id in self.agents:
            raise ValueError(f"agent {agent.agent_id!r} is already hosted here")
        agent.host = self
        self.agents[agent.agent_id] = agent
        if not register:
            self._standby.add(agent.agent_id)

    def watch_migration(self, agent: Agent, migration: _Migration, timeout: float = 60.0) -> None:
        """After ExportState: forward once the registration names another endpoint."""

        async def watch() -> None:
            deadline = time.monotonic() + timeout
            while not migration.released.is_set() and time.monotonic() < deadline:
                try:
                    reply = await self.client.registry.GetAgent(
                        registry_pb2.GetAgentRequest(agent_id=agent.agent_id)
                    )
                    if reply.agent.endpoint != self.address:
                        # The new instance holds the registration now: stop beating for it.
                        self.agents.pop(agent.agent_id, None)
                        self.servicer._release(agent.agent_id, reply.agent.endpoint)
                        return
                except errors.MabeamError:
                    pass
                await asyncio.sleep(0.02)
            self.servicer._release(agent.agent_id, None)

        task = asyncio.create_task(watch(), name=f"migration:{agent.agent_id}")
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
            registry=self._registry, etcd=self._etcd, prefix=self._prefix, tls=self._client_tls
        )
        sem = asyncio.Semaphore(64)

        async def register(agent: Agent) -> None:
            async with sem:
                await self._register(agent)

        await asyncio.gather(*(register(a) for a in self.agents.values() if a.agent_id not in self._standby))
        self._beats = asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeats")

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
        )
        # A registry that is not up yet (containers starting together) is waited
        # for, with back-off, for up to REGISTER_PATIENCE_S.
        deadline = time.monotonic() + REGISTER_PATIENCE_S
        delay = 0.1
        cut_off = False
        while True:
            try:
                reply = await self._client.registry.RegisterAgent(request)
                break
            except errors.Unavailable:
                # Maybe registered: a registry replica that dies mid-call may
                # have committed the registration before answering.
                cut_off = True
                if time.monotonic() + delay > deadline:
                    raise
            except errors.AlreadyExists:
                # After a cut-off call, most likely our own registration, whose
                # token never reached us: it lapses within its TTL, then we register.
                if not cut_off or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        agent.token = reply.token
        return reply.agent

    async def _beats_stream(self) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        interval = max(self._lease_ttl / 3.0, 0.1)
        while True:
            started = time.monotonic()
            agents = list(self.agents.values())
            for i, agent in enumerate(agents, 1):
                if agent.token:
                    beat = registry_pb2.HeartbeatRequest(
                        agent_id=agent.agent_id, token=agent.token, load=agent.load()
                    )
                    self.heartbeat_stats.beat_sent(agent.agent_id)
                    yield beat
                if i % HEARTBEAT_CHUNK == 0 and i < len(agents):
                    # Many agents: spread the beats over the first half of the
                    # interval, a chunk at a time, instead of one burst that the
                    # registry must get through before the last lease lapses.
                    # Each agent keeps its place, so its beats stay an interval apart.
                    target = started + interval / 2 * i / len(agents)
                    await asyncio.sleep(max(0.0, target - time.monotonic()))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _heartbeat_loop(self) -> None:
        """One stream for every agent; on any break, reconnect (another replica) and re-register."""
        assert self._client is not None
        delay = 0.1
        stats = self.heartbeat_stats
        while not self._stopped:
            try:
                async for reply in self._client.registry.Heartbeat(self._beats_stream()):
                    stats.beat_acked(reply.agent_id)
                    delay = 0.1
            except asyncio.CancelledError:
                raise
            except errors.NotFound as exc:
                stats.stream_broke()
                log.info("heartbeat: %s; registering again", exc.message)
                await self._reregister(exc.metadata.get("agent_id"))
            except errors.PermissionDenied as exc:
                stats.stream_broke()
                log.warning("heartbeat refused (%s); registering again", exc.message)
                await self._reregister(exc.metadata.get("agent_id"), forget_token=True)
            except errors.Internal as exc:
                # grpc.aio reports INTERNAL in place of the registry's status when the
                # stream ends while beats are still being written (grpc/grpc#36066):
                # the status named an agent to register again, but which is lost.
                stats.stream_broke()
                log.info("heartbeat stream broke (%s); registering any agent no longer listed", exc)
                await self._register_missing()
            except Exception as exc:
                stats.stream_broke()
                log.info("heartbeat stream broke (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _register_missing(self) -> None:
        """Register again every agent of this host that the registry no longer lists."""
        assert self._client is not None
        try:
            agents = await list_all(
                self._client.registry.ListAgents, registry_pb2.ListAgentsRequest(), "agents"
            )
        except errors.MabeamError as exc:
            log.info("cannot list the registered agents (%s); the next stream break tries again", exc)
            return
        listed = {a.agent_id for a in agents}
        for agent_id in [a for a in self.agents if a not in listed and a not in self._standby]:
            await self._reregister(agent_id)

    async def _reregister(self, agent_id: str | None, forget_token: bool = False) -> None:
        targets = [self.agents[agent_id]] if agent_id in self.agents else list(self.agents.values())
        for agent in targets:
            if forget_token:
                agent.token = ""
            for attempt in range(20):
                try:
                    await self._register(agent)
                    break
                except errors.MabeamError as exc:
                    if not exc.retryable and not isinstance(exc, errors.AlreadyExists):
                        log.warning("re-registering %s failed: %s", agent.agent_id, exc)
                        break
                    await asyncio.sleep(min(0.1 * 2**attempt, 2.0))

    async def stop(self, deregister: bool = True) -> None:
        """Deregister every agent (unless told not to), stop beating and serving; safe twice."""
        if self._stopped:
            return
        self._stopped = True
        for task in [*self._tasks, *([self._beats] if self._beats else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._beats] if self._beats else []), return_exceptions=True)
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
        await self.channels.close()

    async def serve(self) -> None:
        """Start, then run until SIGINT/SIGTERM, then stop."""
        await self.start()
        log.info("agents %s serving on %s", ", ".join(self.agents), self.address)
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


__all__ = ["Agent", "AgentHost", "AgentServicer", "HeartbeatStats", "from_value", "percentile", "to_value"]
