"""Orchestrator end to end: variables, compare-and-set, LWW, leases, watches, bindings, leadership."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from grpc import aio

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import (
    agent_pb2,
    common_pb2,
    coordination_pb2,
    orchestrator_pb2,
    protocol_plugin_pb2,
    protocol_plugin_pb2_grpc,
    registry_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(90)


def num(x: float) -> common_pb2.Value:
    return common_pb2.Value(number_value=x)


@pytest.fixture
async def mesh(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[tuple[MeshClient, MeshServer]]:
    registry = await service("registry")
    coordination = await service("coordination")
    orchestrator = await service("orchestrator")
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, orchestrator=orchestrator.address
    )
    yield client, registry
    await client.close()


async def test_set_get_list_delete(mesh: tuple[MeshClient, MeshServer]) -> None:
    client, _ = mesh
    o = client.orchestrator
    first = (
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="cfg/temp", value=num(0.7), writer="me"))
    ).variable
    assert first.version == 1 and first.value.number_value == 0.7 and first.writer == "me"
    second = (
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="cfg/temp", value=num(0.8)))
    ).variable
    assert second.version == 2 and second.mod_revision > first.mod_revision
    relaxed = await o.GetVariable(
        orchestrator_pb2.GetVariableRequest(name="cfg/temp", consistency=orchestrator_pb2.CONSISTENCY_RELAXED)
    )
    assert relaxed.possibly_stale and relaxed.variable.value.number_value == 0.8
    strong = await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="cfg/temp"))
    assert not strong.possibly_stale and strong.variable.version == 2
    for i in range(5):
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name=f"cfg/v{i}", value=common_pb2.Value(string_value=str(i)))
        )
    await o.SetVariable(
        orchestrator_pb2.SetVariableRequest(name="other", value=common_pb2.Value(bool_value=True))
    )
    names, token = [], ""
    while True:
        page = await o.ListVariables(
            orchestrator_pb2.ListVariablesRequest(prefix="cfg/", page_size=2, page_token=token)
        )
        names += [v.name for v in page.variables]
        token = page.next_page_token
        if not token:
            break
    assert names == ["cfg/temp", "cfg/v0", "cfg/v1", "cfg/v2", "cfg/v3", "cfg/v4"]
    await o.DeleteVariable(orchestrator_pb2.DeleteVariableRequest(name="cfg/temp"))
    with pytest.raises(errors.NotFound) as info:
        await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="cfg/temp"))
    assert info.value.reason == "VARIABLE_NOT_FOUND"
    with pytest.raises(errors.NotFound):
        await o.DeleteVariable(orchestrator_pb2.DeleteVariableRequest(name="cfg/temp"))


async def test_compare_and_set(mesh: tuple[MeshClient, MeshServer]) -> None:
    o = mesh[0].orchestrator
    created = (
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="n", value=num(1), expected_version=0))
    ).variable
    with pytest.raises(errors.Aborted) as info:
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="n", value=num(2), expected_version=0))
    assert info.value.metadata["current_version"] == "1" and info.value.reason == "VERSION_MISMATCH"
    await o.SetVariable(
        orchestrator_pb2.SetVariableRequest(name="n", value=num(2), expected_version=created.version)
    )
    with pytest.raises(errors.Aborted, match="version 2"):
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="n", value=num(3), expected_version=1))
    with pytest.raises(errors.FailedPrecondition) as mismatch:
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(
                name="n", value=common_pb2.Value(string_value="x"), expected_version=2
            )
        )
    assert mismatch.value.reason == "TYPE_MISMATCH"
    assert (
        await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="n"))
    ).variable.value.number_value == 2


async def test_last_write_wins(mesh: tuple[MeshClient, MeshServer]) -> None:
    o = mesh[0].orchestrator

    def at(seconds: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=seconds)

    lww = orchestrator_pb2.WRITE_MODE_LAST_WRITE_WINS
    assert (
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="l", value=num(1), mode=lww, timestamp=at(100))
        )
    ).applied
    late = await o.SetVariable(
        orchestrator_pb2.SetVariableRequest(name="l", value=num(0), mode=lww, timestamp=at(50))
    )
    assert not late.applied and "discarded" in late.reason and late.variable.value.number_value == 1
    assert (
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="l", value=num(2), mode=lww, timestamp=at(200))
        )
    ).applied
    with pytest.raises(errors.InvalidArgument) as info:
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="l", value=num(3), mode=lww))
    assert info.value.field == "timestamp"


async def test_ephemeral_variable_vanishes_with_its_owner(mesh: tuple[MeshClient, MeshServer]) -> None:
    client, _ = mesh
    reg = await client.registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent_id="owner", endpoint="127.0.0.1:1")
    )
    await client.orchestrator.SetVariable(
        orchestrator_pb2.SetVariableRequest(name="eph", value=num(1), lease_id=reg.agent.lease_id)
    )
    got = (await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="eph"))).variable
    assert got.lease_id == reg.agent.lease_id
    await client.registry.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id="owner", token=reg.token)
    )
    with pytest.raises(errors.NotFound):
        await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="eph"))
    with pytest.raises(errors.FailedPrecondition, match="lease_id"):
        await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="eph", value=num(1), lease_id=reg.agent.lease_id)
        )


async def test_watch_and_resume(mesh: tuple[MeshClient, MeshServer]) -> None:
    o = mesh[0].orchestrator
    events: list[orchestrator_pb2.WatchVariablesResponse] = []

    async def watch() -> None:
        async for e in o.WatchVariables(orchestrator_pb2.WatchVariablesRequest(prefix="w/")):
            events.append(e)

    task = asyncio.create_task(watch())
    markers = 0

    async def watching() -> bool:  # a marker written and seen: the watch is in place
        nonlocal markers
        markers += 1
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="w/marker", value=num(markers)))
        return any(e.variable.value.number_value == markers for e in events)

    await eventually(watching, interval=0.1, what="the watch sees a marker")
    events.clear()  # the last marker's event came last: nothing of them is still on its way
    first = (await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="w/a", value=num(1)))).variable
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="w/a", value=num(2)))
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="x/ignored", value=num(2)))
    await o.DeleteVariable(orchestrator_pb2.DeleteVariableRequest(name="w/a"))
    await eventually(lambda: len(events) == 3, what="three events")
    task.cancel()
    assert [e.type for e in events] == [
        orchestrator_pb2.VARIABLE_EVENT_TYPE_PUT,
        orchestrator_pb2.VARIABLE_EVENT_TYPE_PUT,
        orchestrator_pb2.VARIABLE_EVENT_TYPE_DELETE,
    ]
    resumed: list[orchestrator_pb2.WatchVariablesResponse] = []

    async def resume() -> None:
        async for e in o.WatchVariables(
            orchestrator_pb2.WatchVariablesRequest(prefix="w/", after_revision=first.mod_revision)
        ):
            resumed.append(e)

    task = asyncio.create_task(resume())
    await eventually(lambda: len(resumed) == 2, what="replayed after the revision")
    task.cancel()
    assert (
        resumed[0].variable.value.number_value == 2
        and resumed[1].type == orchestrator_pb2.VARIABLE_EVENT_TYPE_DELETE
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (orchestrator_pb2.SetVariableRequest(value=num(1)), "name"),
        (orchestrator_pb2.SetVariableRequest(name="/abs", value=num(1)), "name"),
        (orchestrator_pb2.SetVariableRequest(name="x"), "value"),
        (orchestrator_pb2.SetVariableRequest(name="x", value=num(float("nan"))), "value"),
        (
            orchestrator_pb2.SetVariableRequest(name="x", value=num(1), expected_version=-1),
            "expected_version",
        ),
    ],
)
async def test_bad_writes_name_the_field(
    mesh: tuple[MeshClient, MeshServer], request_: orchestrator_pb2.SetVariableRequest, field: str
) -> None:
    o = mesh[0].orchestrator
    with pytest.raises(errors.InvalidArgument) as info:
        await o.SetVariable(request_)
    assert info.value.field == field
    assert not (await o.ListVariables(orchestrator_pb2.ListVariablesRequest())).variables


INCREMENTER = """
import asyncio, sys
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.v1 import common_pb2, orchestrator_pb2
async def main(address, n):
    acked = 0
    async with await MeshClient.connect(orchestrator=address) as mesh:
        o = mesh.orchestrator
        while acked < n:
            current = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="counter"))).variable
            try:
                await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="counter", expected_version=current.version,
                    value=common_pb2.Value(int_value=current.value.int_value + 1)))
                acked += 1
            except errors.Aborted:
                pass
    print(acked)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_concurrent_cas_increments_lose_nothing(service: Callable[..., Awaitable[MeshServer]]) -> None:
    orchestrator = await service("orchestrator")
    client = await MeshClient.connect(orchestrator=orchestrator.address)
    await client.orchestrator.SetVariable(
        orchestrator_pb2.SetVariableRequest(name="counter", value=common_pb2.Value(int_value=0))
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", INCREMENTER, orchestrator.address, "30", stdout=asyncio.subprocess.PIPE
        )
        for _ in range(4)
    ]
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    acked = sum(int(out.strip()) for out, _ in outs)
    final = (
        await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="counter"))
    ).variable
    await client.close()
    assert acked == 120 and final.value.int_value == acked and final.version == acked + 1


class Voter(Agent):
    capabilities = ("decide",)

    def __init__(self, agent_id: str, option: str, bid: float = 0) -> None:
        super().__init__(agent_id)
        self.option, self.bid = option, bid

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if request.HasField("vote_request"):
            return agent_pb2.CoordinationResponse(vote=agent_pb2.Vote(option=self.option))
        if request.HasField("bid_request"):
            return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=self.bid))
        if request.HasField("demand_request"):
            reply = agent_pb2.CoordinationResponse()
            p = dict(request.demand_request.prices)
            reply.demand.net_demand["power"] = (
                10.0 / p["power"] - 2.0
            )  # equilibrium price 5 with two agents... per agent 10/p - 2
            return reply
        return agent_pb2.CoordinationResponse(ack=agent_pb2.Acknowledgement())


def params(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@pytest.fixture
async def voters(mesh: tuple[MeshClient, MeshServer]) -> AsyncIterator[None]:
    host = AgentHost(
        [Voter("v1", "21", 5), Voter("v2", "21", 9), Voter("v3", "18", 7)], registry=mesh[1].address
    )
    await host.start()
    yield
    await host.stop()


async def test_parameter_decided_by_vote_and_by_market(
    mesh: tuple[MeshClient, MeshServer], voters: None
) -> None:
    o = mesh[0].orchestrator
    selector = common_pb2.AgentSelector(capability="decide")
    binding = orchestrator_pb2.OrchestrationBinding(
        variable="room/temperature",
        protocol="consensus",
        participants=selector,
        parameters=params({"question": "temperature?", "options": ["18", "21", "24"]}),
        constraints=orchestrator_pb2.Constraints(min=16, max=26),
    )
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
    result = (
        await o.CoordinateVariable(orchestrator_pb2.CoordinateVariableRequest(variable="room/temperature"))
    ).result
    assert result.applied and result.decided_value.number_value == 21 and result.session_id
    var = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="room/temperature"))).variable
    assert var.value.number_value == 21 and var.decided_by_session == result.session_id
    market = orchestrator_pb2.OrchestrationBinding(
        variable="price/power",
        protocol="tatonnement",
        participants=selector,
        parameters=params(
            {"goods": ["power"], "initial_prices": {"power": 1.0}, "step": 0.5, "tolerance": 0.001}
        ),
    )
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=market))
    system = (await o.CoordinateSystem(orchestrator_pb2.CoordinateSystemRequest())).results
    by_name = {r.variable: r for r in system}
    assert by_name["price/power"].applied
    # Three agents with demand 10/p - 2 each: excess demand 30/p - 6 = 0 at p = 5.
    assert by_name["price/power"].decided_value.number_value == pytest.approx(5, rel=0.01)


async def test_constraint_violation_is_not_written(mesh: tuple[MeshClient, MeshServer], voters: None) -> None:
    o = mesh[0].orchestrator
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="t", value=num(20)))
    binding = orchestrator_pb2.OrchestrationBinding(
        variable="t",
        protocol="consensus",
        participants=common_pb2.AgentSelector(capability="decide"),
        parameters=params({"question": "t?", "options": ["18", "21", "24"]}),
        constraints=orchestrator_pb2.Constraints(max=19),
    )
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
    result = (await o.CoordinateVariable(orchestrator_pb2.CoordinateVariableRequest(variable="t"))).result
    assert not result.applied and "constraint violated" in result.reason and "maximum 19" in result.reason
    assert (
        await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="t"))
    ).variable.value.number_value == 20


async def test_binding_to_an_unknown_protocol_fails(mesh: tuple[MeshClient, MeshServer]) -> None:
    o = mesh[0].orchestrator
    binding = orchestrator_pb2.OrchestrationBinding(
        variable="z", protocol="nope", participants=common_pb2.AgentSelector(capability="x")
    )
    with pytest.raises(errors.FailedPrecondition, match="nope"):
        await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
    with pytest.raises(errors.InvalidArgument) as info:
        await o.BindVariable(
            orchestrator_pb2.BindVariableRequest(
                binding=orchestrator_pb2.OrchestrationBinding(variable="z", protocol="consensus")
            )
        )
    assert info.value.field == "binding.participants"
    assert not (await o.ListBindings(orchestrator_pb2.ListBindingsRequest())).bindings


async def test_resource_allocation_by_auction_resizes_a_worker_pool(
    mesh: tuple[MeshClient, MeshServer], voters: None
) -> None:
    client, _ = mesh
    o = client.orchestrator
    pool = orchestrator_pb2.WorkerPool(
        launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER])),
        agent_id_prefix="pool",
    )
    binding = orchestrator_pb2.OrchestrationBinding(
        variable="gpu/slot",
        protocol="vickrey",
        participants=common_pb2.AgentSelector(capability="decide"),
        parameters=params({"item": "gpu"}),
        kind=orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION,
        worker_pool=pool,
    )
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
    result = (
        await o.CoordinateVariable(orchestrator_pb2.CoordinateVariableRequest(variable="gpu/slot"))
    ).result
    assert result.applied, result.reason
    decided = result.decided_value.struct_value
    assert list(decided["winners"]) == ["v2"] and decided["price"] == 7 and decided["size"] == 1
    supervised = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    assert [a.agent_id for a in supervised.agents if a.state == registry_pb2.SUPERVISION_STATE_RUNNING] == [
        "pool-1"
    ]
    # A vote on the pool size grows it to two workers.
    sizers = [Voter("s1", "2"), Voter("s2", "2"), Voter("s3", "1")]
    for v in sizers:
        v.agent_capabilities = ("size",)
    host = AgentHost(sizers, registry=mesh[1].address)
    await host.start()
    try:
        size = orchestrator_pb2.OrchestrationBinding(
            variable="gpu/pool",
            protocol="consensus",
            participants=common_pb2.AgentSelector(capability="size"),
            parameters=params({"question": "workers?", "options": ["1", "2", "3"]}),
            kind=orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION,
            worker_pool=pool,
            constraints=orchestrator_pb2.Constraints(max=3),
        )
        await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=size))
        result = (
            await o.CoordinateVariable(orchestrator_pb2.CoordinateVariableRequest(variable="gpu/pool"))
        ).result
        assert result.applied and result.decided_value.struct_value["size"] == 2, result.reason
        supervised = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        running = [a.agent_id for a in supervised.agents if a.state == registry_pb2.SUPERVISION_STATE_RUNNING]
        assert running == ["pool-1", "pool-2"]
    finally:
        await host.stop()
        for a in ("pool-1", "pool-2"):
            with contextlib.suppress(errors.MabeamError):
                await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=a))


async def test_adaptation_leader_fails_over(
    local_mesh: Callable[..., Awaitable[LocalMesh]], etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    mesh = await local_mesh(
        services=("registry", "coordination", "orchestrator"),
        replicas=2,
        extra_env={"MABEAM_SERVICE_TTL": "2"},
    )
    prefix = (mesh_config.prefix + "/orchestrator-leader/").encode()

    async def leader() -> str | None:
        kvs, _ = await snapshot(etcd_client, prefix)
        return bytes(min(kvs, key=lambda kv: kv.create_revision).value).decode() if kvs else None

    first = await eventually(leader, what="a leader")
    replicas = [p for p in mesh.processes if p.kind == "orchestrator"]
    assert sum(f"-{p.pid}-" in first for p in replicas) == 1
    victim = next(p for p in replicas if f"-{p.pid}-" in first)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed = time.monotonic()

    async def new_leader() -> bool:
        now = await leader()
        return now is not None and now != first

    await eventually(new_leader, timeout=10, interval=0.05, what="another replica leads")
    assert time.monotonic() - killed <= 2 + 1.5
    survivor = next(p for p in replicas if p is not victim)
    assert f"-{survivor.pid}-" in (await leader() or "")


async def test_adaptation_rule_recoordinates_when_the_metric_crosses(
    mesh: tuple[MeshClient, MeshServer], voters: None
) -> None:
    o = mesh[0].orchestrator
    binding = orchestrator_pb2.OrchestrationBinding(
        variable="adaptive",
        protocol="consensus",
        participants=common_pb2.AgentSelector(capability="decide"),
        parameters=params({"question": "t?", "options": ["18", "21"]}),
        adaptation=orchestrator_pb2.AdaptationRule(
            metric="var:load",
            comparison=orchestrator_pb2.COMPARISON_ABOVE,
            threshold=0.5,
            cooldown=duration_pb2.Duration(seconds=60),
        ),
    )
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
    # A control binding, bound after it, crosses at the same load: once it is
    # decided, a leader ran an adaptation pass that saw both bindings and the load.
    control = orchestrator_pb2.OrchestrationBinding()
    control.CopyFrom(binding)
    control.variable = "control"
    control.adaptation.comparison = orchestrator_pb2.COMPARISON_BELOW
    await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=control))
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="load", value=num(0.2)))

    async def control_decided() -> bool:
        try:
            await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="control"))
        except errors.NotFound:
            return False
        return True

    await eventually(control_decided, timeout=10, what="a leader adapted the control binding")
    with pytest.raises(errors.NotFound):  # below the threshold: nothing happens
        await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="adaptive"))
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="load", value=num(0.9)))

    async def decided() -> bool:
        try:
            return (
                await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="adaptive"))
            ).variable.value.number_value == 21
        except errors.NotFound:
            return False

    await eventually(decided, timeout=5, what="the leader re-coordinated the binding")
    first = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="adaptive"))).variable
    # Time is what is tested: more adaptation passes (ADAPT_INTERVAL, 1 s) run,
    # the load stays above the threshold, the cool-down holds them back.
    await asyncio.sleep(1.5)
    assert (
        await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="adaptive"))
    ).variable.version == first.version


async def test_adaptation_metrics_over_any_heartbeat_field_and_session_outcomes(
    mesh: tuple[MeshClient, MeshServer], voters: None
) -> None:
    """A rule on the agents' memory (which the SDK reports by itself) fires; one on the
    consensus sessions' decided share fires once there is a finished consensus; a metric
    outside the grammar is refused naming the field."""
    o = mesh[0].orchestrator

    def bound(
        variable: str, metric: str, comparison: int, threshold: float
    ) -> orchestrator_pb2.OrchestrationBinding:
        return orchestrator_pb2.OrchestrationBinding(
            variable=variable,
            protocol="consensus",
            participants=common_pb2.AgentSelector(capability="decide"),
            parameters=params({"question": "t?", "options": ["18", "21"]}),
            adaptation=orchestrator_pb2.AdaptationRule(
                metric=metric,
                comparison=comparison,
                threshold=threshold,
                cooldown=duration_pb2.Duration(seconds=60),
            ),
        )

    with pytest.raises(errors.InvalidArgument) as info:
        await o.BindVariable(
            orchestrator_pb2.BindVariableRequest(
                binding=bound("x", "agents.color.mean", orchestrator_pb2.COMPARISON_ABOVE, 0)
            )
        )
    assert (
        info.value.field == "binding.adaptation.metric" and "agents.<field>.<aggregate>" in info.value.message
    )
    memory = bound("by-memory", "agents.memory_bytes.max", orchestrator_pb2.COMPARISON_ABOVE, 1_000_000)
    outcomes = bound("by-outcomes", "sessions:consensus.decided_ratio", orchestrator_pb2.COMPARISON_BELOW, 2)
    for binding in (memory, outcomes):
        await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))

    async def decided(name: str) -> bool:
        try:
            await o.GetVariable(orchestrator_pb2.GetVariableRequest(name=name))
        except errors.NotFound:
            return False
        return True

    await eventually(lambda: decided("by-memory"), timeout=15, what="adapted on the agents' memory")
    await eventually(lambda: decided("by-outcomes"), timeout=15, what="adapted on the sessions' outcomes")


class FromContext(protocol_plugin_pb2_grpc.ProtocolPluginServiceServicer):
    """A plugin protocol that decides ten times the value that triggered the adaptation."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    async def Describe(self, request: Any, context: Any) -> protocol_plugin_pb2.DescribeResponse:
        return protocol_plugin_pb2.DescribeResponse(description="ten times the trigger's value")

    async def Advance(
        self, request: protocol_plugin_pb2.AdvanceRequest, context: Any
    ) -> protocol_plugin_pb2.AdvanceResponse:
        got = json_format.MessageToDict(request.context)
        self.contexts.append(got)
        return protocol_plugin_pb2.AdvanceResponse(
            outcome=coordination_pb2.Outcome(decided=True, decision=f"{got['value'] * 10:g}")
        )


async def test_an_adaptation_gives_its_trigger_to_a_plugin_that_computes_the_value(
    mesh: tuple[MeshClient, MeshServer], voters: None
) -> None:
    client = mesh[0]
    o = client.orchestrator
    plugin = FromContext()
    server = aio.server()
    protocol_plugin_pb2_grpc.add_ProtocolPluginServiceServicer_to_server(plugin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await client.coordination.RegisterProtocol(
            coordination_pb2.RegisterProtocolRequest(name="from_context", endpoint=f"127.0.0.1:{port}")
        )
        binding = orchestrator_pb2.OrchestrationBinding(
            variable="scaled",
            protocol="consensus",  # what CoordinateVariable runs; the rule runs the plugin
            participants=common_pb2.AgentSelector(capability="decide"),
            parameters=params({"question": "t?", "options": ["18", "21"]}),
            adaptation=orchestrator_pb2.AdaptationRule(
                metric="agents.load.max",
                comparison=orchestrator_pb2.COMPARISON_BELOW,
                threshold=5,
                cooldown=duration_pb2.Duration(seconds=60),
                protocol="from_context",
            ),
        )
        await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))

        async def scaled() -> orchestrator_pb2.Variable | None:
            try:
                return (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="scaled"))).variable
            except errors.NotFound:
                return None

        variable = await eventually(scaled, timeout=15, what="the plugin decided the variable")
        value = variable.value.number_value
        trigger = plugin.contexts[0]
        assert trigger["trigger"] == "adaptation" and trigger["metric"] == "agents.load.max"
        assert trigger["comparison"] == "COMPARISON_BELOW" and trigger["threshold"] == 5
        assert value == pytest.approx(trigger["value"] * 10)
        assert set(trigger["loads"]) >= {"v1", "v2"}, trigger  # the participants' loads by id
        session_id = variable.decided_by_session
        session = (
            await client.coordination.GetSession(coordination_pb2.GetSessionRequest(session_id=session_id))
        ).session
        assert session.protocol == "from_context" and session.context["metric"] == "agents.load.max"
        # A context over 64 KiB is refused up front, naming the field.
        big = struct_pb2.Struct()
        big.update({"blob": "x" * (65 * 1024)})
        with pytest.raises(errors.InvalidArgument) as info:
            await client.coordination.Run(
                coordination_pb2.RunRequest(
                    settings=coordination_pb2.SessionSettings(
                        participants=common_pb2.AgentSelector(capability="decide")
                    ),
                    protocol="from_context",
                    context=big,
                )
            )
        assert info.value.field == "context" and "65536" in info.value.message
    finally:
        await server.stop(0)


class HeldVoter(Agent):
    """Votes "21" once told to: the test unbinds the variable while the vote is held."""

    capabilities = ("held",)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        self.asked.set()
        await self.release.wait()
        return agent_pb2.CoordinationResponse(vote=agent_pb2.Vote(option="21"))


async def test_a_binding_removed_while_coordinating_stays_removed(
    mesh: tuple[MeshClient, MeshServer], etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    """UnbindVariable during CoordinateVariable: nothing is written, the binding does not come back."""
    o = mesh[0].orchestrator
    voter = HeldVoter("held-1")
    host = AgentHost([voter], registry=mesh[1].address)
    await host.start()
    try:
        binding = orchestrator_pb2.OrchestrationBinding(
            variable="unbound/mid-run",
            protocol="consensus",
            participants=common_pb2.AgentSelector(agent_ids=["held-1"]),
            parameters=params({"question": "t?", "options": ["18", "21"]}),
        )
        await o.BindVariable(orchestrator_pb2.BindVariableRequest(binding=binding))
        running = asyncio.create_task(
            o.CoordinateVariable(orchestrator_pb2.CoordinateVariableRequest(variable="unbound/mid-run"))
        )
        await asyncio.wait_for(voter.asked.wait(), 10)
        await o.UnbindVariable(orchestrator_pb2.UnbindVariableRequest(variable="unbound/mid-run"))
        voter.release.set()
        with pytest.raises(errors.NotFound) as caught:
            await running
        assert "unbound" in caught.value.message
        # etcd itself, read after the call ended (not the replicas' watch-fed caches, which may lag).
        for kind in ("bindings", "vars"):
            assert await etcd_client.get(mesh_config.key(kind, "unbound/mid-run")) is None, kind
        listed = await o.ListBindings(orchestrator_pb2.ListBindingsRequest())
        assert "unbound/mid-run" not in [b.variable for b in listed.bindings]
        with pytest.raises(errors.NotFound):
            await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="unbound/mid-run"))
    finally:
        voter.release.set()
        await host.stop()
