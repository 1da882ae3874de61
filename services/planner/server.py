"""The planner's gRPC edge: submit, follow, inspect and cancel goals.

Validation (:mod:`.dag`) happens before anything is stored. A submitted goal
is run by whichever replica takes its owner key (:mod:`.runner`); every
replica looks for goals that are pending or running without an owner (their
replica died) and resumes them. A replica keeps in memory the unfinished
goals only (a watch of the store's ``goal-active/`` index), never every goal
ever submitted; ``ListGoals`` reads one bounded range of etcd per page.

Finished goals are kept for the goal retention (``--goal-retention``,
``MABEAM_GOAL_RETENTION``, default 7 days; :mod:`mabeam.runtime.retention`),
then etcd deletes them (expiry leases: see the store). A goal id not in etcd
is ``NOT_FOUND`` saying it may have expired. With a count cap
(``--goal-retention-count``, ``MABEAM_GOAL_RETENTION_COUNT``), one replica
(an etcd election) deletes the oldest finished goals beyond it every
TRIM_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mabeam import errors, telemetry
from mabeam.client import ChannelPool, MeshClient
from mabeam.runtime import validate
from mabeam.runtime.cache import PrefixCache, report_health
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper
from mabeam.runtime.idempotency import idempotent
from mabeam.runtime.retention import ExpiryLeases, Retention, expired_message
from mabeam.server import MeshServer
from mabeam.services.planner import dag
from mabeam.services.planner.launcher import Launcher, idle_seconds
from mabeam.services.planner.progress import now_ts
from mabeam.services.planner.runner import GoalRunner
from mabeam.services.planner.store import GoalStore
from mabeam.v1 import common_pb2, planner_pb2, planner_pb2_grpc, registry_pb2

SERVICE_NAME = "mabeam.v1.PlannerService"
log = logging.getLogger("mabeam.planner")
ACTIVE = (planner_pb2.GOAL_STATE_PENDING, planner_pb2.GOAL_STATE_RUNNING)
FINISHED = (planner_pb2.GOAL_STATE_SUCCEEDED, planner_pb2.GOAL_STATE_FAILED, planner_pb2.GOAL_STATE_CANCELLED)
# A pending goal is left to the replica that took its submission for this long,
# counted on this replica's monotonic clock from when it first saw the goal: a
# goal's created_at was written by another host's clock, never compared here.
ADOPT_AFTER_S = 2.0
# How often the elected replica enforces the count cap of finished goals (when there is one).
TRIM_INTERVAL_S = 30.0
# An objective's input, serialized, at most (it is stored with the goal and sent to the planning agent).
MAX_OBJECTIVE_INPUT_BYTES = 64 * 1024


def _not_found(goal_id: str, retention: Retention) -> errors.NotFound:
    return errors.NotFound(
        expired_message(f"goal {goal_id!r}", retention), reason=common_pb2.ERROR_REASON_GOAL_NOT_FOUND
    )


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    """mabeam.v1.PlannerService."""

    def __init__(
        self,
        server: MeshServer,
        etcd: EtcdClient,
        retention: Retention | None = None,
        agent_idle_s: float | None = None,
    ) -> None:
        self._server = server
        self.store = GoalStore(etcd, server.config)
        self.retention = retention if retention is not None else Retention.load("goal", os.environ)
        self.expiry = ExpiryLeases(etcd, self.retention)  # finished goals' keys are bound to its leases
        self.pool = ChannelPool(server.config.client_tls(), server.config.agent_credential())
        # Unfinished goals only: goal id's active-index key -> its state (pending or running).
        self.active: PrefixCache[int] = PrefixCache(etcd, self.store.active, lambda k, v: int(v))
        self.owners: PrefixCache[bytes] = PrefixCache(etcd, self.store.owners, lambda k, v: bytes(v))
        self.cancels: PrefixCache[bytes] = PrefixCache(etcd, self.store.cancels, lambda k, v: bytes(v))
        self.runners: dict[str, tuple[GoalRunner | None, asyncio.Task[None]]] = {}
        # goal_id -> (the goal key's create revision, time.monotonic() when this replica first saw it)
        self._first_seen: dict[str, tuple[int, float]] = {}
        self._keeper: LeaseKeeper | None = None
        self._mesh: MeshClient | None = None
        self._wake = asyncio.Event()
        # Agents started for goals that may start them (GoalSpec.may_start_agents), stopped once idle.
        self.launcher = Launcher(
            lambda: self.mesh,
            self.store,
            server.instance_id,
            self._lease_id,
            agent_idle_s if agent_idle_s is not None else idle_seconds(os.environ),
        )

    def _lease_id(self) -> int:
        assert self._keeper is not None
        return self._keeper.lease_id

    @property
    def mesh(self) -> MeshClient:
        assert self._mesh is not None
        return self._mesh

    async def start(self) -> None:
        config = self._server.config
        self._mesh = await self._server.connect_mesh()
        await self.store.backfill_indexes()  # goals stored before the indexes: once per mesh
        for cache in (self.active, self.owners, self.cancels):
            cache.add_listener(lambda *a: self._wake.set())
            await cache.start()
        self.cancels.add_listener(self._on_cancel)
        self._keeper = self.store.lease_keeper(config.service_ttl)
        await self._keeper.start()
        self._server.spawn(self._adopt_loop(), "goal-adoption")
        self._server.spawn(self.launcher.run(), "idle-agents")

    async def stop(self) -> None:
        runners, self.runners = self.runners, {}
        for _, task in runners.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in runners.values()), return_exceptions=True)
        await self.launcher.stop_all()
        if self._keeper is not None:
            await self._keeper.revoke()
        for cache in (self.active, self.owners, self.cancels):
            await cache.stop()
        if self._mesh is not None:
            await self._mesh.close()
        await self.pool.close()

    async def run_retention(self) -> None:
        """While leading (etcd election): delete the oldest finished goals beyond the count cap."""
        await self.store.while_leading_retention(
            self._server.instance_id, self._server.config.service_ttl, self.trim_once, TRIM_INTERVAL_S
        )

    async def trim_once(self) -> int:
        """One pass of the count cap (bounded: see :meth:`GoalStore.trim`); how many goals it deleted."""
        deleted = await self.store.trim(self.retention.max_count)
        if deleted:
            log.info(
                "goal retention: deleted the %d oldest finished goals beyond %d",
                deleted,
                self.retention.max_count,
            )
        return deleted

    def cancel_reason(self, goal_id: str) -> str:
        reason = self.cancels.get(self.store.cancel_key(goal_id))
        return f"cancelled: {reason.decode() or 'on request'}" if reason is not None else "cancelled"

    def _on_cancel(self, kind: str, key: bytes, old: Any, new: Any, rev: int) -> None:
        goal_id = key[len(self.store.cancels) :].decode()
        entry = self.runners.get(goal_id)
        if kind == "PUT" and entry is not None and entry[0] is not None:
            entry[0].cancelled.set()

    # -- adoption: run goals nobody runs ------------------------------------------------

    async def _adopt_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
            try:
                await self._adopt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("goal adoption pass failed: %s", exc)

    async def _adopt(self) -> None:
        assert self._keeper is not None
        if self._keeper.lost.is_set():
            # Our goals' owner keys lapsed with the lease: stop their runners first.
            for _, task in self.runners.values():
                task.cancel()
            self.runners.clear()
            self._keeper = self.store.lease_keeper(self._server.config.service_ttl)
            await self._keeper.start()
        now = time.monotonic()
        pending: set[str] = set()
        # The unfinished goals only (the active index): the pass costs what is running, not the history.
        for key, state in list(self.active.items()):
            goal_id = key[len(self.store.active) :].decode()
            if state not in ACTIVE or goal_id in self.runners:
                continue
            if state == planner_pb2.GOAL_STATE_PENDING:
                pending.add(goal_id)
                if not self._pending_long_enough(goal_id, self.active.create_revision(key), now):
                    continue  # the replica that took the submission starts it (and keeps its trace)
            if self.owners.get(self.store.owner_key(goal_id)) is not None:
                continue
            if await self.store.acquire_owner(goal_id, self._server.instance_id, self._keeper.lease_id):
                self._start_runner(goal_id)
        for goal_id in self._first_seen.keys() - pending:
            del self._first_seen[goal_id]

    def _pending_long_enough(self, goal_id: str, create_revision: int, now: float) -> bool:
        """True once this replica has seen the pending goal for ADOPT_AFTER_S (its own clock).

        The goal is known by its key's create revision, so a goal deleted and
        submitted again under the same id waits afresh.
        """
        seen = self._first_seen.get(goal_id)
        if seen is None or seen[0] != create_revision:
            self._first_seen[goal_id] = seen = (create_revision, now)
        return now - seen[1] >= ADOPT_AFTER_S

    def _start_runner(self, goal_id: str) -> None:
        if goal_id in self.runners:
            return  # submit and the adoption pass may both win the (idempotent) owner key

        async def run() -> None:
            goal = await self.store.get(goal_id, with_steps=False)
            if goal is None or goal.state in FINISHED:
                # An active-index key left behind (a backfill raced the goal's end): drop it.
                await self.store.drop_active(goal_id)
                await self.store.release_owner(goal_id, self._server.instance_id)
                return
            runner = GoalRunner(self, goal, self._server.instance_id)
            self.runners[goal_id] = (runner, task)
            if self.cancels.get(self.store.cancel_key(goal_id)) is not None:
                runner.cancelled.set()
            await runner.run()

        task = asyncio.create_task(run(), name=f"goal:{goal_id}")
        self.runners[goal_id] = (None, task)
        task.add_done_callback(lambda _: self.runners.pop(goal_id, None))

    # -- RPCs ----------------------------------------------------------------------------

    async def _validate_objective(self, spec: planner_pb2.GoalSpec) -> None:
        """A goal given as an objective: its planning agent's capability must be live."""
        if spec.steps:
            raise errors.InvalidArgument("goal.objective", "give steps or an objective, not both")
        objective = spec.objective
        if not objective.capability or len(objective.capability) > 128:
            raise errors.InvalidArgument("goal.objective.capability", "required, 1-128 characters")
        if objective.input.ByteSize() > MAX_OBJECTIVE_INPUT_BYTES:
            raise errors.InvalidArgument(
                "goal.objective.input", f"at most {MAX_OBJECTIVE_INPUT_BYTES} bytes serialized"
            )
        listed = await self.mesh.registry.ListAgents(
            registry_pb2.ListAgentsRequest(capability=objective.capability, page_size=1)
        )
        if not listed.agents and not (
            spec.may_start_agents and await self.launcher.can_start(objective.capability)
        ):
            raise errors.FailedPrecondition(
                f"objective needs capability {objective.capability!r} (a planning agent), "
                "which no live agent offers",
                reason=common_pb2.ERROR_REASON_NO_CAPABLE_AGENT,
            )

    async def _validate(self, spec: planner_pb2.GoalSpec) -> None:
        steps = [dag.StepSpec(s.step_id, s.capability, tuple(s.depends_on)) for s in spec.steps]
        for i, s in enumerate(spec.steps):
            if s.timeout.seconds < 0 or s.timeout.nanos < 0:
                raise errors.InvalidArgument(f"goal.steps[{i}].timeout", "must not be negative")
        if spec.max_parallelism > 1024:
            raise errors.InvalidArgument("goal.max_parallelism", "at most 1024")
        validate.seconds(spec.deadline, "goal.deadline", default=600, minimum=0.001, maximum=7 * 86400)
        if spec.HasField("objective"):
            await self._validate_objective(spec)
            return
        try:
            dag.validate(steps)
            live: set[str] = set()
            for capability in {s.capability for s in steps}:
                listed = await self.mesh.registry.ListAgents(
                    registry_pb2.ListAgentsRequest(capability=capability, page_size=1)
                )
                if listed.agents or (spec.may_start_agents and await self.launcher.can_start(capability)):
                    live.add(capability)
            dag.validate(steps, live)
        except dag.GoalInvalid as exc:
            if exc.code == "NO_CAPABILITY":
                raise errors.FailedPrecondition(
                    exc.message, reason=common_pb2.ERROR_REASON_NO_CAPABLE_AGENT
                ) from None
            raise errors.InvalidArgument(
                "goal.steps", exc.message, reason=common_pb2.ERROR_REASON_INVALID_PLAN
            ) from None

    async def submit(self, spec: planner_pb2.GoalSpec, goal_id: str) -> planner_pb2.Goal:
        if goal_id:
            validate.identifier(goal_id, "goal_id")
            existing = await self.store.get(goal_id)
            if existing is not None:
                return existing  # idempotent submission
        await self._validate(spec)
        goal = planner_pb2.Goal(
            goal_id=goal_id or uuid.uuid4().hex[:16],
            spec=spec,
            state=planner_pb2.GOAL_STATE_PENDING,
            created_at=now_ts(),
        )
        steps = [
            planner_pb2.StepStatus(step_id=s.step_id, state=planner_pb2.STEP_STATE_PENDING)
            for s in spec.steps
        ]
        if not await self.store.create(goal):
            existing = await self.store.get(goal.goal_id)
            if existing is not None:
                return existing
        goal.steps.extend(steps)
        assert self._keeper is not None
        if await self.store.acquire_owner(goal.goal_id, self._server.instance_id, self._keeper.lease_id):
            self._start_runner(goal.goal_id)
        return goal

    @idempotent(planner_pb2.SubmitGoalResponse)
    async def SubmitGoal(
        self, request: planner_pb2.SubmitGoalRequest, context: Any
    ) -> planner_pb2.SubmitGoalResponse:
        return planner_pb2.SubmitGoalResponse(goal=await self.submit(request.goal, request.goal_id))

    async def ExecuteGoal(
        self, request: planner_pb2.ExecuteGoalRequest, context: Any
    ) -> AsyncIterator[planner_pb2.ExecuteGoalResponse]:
        target = request.WhichOneof("target")
        if target is None:
            raise errors.InvalidArgument("target", "give goal_id or goal")
        if target == "goal":
            goal_id = (await self.submit(request.goal, "")).goal_id
        else:
            goal_id = validate.identifier(request.goal_id, "goal_id")
            if await self.store.get(goal_id, with_steps=False) is None:
                raise _not_found(goal_id, self.retention)
        events, revision = await self.store.events_so_far(goal_id)
        for event in events:
            yield event
            if event.type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED:
                return
        after = events[-1].sequence if events else 0
        async with contextlib.aclosing(self.store.follow_events(goal_id, revision + 1, after)) as following:
            async for event in following:
                yield event
                if event.type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED:
                    return

    async def GetGoal(self, request: planner_pb2.GetGoalRequest, context: Any) -> planner_pb2.GetGoalResponse:
        goal_id = validate.identifier(request.goal_id, "goal_id")
        goal = await self.store.get(goal_id)
        if goal is None:
            raise _not_found(goal_id, self.retention)
        return planner_pb2.GetGoalResponse(goal=goal)

    async def ListGoals(
        self, request: planner_pb2.ListGoalsRequest, context: Any
    ) -> planner_pb2.ListGoalsResponse:
        size = validate.page_size(request.page_size)
        filters = [request.state]
        after = validate.decode_page_token(request.page_token, filters)
        # One bounded range of the newest-first index per page (a state filter may give a short page).
        goal_ids, next_after = await self.store.page_goal_ids(after, size, request.state)
        full = [g for g in [await self.store.get(goal_id) for goal_id in goal_ids] if g is not None]
        token = validate.encode_page_token(next_after, filters) if next_after is not None else ""
        return planner_pb2.ListGoalsResponse(goals=full, next_page_token=token)

    @idempotent(planner_pb2.CancelGoalResponse)
    async def CancelGoal(
        self, request: planner_pb2.CancelGoalRequest, context: Any
    ) -> planner_pb2.CancelGoalResponse:
        goal_id = validate.identifier(request.goal_id, "goal_id")
        goal = await self.store.get(goal_id, with_steps=False)
        if goal is None:
            raise _not_found(goal_id, self.retention)
        if goal.state in FINISHED:
            return planner_pb2.CancelGoalResponse(goal=await self.store.get(goal_id))
        await self.store.request_cancel(goal_id, request.reason or "on request")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while loop.time() < deadline:
            goal = await self.store.get(goal_id, with_steps=False)
            if goal is not None and goal.state in FINISHED:
                break
            await asyncio.sleep(0.05)
        return planner_pb2.CancelGoalResponse(goal=await self.store.get(goal_id))


def builder(
    retention: Retention | None = None, agent_idle_s: float | None = None
) -> Callable[[MeshServer, EtcdClient], Awaitable[None]]:
    """The build function of a planner keeping finished goals for ``retention`` (default: :func:`build`'s)
    and stopping the agents it started once idle for ``agent_idle_s``."""

    async def build_planner(server: MeshServer, etcd: EtcdClient) -> None:
        await build(server, etcd, retention, agent_idle_s)

    return build_planner


async def build(
    server: MeshServer,
    etcd: EtcdClient,
    retention: Retention | None = None,
    agent_idle_s: float | None = None,
) -> None:
    """Add the planner servicer to ``server`` (called by mabeam.runtime.service.start_service).

    ``retention``: how long finished goals are kept; default ``$MABEAM_GOAL_RETENTION`` (and
    ``$MABEAM_GOAL_RETENTION_COUNT``), else 7 days. ``agent_idle_s``: how long an agent the planner
    started stays idle before it is stopped; default ``$MABEAM_PLANNER_AGENT_IDLE``, else 60 s.
    """
    servicer = PlannerServicer(server, etcd, retention, agent_idle_s)
    await servicer.start()
    if servicer.retention.max_count:
        server.spawn(servicer.run_retention(), "goal-retention")
    server.on_stop(servicer.stop)
    server.on_stop(servicer.store.requests.stop)
    report_health(server, servicer.active, servicer.owners, servicer.cancels)
    telemetry.observe(
        "mabeam.planner.running_goals", "goals this replica runs", lambda: len(servicer.runners)
    )
    server.add_service(SERVICE_NAME, planner_pb2_grpc.add_PlannerServiceServicer_to_server, servicer)
