"""Messages and topics end to end: MessagingService on a real coordination service, real registry, real etcd.

What a user relies on: a message sent to an agent reaches its ``on_message``,
in the order sent, once (a resend with the same message_id is dropped); a
capability reaches its least-loaded agent; a topic reaches every subscriber,
batched per host, with counts of what was delivered, dropped (a full inbox)
and failed; a subscription goes with its agent; bad input is refused naming
the field; an agent token acts for its own ids only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc import aio

from harness.node_agent import start_node_agent
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient, agent_message
from mabeam.config import MeshConfig
from mabeam.runtime import etcd as mabeam_etcd
from mabeam.runtime.etcd import EtcdClient
from mabeam.server import MeshServer
from mabeam.services.coordination.subscriptions.store import SubscriptionStore
from mabeam.v1 import agent_pb2, agent_pb2_grpc, auth_pb2, common_pb2, messaging_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


class Listener(Agent):
    """Records every message it handles."""

    capabilities = ("listen",)

    def __init__(self, agent_id: str, load: float = 0.0) -> None:
        super().__init__(agent_id)
        self.got: list[agent_pb2.AgentMessage] = []
        self.reported = load

    async def on_message(self, message: agent_pb2.AgentMessage) -> None:
        self.got.append(message)

    def load(self) -> common_pb2.AgentLoad:
        return common_pb2.AgentLoad(load=self.reported)


class Blocked(Listener):
    """Holds its first message until released: its inbox (of one) fills behind it."""

    inbox_size = 1

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def on_message(self, message: agent_pb2.AgentMessage) -> None:
        self.started.set()
        await self.release.wait()
        await super().on_message(message)


class Deaf(Agent):
    """Takes no messages (no on_message)."""

    capabilities = ("deaf",)


def texts(agent: Listener) -> list[str]:
    return [m.json["n"] if "n" in m.json else "" for m in agent.got]  # type: ignore[misc]


async def test_send_reaches_on_message_in_order_once(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = coordination_mesh
    agent = Listener("m1")
    async with AgentHost([agent], registry=registry.address):
        for n in range(20):
            reply = await client.send({"n": n}, to="m1", sender="tester")
            assert reply.agent_id == "m1" and not reply.duplicate
        await eventually(lambda: len(agent.got) == 20, what="20 messages handled")
        assert texts(agent) == list(range(20))  # the order sent, one after another
        first = agent.got[0]
        assert first.sender_id == "tester" and first.topic == "" and first.HasField("sent_at")

        # A resend (same message_id) is acknowledged as a duplicate and not handed over again.
        again = await client.send({"n": 99}, to="m1", sender="tester", message_id="fixed-1")
        dup = await client.send({"n": 99}, to="m1", sender="tester", message_id="fixed-1")
        assert not again.duplicate and dup.duplicate
        # The same id from another sender is another message.
        other = await client.send({"n": 99}, to="m1", sender="someone-else", message_id="fixed-1")
        assert not other.duplicate
        await eventually(lambda: len(agent.got) == 22, what="22 messages handled")
        assert [m.sender_id for m in agent.got[20:]] == ["tester", "someone-else"]

        # A typed payload travels as an Any.
        await client.send(registry_pb2.GetAgentRequest(agent_id="typed"), to="m1")
        await eventually(lambda: len(agent.got) == 23, what="the typed message")
        unpacked = registry_pb2.GetAgentRequest()
        assert agent.got[-1].any.Unpack(unpacked) and unpacked.agent_id == "typed"


async def test_a_capability_reaches_the_least_loaded_agent(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = coordination_mesh
    busy, idle = Listener("busy", load=0.9), Listener("idle", load=0.1)
    async with AgentHost([busy, idle], registry=registry.address, lease_ttl=1.5):

        async def loads_reported() -> bool:
            agents = (
                await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="listen"))
            ).agents
            return {a.agent_id: round(a.load.load, 1) for a in agents} == {"busy": 0.9, "idle": 0.1}

        await eventually(loads_reported, timeout=10, what="both loads in the registry")
        for n in range(5):
            reply = await client.send({"n": n}, capability="listen")
            assert reply.agent_id == "idle"
        await eventually(lambda: len(idle.got) == 5)
        assert busy.got == []


async def test_a_resent_capability_send_goes_to_the_agent_it_went_to_first(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    """A resend (same sender and message id) reaches the agent the first attempt picked, even when
    another is less loaded by then: that agent's dedupe drops it; no second agent handles it."""
    client, registry = coordination_mesh
    first, second = Listener("p-a", load=0.1), Listener("p-b", load=0.9)
    async with AgentHost([first, second], registry=registry.address, lease_ttl=1.5):

        async def loads(expected: dict[str, float]) -> bool:
            agents = (
                await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="listen"))
            ).agents
            return {a.agent_id: round(a.load.load, 1) for a in agents} == expected

        await eventually(lambda: loads({"p-a": 0.1, "p-b": 0.9}), timeout=10, what="the first loads")
        reply = await client.send({"n": 1}, capability="listen", message_id="once-1", sender="s1")
        assert reply.agent_id == "p-a" and not reply.duplicate
        first.reported, second.reported = 0.9, 0.1
        await eventually(lambda: loads({"p-a": 0.9, "p-b": 0.1}), timeout=10, what="the loads swapped")
        again = await client.send({"n": 1}, capability="listen", message_id="once-1", sender="s1")
        assert again.agent_id == "p-a" and again.duplicate
        fresh = await client.send({"n": 2}, capability="listen", message_id="once-2", sender="s1")
        assert fresh.agent_id == "p-b"  # a new message goes to the least loaded
        await eventually(lambda: len(first.got) == 1 and len(second.got) == 1)


async def test_send_refuses_what_it_cannot_deliver(coordination_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = coordination_mesh
    async with AgentHost([Listener("m1"), Deaf("deaf-1")], registry=registry.address):
        with pytest.raises(errors.NotFound, match="'ghost' is not registered"):
            await client.send({"n": 1}, to="ghost")
        with pytest.raises(errors.FailedPrecondition, match="'deaf-1' takes no messages"):
            await client.send({"n": 1}, to="deaf-1")
        with pytest.raises(errors.FailedPrecondition, match="no live agent offers capability 'nobody'"):
            await client.send({"n": 1}, capability="nobody")
        with pytest.raises(errors.FailedPrecondition, match="no live agent offers capability 'a/b c'"):
            await client.send({"n": 1}, capability="a/b c")  # any capability the registry takes
        with pytest.raises(errors.InvalidArgument, match=r"capability: must be 1-128 characters \(got 129\)"):
            await client.send({"n": 1}, capability="x" * 129)
        with pytest.raises(errors.InvalidArgument, match="exactly one of agent_id and capability"):
            await client.send({"n": 1}, to="m1", capability="listen")
        with pytest.raises(errors.InvalidArgument, match="over the limit of 65536"):
            await client.send({"blob": "x" * 70_000}, to="m1")
        with pytest.raises(errors.InvalidArgument, match=r"message\.sender_id"):
            await client.send({"n": 1}, to="m1", sender="bad sender")
        empty = messaging_pb2.SendRequest(
            agent_id="m1", message=agent_pb2.AgentMessage(message_id="x", sender_id="s")
        )
        with pytest.raises(errors.InvalidArgument, match=r"message\.payload"):
            await client.messaging.Send(empty)
        with pytest.raises(errors.InvalidArgument, match="topic"):
            await client.publish("no/slashes", {"n": 1})
        with pytest.raises(errors.NotFound, match="not registered"):
            await client.messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id="ghost", topic="t"))


async def test_publish_reaches_every_subscriber_and_counts_drops(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = coordination_mesh
    listeners = [Listener(f"sub-{i:03d}") for i in range(60)]
    blocked, deaf = Blocked("blocked"), Deaf("deaf-1")
    agents: list[Agent] = [*listeners, blocked, deaf]
    async with AgentHost(agents, registry=registry.address):
        for a in agents:
            await client.messaging.Subscribe(
                messaging_pb2.SubscribeRequest(agent_id=a.agent_id, topic="news")
            )
        await client.messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id="sub-000", topic="news"))

        first = await client.publish("news", {"n": 1}, sender="press")
        assert (first.subscribers, first.delivered, first.dropped, first.failed) == (62, 61, 0, 1)
        assert [(f.agent_id, f.code) for f in first.failures] == [("deaf-1", 12)]  # UNIMPLEMENTED
        await asyncio.wait_for(blocked.started.wait(), 5)  # holds message 1; its inbox is empty again

        second = await client.publish("news", {"n": 2}, sender="press")  # fills the blocked inbox
        assert (second.delivered, second.dropped) == (61, 0)
        # The default load counts the message being handled and the one waiting.
        assert Agent.load(blocked).queue_length == 2
        third = await client.publish("news", {"n": 3}, sender="press")
        assert (third.delivered, third.dropped, third.failed) == (60, 1, 1)
        assert {f.agent_id: f.code for f in third.failures} == {"blocked": 8, "deaf-1": 12}

        # A resend of the third publish: the subscribers that had it answer duplicate,
        # the blocked one (its inbox still full) drops it again.
        again = await client.publish("news", {"n": 3}, sender="press", message_id=third_id(listeners[0]))
        assert (again.delivered, again.duplicates, again.dropped) == (60, 60, 1)

        blocked.release.set()
        await eventually(lambda: all(len(a.got) == 3 for a in listeners), what="3 messages each")
        assert all(texts(a) == [1, 2, 3] for a in listeners)
        assert all(m.topic == "news" for m in listeners[0].got)
        await eventually(lambda: texts(blocked) == [1, 2], what="the blocked agent's two messages")


def third_id(agent: Listener) -> str:
    return agent.got[2].message_id if len(agent.got) > 2 else ""


async def test_subscriptions_are_listed_by_page_and_go_with_their_agent(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = coordination_mesh
    agents = [Listener(f"a{i}") for i in range(5)]
    host = AgentHost(agents, registry=registry.address)
    await host.start()
    try:
        for a in agents:
            await a.subscribe("alpha", mesh=client)
        await agents[0].subscribe("beta", mesh=client)
        seen: list[tuple[str, str]] = []
        token = ""
        while True:
            page = await client.messaging.ListSubscriptions(
                messaging_pb2.ListSubscriptionsRequest(page_size=2, page_token=token)
            )
            assert len(page.subscriptions) <= 2
            seen += [(s.topic, s.agent_id) for s in page.subscriptions]
            token = page.next_page_token
            if not token:
                break
        assert seen == [("alpha", f"a{i}") for i in range(5)] + [("beta", "a0")]
        mine = await client.messaging.ListSubscriptions(messaging_pb2.ListSubscriptionsRequest(agent_id="a0"))
        assert [(s.topic, s.agent_id) for s in mine.subscriptions] == [("alpha", "a0"), ("beta", "a0")]
        assert await agents[1].unsubscribe("alpha", mesh=client) is True
        assert await agents[1].unsubscribe("alpha", mesh=client) is False
    finally:
        await host.stop()  # deregisters: the registration's lease is revoked

    async def none_left() -> bool:
        page = await client.messaging.ListSubscriptions(messaging_pb2.ListSubscriptionsRequest())
        return not page.subscriptions

    await eventually(none_left, what="the subscriptions gone with their agents")
    reply = await client.publish("alpha", {"n": 1})
    assert reply.subscribers == 0 and reply.delivered == 0


async def test_an_agent_token_acts_for_its_own_ids_only(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = coordination_mesh
    made = await client.auth.CreateToken(
        auth_pb2.CreateTokenRequest(name="agents-a", role=auth_pb2.ROLE_AGENT, agent_pattern="a-*")
    )
    async with AgentHost([Listener("a-1"), Listener("b-1")], registry=registry.address):
        coordination = client._balancers["coordination"].addresses()
        agent = await MeshClient.connect(coordination=coordination, token=made.token)
        try:
            await agent.messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id="a-1", topic="t"))
            with pytest.raises(errors.PermissionDenied):
                await agent.messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id="b-1", topic="t"))
            sent = await agent.send({"n": 1}, to="b-1", sender="a-1")
            assert sent.agent_id == "b-1"
            with pytest.raises(errors.PermissionDenied):
                await agent.send({"n": 1}, to="a-1", sender="b-1")
            with pytest.raises(errors.PermissionDenied):
                await agent.messaging.Publish(
                    messaging_pb2.PublishRequest(topic="t", message=agent_message({"n": 1}, "intruder"))
                )
        finally:
            await agent.close()


async def test_a_javascript_agent_takes_messages_and_topics(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    """examples/node-agent/agent.js implements Deliver (not DeliverBatch: the service falls back)."""
    client, registry = coordination_mesh
    js = await start_node_agent("--id", "js-1", registry=registry.address)
    python = Listener("py-1")
    try:
        assert js.stdout is not None
        line = await asyncio.wait_for(js.stdout.readline(), 20)
        assert b"serving on" in line, line
        async with AgentHost([python], registry=registry.address):
            for agent_id in ("js-1", "py-1"):
                await client.messaging.Subscribe(
                    messaging_pb2.SubscribeRequest(agent_id=agent_id, topic="mixed")
                )
            sent = await client.send(
                {"n": 1, "words": ["a", "b"]}, to="js-1", sender="tester", message_id="m-1"
            )
            again = await client.send(
                {"n": 1, "words": ["a", "b"]}, to="js-1", sender="tester", message_id="m-1"
            )
            assert sent.agent_id == "js-1" and not sent.duplicate and again.duplicate
            published = await client.publish("mixed", {"n": 2}, sender="tester")
            assert (published.subscribers, published.delivered, published.failed) == (2, 2, 0)
            printed = [await asyncio.wait_for(js.stdout.readline(), 10) for _ in range(2)]
            assert printed[0].decode().startswith("message - from tester: ")
            assert json.loads(printed[0].decode().split(": ", 1)[1]) == {"n": 1, "words": ["a", "b"]}
            assert printed[1].decode().startswith("message mixed from tester: ")
            assert json.loads(printed[1].decode().split(": ", 1)[1]) == {"n": 2}
            await eventually(lambda: texts(python) == [2], what="the Python subscriber's message")
    finally:
        js.terminate()
        await js.wait()


class CountingHost(agent_pb2_grpc.AgentServiceServicer):
    """A bare AgentService endpoint that takes every message and counts the calls (optionally no batches)."""

    def __init__(self, batches: bool) -> None:
        self.batches = batches
        self.batch_calls = 0
        self.deliver_calls = 0

    async def Deliver(
        self, request: agent_pb2.DeliverRequest, context: aio.ServicerContext
    ) -> agent_pb2.DeliverResponse:
        self.deliver_calls += 1
        return agent_pb2.DeliverResponse()

    async def DeliverBatch(
        self, request: agent_pb2.DeliverBatchRequest, context: aio.ServicerContext
    ) -> agent_pb2.DeliverBatchResponse:
        self.batch_calls += 1
        if not self.batches:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no batches here")
        return agent_pb2.DeliverBatchResponse(
            entries=[agent_pb2.DeliverBatchEntry(agent_id=d.agent_id) for d in request.deliveries]
        )


async def test_a_topic_goes_to_each_host_in_one_batch_or_one_call_per_agent(
    coordination_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, _ = coordination_mesh
    batching, single = CountingHost(batches=True), CountingHost(batches=False)
    servers = []
    try:
        for prefix, host, count in (("batch", batching, 3), ("single", single, 2)):
            server = aio.server()
            agent_pb2_grpc.add_AgentServiceServicer_to_server(host, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            for i in range(count):
                request = registry_pb2.RegisterAgentRequest(
                    agent_id=f"{prefix}-{i}", endpoint=f"127.0.0.1:{port}"
                )
                request.lease_ttl.FromSeconds(30)
                await client.registry.RegisterAgent(request)
                await client.messaging.Subscribe(
                    messaging_pb2.SubscribeRequest(agent_id=f"{prefix}-{i}", topic="counted")
                )
        first = await client.publish("counted", {"n": 1})
        assert (first.subscribers, first.delivered) == (5, 5)
        assert (batching.batch_calls, batching.deliver_calls) == (1, 0)  # three agents, one call
        assert (single.batch_calls, single.deliver_calls) == (1, 2)  # refused, then one each
        second = await client.publish("counted", {"n": 2})
        assert second.delivered == 5
        assert (batching.batch_calls, batching.deliver_calls) == (2, 0)
        assert (single.batch_calls, single.deliver_calls) == (1, 4)  # the refusal is remembered
    finally:
        for server in servers:
            await server.stop(0)


async def test_a_subscription_goes_with_the_lease_and_comes_back_with_the_registration(
    coordination_mesh: tuple[MeshClient, MeshServer], mesh_config: MeshConfig
) -> None:
    """The registration's lease is revoked behind the host's back: the subscription goes with it,
    and the host, registering the agent anew, subscribes it again."""
    client, registry = coordination_mesh
    agent = Listener("phoenix")
    etcd = await mabeam_etcd.connect(mesh_config.etcd_endpoints)
    host = AgentHost(
        [agent],
        registry=registry.address,
        etcd=list(mesh_config.etcd_endpoints),
        prefix=mesh_config.prefix,
        lease_ttl=1.5,
    )
    await host.start()
    try:
        await agent.subscribe("rebirth")  # through the host's client (coordination found in etcd)

        async def subscribed() -> bool:
            page = await client.messaging.ListSubscriptions(
                messaging_pb2.ListSubscriptionsRequest(topic="rebirth")
            )
            return [s.agent_id for s in page.subscriptions] == ["phoenix"]

        assert await subscribed()
        got = await etcd.get(mesh_config.key("agents", "phoenix"))
        assert got is not None
        old_lease = int(got.lease)
        await etcd.revoke_lease(old_lease)
        assert not await subscribed()  # gone with the lease, at once

        async def registered_anew() -> bool:
            now = await etcd.get(mesh_config.key("agents", "phoenix"))
            return now is not None and int(now.lease) != old_lease

        await eventually(registered_anew, timeout=15, what="the agent registered anew")
        await eventually(subscribed, timeout=10, what="the subscription made again")
        reply = await client.publish("rebirth", {"n": 7})
        assert reply.delivered == 1
        await eventually(lambda: texts(agent) == [7], what="the message after the rebirth")
    finally:
        await host.stop()
        await etcd.close()


async def test_concurrent_subscribes_never_pass_the_topic_cap(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    """Ten agents subscribe at once to a topic of at most three: never more than three stay, and
    every one told "ok" is among them (the others: "topic full")."""
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = SubscriptionStore(etcd_client, config)
    lease = await etcd_client.lease(30)
    try:
        for i in range(10):  # what a registration leaves: the agent's key on its lease
            await etcd_client.put(config.key("agents") + f"/c{i}".encode(), b"", lease=lease.id)
        answers = await asyncio.gather(
            *(store.subscribe(f"c{i}", "capped", max_per_agent=10, max_per_topic=3) for i in range(10))
        )
        listed = await store.subscribers("capped", 100)
        assert len(listed) <= 3 and answers.count("ok") == len(listed), (answers, listed)
        assert set(answers) <= {"ok", "topic full"}
    finally:
        await lease.revoke()
