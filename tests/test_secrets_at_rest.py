"""Secrets at rest: no token a client or an agent holds is ever in etcd in the clear.

On real etcd and real services: StartAgent, RegisterAgent (each also replayed
by request_id) and a migration, then every key under the mesh prefix is read
and no value (nor the base64 payloads of the request log's JSON records)
contains any of the tokens. ExportState's bytes carry the state alone; after a
migration the old token no longer works and the new instance heartbeats.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from harness.channels import agent_channel, mesh_channel
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, agent_pb2_grpc, registry_pb2, registry_pb2_grpc

WORKER = str(Path(__file__).resolve().parent.parent / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(90)


class Counter(Agent):
    """An agent with a state to move."""

    capabilities = ("count",)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.counter = 0

    async def export_state(self) -> bytes:
        return json.dumps({"counter": self.counter}).encode()

    async def import_state(self, state: bytes) -> None:
        self.counter = json.loads(state)["counter"]


def _readings(value: bytes) -> list[bytes]:
    """The value, and what a JSON value's base64 strings decode to (the request log's records)."""
    out = [value]
    try:
        doc = json.loads(value)
    except ValueError:
        return out
    if isinstance(doc, dict):
        for v in doc.values():
            if isinstance(v, str):
                try:
                    out.append(base64.b64decode(v, validate=True))
                except (binascii.Error, ValueError):
                    pass
    return out


async def _tokens_in_etcd(client: EtcdClient, config: MeshConfig, tokens: set[str]) -> list[str]:
    """Each (key, token) where a token shows in a key or a value under the mesh prefix."""
    kvs, _ = await snapshot(client, config.prefix.rstrip("/").encode() + b"/")
    assert kvs, "the mesh wrote nothing?"
    found = []
    for kv in kvs:
        key, value = bytes(kv.key), bytes(kv.value)
        for token in tokens:
            t = token.encode()
            if t in key or any(t in reading for reading in _readings(value)):
                found.append(f"{key.decode()}: {token[:6]}…")
    return found


async def _beat(stub: registry_pb2_grpc.RegistryServiceStub, agent_id: str, token: str) -> Any:
    """One beat on a new Heartbeat stream: its answer, or the AioRpcError that ended the stream."""

    async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        yield registry_pb2.HeartbeatRequest(agent_id=agent_id, token=token)

    call = stub.Heartbeat(beats(), timeout=10)
    try:
        async for answer in call:
            return answer
    except aio.AioRpcError as exc:
        return exc
    return None


def _refused(outcome: Any) -> bool:
    return isinstance(outcome, aio.AioRpcError) and outcome.code().name == "PERMISSION_DENIED"


async def test_no_token_is_stored_in_the_clear(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    channel = mesh_channel(registry.address)
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    old_agent, new_agent = Counter("sec-ctr"), Counter("sec-ctr")
    old_host = AgentHost([old_agent], registry=registry.address, lease_ttl=1.0)
    new_host = AgentHost([], registry=registry.address, lease_ttl=1.0)
    new_host.add(new_agent, register=False)
    tokens: set[str] = set()
    launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
    try:
        # StartAgent, and its replay (same request_id): a new token, the first one replaced.
        start = registry_pb2.StartAgentRequest(
            agent_id="sec-sup", launch=launch, request_id=str(uuid.uuid4())
        )
        started = await stub.StartAgent(start, timeout=30)
        replayed = await stub.StartAgent(start, timeout=30)
        assert started.token and replayed.token and replayed.token != started.token
        assert replayed.agent.agent_id == "sec-sup"
        tokens |= {started.token, replayed.token}
        with pytest.raises(errors.PermissionDenied):  # the first answer's token stopped working
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="sec-sup", token=started.token, launch=launch)
            )

        # RegisterAgent, and its replay: the registration's token rotates.
        register = registry_pb2.RegisterAgentRequest(
            agent_id="sec-reg", endpoint="127.0.0.1:9", request_id=str(uuid.uuid4())
        )
        first = await stub.RegisterAgent(register, timeout=10)
        again = await stub.RegisterAgent(register, timeout=10)
        assert first.token and again.token and again.token != first.token
        assert again.agent.lease_id == first.agent.lease_id
        tokens |= {first.token, again.token}
        assert _refused(await _beat(stub, "sec-reg", first.token))
        assert not isinstance(await _beat(stub, "sec-reg", again.token), aio.AioRpcError)

        # A migration between two hosts.
        await old_host.start()
        await new_host.start()
        old_token = old_agent.token
        moved = await client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(
                agent_id="sec-ctr", token=old_token, target_endpoint=new_host.address
            )
        )
        assert moved.agent.endpoint == new_host.address
        tokens |= {old_token, new_agent.token}
        assert new_agent.token and new_agent.token != old_token

        assert await _tokens_in_etcd(etcd_client, mesh_config, tokens) == []
    finally:
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="sec-sup"))
        await old_host.stop()
        await new_host.stop()
        await channel.close(None)
        await client.close()


async def test_export_carries_no_token_and_migration_moves_the_registration(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    channel = mesh_channel(registry.address)
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    old_agent, new_agent = Counter("exp"), Counter("exp")
    old_host = AgentHost([old_agent], registry=registry.address, lease_ttl=1.0)
    new_host = AgentHost([], registry=registry.address, lease_ttl=1.0)
    new_host.add(new_agent, register=False)
    await old_host.start()
    await new_host.start()
    try:
        old_token = old_agent.token
        assert old_token
        # ExportState as the mesh calls it: the state alone.
        async with agent_channel(old_host.address) as agent_ch:
            agent_stub = agent_pb2_grpc.AgentServiceStub(agent_ch)
            exported = await agent_stub.ExportState(agent_pb2.ExportStateRequest(agent_id="exp"), timeout=10)
            assert old_token.encode() not in exported.state
            assert old_token.encode() not in base64.b64encode(exported.state)
            assert json.loads(exported.state) == {"counter": 0}
            # Given back (as a registry rolling a move back does): it serves again, with its token.
            await agent_stub.ImportState(
                agent_pb2.ImportStateRequest(
                    agent_id="exp", state=exported.state, content_type=exported.content_type
                ),
                timeout=10,
            )
        assert old_agent.token == old_token

        moved = await client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(
                agent_id="exp", token=old_token, target_endpoint=new_host.address
            )
        )
        assert moved.agent.generation == 2 and moved.agent.endpoint == new_host.address
        new_token = new_agent.token
        assert new_token and new_token != old_token

        # The old token no longer acts for the agent: a new heartbeat stream, deregistration.
        assert _refused(await _beat(stub, "exp", old_token))
        with pytest.raises(errors.PermissionDenied):
            await client.registry.DeregisterAgent(
                registry_pb2.DeregisterAgentRequest(agent_id="exp", token=old_token)
            )

        # The new instance heartbeats: its beats after the move show on the registration.
        async def beaten_since_move() -> bool:
            got = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="exp"))).agent
            return (
                got.endpoint == new_host.address
                and got.last_heartbeat_at.ToNanoseconds() > moved.agent.last_heartbeat_at.ToNanoseconds()
            )

        await eventually(beaten_since_move, timeout=10, what="the new instance's heartbeats")
        assert not isinstance(await _beat(stub, "exp", new_token), aio.AioRpcError)
    finally:
        await old_host.stop()
        await new_host.stop()
        await channel.close(None)
        await client.close()
