"""Running one goal: assignment, execution with retries, progress events, durability.

A :class:`GoalRunner` runs on the replica that owns the goal (a key bound to
that replica's lease). Steps start as soon as their dependencies succeeded,
at most ``max_parallelism`` at once; each is assigned (first fit, least
loaded, or by a Contract Net auction through the coordination service:
:mod:`.assignment`) and executed with ``AgentService.ExecuteStep``; a failure
is retried on another capable agent up to ``max_attempts``. Every state
change is written to etcd in a transaction that checks ownership, with a
progress event (:mod:`.progress`, group commit). A runner that
starts on a goal another replica left behind keeps the steps that succeeded
and runs the rest; the idempotency key ``<goal>/<step>`` lets agents drop a
step that was in flight when the owner died.

A goal given as an objective is planned first: an agent of the objective's
capability answers ``AgentService.Plan``, the plan is validated as submitted
steps are and becomes the goal's ``spec.steps`` (``Goal.plan`` says who
planned; a ``GOAL_PLANNED`` event). An expandable step is expanded when ready
(its agent's plan: sub-steps ``<step>:<id>`` appended to ``spec.steps``, the
step then depending on the sub-plan's last steps and succeeding with their
outputs; bounded by MAX_EXPANSION_STEPS, MAX_EXPANSION_DEPTH, MAX_GOAL_STEPS;
``STEP_EXPANDED`` events, ``Goal.plan.expansions``). With
``may_start_agents``, a step nobody can run gets an agent started for it
(:mod:`.launcher`).

Finishing binds the goal to its expiry lease (retention): every step status
and event is put again bound to it (:meth:`GoalStore.rebind`), then the
finishing write (summary, ``goal-order/`` key, last event) is bound to it. A
runner that resumes a goal whose owner died in between first puts those keys
again without a lease (:meth:`GoalStore.unbind`), then finishes it again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from mabeam import errors, telemetry
from mabeam.services.planner import dag
from mabeam.services.planner.assignment import Assigner
from mabeam.services.planner.planning import (
    DEFAULT_ATTEMPTS,
    DEFAULT_STEP_TIMEOUT_S,
    PlanInvalid,
    Planning,
    seconds,
)
from mabeam.services.planner.progress import OwnershipLost, ProgressLog, Put, now_ts
from mabeam.services.planner.store import GoalStore, LeaseNotFound
from mabeam.v1 import agent_pb2, agent_pb2_grpc, planner_pb2

if TYPE_CHECKING:
    from mabeam.services.planner.server import PlannerServicer

log = logging.getLogger("mabeam.planner.runner")

DEFAULT_DEADLINE_S = 600.0
DEFAULT_PARALLELISM = 16


class GoalRunner(Planning):
    """Runs one goal to its end while this replica owns it."""

    def __init__(self, planner: PlannerServicer, goal: planner_pb2.Goal, owner: str) -> None:
        self.planner = planner
        self.store: GoalStore = planner.store
        self.goal = goal
        self.goal_id = goal.goal_id
        self.owner = owner
        self.spec = goal.spec
        self.specs = {s.step_id: s for s in self.spec.steps}
        # An objective's goal has no steps until its planning agent answered (_plan_objective).
        self.plan = self._graph() if self.spec.steps else dag.Plan({}, [])
        # Expanded steps (they succeed when their sub-steps have) and each step's expansion depth.
        self.expanded = {e.step_id for e in goal.plan.expansions}
        self.depth = {sid: e.depth for e in goal.plan.expansions for sid in e.step_ids}
        self.statuses: dict[str, planner_pb2.StepStatus] = {}
        self.outputs: dict[str, struct_pb2.Value] = {}
        self.done_count = 0
        self.cancelled = asyncio.Event()
        self.progress = ProgressLog(self.store, self.goal_id, owner, self._event_header)
        self.assigner = Assigner(lambda: planner.mesh, self.goal_id, self.spec.strategy)

    # -- writes -----------------------------------------------------------------------

    def _event_header(self) -> dict[str, Any]:
        """What every progress event tells of the goal when it is numbered."""
        return {
            "goal_state": self.goal.state,
            "steps_done": self.done_count,
            "steps_total": len(self.specs),
        }

    def _step_put(self, step_id: str) -> tuple[bytes, bytes]:
        return self.store.step_key(self.goal_id, step_id), self.statuses[step_id].SerializeToString()

    def _goal_puts(self) -> list[Put]:
        """The goal's summary and its index keys (``goal-order/``, ``goal-active/``: see the store)."""
        summary = planner_pb2.Goal()
        summary.CopyFrom(self.goal)
        del summary.steps[:]
        return [
            (self.store.goal_key(self.goal_id), summary.SerializeToString()),
            *self.store.state_puts(summary),
        ]

    # -- the run ----------------------------------------------------------------------

    async def run(self) -> None:
        """Run (or resume) the goal; returns when it finished, or when ownership was lost."""
        try:
            await self._run()
        except OwnershipLost:
            log.warning("goal %s: ownership lost; another replica continues it", self.goal_id)
        finally:
            self.progress.close()
            with contextlib.suppress(Exception):
                await self.store.release_owner(self.goal_id, self.owner)

    async def _run(self) -> None:
        for status in await self.store.step_statuses(self.goal_id):
            self.statuses[status.step_id] = status
        resumed = self.goal.state == planner_pb2.GOAL_STATE_RUNNING
        for step_id in self.specs:
            status = self.statuses.setdefault(step_id, planner_pb2.StepStatus(step_id=step_id))
            if status.state == planner_pb2.STEP_STATE_SUCCEEDED:
                self.outputs[step_id] = status.output
            elif status.state not in (
                planner_pb2.STEP_STATE_FAILED,
                planner_pb2.STEP_STATE_CANCELLED,
                planner_pb2.STEP_STATE_SKIPPED,
            ):
                status.state = planner_pb2.STEP_STATE_PENDING
        if resumed and await self.store.unbind(self.owner, self.goal_id) is None:
            raise OwnershipLost(self.goal_id)
        self.progress.seq = await self.store.last_seq(self.goal_id)
        self.done_count = len(self.outputs)
        self.goal.state = planner_pb2.GOAL_STATE_RUNNING
        self.goal.owner = self.owner
        if not self.goal.HasField("started_at"):
            self.goal.started_at.CopyFrom(now_ts())
        if resumed:
            self.goal.resumed_count += 1
        await self.progress.write(
            [*self._goal_puts(), self.progress.event(planner_pb2.GOAL_EVENT_TYPE_GOAL_STARTED)]
        )
        if not self.spec.steps:
            try:
                await self._plan_objective()
            except PlanInvalid as exc:
                await self._finish(planner_pb2.GOAL_STATE_FAILED, str(exc))
                return
        deadline_at = self.goal.started_at.ToNanoseconds() / 1e9 + seconds(
            self.spec.deadline, DEFAULT_DEADLINE_S
        )
        parallelism = min(self.spec.max_parallelism or DEFAULT_PARALLELISM, 1024)
        done = {s for s, st in self.statuses.items() if st.state == planner_pb2.STEP_STATE_SUCCEEDED}
        running: dict[asyncio.Task[bool | list[str]], str] = {}
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
                        running, planner_pb2.GOAL_STATE_CANCELLED, self.planner.cancel_reason(self.goal_id)
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
                    await self._stop(running, planner_pb2.GOAL_STATE_FAILED, "the goal's deadline passed")
                    return
                finished, _ = await asyncio.wait(
                    [*running, cancel_wait], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in finished:
                    if task is cancel_wait:
                        continue
                    step_id = running.pop(task)  # type: ignore[arg-type]
                    result = task.result()
                    if isinstance(result, list):
                        # Expanded: its sub-steps join the graph; it succeeds when they all have.
                        for sub in (*result, step_id):
                            waiting[sub] = sum(1 for d in self.specs[sub].depends_on if d not in done)
                            if waiting[sub] == 0:
                                ready.append(sub)
                        continue
                    if result:
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
            await self._finish(planner_pb2.GOAL_STATE_FAILED, reason)
        else:
            await self._finish(planner_pb2.GOAL_STATE_SUCCEEDED, "")

    async def _skip_after_failure(self) -> None:
        puts: list[Put] = []
        for step_id, status in self.statuses.items():
            if status.state in (
                planner_pb2.STEP_STATE_PENDING,
                planner_pb2.STEP_STATE_ASSIGNED,
                planner_pb2.STEP_STATE_RETRYING,
            ):
                status.state = planner_pb2.STEP_STATE_SKIPPED
                status.error = "a step it depends on (or the goal) failed"
                puts.append(self._step_put(step_id))
                puts.append(
                    self.progress.event(
                        planner_pb2.GOAL_EVENT_TYPE_STEP_CANCELLED, step_id=step_id, error=status.error
                    )
                )
        for i in range(0, len(puts), 100):
            await self.progress.write(puts[i : i + 100])

    async def _stop(
        self, running: dict[asyncio.Task[bool | list[str]], str], state: int, reason: str
    ) -> None:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        puts: list[Put] = []
        for step_id, status in self.statuses.items():
            if status.state not in (planner_pb2.STEP_STATE_SUCCEEDED, planner_pb2.STEP_STATE_FAILED):
                status.state = (
                    planner_pb2.STEP_STATE_CANCELLED
                    if state == planner_pb2.GOAL_STATE_CANCELLED
                    else planner_pb2.STEP_STATE_SKIPPED
                )
                status.error = reason
                puts.append(self._step_put(step_id))
                puts.append(
                    self.progress.event(
                        planner_pb2.GOAL_EVENT_TYPE_STEP_CANCELLED, step_id=step_id, error=reason
                    )
                )
        for i in range(0, len(puts), 100):
            await self.progress.write(puts[i : i + 100])
        await self._finish(state, reason)

    async def _finish(self, state: int, reason: str) -> None:
        self.goal.state = state  # type: ignore[assignment]
        self.goal.error = reason
        self.goal.owner = ""
        self.goal.finished_at.CopyFrom(now_ts())
        expiry = self.planner.expiry
        for attempt in range(3):
            lease = await expiry.lease()  # None: finished goals are kept for good
            try:
                # First the keys written while it ran, then the finishing write, on the same lease.
                if lease is not None and await self.store.rebind(self.owner, self.goal_id, lease) is None:
                    raise OwnershipLost(self.goal_id)
                await self.progress.write(
                    [
                        *self._goal_puts(),
                        self.progress.event(planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED, error=reason),
                    ],
                    lease=lease,
                )
                break
            except LeaseNotFound:
                expiry.forget()  # etcd lost the bucket's lease: another, and the keys bound again
                if attempt == 2:
                    raise
        telemetry.instruments().goals.add(1, {"state": planner_pb2.GoalState.Name(self.goal.state)})

    # -- one step ---------------------------------------------------------------------

    async def _run_step(self, step_id: str) -> bool | list[str]:
        """Run a step to success or to its last failure; True when it succeeded.

        An expandable step is expanded instead (the added step ids), and once
        expanded, joined (:meth:`_join`).
        """
        if step_id in self.expanded:
            return await self._join(step_id)
        if self.specs[step_id].expandable:
            return await self._expand(step_id)
        spec = self.specs[step_id]
        status = self.statuses[step_id]
        max_attempts = spec.max_attempts or self.spec.max_attempts or DEFAULT_ATTEMPTS
        timeout = seconds(spec.timeout, DEFAULT_STEP_TIMEOUT_S)
        excluded = {a.agent_id for a in status.attempts if a.error}
        # An attempt that never ended was in flight when the goal's previous owner
        # died: it goes back to the same agent, which answers the same idempotency
        # key with the run it already has instead of running the step again.
        in_flight: planner_pb2.StepAttempt | None = None
        last = status.attempts[-1] if status.attempts else None
        if last is not None and not last.error and not last.HasField("finished_at"):
            in_flight = planner_pb2.StepAttempt()
            in_flight.CopyFrom(last)
        continued: planner_pb2.StepAttempt | None = None
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
                status.state, status.error = planner_pb2.STEP_STATE_FAILED, why
                await self.progress.write(
                    [
                        self._step_put(step_id),
                        self.progress.event(
                            planner_pb2.GOAL_EVENT_TYPE_STEP_FAILED, step_id=step_id, error=why
                        ),
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
            status.state, status.agent_id, status.error = (
                planner_pb2.STEP_STATE_RUNNING,
                assignment.agent_id,
                "",
            )
            start_puts: list[Put] = [
                self._step_put(step_id),
                self.progress.event(
                    planner_pb2.GOAL_EVENT_TYPE_STEP_ASSIGNED,
                    step_id=step_id,
                    agent_id=assignment.agent_id,
                    attempt=attempt,
                ),
                self.progress.event(
                    planner_pb2.GOAL_EVENT_TYPE_STEP_STARTED,
                    step_id=step_id,
                    agent_id=assignment.agent_id,
                    attempt=attempt,
                ),
            ]
            # A step that finishes within START_WRITE_DELAY_S has its start recorded
            # with its outcome, in one transaction; a longer one shows as running.
            started = self.progress.delayed(start_puts)
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
            self.planner.launcher.use(assignment.agent_id)
            try:
                reply = await stub.ExecuteStep(request, timeout=timeout)
                error = ""
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except BaseException:
                started.cancel()
                raise
            finally:
                self.planner.launcher.release(assignment.agent_id)
            await started.settle()
            record.finished_at.CopyFrom(now_ts())
            if not error:
                await self._succeeded(step_id, reply.output, assignment.agent_id, attempt=attempt)
                return True
            record.error = error
            excluded.add(assignment.agent_id)
            if attempt >= max_attempts:
                status.state, status.error = planner_pb2.STEP_STATE_FAILED, error
                await self.progress.write(
                    [
                        self._step_put(step_id),
                        self.progress.event(
                            planner_pb2.GOAL_EVENT_TYPE_STEP_FAILED,
                            step_id=step_id,
                            agent_id=assignment.agent_id,
                            attempt=attempt,
                            error=error,
                        ),
                    ]
                )
                return False
            status.state, status.error = planner_pb2.STEP_STATE_RETRYING, error
            await self.progress.write(
                [
                    self._step_put(step_id),
                    self.progress.event(
                        planner_pb2.GOAL_EVENT_TYPE_STEP_RETRYING,
                        step_id=step_id,
                        agent_id=assignment.agent_id,
                        attempt=attempt,
                        error=error,
                    ),
                ]
            )
