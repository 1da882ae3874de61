"""Idempotent mutating calls (AIP-155 ``request_id``, :mod:`mabeam.runtime.idempotency`).

The same id twice is applied once and answered alike (compare-and-set, whose
outcome is written in its own transaction, and the calls recorded right
after); concurrent duplicates apply once; a recorded error is replayed; the
window's end lets the id apply again; a malformed id or a different request
under a used id is INVALID_ARGUMENT; the SDK sets an id on a copy of the
caller's request.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient, retry_is_safe
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.idempotency import MAX_REQUEST_ID, RequestLog
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

pytestmark = pytest.mark.timeout(60)


def integer(n: int) -> common_pb2.Value:
    return common_pb2.Value(int_value=n)


@pytest.fixture
async def orchestrator(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[MeshClient]:
    server = await service("orchestrator")
    client = await MeshClient.connect(orchestrator=server.address)
    yield client
    await client.close()


async def test_the_same_id_twice_is_one_compare_and_set_and_the_same_answer(orchestrator: MeshClient) -> None:
    o = orchestrator.orchestrator
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="n", value=integer(0)))
    cas = orchestrator_pb2.SetVariableRequest(
        name="n", value=integer(1), expected_version=1, request_id="cas-1"
    )
    first = await o.SetVariable(cas)
    again = await o.SetVariable(cas)
    assert first == again and first.variable.version == 2 and first.variable.mod_revision > 0
    now = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="n"))).variable
    assert now.version == 2 and now.value.int_value == 1
    # Without the id, the same request is a second call: the version moved, so ABORTED.
    with pytest.raises(errors.Aborted):
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="n", value=integer(1), expected_version=1)
        )


async def test_concurrent_duplicates_apply_once(orchestrator: MeshClient) -> None:
    o = orchestrator.orchestrator
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="c", value=integer(0)))
    cas = orchestrator_pb2.SetVariableRequest(
        name="c", value=integer(1), expected_version=1, request_id="dup"
    )
    answers = await asyncio.gather(*(o.SetVariable(cas) for _ in range(8)))
    assert all(a == answers[0] for a in answers)
    # Recorded right after (a plain put): claimed first, so duplicates wait for the first.
    put = orchestrator_pb2.SetVariableRequest(name="p", value=integer(7), request_id="put-dup")
    puts = await asyncio.gather(*(o.SetVariable(put) for _ in range(8)))
    assert all(p == puts[0] for p in puts)
    versions = await asyncio.gather(
        *(o.GetVariable(orchestrator_pb2.GetVariableRequest(name=n)) for n in ("c", "p"))
    )
    assert [v.variable.version for v in versions] == [2, 1]


async def test_a_recorded_error_is_the_answer_within_the_window(orchestrator: MeshClient) -> None:
    o = orchestrator.orchestrator
    delete = orchestrator_pb2.DeleteVariableRequest(name="later", request_id="del-1")
    with pytest.raises(errors.NotFound):
        await o.DeleteVariable(delete)
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="later", value=integer(1)))
    with pytest.raises(errors.NotFound):  # the first outcome, though the variable exists now
        await o.DeleteVariable(delete)
    assert (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="later"))).variable.version == 1
    await o.DeleteVariable(orchestrator_pb2.DeleteVariableRequest(name="later", request_id="del-2"))
    await o.DeleteVariable(orchestrator_pb2.DeleteVariableRequest(name="later", request_id="del-2"))


async def test_malformed_ids_and_reused_ids_are_invalid_arguments(orchestrator: MeshClient) -> None:
    o = orchestrator.orchestrator
    for bad in ("x" * (MAX_REQUEST_ID + 1), "has space", "new\nline"):
        with pytest.raises(errors.InvalidArgument) as caught:
            await o.SetVariable(
                orchestrator_pb2.SetVariableRequest(name="v", value=integer(1), request_id=bad)
            )
        assert caught.value.field == "request_id" and str(MAX_REQUEST_ID) in caught.value.message
    await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="v", value=integer(1), request_id="x" * 128))
    with pytest.raises(errors.InvalidArgument) as caught:
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="v", value=integer(2), request_id="x" * 128)
        )
    assert caught.value.field == "request_id" and "different" in caught.value.message
    assert (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="v"))).variable.value.int_value == 1
    # A compare-and-set (its outcome in its own transaction) that would apply: refused all the same.
    cas = orchestrator_pb2.SetVariableRequest(name="v", value=integer(2), expected_version=1, request_id="c")
    await o.SetVariable(cas)
    with pytest.raises(errors.InvalidArgument) as caught:
        await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(
                name="v", value=integer(3), expected_version=2, request_id="c"
            )
        )
    assert caught.value.field == "request_id"
    assert (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name="v"))).variable.version == 2


async def test_the_sdk_sets_an_id_on_a_copy_and_resends_calls_with_one() -> None:
    request = orchestrator_pb2.SetVariableRequest(name="v", value=integer(1), expected_version=3)

    class CutOff(Exception):
        def code(self) -> object:
            import grpc

            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "Socket closed"

    assert not retry_is_safe("SetVariable", CutOff())  # type: ignore[arg-type]
    assert retry_is_safe("SetVariable", CutOff(), request_id=True)  # type: ignore[arg-type]
    from mabeam.client import _with_request_id

    sent = _with_request_id(request)
    assert len(sent.request_id) == 36 and request.request_id == ""
    assert _with_request_id(request).request_id != sent.request_id


async def test_after_the_window_the_same_id_applies_again(
    etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    log = RequestLog(etcd_client, mesh_config, "test", window=2)
    applied: list[int] = []

    async def work() -> orchestrator_pb2.UnbindVariableResponse:
        applied.append(1)
        await asyncio.sleep(0.2)
        return orchestrator_pb2.UnbindVariableResponse()

    request = orchestrator_pb2.UnbindVariableRequest(variable="x", request_id="r-1")
    try:
        await asyncio.gather(
            *(
                log.run("UnbindVariable", request, orchestrator_pb2.UnbindVariableResponse, work)
                for _ in range(5)
            )
        )
        assert len(applied) == 1
        await log.run("UnbindVariable", request, orchestrator_pb2.UnbindVariableResponse, work)
        assert len(applied) == 1

        async def forgotten() -> bool:
            return await etcd_client.get(log.key("UnbindVariable", "r-1")) is None

        await eventually(forgotten, timeout=15, what="the record gone with its window's lease")
        await log.run("UnbindVariable", request, orchestrator_pb2.UnbindVariableResponse, work)
        assert len(applied) == 2
    finally:
        await log.stop()


async def test_the_other_services_answer_a_repeated_id_from_the_record(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    planner = await service("planner")
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, planner=planner.address
    )
    try:
        register = registry_pb2.RegisterAgentRequest(
            agent_id="a1", endpoint="127.0.0.1:1", capabilities=["nothing"], request_id="reg-1"
        )
        first = await client.registry.RegisterAgent(register)
        again = await client.registry.RegisterAgent(register)
        # One registration; its token is not recorded, so the replay answers a new one
        # (the one who resends lost the first), and the first one stops working.
        assert again.agent == first.agent and first.agent.generation == 1
        assert again.token and again.token != first.token
        with pytest.raises(errors.PermissionDenied):
            await client.registry.DeregisterAgent(
                registry_pb2.DeregisterAgentRequest(agent_id="a1", token=first.token)
            )
        deregister = registry_pb2.DeregisterAgentRequest(
            agent_id="a1", token=again.token, request_id="dereg-1"
        )
        await client.registry.DeregisterAgent(deregister)
        await client.registry.DeregisterAgent(deregister)  # the first outcome, not NOT_FOUND
        with pytest.raises(errors.NotFound):
            await client.registry.DeregisterAgent(
                registry_pb2.DeregisterAgentRequest(agent_id="a1", token=again.token)
            )

        # SubmitGoal without goal_id: refused while no agent can run the step, and a repeated id
        # answers that refusal; a new id, once an agent is there, names one goal, answered alike.
        spec = planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s", capability="nothing")])
        refused = planner_pb2.SubmitGoalRequest(goal=spec, request_id="goal-0")
        with pytest.raises(errors.FailedPrecondition):
            await client.planner.SubmitGoal(refused)
        await client.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent_id="a2", endpoint="127.0.0.1:1", capabilities=["nothing"])
        )
        with pytest.raises(errors.FailedPrecondition):
            await client.planner.SubmitGoal(refused)
        submit = planner_pb2.SubmitGoalRequest(goal=spec, request_id="goal-1")
        goal = (await client.planner.SubmitGoal(submit)).goal
        assert (await client.planner.SubmitGoal(submit)).goal.goal_id == goal.goal_id
        listed = await client.planner.ListGoals(planner_pb2.ListGoalsRequest())
        assert [g.goal_id for g in listed.goals] == [goal.goal_id]
        cancel = planner_pb2.CancelGoalRequest(goal_id=goal.goal_id, request_id="c-1")
        assert await client.planner.CancelGoal(cancel) == await client.planner.CancelGoal(cancel)

        unregister = coordination_pb2.UnregisterProtocolRequest(name="nothing", request_id="unreg-1")
        for _ in range(2):
            with pytest.raises(errors.NotFound):
                await client.coordination.UnregisterProtocol(unregister)
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_killing_a_replica_under_resent_increments_applies_each_once(
    mesh_cluster: Callable[..., Awaitable[LocalMesh]],
) -> None:
    """Compare-and-set increments from 6 workers over 2 orchestrator replicas; one replica is
    SIGKILLed mid-way. Each increment carries its own request_id: the SDK resends one cut off
    to the other replica, the worker resends it (same id) after any outcome it cannot read,
    until it is answered. The counter then equals the number of increments answered OK."""
    mesh = await mesh_cluster(services=("orchestrator",), etcd_members=1)
    addresses = mesh.addresses("orchestrator")
    assert len(addresses) == 2
    client = await MeshClient.connect(orchestrator=addresses)
    o = client.orchestrator
    name = "counter"
    applied: set[str] = set()
    resent = aborted = 0
    stop = asyncio.Event()

    async def worker(me: int) -> None:
        nonlocal resent, aborted
        attempt = 0
        while not stop.is_set():
            try:
                current = (
                    await o.GetVariable(orchestrator_pb2.GetVariableRequest(name=name), timeout=5)
                ).variable
            except (errors.Unavailable, errors.DeadlineExceeded):
                await asyncio.sleep(0.05)
                continue
            attempt += 1
            request = orchestrator_pb2.SetVariableRequest(
                name=name,
                value=integer(current.value.int_value + 1),
                expected_version=current.version,
                request_id=f"w{me}-{attempt}",
            )
            while True:  # until the outcome is known
                try:
                    await o.SetVariable(request, timeout=5)
                    assert request.request_id not in applied
                    applied.add(request.request_id)
                    break
                except errors.Aborted:
                    aborted += 1
                    break
                except (errors.Unavailable, errors.DeadlineExceeded, errors.Internal):
                    resent += 1
                    await asyncio.sleep(0.05)

    try:
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name=name, value=integer(0)))
        workers = [asyncio.create_task(worker(i)) for i in range(6)]
        await eventually(lambda: len(applied) >= 40, timeout=20, what="40 increments before the kill")
        victim = mesh.replicas_of("orchestrator")[0]
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = len(applied)
        await eventually(lambda: len(applied) >= killed_at + 40, timeout=20, what="40 increments after")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 15)
        final = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name=name), timeout=5)).variable
    finally:
        stop.set()
        await client.close()
    print(f"\n{len(applied)} increments answered OK, {aborted} lost races, {resent} resent by the worker")
    assert final.value.int_value == len(applied)
    assert final.version == len(applied) + 1
