"""Running one goal: assignment, execution with retries, progress events, durability.

A :class:`GoalRunner` runs on the replica that owns the goal (a key bound to
that replica's lease). Steps start as soon as their dependencies succeeded,
at most ``max_parallelism`` at once; each is assigned (first fit, least
loaded, or by a Contract Net auction through the coordination service) and
executed with ``AgentService.ExecuteStep``; a failure is retried on another
capable agent up to ``max_attempts``. Every state change is written to etcd
in a transaction that checks ownership, with a progress event. A runner that
starts on a goal another replica left behind keeps the steps that succeeded
and runs the rest; the idempotency key ``<goal>/<step>`` lets agents drop a
step that was in flight when the owner died.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from mabeam import errors, telemetry
from mabeam.services.planner import dag
from mabeam.services.planner.store import GoalStore
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordination_pb2, registry_pb2
from mabeam.v1 import planner_pb2 as P

if TYPE_CHECKING:
    from mabeam.services.planner.server import PlannerServicer

log = logging.getLogger("mabeam.planner.runner")

DEFAULT_DEADLINE_S = 600.0
DEFAULT_STEP_TIMEOUT_S = 30.0
DEFAULT_PARALLELISM = 16
DEFAULT_ATTEMPTS = 3
CANDIDATES_TTL_S = 1.0
START_WRITE_DELAY_S = 0.05
# Auctions held for a step's assignment while coordination answers UNAVAILABLE.
AUCTION_TRIES = 5
MAX_TXN_OPS = 120  # etcd refuses a transaction of more than 128 operations


def now_ts() -> timestamp_pb2.Timestamp:
    # Not Timestamp.GetCurrentTime: it goes through datetime, in Python, several times a step.
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def seconds(d: Any, default: float) -> float:
    value = float(d.seconds + d.nanos / 1e9)
    return value if value > 0 else default


@dataclass
class _Event:
    """A progress event waiting for its sequence number."""

    etype: int
    fields: dict[str, Any]


Put = tuple[bytes, bytes] | _Event


class _DelayedWrite:
    """A step's start record, written after a short delay unless its outcome comes first."""

    def __init__(self, runner: GoalRunner, puts: list[Put]) -> None:
        self._runner = runner
        self._puts = puts
        self._task: asyncio.Future[None] | None = None
        # A timer, not a sleeping task: most steps end first and cancel it.
        self._timer = asyncio.get_running_loop().call_later(START_WRITE_DELAY_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._runner._write(self._puts))

    async def settle(self) -> None:
        """Before the outcome is written: the start record was written, or never will be.

        A step that ended before the timer has no start record at all: its
        outcome (status and event) says which agent ran which attempt, and an
        ASSIGNED and a STARTED event at the same instant would tell a follower
        nothing more (they were two thirds of a fast goal's events).
        """
        if self._task is None:
            self._timer.cancel()
            return
        await self._task

    def cancel(self) -> None:
        """The step was cancelled before its outcome: no start record is written for it."""
        self._timer.cancel()


class OwnershipLost(Exception):
    """This replica no longer owns the goal: stop at once, another replica runs it."""


@dataclass
class Assignment:
    agent_id: str
    endpoint: str
    price: float = 0.0
    session_id: str = ""


class GoalRunner:
    """Runs one goal to its end while this replica owns it."""

    def __init__(self, planner: PlannerServicer, goal: P.Goal, owner: str) -> None:
        self.planner = planner
        self.store: GoalStore = planner.store
        self.goal = goal
        self.goal_id = goal.goal_id
        self.owner = owner
        self.spec = goal.spec
        self.specs = {s.step_id: s for s in self.spec.steps}
        self.plan = dag.validate(
            [dag.StepSpec(s.step_id, s.capability, tuple(s.depends_on)) for s in self.spec.steps]
        )
        self.statuses: dict[str, P.StepStatus] = {}
        self.outputs: dict[str, struct_pb2.Value] = {}
        self.seq = 0
        self.done_count = 0
        self.cancelled = asyncio.Event()
        self._candidates: dict[str, tuple[float, list[registry_pb2.Agent]]] = {}
        self._queue: collections.deque[tuple[list[Put], asyncio.Future[None]]] = collections.deque()
        self._flusher: asyncio.Future[None] | None = None

    # -- writes -----------------------------------------------------------------------

    def _event(self, etype: int, **fields: Any) -> _Event:
        """A progress event; it gets its sequence number when it is written."""
        return _Event(etype, fields)

    def _step_put(self, step_id: str) -> tuple[bytes, bytes]:
        return self.store.step_key(self.goal_id, step_id), self.statuses[step_id].SerializeToString()

    def _goal_put(self) -> tuple[bytes, bytes]:
        summary = P.Goal()
        summary.CopyFrom(self.goal)
        del summary.steps[:]
        return self.store.goal_key(self.goal_id), summary.SerializeToString()

    async def _write(self, puts: Sequence[Put]) -> None:
        """Write ``puts`` (with the writes queued meanwhile: group commit), checking ownership.

        Writes are applied in the order they were asked for, and events are
        numbered in that order, so a follower sees them in sequence.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((list(puts), done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await done

    async def _flush(self) -> None:
        while self._queue:
            batch: list[tuple[list[Put], asyncio.Future[None]]] = []
            ops = 0
            while self._queue and (not batch or ops + len(self._queue[0][0]) <= MAX_TXN_OPS):
                item = self._queue.popleft()
                batch.append(item)
                ops += len(item[0])
            merged: dict[bytes, bytes] = {}
            for puts, _ in batch:
                for put in puts:
                    if isinstance(put, _Event):
                        self.seq += 1
                        event = P.ExecuteGoalResponse(
                            sequence=self.seq,
                            type=put.etype,
                            goal_id=self.goal_id,  # type: ignore[arg-type]
                            goal_state=self.goal.state,
                            time=now_ts(),
                            steps_done=self.done_count,
                            steps_total=len(self.specs),
                            **put.fields,
                        )
                        merged[self.store.event_key(self.goal_id, self.seq)] = event.SerializeToString()
                    else:
                        merged.pop(put[0], None)  # the later value of a key wins, in its place
                        merged[put[0]] = put[1]
            try:
                ok = await self.store.write(self.owner, self.goal_id, list(merged.items()))
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                raise
            for _, fut in batch:
                if not fut.done():
                    if ok:
                        fut.set_result(None)
                    else:
                        fut.set_exception(OwnershipLost(self.goal_id))

    # -- the run ----------------------------------------------------------------------

    async def run(self) -> None:
        """Run (or resume) the goal; returns when it finished, or when ownership was lost."""
        try:
            await self._run()
        except OwnershipLost:
            log.warning("goal %s: ownership lost; another replica continues it", self.goal_id)
        finally:
            if self._flusher is not None and not self._flusher.done():
                self._flusher.cancel()
            with contextlib.suppress(Exception):
                c = self.store.client
                await c.transaction(
                    compare=[c.transactions.value(self.store.owner_key(self.goal_id)) == self.owner.encode()],
                    success=[c.transactions.delete(self.store.owner_key(self.goal_id))],
                    failure=[],
                )

    async def _run(self) -> None:
        for status in await self.store.step_statuses(self.goal_id):
            self.statuses[status.step_id] = status
        resumed = self.goal.state == P.GOAL_STATE_RUNNING
        for step_id in self.specs:
            status = self.statuses.setdefault(step_id, P.StepStatus(step_id=step_id))
            if status.state == P.STEP_STATE_SUCCEEDED:
                self.outputs[step_id] = status.output
            elif status.state not in (P.STEP_STATE_FAILED, P.STEP_STATE_CANCELLED, P.STEP_STATE_SKIPPED):
                status.state = P.STEP_STATE_PENDING
        self.seq = await self.store.last_seq(self.goal_id)
        self.done_count = len(self.outputs)
        self.goal.state = P.GOAL_STATE_RUNNING
        self.goal.owner = self.owner
        if not self.goal.HasField("started_at"):
            self.goal.started_at.CopyFrom(now_ts())
        if resumed:
            self.goal.resumed_count += 1
        await self._write([self._goal_put(), self._event(P.GOAL_EVENT_TYPE_GOAL_STARTED)])
        deadline_at = self.goal.started_at.ToNanoseconds() / 1e9 + seconds(
            self.spec.deadline, DEFAULT_DEADLINE_S
        )
        parallelism = min(self.spec.max_parallelism or DEFAULT_PARALLELISM, 1024)
        done = {s for s, st in self.statuses.items() if st.state == P.STEP_STATE_SUCCEEDED}
        running: dict[asyncio.Task[bool], str] = {}
        waiting = {
            s: sum(1 for d in self.specs[s].depends_on if d not in done)
            for s in self.plan.order
            if s not in done
        }
        ready = collections.deque(s for s in self.plan.order if s in waiting and waiting[s] == 0)
        failed: str | None = None
        cancel_wait = asyncio.ensure_future(self.cancelled.wait())
        try:
            while True:
                if self.cancelled.is_set():
                    await self._stop(
                        running, P.GOAL_STATE_CANCELLED, self.planner.cancel_reason(self.goal_id)
                    )
                    return
                if failed is None:
                    while ready and len(running) < parallelism:
                        step_id = ready.popleft()
                        running[asyncio.create_task(self._run_step(step_id))] = step_id
                if not running:
                    break
                remaining = deadline_at - time.time()
                if remaining <= 0:
                    await self._stop(running, P.GOAL_STATE_FAILED, "the goal's deadline passed")
                    return
                finished, _ = await asyncio.wait(
                    [*running, cancel_wait], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in finished:
                    if task is cancel_wait:
                        continue
                    step_id = running.pop(task)  # type: ignore[arg-type]
                    if task.result():
                        done.add(step_id)
                        # Readiness by counting: O(edges) for the whole goal, not a scan per step.
                        for dependent in self.plan.dependents.get(step_id, ()):
                            waiting[dependent] -= 1
                            if waiting[dependent] == 0:
                                ready.append(dependent)
                    elif failed is None:
                        failed = step_id
                if failed is not None and not running:
                    break
        finally:
            cancel_wait.cancel()
        if failed is not None:
            reason = f"step {failed!r} failed: {self.statuses[failed].error}"
            await self._skip_after_failure()
            await self._finish(P.GOAL_STATE_FAILED, reason)
        else:
            await self._finish(P.GOAL_STATE_SUCCEEDED, "")

    async def _skip_after_failure(self) -> None:
        puts: list[Put] = []
        for step_id, status in self.statuses.items():
            if status.state in (P.STEP_STATE_PENDING, P.STEP_STATE_ASSIGNED, P.STEP_STATE_RETRYING):
                status.state = P.STEP_STATE_SKIPPED
                status.error = "a step it depends on (or the goal) failed"
                puts.append(self._step_put(step_id))
                puts.append(
                    self._event(P.GOAL_EVENT_TYPE_STEP_CANCELLED, step_id=step_id, error=status.error)
                )
        for i in range(0, len(puts), 100):
            await self._write(puts[i : i + 100])

    async def _stop(self, running: dict[asyncio.Task[bool], str], state: int, reason: str) -> None:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        puts: list[Put] = []
        for step_id, status in self.statuses.items():
            if status.state not in (P.STEP_STATE_SUCCEEDED, P.STEP_STATE_FAILED):
                status.state = (
                    P.STEP_STATE_CANCELLED if state == P.GOAL_STATE_CANCELLED else P.STEP_STATE_SKIPPED
                )
                status.error = reason
                puts.append(self._step_put(step_id))
                puts.append(self._event(P.GOAL_EVENT_TYPE_STEP_CANCELLED, step_id=step_id, error=reason))
        for i in range(0, len(puts), 100):
            await self._write(puts[i : i + 100])
        await self._finish(state, reason)

    async def _finish(self, state: int, reason: str) -> None:
        self.goal.state = state  # type: ignore[assignment]
        self.goal.error = reason
        self.goal.owner = ""
        self.goal.finished_at.CopyFrom(now_ts())
        await self._write([self._goal_put(), self._event(P.GOAL_EVENT_TYPE_GOAL_FINISHED, error=reason)])
        telemetry.instruments().goals.add(1, {"state": P.GoalState.Name(self.goal.state)})

    # -- one step ---------------------------------------------------------------------

    async def _run_step(self, step_id: str) -> bool:
        """Run a step to success or to its last failure; True when it succeeded."""
        spec = self.specs[step_id]
        status = self.statuses[step_id]
        max_attempts = spec.max_attempts or self.spec.max_attempts or DEFAULT_ATTEMPTS
        timeout = seconds(spec.timeout, DEFAULT_STEP_TIMEOUT_S)
        excluded = {a.agent_id for a in status.attempts if a.error}
        # An attempt that never ended was in flight when the goal's previous owner
        # died: it goes back to the same agent, which answers the same idempotency
        # key with the run it already has instead of running the step again.
        in_flight: P.StepAttempt | None = None
        last = status.attempts[-1] if status.attempts else None
        if last is not None and not last.error and not last.HasField("finished_at"):
            in_flight = P.StepAttempt()
            in_flight.CopyFrom(last)
        continued: P.StepAttempt | None = None
        while True:
            try:
                assignment = await self._assign(spec, excluded, in_flight)
            except errors.MabeamError as exc:
                assignment, why = None, exc.message
            else:
                why = f"no live agent offers capability {spec.capability!r}"
            if in_flight is not None:
                if assignment is not None and assignment.agent_id == in_flight.agent_id:
                    del status.attempts[-1]  # the same attempt, continued
                    continued = in_flight
                in_flight = None
            attempt = len(status.attempts) + 1
            if assignment is None:
                status.state, status.error = P.STEP_STATE_FAILED, why
                await self._write(
                    [
                        self._step_put(step_id),
                        self._event(P.GOAL_EVENT_TYPE_STEP_FAILED, step_id=step_id, error=why),
                    ]
                )
                return False
            record = status.attempts.add(
                attempt=attempt,
                agent_id=assignment.agent_id,
                started_at=continued.started_at if continued is not None else now_ts(),
                price=assignment.price,
                session_id=assignment.session_id,
            )
            continued = None
            status.state, status.agent_id, status.error = P.STEP_STATE_RUNNING, assignment.agent_id, ""
            start_puts: list[Put] = [
                self._step_put(step_id),
                self._event(
                    P.GOAL_EVENT_TYPE_STEP_ASSIGNED,
                    step_id=step_id,
                    agent_id=assignment.agent_id,
                    attempt=attempt,
                ),
                self._event(
                    P.GOAL_EVENT_TYPE_STEP_STARTED,
                    step_id=step_id,
                    agent_id=assignment.agent_id,
                    attempt=attempt,
                ),
            ]
            # A step that finishes within START_WRITE_DELAY_S has its start recorded
            # with its outcome, in one transaction; a longer one shows as running.
            started = _DelayedWrite(self, start_puts)
            request = agent_pb2.ExecuteStepRequest(
                agent_id=assignment.agent_id,
                goal_id=self.goal_id,
                step_id=step_id,
                capability=spec.capability,
                input=spec.input,
                attempt=attempt,
                idempotency_key=f"{self.goal_id}/{step_id}",
                dependency_outputs={d: self.outputs[d] for d in spec.depends_on},
            )
            request.deadline.seconds, request.deadline.nanos = divmod(
                int((time.time() + timeout) * 1e9), 1_000_000_000
            )
            stub = self.planner.pool.stub(assignment.endpoint, agent_pb2_grpc.AgentServiceStub)
            try:
                reply = await stub.ExecuteStep(request, timeout=timeout)
                error = ""
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except BaseException:
                started.cancel()
                raise
            await started.settle()
            record.finished_at.CopyFrom(now_ts())
            if not error:
                status.state = P.STEP_STATE_SUCCEEDED
                status.output.CopyFrom(reply.output)
                self.outputs[step_id] = reply.output
                self.done_count += 1
                await self._write(
                    [
                        self._step_put(step_id),
                        self._event(
                            P.GOAL_EVENT_TYPE_STEP_SUCCEEDED,
                            step_id=step_id,
                            agent_id=assignment.agent_id,
                            attempt=attempt,
                            output=reply.output,
                        ),
                    ]
                )
                return True
            record.error = error
            excluded.add(assignment.agent_id)
            if attempt >= max_attempts:
                status.state, status.error = P.STEP_STATE_FAILED, error
                await self._write(
                    [
                        self._step_put(step_id),
                        self._event(
                            P.GOAL_EVENT_TYPE_STEP_FAILED,
                            step_id=step_id,
                            agent_id=assignment.agent_id,
                            attempt=attempt,
                            error=error,
                        ),
                    ]
                )
                return False
            status.state, status.error = P.STEP_STATE_RETRYING, error
            await self._write(
                [
                    self._step_put(step_id),
                    self._event(
                        P.GOAL_EVENT_TYPE_STEP_RETRYING,
                        step_id=step_id,
                        agent_id=assignment.agent_id,
                        attempt=attempt,
                        error=error,
                    ),
                ]
            )

    async def _candidates_for(self, capability: str) -> list[registry_pb2.Agent]:
        cached = self._candidates.get(capability)
        if cached is not None and time.monotonic() - cached[0] < CANDIDATES_TTL_S:
            return cached[1]
        listed = await self.planner.mesh.registry.ListAgents(
            registry_pb2.ListAgentsRequest(capability=capability, page_size=1000)
        )
        agents = [a for a in listed.agents if a.status != registry_pb2.AGENT_STATUS_NOT_SERVING]
        self._candidates[capability] = (time.monotonic(), agents)
        return agents

    async def _assign(
        self, spec: P.StepSpec, excluded: set[str], in_flight: P.StepAttempt | None = None
    ) -> Assignment | None:
        agents = await self._candidates_for(spec.capability)
        fresh = [a for a in agents if a.agent_id not in excluded]
        if not fresh and agents:
            self._candidates.pop(spec.capability, None)  # maybe new agents came: look again
            agents = await self._candidates_for(spec.capability)
            fresh = [a for a in agents if a.agent_id not in excluded] or agents  # nobody else: the same again
        if not fresh:
            return None
        if in_flight is not None:
            same = next((a for a in fresh if a.agent_id == in_flight.agent_id), None)
            if same is not None:
                return Assignment(same.agent_id, same.endpoint, in_flight.price, in_flight.session_id)
        strategy = spec.strategy or self.spec.strategy or P.ASSIGNMENT_STRATEGY_LEAST_LOADED
        if strategy == P.ASSIGNMENT_STRATEGY_AUCTION:
            return await self._auction(spec, fresh)
        if strategy == P.ASSIGNMENT_STRATEGY_FIRST_FIT:
            chosen = min(fresh, key=lambda a: a.agent_id)
        else:
            chosen = min(fresh, key=lambda a: (a.load.load, a.load.queue_length, a.agent_id))
        return Assignment(chosen.agent_id, chosen.endpoint)

    async def _auction(self, spec: P.StepSpec, agents: list[registry_pb2.Agent]) -> Assignment | None:
        """Contract Net through the coordination service: the lowest cost wins."""
        task_input = struct_pb2.Struct()
        task_input.update({"goal_id": self.goal_id, "step_id": spec.step_id})
        params = struct_pb2.Struct()
        params.update({"task": spec.capability})
        params["task_input"] = task_input
        run = coordination_pb2.RunRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(agent_ids=[a.agent_id for a in agents])
            ),
            protocol="contract_net",
            parameters=params,
        )
        # A coordination replica that dies mid-auction answers UNAVAILABLE (the
        # client does not resend a call that may have run): hold another auction.
        for attempt in range(AUCTION_TRIES):
            try:
                session = (await self.planner.mesh.coordination.Run(run)).session
                break
            except errors.Unavailable:
                if attempt == AUCTION_TRIES - 1:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        if not session.outcome.winners:
            return None
        winner = session.outcome.winners[0]
        endpoint = next(a.endpoint for a in agents if a.agent_id == winner)
        return Assignment(winner, endpoint, session.outcome.price, session.session_id)
