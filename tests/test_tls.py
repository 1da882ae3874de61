"""Mutual TLS across the mesh: services, agents and clients on certificates the test makes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from harness.certs import make_certs
from harness.sample_agents import SecureBidder
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import AgentHost
from mabeam.cli.goal import load_goal
from mabeam.client import MeshClient
from mabeam.config import SERVICES, MeshConfig
from mabeam.discovery import EndpointResolver
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.tls import TLS
from mabeam.v1 import (
    auth_pb2,
    common_pb2,
    coordination_pb2,
    planner_pb2,
    registry_pb2,
    registry_pb2_grpc,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


async def not_(probe: Awaitable[bool]) -> bool:
    return not await probe


async def exit_code(argv: list[str], env: dict[str, str]) -> int:
    """The exit code of ``argv`` run with ``env`` added to this environment (no MABEAM_CLIENT_TLS_* of its own)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MABEAM_CLIENT_TLS_")}
    proc = await asyncio.create_subprocess_exec(*argv, env={**base, **env})
    return await asyncio.wait_for(proc.wait(), 30)


async def test_mesh_with_mutual_tls(
    tmp_path: Path, mesh_config: MeshConfig, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    pem = make_certs(tmp_path)
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])
    config = replace(mesh_config, tls=tls)
    registry = await service("registry", config)
    coordination = await service("coordination", config)
    client_tls = TLS(ca_file=pem["ca"], cert_file=pem["client"], key_file=pem["client-key"])
    # Agents serve with the mesh's certificate and call the registry with it.
    host = AgentHost(
        [SecureBidder("s1", 3), SecureBidder("s2", 8)],
        registry=registry.address,
        tls=tls,
        client_tls=config.client_tls(),
    )
    await host.start()
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, tls=client_tls
    )
    try:
        listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="secure"))
        assert {a.agent_id for a in listed.agents} == {"s1", "s2"}
        session = (
            await client.coordination.RunAuction(
                coordination_pb2.RunAuctionRequest(
                    settings=coordination_pb2.SessionSettings(
                        participants=common_pb2.AgentSelector(capability="secure")
                    ),
                    type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                    item="x",
                )
            )
        ).session
        assert (
            list(session.outcome.winners) == ["s2"] and not session.excluded
        )  # coordination -> agents over mTLS

        # With mutual TLS, a certificate is an identity only once an admin gives its subject a role.
        by_cert = await MeshClient.connect(registry=registry.address, tls=client_tls, token="")
        try:
            with pytest.raises(errors.Unauthenticated, match="'client' holds no role"):
                await by_cert.registry.ListAgents(registry_pb2.ListAgentsRequest())
            granted = await client.auth.CreateToken(
                auth_pb2.CreateTokenRequest(
                    name="ops-cert", role=auth_pb2.ROLE_READER, certificate_subject="client"
                )
            )
            assert not granted.token and granted.principal.certificate_subject == "client"

            async def reads() -> bool:
                try:
                    await by_cert.registry.ListAgents(registry_pb2.ListAgentsRequest())
                except errors.Unauthenticated:
                    return False
                return True

            await eventually(reads, timeout=2, what="the certificate's role is known")
            who = await by_cert.auth.WhoAmI(auth_pb2.WhoAmIRequest())
            assert (
                who.principal.role == auth_pb2.ROLE_READER and who.principal.certificate_subject == "client"
            )
            with pytest.raises(errors.PermissionDenied):  # a reader, not an agent
                await by_cert.registry.RegisterAgent(
                    registry_pb2.RegisterAgentRequest(agent_id="c1", endpoint="127.0.0.1:1")
                )
            await client.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=granted.principal.id))
            await eventually(lambda: not_(reads()), timeout=2, what="the certificate's role revoked")
        finally:
            await by_cert.close()

        # The containers' health check talks TLS with the variables the mabeam command reads.
        check = [sys.executable, "-m", "mabeam.health_check", registry.address, "mabeam.v1.RegistryService"]
        tls_env = {
            "MABEAM_CLIENT_TLS_CA": pem["ca"],
            "MABEAM_CLIENT_TLS_CERT": pem["client"],
            "MABEAM_CLIENT_TLS_KEY": pem["client-key"],
        }
        assert await exit_code(check, tls_env) == 0
        assert await exit_code(check, {}) == 1  # plaintext to a TLS service: not SERVING

        # A client without a certificate is refused, and so is a plaintext one.
        no_cert = await MeshClient.connect(registry=registry.address, tls=TLS(ca_file=pem["ca"]))
        with pytest.raises(errors.Unavailable):
            await no_cert.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await no_cert.close()
        async with aio.insecure_channel(registry.address) as plain:
            with pytest.raises(grpc.RpcError) as info:
                await registry_pb2_grpc.RegistryServiceStub(plain).ListAgents(
                    registry_pb2.ListAgentsRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()
        await host.stop()


# A supervised agent serving with mutual TLS (examples/worker.py's Worker on an
# AgentHost), its certificate files named in its launch spec's environment.
TLS_WORKER = """
import asyncio, os, sys
sys.path.insert(0, os.environ["EXAMPLES"])
from worker import Worker
from mabeam.agent import AgentHost
from mabeam.tls import TLS


async def main():  # grpc.aio wants the server made in the loop that runs it
    tls = TLS(cert_file=os.environ["CERT"], key_file=os.environ["KEY"], ca_file=os.environ["CA"])
    await AgentHost([Worker()], registry=os.environ["MABEAM_REGISTRY"], tls=tls, client_tls=tls).serve()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_whole_mesh_on_mutual_tls_etcd_and_mutual_tls_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd requiring client certificates, every service with mTLS, two registry replicas:
    a goal, an auction, and a migration handed from one registry replica to the other."""
    pem = make_certs(tmp_path)
    etcd = EmbeddedEtcd(
        unsafe_no_fsync=True, cert_file=pem["server"], key_file=pem["server-key"], trusted_ca_file=pem["ca"]
    )
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])
    client_tls = TLS(ca_file=pem["ca"], cert_file=pem["client"], key_file=pem["client-key"])
    async with etcd:
        config = MeshConfig(
            etcd_endpoints=(etcd.endpoint,),
            prefix="/mtls",
            ports={s: 0 for s in SERVICES},
            grace=0.5,
            service_ttl=2,
            tls=tls,
            etcd_tls=client_tls,
            data_dir=tmp_path / "data",
        )
        mesh = LocalMesh(config, services=("registry", "coordination", "planner"), log_dir=tmp_path / "logs")
        await mesh.start(timeout=60)
        # Auth on as well: this test's clients and agents present the admin token mabeam up minted.
        monkeypatch.setenv("MABEAM_TOKEN", mesh.admin_token or "")
        host: AgentHost | None = None
        clients: list[MeshClient] = []
        try:
            await mesh.start_replica("registry", timeout=60)
            first, second = mesh.addresses("registry")
            # Through discovery on the mTLS etcd, as any client of the mesh.
            mesh_client = await MeshClient.connect(
                etcd=[etcd.endpoint], prefix=config.prefix, tls=client_tls, etcd_tls=client_tls
            )
            by_replica = {a: await MeshClient.connect(registry=a, tls=client_tls) for a in (first, second)}
            clients += [mesh_client, *by_replica.values()]

            # A supervised worker serving with mTLS, started through the first replica.
            launch = registry_pb2.LaunchSpec(
                command=registry_pb2.Command(argv=[sys.executable, "-c", TLS_WORKER]),
                env={
                    "EXAMPLES": str(ROOT / "examples"),
                    "CERT": tls.cert_file,
                    "KEY": tls.key_file,
                    "CA": pem["ca"],
                },
            )
            started = await by_replica[first].registry.StartAgent(
                registry_pb2.StartAgentRequest(
                    agent_id="tls-worker", launch=launch, start_timeout=duration_pb2.Duration(seconds=60)
                ),
                timeout=90,
            )
            assert started.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING, started.agent

            # A goal: planner -> registry -> agent, every hop mTLS.
            goal = (
                await mesh_client.planner.SubmitGoal(
                    planner_pb2.SubmitGoalRequest(
                        goal=load_goal(ROOT / "examples" / "goal.yaml"), goal_id="g"
                    )
                )
            ).goal
            async for _ in mesh_client.planner.ExecuteGoal(
                planner_pb2.ExecuteGoalRequest(goal_id=goal.goal_id)
            ):
                pass
            done = (await mesh_client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id="g"))).goal
            assert done.state == planner_pb2.GOAL_STATE_SUCCEEDED, done

            # An auction among agents registered with the second replica.
            host = AgentHost(
                [SecureBidder("s1", 3), SecureBidder("s2", 8)],
                registry=second,
                tls=tls,
                client_tls=client_tls,
            )
            await host.start()
            session = (
                await mesh_client.coordination.RunAuction(
                    coordination_pb2.RunAuctionRequest(
                        settings=coordination_pb2.SessionSettings(
                            participants=common_pb2.AgentSelector(capability="secure")
                        ),
                        type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                        item="x",
                    )
                )
            ).session
            assert list(session.outcome.winners) == ["s2"] and not session.excluded

            # A migration asked of the replica that does not supervise the agent: it hands the
            # call to the one that does, over mTLS, found through the mTLS etcd.
            records = await by_replica[first].registry.ListSupervisedAgents(
                registry_pb2.ListSupervisedAgentsRequest()
            )
            owner = next(a for a in records.agents if a.agent_id == "tls-worker").supervisor_id
            resolver = EndpointResolver(config.etcd_endpoints, config.prefix, "registry", tls=client_tls)
            await resolver.start()
            try:
                owner_address = resolver.address_of(owner)
            finally:
                await resolver.stop()
            assert owner_address in (first, second)
            other = second if owner_address == first else first
            before = (
                await mesh_client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="tls-worker"))
            ).agent
            moved = await by_replica[other].registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="tls-worker", token=started.token, launch=launch),
                timeout=120,
            )
            assert moved.agent.endpoint != before.endpoint and moved.agent.generation == before.generation + 1
            # The moved agent answers steps (a second goal), still over mTLS.
            await mesh_client.planner.SubmitGoal(
                planner_pb2.SubmitGoalRequest(goal=load_goal(ROOT / "examples" / "goal.yaml"), goal_id="g2")
            )
            async for _ in mesh_client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id="g2")):
                pass
            done = (await mesh_client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id="g2"))).goal
            assert done.state == planner_pb2.GOAL_STATE_SUCCEEDED, done
            assert {s.agent_id for s in done.steps} == {"tls-worker"}
            await by_replica[first].registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="tls-worker"))
        finally:
            if host is not None:
                await host.stop()
            for client in clients:
                await client.close()
            await mesh.stop()
