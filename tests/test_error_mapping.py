"""Errors mapped by cause: a full etcd, a downstream service's status, a dependency that is down."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from harness.mesh_fixtures import enrolled
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.server import MeshServer, to_mabeam_error
from mabeam.v1 import common_pb2, orchestrator_pb2, planner_pb2

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def full_etcd() -> AsyncIterator[EmbeddedEtcd]:
    """An etcd whose database may grow to 256 KiB only: a few writes raise the NOSPACE alarm."""
    async with EmbeddedEtcd(
        unsafe_no_fsync=True, extra_args=["--quota-backend-bytes", str(256 * 1024)]
    ) as server:
        yield server


async def test_a_write_to_a_full_etcd_is_resource_exhausted(
    full_etcd: EmbeddedEtcd,
    mesh_config: MeshConfig,
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    config = await enrolled(dataclasses.replace(mesh_config, etcd_endpoints=(full_etcd.endpoint,)))
    orchestrator = await service("orchestrator", config)
    async with await MeshClient.connect(orchestrator=orchestrator.address) as client:
        big = common_pb2.Value(bytes_value=b"x" * 100_000)
        with pytest.raises(errors.MabeamError) as caught:
            for i in range(100):
                await client.orchestrator.SetVariable(
                    orchestrator_pb2.SetVariableRequest(name=f"big/{i}", value=big)
                )
    err = caught.value
    assert isinstance(err, errors.ResourceExhausted), err
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "STORE_EXHAUSTED"
    assert "database space exceeded" in err.message and not err.retryable


def _downstream(cls: type[errors.MabeamError], service: str, *args: str) -> errors.MabeamError:
    err = cls(*args)
    err.service = service
    return err


@pytest.mark.parametrize(
    ("raised", "code", "reason"),
    [
        (
            _downstream(errors.InvalidArgument, "registry", "agent_id", "bad"),
            grpc.StatusCode.INTERNAL,
            "DEPENDENCY_FAILED",
        ),
        (
            _downstream(errors.PermissionDenied, "registry", "token mismatch"),
            grpc.StatusCode.INTERNAL,
            "DEPENDENCY_FAILED",
        ),
        (
            _downstream(errors.NotFound, "registry", "no agent"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "DEPENDENCY_FAILED",
        ),
        (_downstream(errors.Aborted, "coordination", "moved"), grpc.StatusCode.ABORTED, "DEPENDENCY_FAILED"),
        (
            _downstream(errors.Unavailable, "registry", "etcd is unreachable"),
            grpc.StatusCode.UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
        ),
        (
            _downstream(errors.DeadlineExceeded, "coordination", "slow"),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "DEADLINE_EXCEEDED",
        ),
    ],
)
def test_a_downstream_status_is_mapped_by_cause(
    raised: errors.MabeamError, code: grpc.StatusCode, reason: str
) -> None:
    """A status another service answered is not passed on as if it were the caller's mistake."""
    mapped = to_mabeam_error(raised, service="planner")
    assert mapped.code == code and mapped.reason == reason
    assert mapped.metadata["service"] == raised.service
    assert mapped.metadata["downstream_code"] == raised.code.name
    assert f"the {raised.service} service" in mapped.message
    assert mapped.retryable == (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED))
    # A replica handing a call to a peer of its own kind answers the peer's status as is.
    assert to_mabeam_error(raised, service=raised.service) is raised
    # An error the handler raised itself is its own.
    own = errors.InvalidArgument("goal.steps", "bad")
    assert to_mabeam_error(own, service="planner") is own


def test_rich_status_round_trips_through_grpcio_status() -> None:
    err = errors.InvalidArgument("name", "is required", metadata={"k": "v"})

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return err.code

        def details(self) -> str:
            return err.message

        def trailing_metadata(self) -> Any:
            return errors.trailing_metadata(err)

    back = errors.from_rpc_error(Failed())
    assert isinstance(back, errors.InvalidArgument)
    assert (back.field, back.reason, back.metadata) == ("name", "INVALID_FIELD", {"k": "v"})


async def test_a_registry_outage_is_not_a_store_outage(service: Callable[..., Awaitable[MeshServer]]) -> None:
    """SubmitGoal while the registry is down: UNAVAILABLE naming the registry, not the store."""
    registry = await service("registry")
    planner = await service("planner")
    await registry.stop(0)
    async with await MeshClient.connect(planner=planner.address) as client:
        goal = planner_pb2.GoalSpec(
            steps=[planner_pb2.StepSpec(step_id="a", capability="nobody-offers-this")]
        )
        with pytest.raises(errors.Unavailable) as caught:
            await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=goal))
    err = caught.value
    assert err.reason == "SERVICE_UNAVAILABLE" and err.metadata["service"] == "registry", err
    assert "registry" in err.message and err.retryable
