"""The orchestrator's gRPC edge: shared variables, and variables the agents decide.

Requests are validated here and turned into calls on the orchestrator's
pieces: variables' values (:mod:`.variables`), how a write applies
(compare-and-set on the version, same type, last-write-wins by timestamp:
:mod:`.writes`), the etcd keyspace (:mod:`.store`: reads, ephemeral variables
on a lease, watches, bindings), and the decisions of bound variables
(:mod:`.coordinate`: run a binding's protocol through the coordination
service, write the outcome with compare-and-set, resize a worker pool; the
adaptation loop, run by one replica elected through etcd).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import timestamp_pb2

from mabeam import errors
from mabeam.client import MeshClient, list_all
from mabeam.runtime import idempotency, validate
from mabeam.runtime.cache import PrefixCache, report_health
from mabeam.runtime.etcd import EtcdClient, WatchCompacted
from mabeam.runtime.idempotency import idempotent
from mabeam.server import MeshServer
from mabeam.services.orchestrator import variables, writes
from mabeam.services.orchestrator.coordinate import Coordinator
from mabeam.services.orchestrator.store import VariableStore
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, orchestrator_pb2_grpc, registry_pb2

SERVICE_NAME = "mabeam.v1.OrchestratorService"
ADAPT_INTERVAL = 1.0


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _fill_revision(response: orchestrator_pb2.SetVariableResponse, revision: int) -> None:
    """A replayed compare-and-set: the variable's revision is its record's (one transaction)."""
    response.variable.mod_revision = revision


def _not_found(name: str) -> errors.NotFound:
    return errors.NotFound(
        f"variable {name!r} does not exist", reason=common_pb2.ERROR_REASON_VARIABLE_NOT_FOUND
    )


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """mabeam.v1.OrchestratorService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self.store = VariableStore(etcd, server.config)
        self.bindings: PrefixCache[orchestrator_pb2.OrchestrationBinding] = PrefixCache(
            etcd, self.store.bindings, lambda k, v: orchestrator_pb2.OrchestrationBinding.FromString(v)
        )
        self._mesh: MeshClient | None = None
        self.coordinator = Coordinator(self.store, lambda: self.mesh, server.instance_id)

    async def start(self) -> None:
        await self.bindings.start()
        self._mesh = await self._server.connect_mesh()

    async def stop(self) -> None:
        await self.bindings.stop()
        await self.store.requests.stop()
        if self._mesh is not None:
            await self._mesh.close()

    @property
    def mesh(self) -> MeshClient:
        assert self._mesh is not None
        return self._mesh

    # -- variables ------------------------------------------------------------------

    async def SetVariable(
        self, request: orchestrator_pb2.SetVariableRequest, context: Any
    ) -> orchestrator_pb2.SetVariableResponse:
        # A compare-and-set records its outcome in its own transaction; other modes right after.
        atomic = request.mode != orchestrator_pb2.WRITE_MODE_LAST_WRITE_WINS and request.HasField(
            "expected_version"
        )
        return await self.store.requests.run(
            "SetVariable",
            request,
            orchestrator_pb2.SetVariableResponse,
            lambda: self._set_variable(request),
            atomic=atomic,
            on_replay=_fill_revision,
        )

    async def _set_variable(
        self, request: orchestrator_pb2.SetVariableRequest
    ) -> orchestrator_pb2.SetVariableResponse:
        name = variables.check_name(request.name)
        variables.check_value(request.value)
        if request.lease_id < 0:
            raise errors.InvalidArgument("lease_id", "must not be negative")
        var = orchestrator_pb2.Variable(
            name=name, value=request.value, updated_at=_now(), writer=request.writer
        )
        if request.mode == orchestrator_pb2.WRITE_MODE_LAST_WRITE_WINS:
            if not request.HasField("timestamp"):
                raise errors.InvalidArgument("timestamp", "is required with WRITE_MODE_LAST_WRITE_WINS")
            var.timestamp.CopyFrom(request.timestamp)
            written = await writes.last_write_wins(self.store, var, request.lease_id)
        else:
            if request.HasField("timestamp"):
                var.timestamp.CopyFrom(request.timestamp)
            if request.HasField("expected_version"):
                if request.expected_version < 0:
                    raise errors.InvalidArgument("expected_version", "must not be negative")
                record = None
                guard = idempotency.current()
                if guard is not None:
                    # What a compare-and-set that applies answers (its revision aside).
                    after = orchestrator_pb2.Variable()
                    after.CopyFrom(var)
                    after.version, after.lease_id = request.expected_version + 1, request.lease_id
                    record = await guard.txn_ops(
                        orchestrator_pb2.SetVariableResponse(variable=after, applied=True), fill_revision=True
                    )
                written = await writes.compare_and_set(
                    self.store, var, request.expected_version, request.lease_id, record
                )
            elif request.require_same_type:
                written = await writes.same_type(self.store, var, request.lease_id)
            else:
                written = await writes.put(self.store, var, request.lease_id)
        return orchestrator_pb2.SetVariableResponse(
            variable=written.variable, applied=written.applied, reason=written.reason
        )

    async def GetVariable(
        self, request: orchestrator_pb2.GetVariableRequest, context: Any
    ) -> orchestrator_pb2.GetVariableResponse:
        name = variables.check_name(request.name)
        relaxed = request.consistency == orchestrator_pb2.CONSISTENCY_RELAXED
        var = await self.store.get(name, relaxed=relaxed)
        if var is None:
            raise _not_found(name)
        return orchestrator_pb2.GetVariableResponse(variable=var, possibly_stale=relaxed)

    async def ListVariables(
        self, request: orchestrator_pb2.ListVariablesRequest, context: Any
    ) -> orchestrator_pb2.ListVariablesResponse:
        size = validate.page_size(request.page_size)
        if request.prefix:
            variables.check_name(request.prefix, "prefix")
        relaxed = request.consistency == orchestrator_pb2.CONSISTENCY_RELAXED
        filters = [request.prefix]
        after = validate.decode_page_token(request.page_token, filters)
        chunk, next_after = await self.store.page_variables(request.prefix, after, size, relaxed=relaxed)
        token = validate.encode_page_token(next_after, filters) if next_after is not None else ""
        return orchestrator_pb2.ListVariablesResponse(
            variables=chunk, next_page_token=token, possibly_stale=relaxed
        )

    async def DeleteVariable(
        self, request: orchestrator_pb2.DeleteVariableRequest, context: Any
    ) -> orchestrator_pb2.DeleteVariableResponse:
        return await self.store.requests.run(
            "DeleteVariable",
            request,
            orchestrator_pb2.DeleteVariableResponse,
            lambda: self._delete_variable(request),
            atomic=True,
        )

    async def _delete_variable(
        self, request: orchestrator_pb2.DeleteVariableRequest
    ) -> orchestrator_pb2.DeleteVariableResponse:
        name = variables.check_name(request.name)
        expected = request.expected_version if request.HasField("expected_version") else None
        guard = idempotency.current()
        record = await guard.txn_ops(orchestrator_pb2.DeleteVariableResponse()) if guard else None
        if not await self.store.delete(name, expected, record):
            current = await self.store.get(name)
            if current is None:
                raise _not_found(name)
            raise writes.version_mismatch(name, request.expected_version, current)
        return orchestrator_pb2.DeleteVariableResponse()

    async def WatchVariables(
        self, request: orchestrator_pb2.WatchVariablesRequest, context: Any
    ) -> AsyncIterator[orchestrator_pb2.WatchVariablesResponse]:
        if request.prefix:
            variables.check_name(request.prefix, "prefix")
        if request.after_revision < 0:
            raise errors.InvalidArgument("after_revision", "must not be negative")
        try:
            async with contextlib.aclosing(
                self.store.watch(request.prefix, request.after_revision)
            ) as changes:
                async for kind, var, revision in changes:
                    etype = (
                        orchestrator_pb2.VARIABLE_EVENT_TYPE_PUT
                        if kind == "PUT"
                        else orchestrator_pb2.VARIABLE_EVENT_TYPE_DELETE
                    )
                    yield orchestrator_pb2.WatchVariablesResponse(type=etype, variable=var, revision=revision)
        except WatchCompacted as exc:
            raise errors.OutOfRange(
                f"after_revision {request.after_revision} was compacted (oldest {exc.compact_revision}); watch from 0"
            ) from None

    # -- bindings ---------------------------------------------------------------------

    @idempotent(orchestrator_pb2.BindVariableResponse)
    async def BindVariable(
        self, request: orchestrator_pb2.BindVariableRequest, context: Any
    ) -> orchestrator_pb2.BindVariableResponse:
        binding = orchestrator_pb2.OrchestrationBinding()
        binding.CopyFrom(request.binding)
        variables.check_name(binding.variable, "binding.variable")
        if not binding.protocol:
            raise errors.InvalidArgument("binding.protocol", "is required")
        p = binding.participants
        if not p.agent_ids and not p.capability and not p.labels:
            raise errors.InvalidArgument("binding.participants", "give agent ids or a capability")
        if binding.HasField("adaptation"):
            rule = binding.adaptation
            variables.parse_metric(rule.metric, "binding.adaptation.metric")
            if rule.protocol and not variables.PROTOCOL_RE.match(rule.protocol):
                raise errors.InvalidArgument(
                    "binding.adaptation.protocol", f"{rule.protocol[:100]!r} is not a protocol name"
                )
            if rule.comparison == orchestrator_pb2.COMPARISON_UNSPECIFIED:
                raise errors.InvalidArgument("binding.adaptation.comparison", "choose ABOVE or BELOW")
            validate.finite(rule.threshold, "binding.adaptation.threshold")
        c = binding.constraints
        if c.HasField("min") and c.HasField("max") and c.min > c.max:
            raise errors.InvalidArgument("binding.constraints", f"min {c.min:g} is above max {c.max:g}")
        if binding.kind == orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION and binding.HasField(
            "worker_pool"
        ):
            pool = binding.worker_pool
            validate.identifier(pool.agent_id_prefix, "binding.worker_pool.agent_id_prefix")
            if pool.launch.WhichOneof("target") is None:
                raise errors.InvalidArgument(
                    "binding.worker_pool.launch", "give a kind of the registry's agent catalog"
                )
            await self._check_pool_launch(pool)
        protocols = await list_all(
            self.mesh.coordination.ListProtocols, coordination_pb2.ListProtocolsRequest(), "protocols"
        )
        if binding.protocol not in {pr.name for pr in protocols}:
            raise errors.FailedPrecondition(
                f"protocol {binding.protocol!r} is not known to the coordination service (see ListProtocols)",
                reason=common_pb2.ERROR_REASON_PROTOCOL_NOT_FOUND,
            )
        binding.updated_at.CopyFrom(_now())
        await self.store.put_binding(binding)
        return orchestrator_pb2.BindVariableResponse(binding=binding)

    async def _check_pool_launch(self, pool: orchestrator_pb2.WorkerPool) -> None:
        """The registry's own checks of the pool's workers (StartAgent with validate_only): nothing starts.

        What a registry may launch is its catalog's business (--agent-catalog,
        --allow-argv), so a pool it would refuse is refused now, at bind time,
        with the registry's answer (PERMISSION_DENIED, NOT_FOUND for an unknown
        kind, INVALID_ARGUMENT), not later when the pool is resized.
        """
        try:
            await self.mesh.registry.StartAgent(
                registry_pb2.StartAgentRequest(
                    agent_id=f"{pool.agent_id_prefix}-1",
                    launch=pool.launch,
                    restart_policy=pool.restart_policy,
                    validate_only=True,
                )
            )
        except errors.InvalidArgument as exc:
            field = exc.field or "launch"
            raise errors.InvalidArgument(
                f"binding.worker_pool.{field}", exc.message.removeprefix(f"{field}: ")
            ) from None
        except (errors.PermissionDenied, errors.NotFound) as exc:
            raise type(exc)(
                f"binding.worker_pool: {exc.message}", reason=exc.reason_value, metadata=exc.metadata
            ) from None

    @idempotent(orchestrator_pb2.UnbindVariableResponse)
    async def UnbindVariable(
        self, request: orchestrator_pb2.UnbindVariableRequest, context: Any
    ) -> orchestrator_pb2.UnbindVariableResponse:
        variables.check_name(request.variable, "variable")
        if not await self.store.delete_binding(request.variable):
            raise errors.NotFound(f"variable {request.variable!r} is not bound")
        return orchestrator_pb2.UnbindVariableResponse()

    async def ListBindings(
        self, request: orchestrator_pb2.ListBindingsRequest, context: Any
    ) -> orchestrator_pb2.ListBindingsResponse:
        size = validate.page_size(request.page_size)
        after = validate.decode_page_token(request.page_token, [])
        chunk, next_after = await self.store.page_bindings(after, size)
        token = validate.encode_page_token(next_after, []) if next_after is not None else ""
        return orchestrator_pb2.ListBindingsResponse(bindings=chunk, next_page_token=token)

    @idempotent(orchestrator_pb2.CoordinateVariableResponse)
    async def CoordinateVariable(
        self, request: orchestrator_pb2.CoordinateVariableRequest, context: Any
    ) -> orchestrator_pb2.CoordinateVariableResponse:
        name = variables.check_name(request.variable, "variable")
        binding = await self.store.get_binding(name)
        if binding is None:
            raise errors.NotFound(f"variable {name!r} is not bound (BindVariable first)")
        return orchestrator_pb2.CoordinateVariableResponse(result=await self.coordinator.coordinate(binding))

    @idempotent(orchestrator_pb2.CoordinateSystemResponse)
    async def CoordinateSystem(
        self, request: orchestrator_pb2.CoordinateSystemRequest, context: Any
    ) -> orchestrator_pb2.CoordinateSystemResponse:
        bindings = sorted(
            (b for b in await self.store.list_bindings() if b.variable.startswith(request.prefix)),
            key=lambda b: b.variable,
        )
        results = await self.coordinator.coordinate_system(bindings)
        return orchestrator_pb2.CoordinateSystemResponse(results=results)

    # -- adaptation -----------------------------------------------------------------------

    async def run_adaptation(self) -> None:
        """While leading (etcd election), re-coordinate bindings whose metric crosses its threshold."""
        await self.store.while_leading_adaptation(
            self._server.instance_id, self._server.config.service_ttl, self.adapt_once, ADAPT_INTERVAL
        )

    async def adapt_once(self) -> None:
        """One pass of the adaptation loop."""
        await self.coordinator.adapt_once([binding for _, binding in list(self.bindings.items())])


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the orchestrator servicer to ``server`` (called by mabeam.runtime.service.start_service)."""
    servicer = OrchestratorServicer(server, etcd)
    await servicer.start()
    server.on_stop(servicer.stop)
    report_health(server, servicer.bindings)
    server.spawn(servicer.run_adaptation(), "adaptation")
    server.add_service(
        SERVICE_NAME, orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server, servicer
    )


__all__ = ["SERVICE_NAME", "OrchestratorServicer", "build"]
