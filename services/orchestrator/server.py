"""The orchestrator's gRPC edge: shared variables, and variables the agents decide.

Variables (:mod:`.store`): strong or relaxed reads, compare-and-set on the
version, last-write-wins by timestamp, ephemeral variables on a lease, watches.
Bindings attach a coordination protocol to a variable; CoordinateVariable runs
it through the coordination service and writes the outcome with
compare-and-set. One replica (etcd election) runs the adaptation loop that
re-coordinates bindings whose metric crosses its threshold.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2

from mabeam import errors
from mabeam.client import MeshClient
from mabeam.runtime import validate
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient, ResumingWatch, WatchCompacted, snapshot, while_leading
from mabeam.server import MeshServer
from mabeam.services.orchestrator import variables as V
from mabeam.services.orchestrator.store import VariableStore, variable_from_kv
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2_grpc, registry_pb2
from mabeam.v1 import orchestrator_pb2 as O

SERVICE_NAME = "mabeam.v1.OrchestratorService"
log = logging.getLogger("mabeam.orchestrator")
ADAPT_INTERVAL = 1.0


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _version_mismatch(name: str, expected: int, current: O.Variable | None) -> errors.Aborted:
    version = current.version if current is not None else 0
    return errors.Aborted(
        f"variable {name!r} is at version {version}, not the expected {expected}",
        metadata={"current_version": str(version)},
    )


def _not_found(name: str) -> errors.NotFound:
    return errors.NotFound(
        f"variable {name!r} does not exist", reason=common_pb2.ERROR_REASON_VARIABLE_NOT_FOUND
    )


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """mabeam.v1.OrchestratorService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd
        self.store = VariableStore(etcd, server.config)
        self.bindings: PrefixCache[O.OrchestrationBinding] = PrefixCache(
            etcd, self.store.bindings, lambda k, v: O.OrchestrationBinding.FromString(v)
        )
        self._mesh: MeshClient | None = None
        self._coordinating: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        await self.bindings.start()
        config = self._server.config
        self._mesh = await MeshClient.connect(
            etcd=list(config.etcd_endpoints),
            prefix=config.prefix,
            tls=config.client_tls(),
            etcd_tls=config.etcd_tls,
        )

    async def stop(self) -> None:
        await self.bindings.stop()
        if self._mesh is not None:
            await self._mesh.close()

    @property
    def mesh(self) -> MeshClient:
        assert self._mesh is not None
        return self._mesh

    # -- variables ------------------------------------------------------------------

    async def SetVariable(self, request: O.SetVariableRequest, context: Any) -> O.SetVariableResponse:
        name = V.check_name(request.name)
        V.check_value(request.value)
        if request.lease_id < 0:
            raise errors.InvalidArgument("lease_id", "must not be negative")
        var = O.Variable(name=name, value=request.value, updated_at=_now(), writer=request.writer)
        if request.mode == O.WRITE_MODE_LAST_WRITE_WINS:
            return await self._set_lww(request, var)
        if request.HasField("timestamp"):
            var.timestamp.CopyFrom(request.timestamp)
        c = self._etcd
        key = self.store.key(name)
        if request.HasField("expected_version"):
            expected = request.expected_version
            if expected < 0:
                raise errors.InvalidArgument("expected_version", "must not be negative")
            # One transaction: the version and the stored type both checked.
            compare = [c.transactions.version(key) == expected]
            if expected > 0:
                compare.append(
                    c.transactions.value(self.store.type_key(name)) == V.kind_of(request.value).encode()
                )
            ok, now = await self._put(name, var, compare, request.lease_id)
            if not ok:
                if now is not None and now.version == expected:
                    self._check_type(name, now, request.value)
                raise _version_mismatch(name, expected, now)
            return O.SetVariableResponse(variable=now, applied=True)
        if request.require_same_type:
            for _ in range(20):
                current = await self.store.get(name)
                if current is None:
                    compare = [c.transactions.create(key) == 0]
                else:
                    self._check_type(name, current, request.value)
                    compare = [c.transactions.mod(key) == current.mod_revision]
                ok, now = await self._put(name, var, compare, request.lease_id)
                if ok:
                    return O.SetVariableResponse(variable=now, applied=True)
            raise errors.Aborted(f"variable {name!r} kept changing; retry")
        ok, now = await self._put(name, var, [], request.lease_id)
        return O.SetVariableResponse(variable=now, applied=True)

    async def _put(
        self, name: str, var: O.Variable, compare: list[Any], lease: int
    ) -> tuple[bool, O.Variable | None]:
        try:
            return await self.store.put_if(name, var, compare, lease)
        except Exception as exc:
            if lease and "lease not found" in str(exc):
                raise errors.FailedPrecondition(
                    f"lease_id {lease} does not exist (it lapsed or was never granted)"
                ) from None
            raise

    @staticmethod
    def _check_type(name: str, current: O.Variable, value: common_pb2.Value) -> None:
        if V.kind_of(current.value) != V.kind_of(value):
            raise errors.FailedPrecondition(
                f"variable {name!r} holds a {V.kind_of(current.value)}, not a {V.kind_of(value)}",
                reason=common_pb2.ERROR_REASON_TYPE_MISMATCH,
            )

    async def _set_lww(self, request: O.SetVariableRequest, var: O.Variable) -> O.SetVariableResponse:
        if not request.HasField("timestamp"):
            raise errors.InvalidArgument("timestamp", "is required with WRITE_MODE_LAST_WRITE_WINS")
        var.timestamp.CopyFrom(request.timestamp)
        new = request.timestamp.ToNanoseconds()
        c = self._etcd
        key = self.store.key(var.name)
        for _ in range(50):
            current = await self.store.get(var.name)
            if (
                current is not None
                and current.HasField("timestamp")
                and current.timestamp.ToNanoseconds() >= new
            ):
                return O.SetVariableResponse(
                    variable=current,
                    applied=False,
                    reason=f"discarded: the stored value is newer or as new ({current.timestamp.ToJsonString()})",
                )
            compare = (
                [c.transactions.create(key) == 0]
                if current is None
                else [c.transactions.mod(key) == current.mod_revision]
            )
            ok, now = await self._put(var.name, var, compare, request.lease_id)
            if ok:
                return O.SetVariableResponse(variable=now, applied=True)
        raise errors.Aborted(f"variable {var.name!r} kept changing; retry")

    async def GetVariable(self, request: O.GetVariableRequest, context: Any) -> O.GetVariableResponse:
        name = V.check_name(request.name)
        relaxed = request.consistency == O.CONSISTENCY_RELAXED
        var = await self.store.get(name, relaxed=relaxed)
        if var is None:
            raise _not_found(name)
        return O.GetVariableResponse(variable=var, possibly_stale=relaxed)

    async def ListVariables(self, request: O.ListVariablesRequest, context: Any) -> O.ListVariablesResponse:
        size = validate.page_size(request.page_size)
        if request.prefix:
            V.check_name(request.prefix, "prefix")
        relaxed = request.consistency == O.CONSISTENCY_RELAXED
        kvs, _ = await snapshot(self._etcd, self.store.key(request.prefix), serializable=relaxed)
        found = sorted((variable_from_kv(kv) for kv in kvs), key=lambda v: v.name)
        chunk, token = validate.page(found, lambda v: v.name, size, request.page_token, [request.prefix])
        return O.ListVariablesResponse(variables=chunk, next_page_token=token, possibly_stale=relaxed)

    async def DeleteVariable(
        self, request: O.DeleteVariableRequest, context: Any
    ) -> O.DeleteVariableResponse:
        name = V.check_name(request.name)
        c = self._etcd
        key = self.store.key(name)
        compare = [c.transactions.create(key) > 0]
        if request.HasField("expected_version"):
            compare = [c.transactions.version(key) == request.expected_version, *compare]
        if not await self.store.delete_if(name, compare):
            current = await self.store.get(name)
            if current is None:
                raise _not_found(name)
            raise _version_mismatch(name, request.expected_version, current)
        return O.DeleteVariableResponse()

    async def WatchVariables(
        self, request: O.WatchVariablesRequest, context: Any
    ) -> AsyncIterator[O.WatchVariablesResponse]:
        if request.prefix:
            V.check_name(request.prefix, "prefix")
        if request.after_revision < 0:
            raise errors.InvalidArgument("after_revision", "must not be negative")
        prefix = self.store.key(request.prefix)
        start = request.after_revision + 1 if request.after_revision else None
        if start is None:
            _, revision = await snapshot(self._etcd, prefix + b"\x00")  # the current revision, cheaply
            start = revision + 1
        try:
            async for event in ResumingWatch(self._etcd, prefix, start_revision=start):
                name = event.key[len(self.store.vars) :].decode()
                if event.kind == "PUT":
                    var = O.Variable.FromString(event.value)
                    var.version, var.mod_revision, var.lease_id = (
                        event.version,
                        event.mod_revision,
                        event.lease,
                    )
                    yield O.WatchVariablesResponse(
                        type=O.VARIABLE_EVENT_TYPE_PUT, variable=var, revision=event.mod_revision
                    )
                else:
                    yield O.WatchVariablesResponse(
                        type=O.VARIABLE_EVENT_TYPE_DELETE,
                        variable=O.Variable(name=name),
                        revision=event.mod_revision,
                    )
        except WatchCompacted as exc:
            raise errors.OutOfRange(
                f"after_revision {request.after_revision} was compacted (oldest {exc.compact_revision}); watch from 0"
            ) from None

    # -- bindings ---------------------------------------------------------------------

    async def BindVariable(self, request: O.BindVariableRequest, context: Any) -> O.BindVariableResponse:
        binding = O.OrchestrationBinding()
        binding.CopyFrom(request.binding)
        V.check_name(binding.variable, "binding.variable")
        if not binding.protocol:
            raise errors.InvalidArgument("binding.protocol", "is required")
        p = binding.participants
        if not p.agent_ids and not p.capability and not p.labels:
            raise errors.InvalidArgument("binding.participants", "give agent ids or a capability")
        if binding.HasField("adaptation"):
            rule = binding.adaptation
            if not (
                rule.metric in ("agents.load.mean", "agents.load.max", "agents.queue.mean")
                or rule.metric.startswith("var:")
            ):
                raise errors.InvalidArgument(
                    "binding.adaptation.metric",
                    "use agents.load.mean, agents.load.max, agents.queue.mean or var:<name>",
                )
            if rule.comparison == O.COMPARISON_UNSPECIFIED:
                raise errors.InvalidArgument("binding.adaptation.comparison", "choose ABOVE or BELOW")
            validate.finite(rule.threshold, "binding.adaptation.threshold")
        c = binding.constraints
        if c.HasField("min") and c.HasField("max") and c.min > c.max:
            raise errors.InvalidArgument("binding.constraints", f"min {c.min:g} is above max {c.max:g}")
        if binding.kind == O.BINDING_KIND_RESOURCE_ALLOCATION and binding.HasField("worker_pool"):
            pool = binding.worker_pool
            validate.identifier(pool.agent_id_prefix, "binding.worker_pool.agent_id_prefix")
            if pool.launch.WhichOneof("target") is None:
                raise errors.InvalidArgument(
                    "binding.worker_pool.launch", "give a command or a python_entry_point"
                )
        protocols = await self.mesh.coordination.ListProtocols(
            coordination_pb2.ListProtocolsRequest(page_size=1000)
        )
        if binding.protocol not in {pr.name for pr in protocols.protocols}:
            raise errors.FailedPrecondition(
                f"protocol {binding.protocol!r} is not known to the coordination service (see ListProtocols)",
                reason=common_pb2.ERROR_REASON_PROTOCOL_NOT_FOUND,
            )
        binding.updated_at.CopyFrom(_now())
        await self._etcd.put(self.store.binding_key(binding.variable), binding.SerializeToString())
        return O.BindVariableResponse(binding=binding)

    async def UnbindVariable(
        self, request: O.UnbindVariableRequest, context: Any
    ) -> O.UnbindVariableResponse:
        V.check_name(request.variable, "variable")
        if not await self._etcd.delete(self.store.binding_key(request.variable)):
            raise errors.NotFound(f"variable {request.variable!r} is not bound")
        return O.UnbindVariableResponse()

    async def ListBindings(self, request: O.ListBindingsRequest, context: Any) -> O.ListBindingsResponse:
        size = validate.page_size(request.page_size)
        kvs, _ = await snapshot(self._etcd, self.store.bindings)
        found = sorted((O.OrchestrationBinding.FromString(kv.value) for kv in kvs), key=lambda b: b.variable)
        chunk, token = validate.page(found, lambda b: b.variable, size, request.page_token, [])
        return O.ListBindingsResponse(bindings=chunk, next_page_token=token)

    async def CoordinateVariable(
        self, request: O.CoordinateVariableRequest, context: Any
    ) -> O.CoordinateVariableResponse:
        name = V.check_name(request.variable, "variable")
        got = await self._etcd.get(self.store.binding_key(name))
        if got is None:
            raise errors.NotFound(f"variable {name!r} is not bound (BindVariable first)")
        return O.CoordinateVariableResponse(
            result=await self.coordinate(O.OrchestrationBinding.FromString(got.value))
        )

    async def CoordinateSystem(
        self, request: O.CoordinateSystemRequest, context: Any
    ) -> O.CoordinateSystemResponse:
        kvs, _ = await snapshot(self._etcd, self.store.bindings)
        bindings = [O.OrchestrationBinding.FromString(kv.value) for kv in kvs]
        bindings = sorted(
            (b for b in bindings if b.variable.startswith(request.prefix)), key=lambda b: b.variable
        )
        results = await asyncio.gather(*(self.coordinate(b) for b in bindings))
        return O.CoordinateSystemResponse(results=results)

    async def coordinate(self, binding: O.OrchestrationBinding) -> O.VariableCoordination:
        """Run a binding's protocol and write its outcome with compare-and-set."""
        lock = self._coordinating.setdefault(binding.variable, asyncio.Lock())
        async with lock:
            return await self._coordinate(binding)

    async def _coordinate(self, binding: O.OrchestrationBinding) -> O.VariableCoordination:
        result = O.VariableCoordination(variable=binding.variable)
        before = await self.store.get(binding.variable)
        expected = before.version if before is not None else 0
        selector = common_pb2.AgentSelector()
        selector.CopyFrom(binding.participants)
        if binding.constraints.max_agents and (
            not selector.max_agents or selector.max_agents > binding.constraints.max_agents
        ):
            selector.max_agents = binding.constraints.max_agents
        run = coordination_pb2.RunRequest(
            settings=coordination_pb2.SessionSettings(participants=selector),
            protocol=binding.protocol,
            parameters=binding.parameters,
        )
        try:
            session = (await self.mesh.coordination.Run(run)).session
        except errors.MabeamError as exc:
            result.reason = f"coordination failed: {exc.message}"
            return result
        result.session_id = session.session_id
        if not session.outcome.decided:
            result.reason = f"no decision: {session.outcome.reason}"
            return result
        value = V.decided_value(session.outcome, binding.kind)
        result.decided_value.CopyFrom(value)
        broken = V.violation(value, binding.constraints)
        if broken is not None:
            result.reason = f"constraint violated: {broken}; not written"
            if before is not None:
                result.variable_after.CopyFrom(before)
            return result
        var = O.Variable(
            name=binding.variable, value=value, updated_at=_now(), writer=self._server.instance_id
        )
        var.decided_by_session = session.session_id
        c = self._etcd
        ok, now = await self.store.put_if(
            binding.variable, var, [c.transactions.version(self.store.key(binding.variable)) == expected]
        )
        if now is not None:
            result.variable_after.CopyFrom(now)
        if not ok:
            result.reason = f"lost compare-and-set: the variable moved from version {expected} while deciding"
            return result
        result.applied = True
        binding.last_coordinated_at.CopyFrom(_now())
        await self._etcd.put(self.store.binding_key(binding.variable), binding.SerializeToString())
        if binding.kind == O.BINDING_KIND_RESOURCE_ALLOCATION and binding.HasField("worker_pool"):
            try:
                await self._resize_pool(binding.worker_pool, int(value.struct_value["size"]))
            except errors.MabeamError as exc:
                result.reason = f"written; resizing the worker pool failed: {exc.message}"
        return result

    async def _resize_pool(self, pool: O.WorkerPool, size: int) -> None:
        """Start or stop supervised workers <prefix>-1..n through the registry to reach ``size``."""
        registry = self.mesh.registry
        listed = await registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest(page_size=1000))
        running = {
            a.agent_id
            for a in listed.agents
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

    async def run_adaptation(self) -> None:
        """While leading (etcd election), re-coordinate bindings whose metric crosses its threshold."""
        await while_leading(
            self._etcd,
            self.store.leader,
            self._server.instance_id,
            self._server.config.service_ttl,
            self.adapt_once,
            ADAPT_INTERVAL,
            what="orchestrator adaptation loop",
        )

    async def adapt_once(self) -> None:
        """One pass of the adaptation loop."""
        for _, binding in list(self.bindings.items()):
            if not binding.HasField("adaptation"):
                continue
            rule = binding.adaptation
            cooldown = validate.seconds(rule.cooldown, "cooldown", default=10.0)
            last = (
                binding.last_coordinated_at.ToNanoseconds() / 1e9
                if binding.HasField("last_coordinated_at")
                else 0.0
            )
            if time.time() - last < cooldown:
                continue
            value = await self._metric(binding)
            if value is not None and V.metric_crosses(value, rule):
                log.info(
                    "adapting %s: %s = %g crossed %g", binding.variable, rule.metric, value, rule.threshold
                )
                await self.coordinate(binding)

    async def _metric(self, binding: O.OrchestrationBinding) -> float | None:
        metric = binding.adaptation.metric
        if metric.startswith("var:"):
            var = await self.store.get(metric[4:])
            return V.as_number(var.value) if var is not None else None
        selector = binding.participants
        listed = await self.mesh.registry.ListAgents(
            registry_pb2.ListAgentsRequest(
                capability=selector.capability, labels=dict(selector.labels), page_size=1000
            )
        )
        agents = [a for a in listed.agents if not selector.agent_ids or a.agent_id in selector.agent_ids]
        if not agents:
            return None
        if metric == "agents.load.mean":
            return statistics.fmean(a.load.load for a in agents)
        if metric == "agents.load.max":
            return max(a.load.load for a in agents)
        return statistics.fmean(a.load.queue_length for a in agents)


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the orchestrator servicer to ``server`` (called by mabeam.runtime.service.start_service)."""
    servicer = OrchestratorServicer(server, etcd)
    await servicer.start()
    server.on_stop(servicer.stop)
    server.spawn(servicer.run_adaptation(), "adaptation")
    server.add_service(
        SERVICE_NAME, orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server, servicer
    )


__all__ = ["SERVICE_NAME", "OrchestratorServicer", "build"]
