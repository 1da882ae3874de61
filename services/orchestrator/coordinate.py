"""Variables the agents decide: run a binding's protocol, write the outcome, resize the pool.

CoordinateVariable, CoordinateSystem and the adaptation loop all come here. A
binding's protocol runs through the coordination service; the decided value
is checked against the binding's constraints and written with compare-and-set
on the version read before deciding (a variable that moved meanwhile is not
overwritten), in one transaction with the binding's ``last_coordinated_at``
that compares the binding's mod revision read before deciding: a binding
removed meanwhile (UnbindVariable) stays removed, nothing is written, and the
call is NOT_FOUND; one rebound meanwhile is reported and not written. A
resource allocation with a worker pool then starts or stops
supervised workers through the registry. One coordination per variable at a
time on a replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from google.protobuf import struct_pb2, timestamp_pb2

from mabeam import errors, telemetry
from mabeam.client import MeshClient, list_all
from mabeam.runtime import validate
from mabeam.services.orchestrator import variables
from mabeam.services.orchestrator.store import VariableStore
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, registry_pb2

log = logging.getLogger("mabeam.orchestrator")
# The participants' loads an adaptation's context carries at most (~40 bytes each: well
# within the 64 KiB a run's context may take).
MAX_CONTEXT_LOADS = 1000


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _unbound(name: str, session_id: str) -> errors.NotFound:
    if not session_id:
        return errors.NotFound(f"variable {name!r} is not bound (BindVariable first)")
    return errors.NotFound(
        f"variable {name!r} was unbound while session {session_id} decided it; nothing was written"
    )


class Coordinator:
    """Runs bindings' protocols and writes what they decide."""

    def __init__(self, store: VariableStore, mesh: Callable[[], MeshClient], writer: str) -> None:
        self.store = store
        self._mesh = mesh
        self._writer = writer
        self._coordinating: dict[str, asyncio.Lock] = {}
        # variable -> (the binding's last_coordinated_at as last seen, this process's monotonic
        # time when it was first seen so): cooldowns are counted on this host's clock only.
        self._last_seen: dict[str, tuple[int, float]] = {}

    @property
    def mesh(self) -> MeshClient:
        return self._mesh()

    async def coordinate(
        self,
        binding: orchestrator_pb2.OrchestrationBinding,
        trigger: str = "call",
        context: struct_pb2.Struct | None = None,
    ) -> orchestrator_pb2.VariableCoordination:
        """Run a binding's protocol and write its outcome with compare-and-set.

        Raises NotFound when the variable is not bound, or was unbound before
        the outcome could be written (then nothing is written). ``trigger``
        (``call``, ``system``, ``adaptation``) labels the metrics; an adaptation
        gives its ``context`` to the run and runs its rule's protocol, if it names one.
        """
        lock = self._coordinating.setdefault(binding.variable, asyncio.Lock())
        started = time.monotonic()
        result = "failed"
        try:
            async with lock:
                done = await self._coordinate(binding, context, adapting=trigger == "adaptation")
            result = "written" if done.applied else "not_written"
            return done
        finally:
            meters = telemetry.instruments()
            meters.variable_coordinations.add(1, {"trigger": trigger, "result": result})
            meters.variable_coordination_duration.record(time.monotonic() - started, {"trigger": trigger})

    async def _coordinate(
        self,
        binding: orchestrator_pb2.OrchestrationBinding,
        context: struct_pb2.Struct | None = None,
        adapting: bool = False,
    ) -> orchestrator_pb2.VariableCoordination:
        result = orchestrator_pb2.VariableCoordination(variable=binding.variable)
        # Read here, with its revision: the outcome is written only while the binding stays as read.
        entry = await self.store.get_binding_entry(binding.variable)
        if entry is None:
            raise _unbound(binding.variable, "")
        binding, binding_revision = entry
        before = await self.store.get(binding.variable)
        expected = before.version if before is not None else 0
        selector = common_pb2.AgentSelector()
        selector.CopyFrom(binding.participants)
        if binding.constraints.max_agents and (
            not selector.max_agents or selector.max_agents > binding.constraints.max_agents
        ):
            selector.max_agents = binding.constraints.max_agents
        protocol = binding.protocol
        if adapting and binding.adaptation.protocol:
            protocol = binding.adaptation.protocol
        run = coordination_pb2.RunRequest(
            settings=coordination_pb2.SessionSettings(participants=selector),
            protocol=protocol,
            parameters=binding.parameters,
        )
        if context is not None:
            run.context.CopyFrom(context)
        try:
            session = (await self.mesh.coordination.Run(run)).session
        except errors.MabeamError as exc:
            result.reason = f"coordination failed: {exc.message}"
            return result
        result.session_id = session.session_id
        if not session.outcome.decided:
            result.reason = f"no decision: {session.outcome.reason}"
            return result
        value = variables.decided_value(session.outcome, binding.kind)
        result.decided_value.CopyFrom(value)
        broken = variables.violation(value, binding.constraints)
        if broken is not None:
            result.reason = f"constraint violated: {broken}; not written"
            if before is not None:
                result.variable_after.CopyFrom(before)
            return result
        var = orchestrator_pb2.Variable(
            name=binding.variable, value=value, updated_at=_now(), writer=self._writer
        )
        var.decided_by_session = session.session_id
        binding.last_coordinated_at.CopyFrom(_now())
        ok, now, binding_now = await self.store.put_decided(var, expected, binding, binding_revision)
        if now is not None:
            result.variable_after.CopyFrom(now)
        if not ok:
            if binding_now == 0:
                raise _unbound(binding.variable, session.session_id)
            if (now.version if now is not None else 0) != expected:
                result.reason = (
                    f"lost compare-and-set: the variable moved from version {expected} while deciding"
                )
            else:
                result.reason = "the binding changed while deciding (rebound); not written"
            return result
        result.applied = True
        if binding.kind == orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION and binding.HasField(
            "worker_pool"
        ):
            try:
                await self._resize_pool(binding.worker_pool, int(value.struct_value["size"]))
            except errors.MabeamError as exc:
                result.reason = f"written; resizing the worker pool failed: {exc.message}"
        return result

    async def coordinate_system(
        self, bindings: Iterable[orchestrator_pb2.OrchestrationBinding]
    ) -> list[orchestrator_pb2.VariableCoordination]:
        """Coordinate ``bindings`` concurrently; one unbound meanwhile is reported in its result."""

        async def one(
            binding: orchestrator_pb2.OrchestrationBinding,
        ) -> orchestrator_pb2.VariableCoordination:
            try:
                return await self.coordinate(binding, "system")
            except errors.NotFound as exc:
                return orchestrator_pb2.VariableCoordination(variable=binding.variable, reason=exc.message)

        return list(await asyncio.gather(*(one(b) for b in bindings)))

    async def _resize_pool(self, pool: orchestrator_pb2.WorkerPool, size: int) -> None:
        """Start or stop supervised workers <prefix>-1..n through the registry to reach ``size``."""
        registry = self.mesh.registry
        # Every page: a pool past 1,000 supervised agents (or a mesh with more) is counted whole.
        supervised = await list_all(
            registry.ListSupervisedAgents, registry_pb2.ListSupervisedAgentsRequest(), "agents"
        )
        running = {
            a.agent_id
            for a in supervised
            if a.agent_id.startswith(pool.agent_id_prefix + "-")
            and a.state
            in (
                registry_pb2.SUPERVISION_STATE_STARTING,
                registry_pb2.SUPERVISION_STATE_RUNNING,
                registry_pb2.SUPERVISION_STATE_RESTARTING,
            )
        }
        wanted = {f"{pool.agent_id_prefix}-{n}" for n in range(1, size + 1)}
        starts = [
            registry.StartAgent(
                registry_pb2.StartAgentRequest(
                    agent_id=a, launch=pool.launch, restart_policy=pool.restart_policy
                )
            )
            for a in sorted(wanted - running)
        ]
        stops = [
            registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=a)) for a in sorted(running - wanted)
        ]
        await asyncio.gather(*starts, *stops)

    # -- adaptation -----------------------------------------------------------------------

    async def adapt_once(self, bindings: Iterable[orchestrator_pb2.OrchestrationBinding]) -> None:
        """One pass of the adaptation loop: re-coordinate the bindings whose metric crosses its threshold."""
        bindings = list(bindings)
        for gone in self._last_seen.keys() - {b.variable for b in bindings}:
            del self._last_seen[gone]  # unbound: forgotten (bounded by the bindings that exist)
        for binding in bindings:
            if not binding.HasField("adaptation"):
                continue
            rule = binding.adaptation
            cooldown = validate.seconds(rule.cooldown, "cooldown", default=10.0)
            if self._cooling(binding, cooldown):
                continue
            value, loads = await self._metric(binding)
            if value is not None and variables.metric_crosses(value, rule):
                log.info(
                    "adapting %s: %s = %g crossed %g", binding.variable, rule.metric, value, rule.threshold
                )
                context = struct_pb2.Struct()
                context.update(
                    {
                        "trigger": "adaptation",
                        "metric": rule.metric,
                        "value": value,
                        "threshold": rule.threshold,
                        "comparison": orchestrator_pb2.Comparison.Name(rule.comparison),
                    }
                )
                if loads is not None:
                    context.update({"loads": loads})
                try:
                    await self.coordinate(binding, "adaptation", context)
                except errors.NotFound:
                    log.info("%s was unbound while adapting; nothing written", binding.variable)

    def _cooling(self, binding: orchestrator_pb2.OrchestrationBinding, cooldown: float) -> bool:
        """Whether ``binding`` was coordinated less than ``cooldown`` s ago, by this host's clock.

        ``last_coordinated_at`` is written by whichever replica coordinated, with its own
        wall clock: it is compared only with itself. A change of it is timed when this
        process first sees it; one this process has not seen change since it started
        leading counts as just coordinated (a new leader waits one cooldown); a binding
        never coordinated is not cooling.
        """
        if not binding.HasField("last_coordinated_at"):
            return False
        stamp = binding.last_coordinated_at.ToNanoseconds()
        now = time.monotonic()
        seen = self._last_seen.get(binding.variable)
        if seen is None or seen[0] != stamp:
            seen = self._last_seen[binding.variable] = (stamp, now)
        return now - seen[1] < cooldown

    async def _metric(
        self, binding: orchestrator_pb2.OrchestrationBinding
    ) -> tuple[float | None, dict[str, float] | None]:
        """The rule's metric now (None: nothing to measure), and for an ``agents.`` metric the
        participants' loads by id (at most MAX_CONTEXT_LOADS of them, for the run's context)."""
        kind, subject, statistic = variables.parse_metric(binding.adaptation.metric)
        if kind == "var":
            var = await self.store.get(subject)
            return (variables.as_number(var.value) if var is not None else None), None
        if kind == "sessions":
            page = await self.mesh.coordination.ListSessions(
                coordination_pb2.ListSessionsRequest(protocol=subject, page_size=variables.SESSIONS_LOOKED_AT)
            )
            finished = [s for s in page.sessions if s.state != coordination_pb2.SESSION_STATE_RUNNING]
            return variables.session_statistic(finished, statistic), None
        selector = binding.participants
        listed = await list_all(  # every page: a metric over all the agents, not the first 1,000
            self.mesh.registry.ListAgents,
            registry_pb2.ListAgentsRequest(capability=selector.capability, labels=dict(selector.labels)),
            "agents",
        )
        agents = [a for a in listed if not selector.agent_ids or a.agent_id in selector.agent_ids]
        loads = {a.agent_id: a.load.load for a in agents[:MAX_CONTEXT_LOADS]}
        return variables.aggregate([float(getattr(a.load, subject)) for a in agents], statistic), loads
