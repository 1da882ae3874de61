"""One goal's trace spans planner -> coordination -> registry lookups -> agents (in-memory exporter)."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mabeam import telemetry
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, planner_pb2

pytestmark = pytest.mark.timeout(60)


class Bidder(Agent):
    capabilities = ("traced",)

    def __init__(self, agent_id: str, cost: float) -> None:
        super().__init__(agent_id)
        self.cost = cost

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if request.HasField("task_announcement"):
            return agent_pb2.CoordinationResponse(proposal=agent_pb2.Proposal(cost=self.cost))
        return agent_pb2.CoordinationResponse(ack=agent_pb2.Acknowledgement())

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"by": self.agent_id}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace._TRACER_PROVIDER_SET_ONCE._done = False  # tests may install their own provider
    trace.set_tracer_provider(provider)
    telemetry.enable()
    yield spans
    telemetry.disable()


async def test_one_trace_crosses_the_services(
    exporter: InMemorySpanExporter, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    registry = await service("registry")
    await service("coordination")
    planner = await service("planner")
    host = AgentHost([Bidder("cheap", 1), Bidder("dear", 5)], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(planner=planner.address)
    try:
        spec = planner_pb2.GoalSpec(
            steps=[
                planner_pb2.StepSpec(step_id="a", capability="traced"),
                planner_pb2.StepSpec(step_id="b", capability="traced", depends_on=["a"]),
            ],
            strategy=planner_pb2.ASSIGNMENT_STRATEGY_AUCTION,
        )
        goal_id = (await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec))).goal.goal_id
        events = [
            e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id))
        ]
        assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED
    finally:
        await client.close()
        await host.stop()
    by_trace: dict[int, set[str]] = collections.defaultdict(set)
    for span in exporter.get_finished_spans():
        by_trace[span.context.trace_id].add(f"{span.kind.name}:{span.name}")
    submit = next(
        t for t, names in by_trace.items() if "SERVER:/mabeam.v1.PlannerService/SubmitGoal" in names
    )
    names = by_trace[submit]
    expected = {
        "CLIENT:/mabeam.v1.PlannerService/SubmitGoal",
        "SERVER:/mabeam.v1.PlannerService/SubmitGoal",
        "CLIENT:/mabeam.v1.CoordinationService/Run",
        "SERVER:/mabeam.v1.CoordinationService/Run",
        "SERVER:/mabeam.v1.RegistryService/ListAgents",
        "SERVER:/mabeam.v1.AgentService/ExecuteStep",
    }
    assert expected <= names, sorted(names)
    assert names & {
        "SERVER:/mabeam.v1.AgentService/CoordinateBatch",
        "SERVER:/mabeam.v1.AgentService/Coordinate",
    }
    assert not any("grpc.health" in n for n in names)


async def test_otlp_endpoint_from_the_standard_variables(etcd: Any) -> None:
    import asyncio
    import os
    import sys

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from harness.wait import eventually
    from mabeam.v1 import registry_pb2

    received: list[str] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    received.extend(span.name for span in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mabeam.services.registry",
        "--etcd",
        etcd.endpoint,
        "--port",
        "0",
        "--prefix",
        "/otlp",
        "--no-auth",  # what is tested is tracing; auth: test_auth.py
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        address = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split()[-1]
        client = await MeshClient.connect(registry=address)
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await client.close()
        await eventually(
            lambda: "/mabeam.v1.RegistryService/ListAgents" in received, timeout=10, what="span exported"
        )
        assert not any("grpc.health" in name for name in received)
    finally:
        proc.terminate()
        await proc.wait()
        await collector.stop(0)
