"""Metrics: RPC latency and counts, registry size, sessions and goals; Prometheus export; logs with trace ids."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from harness.wait import eventually
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.runtime.embedded_etcd import EmbeddedEtcd, free_port
from mabeam.server import MeshServer, port_is_free
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def reader() -> Iterator[InMemoryMetricReader]:
    found = InMemoryMetricReader()
    metrics._internal._METER_PROVIDER_SET_ONCE._done = False  # tests may install their own provider
    metrics.set_meter_provider(MeterProvider(metric_readers=[found]))
    yield found


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


class Worker(Agent):
    capabilities = ("metered",)

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=1))

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"ok": True}


class Failing(Worker):
    """Answers every protocol message with an error: excluded from the session."""

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        raise RuntimeError("no bids here")


async def test_the_mesh_reports_its_numbers(
    reader: InMemoryMetricReader, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    planner = await service("planner")
    host = AgentHost([Worker("m1"), Worker("m2"), Failing("m3")], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, planner=planner.address
    )
    try:
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await client.coordination.RunAuction(
            coordination_pb2.RunAuctionRequest(
                settings=coordination_pb2.SessionSettings(
                    participants=common_pb2.AgentSelector(capability="metered")
                ),
                type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
                item="x",
            )
        )
        spec = planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s", capability="metered")])
        [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
    finally:
        await client.close()
        await host.stop()
    found = points(reader)
    calls = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"])
        for p in found["mabeam.rpc.server.calls"]
    }
    assert ("/mabeam.v1.RegistryService/ListAgents", "OK") in calls
    assert any(p.count > 0 for p in found["mabeam.rpc.server.duration"])
    assert any(
        p.attributes == {"protocol": "first_price", "state": "SESSION_STATE_DECIDED"}
        for p in found["mabeam.coordination.sessions"]
    )
    assert any(p.attributes == {"state": "GOAL_STATE_SUCCEEDED"} for p in found["mabeam.planner.goals"])
    assert "mabeam.registry.agents" in found and "mabeam.registry.leases" in found
    # Coordination telemetry: duration and participants by protocol, exclusions by reason.
    decided = {"protocol": "first_price", "state": "SESSION_STATE_DECIDED"}
    assert any(
        p.attributes == decided and p.count >= 1 for p in found["mabeam.coordination.session.duration"]
    )
    sizes = [
        p
        for p in found["mabeam.coordination.session.participants"]
        if p.attributes == {"protocol": "first_price"}
    ]
    assert sizes and sizes[0].max == 3
    assert any(
        p.attributes == {"protocol": "first_price", "reason": "EXCLUSION_REASON_ERROR"} and p.value >= 1
        for p in found["mabeam.coordination.exclusions"]
    ), found["mabeam.coordination.exclusions"]


async def test_coordinating_a_variable_is_counted_by_trigger_and_result(
    reader: InMemoryMetricReader, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    orchestrator = await service("orchestrator")
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, orchestrator=orchestrator.address
    )
    try:
        binding = orchestrator_pb2.OrchestrationBinding(
            variable="metered/v",
            protocol="consensus",
            participants=common_pb2.AgentSelector(capability="nobody"),
        )
        await client.orchestrator.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
        result = await client.orchestrator.CoordinateVariable(
            orchestrator_pb2.CoordinateVariableRequest(variable="metered/v")
        )
        assert not result.result.applied  # nobody to decide: not written
    finally:
        await client.close()
    found = points(reader)
    assert any(
        p.attributes == {"trigger": "call", "result": "not_written"} and p.value >= 1
        for p in found["mabeam.orchestrator.coordinations"]
    )
    assert any(
        p.attributes == {"trigger": "call"} and p.count >= 1
        for p in found["mabeam.orchestrator.coordination.duration"]
    )


async def test_prometheus_endpoint_and_trace_ids_in_logs(etcd: EmbeddedEtcd) -> None:
    # The metrics port is picked here and bound by the service: another process
    # may take it in between, and the service then exits: start it again on another.
    for _ in range(3):
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mabeam.services.registry",
            "--etcd",
            etcd.endpoint,
            "--port",
            "0",
            "--prefix",
            "/metrics-test",
            "--no-auth",  # what is tested is metrics; auth: test_auth.py
            env={**os.environ, "MABEAM_METRICS_PORT": str(port)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if line or port_is_free("127.0.0.1", port):
            break
        await proc.communicate()
    try:
        address = line.decode().split()[-1]
        client = await MeshClient.connect(registry=address)
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await client.close()

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                return str(reply.read().decode())

        text = await eventually(lambda: asyncio.to_thread(scrape), what="metrics served")
        assert "mabeam_rpc_server_calls" in text and "ListAgents" in text
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert b'"trace_id":' in err  # structured log lines carry the trace id field
