"""mabeam.v1.AgentService for every agent of an :class:`~mabeam.agent.AgentHost`.

One servicer serves all the agents of a host, routing each call by its
``agent_id``: ``Coordinate``, ``CoordinateBatch`` (every agent of a host
answers in one call, handlers run eagerly), ``ExecuteStep`` (idempotent: a
step repeated with the same key gets the first run's output) and, for
migration, ``ExportState`` / ``ImportState``.

Migration lives here whole: the hold on an agent's calls while it is being
moved (:class:`_Migration`), the watch for the registration to name the new
endpoint (``AgentMoved``, from the registry; :meth:`AgentServicer.watch_migration`
is the bounded fallback when no word comes), and the forwarding of held and
later calls there. The host (:mod:`mabeam._agent_host`) only keeps the
registrations and leases.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from mabeam import errors
from mabeam._eager import Finished, run_eagerly
from mabeam._values import to_value
from mabeam.server import to_mabeam_error
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, registry_pb2

if TYPE_CHECKING:
    from mabeam._agent_host import AgentHost
    from mabeam.agent import Agent


# The longest endpoint an AgentMoved may name (a DNS name is at most 253, plus ":port").
MAX_ENDPOINT = 260


def _passed_on(context: Any) -> tuple[tuple[str, str], ...]:
    """The caller's ``authorization``, for a call forwarded on its behalf (to the agent's new endpoint).

    The new instance checks it as this one did: only the mesh's own services
    call agents, and an agent holds no service token of its own.
    """
    metadata = context.invocation_metadata() if context is not None else None
    for key, value in metadata or ():
        if key == "authorization":
            return ((key, value if isinstance(value, str) else value.decode("latin-1")),)
    return ()


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
            if isinstance(started, Finished):
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

    async def cancel(self) -> None:
        """Cancel the steps still running and wait for them (their host is stopping)."""
        running = list(self._running.values())
        for future in running:
            future.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a step's failure as seen: its caller may be gone, and the next attempt runs it again."""
    if not task.cancelled():
        task.exception()


def _plan_response(answer: Any) -> agent_pb2.PlanResponse:
    """What :meth:`Agent.plan` returned as a PlanResponse (dicts, PlannedStep messages or one)."""
    if isinstance(answer, agent_pb2.PlanResponse):
        return answer
    steps: list[agent_pb2.PlannedStep] = []
    for i, item in enumerate(answer or ()):
        if isinstance(item, agent_pb2.PlannedStep):
            steps.append(item)
            continue
        if not isinstance(item, dict):
            raise errors.Internal(f"plan step {i} is a {type(item).__name__}, not a dict or PlannedStep")
        step = agent_pb2.PlannedStep(
            step_id=str(item.get("step_id", "")),
            capability=str(item.get("capability", "")),
            depends_on=[str(d) for d in item.get("depends_on", ())],
            expandable=bool(item.get("expandable", False)),
            max_attempts=int(item.get("max_attempts", 0)),
        )
        if "input" in item:
            step.input.CopyFrom(to_value(item["input"]))
        if item.get("timeout"):
            step.timeout.FromNanoseconds(int(float(item["timeout"]) * 1e9))
        steps.append(step)
    return agent_pb2.PlanResponse(steps=steps)


def _deadline_seconds(request: Any, default: float = 30.0) -> float:
    if request.HasField("deadline"):
        remaining = request.deadline.seconds + request.deadline.nanos / 1e9 - time.time()
        return max(remaining, 0.001)
    return default


# The envelope ({"token", "state"}) older SDKs exported; still understood on import, never exported:
# ExportState returns the state alone (STATE_CONTENT_TYPE), and the registry gives the new instance
# its registration token (ImportStateRequest.token).
MIGRATION_CONTENT_TYPE = "application/vnd.mabeam.migration+json"
STATE_CONTENT_TYPE = "application/octet-stream"


class _Migration:
    """An agent of this host being moved away: its calls are held, then forwarded."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.forward_to: str | None = None


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """mabeam.v1.AgentService for every agent of a host, routed by agent_id.

    Migration (see :mod:`mabeam.services.registry.migration`): on
    ExportState the agent's new calls are held and its calls in flight
    drained, so the exported state is final. The state travels in an envelope
    with the registration token, so the new instance takes the heartbeats
    over on ImportState. When the registry says the registration names the
    new endpoint (AgentMoved), held and later calls are forwarded there;
    callers see one agent throughout.
    """

    def __init__(self, host: AgentHost) -> None:
        self._host = host
        self._steps = _IdempotencyCache()
        self.migrations: dict[str, _Migration] = {}

    async def cancel_steps(self) -> None:
        """Cancel the steps still running: they outlive a cancelled call, not their host."""
        await self._steps.cancel()

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

    async def _coordinate(
        self, request: agent_pb2.CoordinationRequest, context: Any
    ) -> agent_pb2.CoordinationResponse:
        target = await self._route(request.agent_id)
        if isinstance(target, str):
            return await self._forward_stub(target).Coordinate(  # type: ignore[no-any-return]
                request, timeout=_deadline_seconds(request), metadata=_passed_on(context)
            )
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
        return await self._coordinate(request, context)

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
            if isinstance(started, Finished):
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
                    agent_id=req.agent_id, response=await self._coordinate(req, context)
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
            return await self._forward_stub(target).ExecuteStep(  # type: ignore[no-any-return]
                request, timeout=_deadline_seconds(request), metadata=_passed_on(context)
            )
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

    async def Plan(self, request: agent_pb2.PlanRequest, context: Any) -> agent_pb2.PlanResponse:
        target = await self._route(request.agent_id)
        if isinstance(target, str):
            return await self._forward_stub(target).Plan(  # type: ignore[no-any-return]
                request, timeout=_deadline_seconds(request), metadata=_passed_on(context)
            )
        target.in_flight += 1
        try:
            answer = await asyncio.wait_for(target.plan(request), _deadline_seconds(request))
        finally:
            target.in_flight -= 1
        return _plan_response(answer)

    async def Deliver(self, request: agent_pb2.DeliverRequest, context: Any) -> agent_pb2.DeliverResponse:
        """Put a message in the agent's bounded inbox (:mod:`mabeam._inbox`); forwarded after a move."""
        target = await self._route(request.agent_id)
        if isinstance(target, str):
            return await self._forward_stub(target).Deliver(  # type: ignore[no-any-return]
                request, timeout=10.0, metadata=_passed_on(context)
            )
        return agent_pb2.DeliverResponse(duplicate=target.inbox.offer(request.message))

    async def DeliverBatch(
        self, request: agent_pb2.DeliverBatchRequest, context: Any
    ) -> agent_pb2.DeliverBatchResponse:
        """One message for many agents of this host: one entry each, in order (no task per agent)."""
        entries: list[agent_pb2.DeliverBatchEntry] = []
        for delivery in request.deliveries:
            agent_id = delivery.agent_id
            try:
                agent = self._host.agents.get(agent_id)
                if agent is None or agent_id in self.migrations:
                    reply = await self.Deliver(delivery, context)
                    entries.append(agent_pb2.DeliverBatchEntry(agent_id=agent_id, duplicate=reply.duplicate))
                else:
                    duplicate = agent.inbox.offer(delivery.message)
                    entries.append(agent_pb2.DeliverBatchEntry(agent_id=agent_id, duplicate=duplicate))
            except Exception as exc:
                err = to_mabeam_error(exc)
                entries.append(
                    agent_pb2.DeliverBatchEntry(
                        agent_id=agent_id,
                        error=agent_pb2.AgentError(
                            code=errors.status_code_number(err.code), message=err.message
                        ),
                    )
                )
        return agent_pb2.DeliverBatchResponse(entries=entries)

    async def ExportState(
        self, request: agent_pb2.ExportStateRequest, context: Any
    ) -> agent_pb2.ExportStateResponse:
        agent = self._agent(request.agent_id)
        if request.agent_id in self.migrations:
            raise errors.FailedPrecondition(f"agent {request.agent_id!r} is already being migrated")
        migration = _Migration()
        self.migrations[agent.agent_id] = migration
        try:
            # A short drain: the state must include every accepted call, and every message the
            # inbox took (one accepted but not yet picked up by its consumer is waiting there).
            while agent.in_flight or agent.inbox_waiting():  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            state = await agent.export_state()
        except BaseException:
            self._release(agent.agent_id, None)
            raise
        self.watch_migration(agent, migration)
        # The state alone: never the registration token (the registry issues the new instance its own).
        return agent_pb2.ExportStateResponse(state=state, content_type=STATE_CONTENT_TYPE)

    def watch_migration(self, agent: Agent, migration: _Migration, timeout: float = 60.0) -> None:
        """After ExportState: wait to be told how the move ended, and only in the end look once.

        The registry ends every move it survives by telling this instance:
        AgentMoved after the switch (forward to the new endpoint), or
        ImportState of the state it exported (rolled back: serve here again).
        Only if it never does (it died mid-migration) is the registration read,
        once, after ``timeout``: forward if it names another endpoint, else
        serve here again. Calls stay held until then.
        """
        host = self._host

        async def fallback() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(migration.released.wait(), timeout)
                return
            if self.migrations.get(agent.agent_id) is not migration:
                return
            endpoint = ""
            with contextlib.suppress(errors.MabeamError):
                reply = await host.client.registry.GetAgent(
                    registry_pb2.GetAgentRequest(agent_id=agent.agent_id)
                )
                endpoint = reply.agent.endpoint
            if endpoint and endpoint != host.address:
                self._moved(agent.agent_id, endpoint)
            else:
                self._release(agent.agent_id, None)

        host.spawn(fallback(), name=f"migration:{agent.agent_id}")

    async def AgentMoved(
        self, request: agent_pb2.AgentMovedRequest, context: Any
    ) -> agent_pb2.AgentMovedResponse:
        """The registration names ``new_endpoint`` now: forward what was held, and every later call."""
        endpoint = request.new_endpoint
        if not endpoint or len(endpoint) > MAX_ENDPOINT or ":" not in endpoint:
            raise errors.InvalidArgument(
                "new_endpoint", f"is a host:port of at most {MAX_ENDPOINT} characters (got {len(endpoint)})"
            )
        if request.agent_id in self.migrations:
            self._moved(request.agent_id, request.new_endpoint)
        return agent_pb2.AgentMovedResponse()

    def _moved(self, agent_id: str, endpoint: str) -> None:
        # The new instance holds the registration now: stop beating for the agent here.
        self._host.agents.pop(agent_id, None)
        self._release(agent_id, endpoint)

    async def ImportState(
        self, request: agent_pb2.ImportStateRequest, context: Any
    ) -> agent_pb2.ImportStateResponse:
        agent = self._agent(request.agent_id)
        state = request.state
        token = request.token  # issued by the registry at migration; empty otherwise
        if request.content_type == MIGRATION_CONTENT_TYPE:  # an older SDK's export
            try:
                doc = json.loads(state)
                token, state = token or str(doc["token"]), base64.b64decode(doc["state"])
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
