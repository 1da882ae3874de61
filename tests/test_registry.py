"""The registry through gRPC on a real etcd: registration, leases, lookups, watches, bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.server import MeshServer
from mabeam.services.registry.store import token_hash
from mabeam.v1 import common_pb2, registry_pb2

StartService = Callable[..., Awaitable[MeshServer]]


@pytest.fixture
async def registry(service: StartService) -> MeshServer:
    return await service("registry")


@pytest.fixture
async def client(registry: MeshServer) -> AsyncIterator[MeshClient]:
    mesh = await MeshClient.connect(registry=registry.address)
    yield mesh
    await mesh.close()


async def one_beat(client: MeshClient, agent_id: str, token: str) -> registry_pb2.HeartbeatResponse:
    """One beat on a stream of its own: its answer (or the status that ended the stream)."""

    async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        yield registry_pb2.HeartbeatRequest(agent_id=agent_id, token=token)

    answers = [answer async for answer in client.registry.Heartbeat(beats())]
    return answers[0]


def register_request(agent_id: str = "a1", **kw: object) -> registry_pb2.RegisterAgentRequest:
    fields: dict[str, object] = {"endpoint": "127.0.0.1:1", "capabilities": ["bid"], **kw}
    return registry_pb2.RegisterAgentRequest(agent_id=agent_id, **fields)  # type: ignore[arg-type]


async def test_register_get_list_deregister(client: MeshClient) -> None:
    reply = await client.registry.RegisterAgent(register_request("a1", labels={"zone": "x"}))
    assert reply.token and reply.agent.lease_id and reply.agent.generation == 1
    got = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a1"))).agent
    assert got.endpoint == "127.0.0.1:1" and list(got.capabilities) == ["bid"]
    assert got.status == registry_pb2.AGENT_STATUS_SERVING
    listed = await eventually(
        lambda: client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="bid")),
        what="agent listed",
    )
    assert [a.agent_id for a in listed.agents] == ["a1"]
    none = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="vote"))
    assert not none.agents
    await client.registry.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id="a1", token=reply.token)
    )
    with pytest.raises(errors.NotFound):
        await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a1"))


async def test_live_id_needs_its_token(client: MeshClient) -> None:
    first = await client.registry.RegisterAgent(register_request("dup"))
    with pytest.raises(errors.AlreadyExists, match="dup"):
        await client.registry.RegisterAgent(register_request("dup"))
    with pytest.raises(errors.AlreadyExists):
        await client.registry.RegisterAgent(register_request("dup", token="wrong"))
    again = await client.registry.RegisterAgent(register_request("dup", token=first.token))
    assert again.agent.generation == 2 and again.token == first.token


async def test_one_id_registered_at_once_on_two_replicas_has_one_owner(
    registry: MeshServer, service: StartService
) -> None:
    """A replica whose directory has not seen a registration yet (the other replica's, a moment
    ago) still refuses the id without its token, and a take-over with the token still works."""
    other = await service("registry")
    a = await MeshClient.connect(registry=registry.address)
    b = await MeshClient.connect(registry=other.address)
    try:
        for i in range(10):
            agent_id = f"race-{i}"
            attempts = [
                (a if n % 2 else b).registry.RegisterAgent(register_request(agent_id)) for n in range(6)
            ]
            outcomes = await asyncio.gather(*attempts, return_exceptions=True)
            won = [o for o in outcomes if isinstance(o, registry_pb2.RegisterAgentResponse)]
            assert len(won) == 1, outcomes
            assert all(isinstance(o, errors.AlreadyExists) for o in outcomes if o is not won[0]), outcomes
            # Registered on one replica, taken over on the other right after with its token.
            first = await a.registry.RegisterAgent(register_request(f"moved-{i}"))
            again = await b.registry.RegisterAgent(register_request(f"moved-{i}", token=first.token))
            assert again.agent.generation == 2 and again.token == first.token
    finally:
        await a.close()
        await b.close()


async def test_wrong_token_changes_nothing(
    registry: MeshServer, client: MeshClient, etcd_client: EtcdClient
) -> None:
    reply = await client.registry.RegisterAgent(register_request("t1"))

    async def stored() -> dict[bytes, int]:
        """The agent's keys in etcd: their revisions, and the record's lease (the prober may
        rightly write the record's status: its endpoint does not answer)."""
        kvs, _ = await snapshot(etcd_client, registry.config.key("agent"))
        record = registry.config.key("agents", "t1")
        return {bytes(kv.key): int(kv.lease if kv.key == record else kv.mod_revision) for kv in kvs}

    before = await stored()
    assert registry.config.key("agents", "t1") in before
    with pytest.raises(errors.PermissionDenied):
        await client.registry.DeregisterAgent(
            registry_pb2.DeregisterAgentRequest(agent_id="t1", token="nope")
        )

    async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        yield registry_pb2.HeartbeatRequest(agent_id="t1", token="nope")

    with pytest.raises(errors.PermissionDenied):
        async for _ in client.registry.Heartbeat(beats()):
            pass
    got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="t1"))
    assert got.agent.lease_id == reply.agent.lease_id
    assert await stored() == before  # read from etcd after the refusals: nothing written


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (registry_pb2.RegisterAgentRequest(endpoint="127.0.0.1:1"), "agent_id"),
        (registry_pb2.RegisterAgentRequest(agent_id="bad id!", endpoint="127.0.0.1:1"), "agent_id"),
        (registry_pb2.RegisterAgentRequest(agent_id="x"), "endpoint"),
        (registry_pb2.RegisterAgentRequest(agent_id="x", endpoint="nohost"), "endpoint"),
        (
            registry_pb2.RegisterAgentRequest(
                agent_id="x", endpoint="h:1", lease_ttl=duration_pb2.Duration(seconds=100000)
            ),
            "lease_ttl",
        ),
        (
            registry_pb2.RegisterAgentRequest(agent_id="x", endpoint="h:1", capabilities=[""]),
            "capabilities[0]",
        ),
    ],
)
async def test_bad_registrations_name_the_field_and_leave_nothing(
    registry: MeshServer,
    client: MeshClient,
    etcd_client: EtcdClient,
    request_: registry_pb2.RegisterAgentRequest,
    field: str,
) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        await client.registry.RegisterAgent(request_)
    assert info.value.field == field and field.split("[")[0] in info.value.message
    # etcd itself, read after the refusal (a linearizable read: any write the
    # registry made is in it), not the registry's watch-fed cache, which may lag.
    kvs, _ = await snapshot(etcd_client, registry.config.key("agent"))  # agents/, agent-tokens/, agent-load/
    assert not kvs, [bytes(kv.key) for kv in kvs]
    listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert not listed.agents


async def test_unknown_agent_and_bad_paging(client: MeshClient) -> None:
    with pytest.raises(errors.NotFound, match="ghost"):
        await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="ghost"))
    with pytest.raises(errors.InvalidArgument) as info:
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=-1))
    assert info.value.field == "page_size"
    with pytest.raises(errors.InvalidArgument) as info:
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest(page_token="garbage"))
    assert info.value.field == "page_token"
    with pytest.raises(errors.NotFound):
        await client.registry.DeregisterAgent(
            registry_pb2.DeregisterAgentRequest(agent_id="ghost", token="x")
        )


async def test_paging_walks_every_agent_once(client: MeshClient) -> None:
    for i in range(25):
        await client.registry.RegisterAgent(register_request(f"p{i:02d}"))
    seen: list[str] = []
    token = ""
    while True:
        page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=7, page_token=token))
        seen += [a.agent_id for a in page.agents]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(f"p{i:02d}" for i in range(25))


async def test_lapsed_lease_removes_the_agent_and_tells_watchers(client: MeshClient) -> None:
    events: list[registry_pb2.WatchAgentsResponse] = []

    async def watch() -> None:
        async for event in client.registry.WatchAgents(registry_pb2.WatchAgentsRequest(capability="bid")):
            events.append(event)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: any(e.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE for e in events))
    reply = await client.registry.RegisterAgent(
        register_request("short", lease_ttl=duration_pb2.Duration(seconds=1))
    )
    await eventually(lambda: any(e.type == registry_pb2.AGENT_EVENT_TYPE_ADDED for e in events))
    started = time.monotonic()
    await eventually(
        lambda: any(
            e.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED and e.agent.agent_id == "short" for e in events
        ),
        timeout=6,
    )
    granted = reply.agent.lease_ttl.seconds  # etcd grants at least its minimum TTL (2 s)
    assert time.monotonic() - started < granted + 1.5
    listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert "short" not in [a.agent_id for a in listed.agents]
    # Resuming after the ADDED event replays the removal.
    added = next(e for e in events if e.type == registry_pb2.AGENT_EVENT_TYPE_ADDED)
    resumed: list[registry_pb2.WatchAgentsResponse] = []

    async def resume() -> None:
        async for event in client.registry.WatchAgents(
            registry_pb2.WatchAgentsRequest(after_revision=added.revision)
        ):
            resumed.append(event)

    task = asyncio.create_task(resume())
    await eventually(lambda: any(e.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED for e in resumed))
    task.cancel()
    watcher.cancel()
    del reply


class Echo(Agent):
    capabilities = ("echo",)

    async def execute_step(self, request):  # type: ignore[no-untyped-def]
        return {"agent": self.agent_id}


async def test_agent_host_registers_heartbeats_and_deregisters(
    registry: MeshServer, client: MeshClient
) -> None:
    host = AgentHost([Echo(f"e{i}") for i in range(5)], registry=registry.address, lease_ttl=1.0)
    await host.start()
    listed = await eventually(
        lambda: client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="echo")),
        what="hosted agents listed",
    )
    assert sorted(a.agent_id for a in listed.agents) == [f"e{i}" for i in range(5)]
    assert {a.endpoint for a in listed.agents} == {host.address}
    await asyncio.sleep(3)  # three TTLs: the heartbeats keep every lease
    listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="echo"))
    assert len(listed.agents) == 5
    got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="e0"))
    assert got.agent.last_heartbeat_at.seconds > 0
    await host.stop()
    await eventually(lambda: _empty(client), what="deregistered at once")


async def _empty(client: MeshClient) -> bool:
    listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="echo"))
    return not listed.agents


async def test_health_probe_reports_not_serving(registry: MeshServer, client: MeshClient) -> None:
    host = AgentHost([Echo("h1"), Echo("h2")], registry=registry.address)
    await host.start()
    try:
        serving = registry_pb2.ListAgentsRequest(capability="echo", status=registry_pb2.AGENT_STATUS_SERVING)
        await eventually(lambda: _count_of(client, serving, 2), what="both serving")
        await host.set_serving(False)
        not_serving = registry_pb2.ListAgentsRequest(
            capability="echo", status=registry_pb2.AGENT_STATUS_NOT_SERVING
        )
        await eventually(lambda: _count_of(client, not_serving, 2), timeout=8, what="probe sees NOT_SERVING")
        got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="h1"))
        assert got.agent.status == registry_pb2.AGENT_STATUS_NOT_SERVING
        await host.set_serving(True)
        await eventually(lambda: _count_of(client, serving, 2), timeout=8, what="serving again")
    finally:
        await host.stop()


async def _count_of(client: MeshClient, request: registry_pb2.ListAgentsRequest, n: int) -> bool:
    return len((await client.registry.ListAgents(request)).agents) == n


async def _statuses_until_gone(client: MeshClient, agent_id: str, timeout: float) -> list[tuple[float, int]]:
    """(seconds since the call, status) of ``agent_id``, polled until it is gone."""
    seen: list[tuple[float, int]] = []
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
        except errors.NotFound:
            return seen
        seen.append((time.monotonic() - started, got.agent.status))
        await asyncio.sleep(0.05)
    raise AssertionError(f"{agent_id} still registered after {timeout} s")


@pytest.mark.slow
async def test_an_agent_without_heartbeats_is_unknown_before_its_lease_lapses(
    registry: MeshServer, client: MeshClient
) -> None:
    from mabeam.services.registry.directory import UNKNOWN_AFTER_TTLS

    # Its endpoint (the registry's own) answers health probes: UNKNOWN can only come from the beats.
    reply = await client.registry.RegisterAgent(
        register_request("silent", endpoint=registry.address, lease_ttl=duration_pb2.Duration(seconds=6))
    )
    ttl = reply.agent.lease_ttl.seconds
    seen = await _statuses_until_gone(client, "silent", timeout=ttl + 5)
    unknown_at = [t for t, s in seen if s == registry_pb2.AGENT_STATUS_UNKNOWN]
    assert unknown_at, f"never UNKNOWN before the lease lapsed: {seen}"
    assert unknown_at[0] >= UNKNOWN_AFTER_TTLS * ttl - 0.5
    assert all(s == registry_pb2.AGENT_STATUS_SERVING for t, s in seen if t < UNKNOWN_AFTER_TTLS * ttl - 0.5)


@pytest.mark.slow
async def test_a_heartbeating_agent_is_never_unknown(registry: MeshServer, client: MeshClient) -> None:
    host = AgentHost([Echo("beating")], registry=registry.address, lease_ttl=3.0)
    await host.start()
    try:
        await eventually(lambda: client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="beating")))
        statuses = []
        started = time.monotonic()
        while time.monotonic() - started < 7:  # over two TTLs
            got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="beating"))
            statuses.append(got.agent.status)
            await asyncio.sleep(0.05)
        assert set(statuses) == {registry_pb2.AGENT_STATUS_SERVING}
    finally:
        await host.stop()


async def test_a_new_heartbeat_stream_reuses_the_replicas_token_checks(
    registry: MeshServer, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream opened again (an AgentHost's broke) beats without etcd reads for agents this replica
    already checked, and a wrong or superseded token is still refused."""
    first = await client.registry.RegisterAgent(register_request("v1"))

    def beat(token: str) -> Awaitable[registry_pb2.HeartbeatResponse]:
        return one_beat(client, "v1", token)

    assert (await beat(first.token)).lease_id == first.agent.lease_id  # checked against etcd once
    store = registry.servicers[registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name].store
    reads = 0
    get_agent = store.get_agent

    async def counted(agent_id: str) -> object:
        nonlocal reads
        reads += 1
        return await get_agent(agent_id)

    monkeypatch.setattr(store, "get_agent", counted)
    assert (await beat(first.token)).lease_id == first.agent.lease_id
    assert reads == 0, "a second stream read the agent again"
    with pytest.raises(errors.PermissionDenied):
        await beat("nope")
    # Registered again (a new generation and token): the old token no longer beats.
    await client.registry.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id="v1", token=first.token)
    )
    second = await client.registry.RegisterAgent(register_request("v1"))
    await eventually(
        lambda: client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="v1")),
        what="v1 registered again",
    )
    with pytest.raises((errors.PermissionDenied, errors.NotFound)):
        await beat(first.token)
    assert (await beat(second.token)).lease_id == second.agent.lease_id


async def test_a_beat_follows_the_registration_in_etcd_when_the_directory_lags(
    registry: MeshServer, client: MeshClient, etcd_client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's lease was revoked and it registered again with its token (an AgentHost's take-over)
    before this replica's watch said so: its next beat refreshes the new lease, not NOT_FOUND."""
    first = await client.registry.RegisterAgent(register_request("v2"))

    def beat() -> Awaitable[registry_pb2.HeartbeatResponse]:
        return one_beat(client, "v2", first.token)

    assert (await beat()).lease_id == first.agent.lease_id
    directory = registry.servicers[
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
    ].directory
    key = registry.config.key("agents", "v2")
    stale = directory.agents.get(key)
    assert stale is not None and stale.lease_id == first.agent.lease_id
    await etcd_client.revoke_lease(first.agent.lease_id)
    again = await client.registry.RegisterAgent(register_request("v2", token=first.token))
    assert again.agent.lease_id != first.agent.lease_id
    # This replica's directory has not seen the revocation nor the new registration yet.
    cached = directory.agents.get
    monkeypatch.setattr(directory.agents, "get", lambda k: stale if k == key else cached(k))
    assert (await beat()).lease_id == again.agent.lease_id


async def test_a_token_replaced_in_etcd_stops_beating_on_a_replica_that_checked_it(
    registry: MeshServer, client: MeshClient, etcd_client: EtcdClient
) -> None:
    """The token checks a replica keeps follow the token keys' watch: when another replica rotates the
    agent's token (same lease, same generation), the old one is refused from then on."""
    first = await client.registry.RegisterAgent(register_request("v3"))

    def beat(token: str) -> Awaitable[registry_pb2.HeartbeatResponse]:
        return one_beat(client, "v3", token)

    assert (await beat(first.token)).lease_id == first.agent.lease_id  # checked, and kept
    # Another replica rotates it (what a replayed RegisterAgent does): the key, not the lease, changes.
    await etcd_client.put(registry.config.key("agent-tokens", "v3"), token_hash("another-token"))

    async def refused() -> bool:
        try:
            await beat(first.token)
        except errors.PermissionDenied:
            return True
        return False

    await eventually(refused, timeout=10, what="the replaced token refused")
    assert (await beat("another-token")).lease_id == first.agent.lease_id


async def test_a_streams_loads_are_written_together_and_a_gone_agent_is_left_out(
    registry: MeshServer, client: MeshClient, etcd_client: EtcdClient
) -> None:
    """Beats of many agents on one stream store their loads in a few etcd transactions, not one
    each (a host of 1,000 agents wrote ~300 a second); an agent gone meanwhile gets none stored."""
    ids = [f"w{i}" for i in range(120)]
    replies = await asyncio.gather(*(client.registry.RegisterAgent(register_request(a)) for a in ids))
    tokens = {r.agent.agent_id: r.token for r in replies}
    load_prefix = registry.config.key("agent-load")

    async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        for i, agent_id in enumerate(ids):
            load = common_pb2.AgentLoad(load=0.5, queue_length=i)
            yield registry_pb2.HeartbeatRequest(agent_id=agent_id, token=tokens[agent_id], load=load)

    answers = [a.agent_id async for a in client.registry.Heartbeat(beats())]
    assert sorted(answers) == sorted(ids)
    kvs, _ = await snapshot(etcd_client, load_prefix)
    stored = {
        bytes(kv.key).rsplit(b"/", 1)[1].decode(): common_pb2.AgentLoad.FromString(kv.value) for kv in kvs
    }
    assert {a: stored[a].queue_length for a in ids} == {a: i for i, a in enumerate(ids)}
    # A transaction is one etcd revision: the loads were written in a few, not one each.
    written_at = {kv.mod_revision for kv in kvs}
    assert len(written_at) <= len(ids) // 2, f"{len(written_at)} transactions for {len(ids)} loads"

    # The store's transaction of many loads: one agent deregistered, one whose registration went
    # with its lease; the others are stored, those two are not.
    store = registry.servicers[registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name].store
    leases = {r.agent.agent_id: r.agent.lease_id for r in replies}
    await client.registry.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id="w0", token=tokens["w0"])
    )
    await etcd_client.revoke_lease(leases["w1"])
    batch = {a: (common_pb2.AgentLoad(load=0.9), leases[a]) for a in ["w0", "w1", "w2", "w3"]}
    assert await store.put_loads(batch) == {"w0": False, "w1": False, "w2": True, "w3": True}
    # One still registered, on a lease other than the one its beat saw, which etcd no longer knows
    # (etcd refuses the whole transaction: "requested lease not found").
    gone = await etcd_client.lease(ttl=5)
    await etcd_client.revoke_lease(gone.id)
    batch = {
        "w2": (common_pb2.AgentLoad(load=0.1), gone.id),
        "w3": (common_pb2.AgentLoad(load=0.2), leases["w3"]),
    }
    assert await store.put_loads(batch) == {"w2": False, "w3": True}
    kvs, _ = await snapshot(etcd_client, load_prefix)
    loads = {
        bytes(kv.key).rsplit(b"/", 1)[1].decode(): common_pb2.AgentLoad.FromString(kv.value) for kv in kvs
    }
    assert "w0" not in loads and "w1" not in loads
    assert loads["w3"].load == pytest.approx(0.2)
    assert loads["w2"].load == pytest.approx(0.9)


async def test_a_refused_beat_is_answered_and_the_stream_goes_on(client: MeshClient) -> None:
    """With answer_refusals, an unknown agent's beat and a wrong token's are answered with a refusal
    and the stream keeps serving the other agents' beats; without it, the refusal ends the stream."""
    ok = await client.registry.RegisterAgent(register_request("r1"))

    async def beats() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        for agent_id, token in [("ghost", "x"), ("r1", "wrong"), ("r1", ok.token)]:
            yield registry_pb2.HeartbeatRequest(agent_id=agent_id, token=token, answer_refusals=True)

    answers = {(a.agent_id, a.refusal.code): a async for a in client.registry.Heartbeat(beats())}
    ghost = answers[("ghost", grpc.StatusCode.NOT_FOUND.value[0])]
    assert ghost.refusal.reason == common_pb2.ERROR_REASON_AGENT_NOT_FOUND and not ghost.lease_id
    assert "ghost" in ghost.refusal.message
    wrong = answers[("r1", grpc.StatusCode.PERMISSION_DENIED.value[0])]
    assert "token" in wrong.refusal.message and not wrong.lease_id
    fine = answers[("r1", 0)]
    assert not fine.HasField("refusal") and fine.lease_id == ok.agent.lease_id
    with pytest.raises(errors.NotFound):
        await one_beat(client, "ghost", "x")


async def test_a_host_registers_a_lapsed_agent_again_without_breaking_its_stream(
    registry: MeshServer, client: MeshClient, etcd_client: EtcdClient
) -> None:
    """One of a host's agents loses its lease: only that agent is registered again (new lease), the
    others keep theirs, and the host's heartbeat stream never breaks."""
    host = AgentHost([Echo(f"k{i}") for i in range(4)], registry=registry.address, lease_ttl=2.0)
    await host.start()
    try:
        first: dict[str, int] = {}
        for agent_id in host.agents:
            got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
            first[agent_id] = got.agent.lease_id
        await etcd_client.revoke_lease(first["k0"])

        async def k0_back() -> bool:
            try:
                got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="k0"))
            except errors.NotFound:
                return False
            return got.agent.lease_id != first["k0"]

        await eventually(k0_back, timeout=10, what="k0 registered again on a new lease")
        acked = host.heartbeat_stats.acked
        await eventually(lambda: host.heartbeat_stats.acked > acked + 8, timeout=10, what="beats acked since")
        for agent_id in ["k1", "k2", "k3"]:
            got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
            assert got.agent.lease_id == first[agent_id], f"{agent_id} lost its lease"
        assert host.heartbeat_stats.refused >= 1
        assert host.heartbeat_stats.stream_breaks == 0
    finally:
        await host.stop()
