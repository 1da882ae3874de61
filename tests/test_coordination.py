"""Coordination end to end: real registry, real agents, every built-in protocol, plugins, failures."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from grpc import aio

from harness.channels import mesh_channel
from harness.mesh_fixtures import enrolled
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.runtime import process
from mabeam.server import MeshServer
from mabeam.v1 import (
    agent_pb2,
    common_pb2,
    coordination_pb2,
    coordination_pb2_grpc,
    protocol_plugin_pb2,
    protocol_plugin_pb2_grpc,
    registry_pb2,
)

BIDDER = str(Path(__file__).resolve().parent.parent / "examples" / "bidder.py")
pytestmark = pytest.mark.timeout(60)


class Trader(Agent):
    """Bids, stays in and accepts up to its value; votes for its option; reports Cobb-Douglas demand."""

    capabilities = ("trade",)

    def __init__(
        self, agent_id: str, value: float, vote: str = "yes", side: int = agent_pb2.ORDER_SIDE_BUY
    ) -> None:
        super().__init__(agent_id)
        self.value, self.vote, self.side = value, vote, side
        self.awards: list[float] = []
        self.rejects = 0

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        kind = request.WhichOneof("message")
        reply = agent_pb2.CoordinationResponse()
        if kind == "bid_request":
            reply.bid.amount = self.value
        elif kind == "price_quote":
            reply.price_answer.accept = request.price_quote.price <= self.value
        elif kind == "vote_request":
            reply.vote.option = self.vote
        elif kind == "task_announcement":
            reply.proposal.cost = self.value
        elif kind == "order_request":
            reply.orders.orders.add(side=self.side, price=self.value, quantity=1.0)  # type: ignore[arg-type]
        elif kind == "demand_request":
            prices = dict(request.demand_request.prices)
            wealth = sum(prices.values())
            for good, price in prices.items():
                reply.demand.net_demand[good] = 0.5 * wealth / price - 1.0
        elif kind == "award":
            self.awards.append(request.award.price)
            reply.ack.SetInParent()
        elif kind == "reject":
            self.rejects += 1
            reply.ack.SetInParent()
        elif kind == "custom":
            reply.custom.update({"number": self.value})
        return reply


class Slow(Trader):
    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        await asyncio.sleep(5)
        return await super().coordinate(request)


class Malformed(Trader):
    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if request.HasField("bid_request"):
            return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=math.nan))
        return agent_pb2.CoordinationResponse(vote=agent_pb2.Vote(option="banana"))


@pytest.fixture
async def traders(coordination_mesh: tuple[MeshClient, MeshServer]) -> AsyncIterator[dict[str, Trader]]:
    _, registry = coordination_mesh
    agents = {
        "t10": Trader("t10", 10, "yes"),
        "t20": Trader("t20", 20, "no"),
        "t30": Trader("t30", 30, "yes"),
    }
    host = AgentHost(list(agents.values()), registry=registry.address)
    await host.start()
    yield agents
    await host.stop()


def settings(
    *ids: str, capability: str = "", timeout: float = 1.0, notify: bool = False
) -> coordination_pb2.SessionSettings:
    s = coordination_pb2.SessionSettings(
        participants=common_pb2.AgentSelector(agent_ids=list(ids), capability=capability)
    )
    s.round_timeout.FromNanoseconds(int(timeout * 1e9))
    s.notify_outcome = notify
    return s


async def test_vickrey_with_slow_malformed_and_dead_agents(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, registry = coordination_mesh
    bad = AgentHost([Slow("slow", 99), Malformed("nan", 99)], registry=registry.address)
    await bad.start()
    await client.registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent_id="dead", endpoint="127.0.0.1:9", capabilities=["trade"])
    )
    try:
        reply = await client.coordination.RunAuction(
            coordination_pb2.RunAuctionRequest(
                settings=settings(
                    "t10", "t20", "t30", "slow", "nan", "dead", "ghost", timeout=0.5, notify=True
                ),
                type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                item="slot",
            )
        )
    finally:
        await bad.stop()
    session = reply.session
    assert session.state == coordination_pb2.SESSION_STATE_DECIDED
    assert list(session.outcome.winners) == ["t30"] and session.outcome.price == 20
    reasons = {e.agent_id: e.reason for e in session.excluded}
    assert reasons == {
        "slow": coordination_pb2.EXCLUSION_REASON_TIMEOUT,
        "nan": coordination_pb2.EXCLUSION_REASON_MALFORMED,
        "dead": coordination_pb2.EXCLUSION_REASON_UNAVAILABLE,
        "ghost": coordination_pb2.EXCLUSION_REASON_NOT_REGISTERED,
    }
    assert traders["t30"].awards == [20] and traders["t10"].rejects == 1
    stored = (
        await client.coordination.GetSession(
            coordination_pb2.GetSessionRequest(session_id=session.session_id)
        )
    ).session
    assert stored.outcome == session.outcome and len(stored.rounds) == 2
    bids = {e.agent_id: e.response.bid.amount for e in stored.rounds[0].entries if e.response.HasField("bid")}
    assert bids["t10"] == 10 and bids["t30"] == 30


async def test_first_price_by_capability(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    reply = await client.coordination.RunAuction(
        coordination_pb2.RunAuctionRequest(
            settings=settings(capability="trade"),
            type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item="x",
            reserve_price=5,
        )
    )
    assert list(reply.session.outcome.winners) == ["t30"] and reply.session.outcome.price == 30
    assert sorted(reply.session.participants) == ["t10", "t20", "t30"]


async def test_the_answer_carries_the_transcript_unless_the_basic_view_is_asked(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh

    async def auction(view: int) -> coordination_pb2.Session:
        s = settings(capability="trade")
        s.view = view  # type: ignore[assignment]
        request = coordination_pb2.RunAuctionRequest(
            settings=s, type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE, item="x"
        )
        return (await client.coordination.RunAuction(request)).session

    full = await auction(coordination_pb2.SESSION_VIEW_UNSPECIFIED)
    basic = await auction(coordination_pb2.SESSION_VIEW_BASIC)
    assert len(full.rounds) == 1 and not basic.rounds
    assert basic.outcome == full.outcome and list(basic.outcome.winners) == ["t30"]
    entries = {e.agent_id: e for e in full.rounds[0].entries}
    # Every agent's own request (the engine fills in agent, session and round) and its bid.
    assert {
        a: (e.request.agent_id, e.request.session_id, e.response.bid.amount) for a, e in entries.items()
    } == {a: (a, full.session_id, t.value) for a, t in traders.items()}
    # The transcript is stored all the same.
    stored = (
        await client.coordination.GetSession(coordination_pb2.GetSessionRequest(session_id=basic.session_id))
    ).session
    assert sorted(e.agent_id for e in stored.rounds[0].entries) == sorted(traders)
    with pytest.raises(errors.InvalidArgument, match=r"settings\.view"):
        await auction(77)


async def test_reserve_not_met_is_no_decision(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    reply = await client.coordination.RunAuction(
        coordination_pb2.RunAuctionRequest(
            settings=settings(capability="trade"),
            type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
            item="x",
            reserve_price=50,
        )
    )
    assert (
        reply.session.state == coordination_pb2.SESSION_STATE_NO_DECISION
        and "reserve" in reply.session.outcome.reason
    )


async def test_english_auction_streams_its_rounds(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    request = coordination_pb2.RunAuctionRequest(
        settings=settings("t10", "t20", "t30"),
        type=coordination_pb2.AUCTION_TYPE_ENGLISH,
        item="x",
        start_price=0,
        increment=5,
    )
    request.settings.session_id = "english-1"
    run = asyncio.create_task(client.coordination.RunAuction(request))
    events: list[coordination_pb2.WatchSessionResponse] = []
    for _ in range(100):
        try:
            async for event in client.coordination.WatchSession(
                coordination_pb2.WatchSessionRequest(session_id="english-1")
            ):
                events.append(event)
            break
        except errors.NotFound:
            await asyncio.sleep(0.01)
    session = (await run).session
    # 0, 5, 10, 15, 20 (t10 out), 25 (t20 out at 25 > 20): t30 alone at 25.
    assert list(session.outcome.winners) == ["t30"] and session.outcome.price == 25
    prices = [e.round.state["price"] for e in events if e.type == coordination_pb2.SESSION_EVENT_TYPE_ROUND]
    assert prices == [0, 5, 10, 15, 20, 25]
    assert (
        events[-1].type == coordination_pb2.SESSION_EVENT_TYPE_FINISHED
        and events[-1].session.outcome.price == 25
    )


async def test_dutch_auction(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    reply = await client.coordination.RunAuction(
        coordination_pb2.RunAuctionRequest(
            settings=settings("t10", "t20", "t30"),
            type=coordination_pb2.AUCTION_TYPE_DUTCH,
            item="x",
            start_price=50,
            decrement=10,
        )
    )
    assert list(reply.session.outcome.winners) == ["t30"] and reply.session.outcome.price == 30
    assert reply.session.round_count == 3


async def test_consensus_majority_supermajority_and_malformed_vote(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, registry = coordination_mesh
    reply = await client.coordination.RunConsensus(
        coordination_pb2.RunConsensusRequest(
            settings=settings("t10", "t20", "t30"),
            question="go?",
            rule=coordination_pb2.CONSENSUS_RULE_MAJORITY,
        )
    )
    assert reply.session.outcome.decision == "yes" and reply.session.outcome.tallies["yes"] == 2
    reply = await client.coordination.RunConsensus(
        coordination_pb2.RunConsensusRequest(
            settings=settings("t10", "t20", "t30"),
            question="go?",
            rule=coordination_pb2.CONSENSUS_RULE_SUPERMAJORITY,
            threshold=0.9,
        )
    )
    assert (
        reply.session.state == coordination_pb2.SESSION_STATE_NO_DECISION
        and "threshold" in reply.session.outcome.reason
    )
    weighted = await client.coordination.RunConsensus(
        coordination_pb2.RunConsensusRequest(
            settings=settings("t10", "t20", "t30"),
            question="go?",
            rule=coordination_pb2.CONSENSUS_RULE_MAJORITY,
            weights={"t20": 5},
        )
    )
    assert weighted.session.outcome.decision == "no"
    bad = AgentHost([Malformed("voter", 0)], registry=registry.address)
    await bad.start()
    try:
        reply = await client.coordination.RunConsensus(
            coordination_pb2.RunConsensusRequest(
                settings=settings("t10", "voter"),
                question="go?",
                rule=coordination_pb2.CONSENSUS_RULE_UNANIMITY,
            )
        )
    finally:
        await bad.stop()
    assert reply.session.outcome.decision == "yes"
    assert [(e.agent_id, e.reason) for e in reply.session.excluded] == [
        ("voter", coordination_pb2.EXCLUSION_REASON_MALFORMED)
    ]


async def test_tatonnement_converges_to_the_symmetric_equilibrium(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    reply = await client.coordination.RunMarket(
        coordination_pb2.RunMarketRequest(
            settings=settings("t10", "t20", "t30"),
            type=coordination_pb2.MARKET_TYPE_TATONNEMENT,
            goods=["x", "y"],
            initial_prices={"x": 1.0, "y": 2.0},
            step=0.5,
            tolerance=0.01,
            max_rounds=200,
        )
    )
    outcome = reply.session.outcome
    assert reply.session.state == coordination_pb2.SESSION_STATE_DECIDED, outcome.reason
    # Equal Cobb-Douglas shares and endowments: equilibrium at p_x = p_y.
    assert outcome.prices["x"] == pytest.approx(outcome.prices["y"], rel=0.02)
    capped = await client.coordination.RunMarket(
        coordination_pb2.RunMarketRequest(
            settings=settings("t10", "t20"),
            type=coordination_pb2.MARKET_TYPE_TATONNEMENT,
            goods=["x", "y"],
            initial_prices={"x": 1.0, "y": 5.0},
            max_rounds=2,
        )
    )
    assert (
        capped.session.state == coordination_pb2.SESSION_STATE_NO_DECISION
        and "did not converge" in capped.session.outcome.reason
    )


async def test_call_market_and_contract_net(coordination_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = coordination_mesh
    agents = [
        Trader("b1", 12, side=agent_pb2.ORDER_SIDE_BUY),
        Trader("b2", 8, side=agent_pb2.ORDER_SIDE_BUY),
        Trader("s1", 6, side=agent_pb2.ORDER_SIDE_SELL),
        Trader("s2", 11, side=agent_pb2.ORDER_SIDE_SELL),
    ]
    host = AgentHost(agents, registry=registry.address)
    await host.start()
    try:
        market = await client.coordination.RunMarket(
            coordination_pb2.RunMarketRequest(
                settings=settings("b1", "b2", "s1", "s2"), type=coordination_pb2.MARKET_TYPE_CALL, goods=["w"]
            )
        )
        price = market.session.outcome.price
        trades = json_format.MessageToDict(market.session.outcome.details)["trades"]
        assert {t["agent_id"] for t in trades} == {"b1", "s1"} and 6 <= price <= 12
        cnet = await client.coordination.Run(
            coordination_pb2.RunRequest(
                settings=settings("b1", "b2", "s1", "s2"),
                protocol="contract_net",
                parameters=_struct({"task": "build"}),
            )
        )
        assert list(cnet.session.outcome.winners) == ["s1"] and cnet.session.outcome.price == 6
        assert agents[2].awards == [6] and agents[0].rejects == 1
    finally:
        await host.stop()


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            coordination_pb2.RunAuctionRequest(
                settings=settings("t10"),
                type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                item="x",
                reserve_price=-1,
            ),
            "reserve_price",
        ),
        (
            coordination_pb2.RunAuctionRequest(
                settings=settings(), type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE, item="x"
            ),
            "settings.participants",
        ),
        (coordination_pb2.RunAuctionRequest(settings=settings("t10"), item="x"), "type"),
        (
            coordination_pb2.RunAuctionRequest(
                settings=settings("t10"), type=coordination_pb2.AUCTION_TYPE_ENGLISH, item="x", increment=-1
            ),
            "increment",
        ),
        (
            coordination_pb2.RunConsensusRequest(
                settings=settings("t10"),
                question="q",
                rule=coordination_pb2.CONSENSUS_RULE_SUPERMAJORITY,
                threshold=1.5,
            ),
            "threshold",
        ),
        (
            coordination_pb2.RunConsensusRequest(
                settings=settings("t10"),
                question="q",
                rule=coordination_pb2.CONSENSUS_RULE_MAJORITY,
                quorum=2,
            ),
            "quorum",
        ),
        (
            coordination_pb2.RunMarketRequest(
                settings=settings("t10"), type=coordination_pb2.MARKET_TYPE_TATONNEMENT
            ),
            "goods",
        ),
    ],
)
async def test_bad_parameters_name_the_field(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader], request_: Any, field: str
) -> None:
    client, _ = coordination_mesh
    method = {
        coordination_pb2.RunAuctionRequest: client.coordination.RunAuction,
        coordination_pb2.RunConsensusRequest: client.coordination.RunConsensus,
        coordination_pb2.RunMarketRequest: client.coordination.RunMarket,
    }[type(request_)]
    with pytest.raises(errors.InvalidArgument) as info:
        await method(request_)
    assert info.value.field == field
    listed = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest())
    assert not listed.sessions  # nothing half-written


async def test_unknown_protocol_and_session(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    with pytest.raises(errors.NotFound, match="nope"):
        await client.coordination.Run(coordination_pb2.RunRequest(settings=settings("t10"), protocol="nope"))
    with pytest.raises(errors.NotFound):
        await client.coordination.GetSession(coordination_pb2.GetSessionRequest(session_id="missing"))
    names = {
        p.name
        for p in (await client.coordination.ListProtocols(coordination_pb2.ListProtocolsRequest())).protocols
    }
    assert {
        "first_price",
        "vickrey",
        "english",
        "dutch",
        "contract_net",
        "tatonnement",
        "call_market",
        "consensus",
    } <= names


class HighestNumber(protocol_plugin_pb2_grpc.ProtocolPluginServiceServicer):
    """A protocol served by the test: ask every agent for a number; the highest wins."""

    async def Describe(self, request: Any, context: Any) -> protocol_plugin_pb2.DescribeResponse:
        return protocol_plugin_pb2.DescribeResponse(description="highest number wins")

    async def Advance(
        self, request: protocol_plugin_pb2.AdvanceRequest, context: Any
    ) -> protocol_plugin_pb2.AdvanceResponse:
        if request.round == 0:
            out = protocol_plugin_pb2.AdvanceResponse()
            for agent_id in request.participants:
                out.round.requests.add(agent_id=agent_id).custom.update({"ask": "number"})
            return out
        numbers = {r.agent_id: r.response.custom["number"] for r in request.replies if r.HasField("response")}
        winner = max(numbers, key=lambda a: numbers[a])
        return protocol_plugin_pb2.AdvanceResponse(
            outcome=coordination_pb2.Outcome(decided=True, winners=[winner], price=numbers[winner])
        )


async def test_registered_protocol_runs_among_real_agents(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    server = aio.server()
    protocol_plugin_pb2_grpc.add_ProtocolPluginServiceServicer_to_server(HighestNumber(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await client.coordination.RegisterProtocol(
            coordination_pb2.RegisterProtocolRequest(name="highest", endpoint=f"127.0.0.1:{port}")
        )
        with pytest.raises(errors.AlreadyExists):
            await client.coordination.RegisterProtocol(
                coordination_pb2.RegisterProtocolRequest(name="highest", endpoint=f"127.0.0.1:{port}")
            )
        listed = {
            p.name: p
            for p in (
                await client.coordination.ListProtocols(coordination_pb2.ListProtocolsRequest())
            ).protocols
        }
        assert not listed["highest"].builtin and listed["highest"].description == "highest number wins"
        reply = await client.coordination.Run(
            coordination_pb2.RunRequest(settings=settings(capability="trade"), protocol="highest")
        )
        assert list(reply.session.outcome.winners) == ["t30"] and reply.session.outcome.price == 30
        await client.coordination.UnregisterProtocol(
            coordination_pb2.UnregisterProtocolRequest(name="highest")
        )
        with pytest.raises(errors.NotFound):
            await client.coordination.Run(
                coordination_pb2.RunRequest(settings=settings("t10"), protocol="highest")
            )
    finally:
        await server.stop(0)


async def test_session_never_outlives_its_deadline(coordination_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = coordination_mesh
    host = AgentHost([Slow("s1", 1), Slow("s2", 2)], registry=registry.address)
    await host.start()
    try:
        request = coordination_pb2.RunAuctionRequest(
            settings=settings("s1", "s2", timeout=10),
            type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item="x",
        )
        request.settings.deadline.CopyFrom(duration_pb2.Duration(nanos=500_000_000))
        started = asyncio.get_running_loop().time()
        reply = await client.coordination.RunAuction(request)
        assert asyncio.get_running_loop().time() - started < 3
        assert reply.session.state == coordination_pb2.SESSION_STATE_NO_DECISION
        assert {e.reason for e in reply.session.excluded} == {coordination_pb2.EXCLUSION_REASON_TIMEOUT}
    finally:
        await host.stop()


class Quick(Agent):
    capabilities = ("crowd",)

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=float(self.agent_id[1:])))


async def test_a_thousand_agents_on_one_host(coordination_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = coordination_mesh
    host = AgentHost([Quick(f"q{i:04d}") for i in range(1000)], registry=registry.address, lease_ttl=30)
    await host.start()
    try:
        request = coordination_pb2.RunAuctionRequest(
            settings=settings(capability="crowd", timeout=10),
            type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
            item="x",
        )
        reply = await client.coordination.RunAuction(request)
    finally:
        await host.stop()
    session = reply.session
    assert len(session.participants) == 1000 and not session.excluded
    assert list(session.outcome.winners) == ["q0999"] and session.outcome.price == 998


class Paced(Trader):
    """A trader that takes its time: rounds last long enough for the test to act mid-session."""

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        await asyncio.sleep(0.05)
        return await super().coordinate(request)


async def test_agent_killed_mid_session_is_left_out(coordination_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = coordination_mesh
    rival = AgentHost([Paced("rival", 500)], registry=registry.address)
    await rival.start()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, BIDDER, "--id", "doomed", "--value", "1000", "--registry", registry.address),
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:

        async def registered() -> bool:
            try:
                await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="doomed"))
            except errors.NotFound:
                return False
            return True

        await eventually(registered, timeout=10, what="doomed registered")
        request = coordination_pb2.RunAuctionRequest(
            settings=settings("rival", "doomed", timeout=0.5),
            type=coordination_pb2.AUCTION_TYPE_ENGLISH,
            item="x",
            start_price=0,
            increment=1,
            max_rounds=400,
        )
        request.settings.session_id = "doomed-run"
        request.settings.deadline.FromSeconds(60)
        run = asyncio.create_task(client.coordination.RunAuction(request))
        async for number in _rounds(client, "doomed-run"):
            if number >= 3:
                proc.send_signal(signal.SIGKILL)
                break
        session = (await run).session
    finally:
        with contextlib.suppress(ProcessLookupError):  # already reaped
            proc.kill()
        await proc.wait()
        await rival.stop()
    # Both would stay in up to 500; once "doomed" is gone, the rival is alone and wins.
    assert list(session.outcome.winners) == ["rival"] and session.outcome.price < 500
    doomed = next(e for e in session.excluded if e.agent_id == "doomed")
    assert (
        doomed.reason
        in (coordination_pb2.EXCLUSION_REASON_UNAVAILABLE, coordination_pb2.EXCLUSION_REASON_TIMEOUT)
        and doomed.round >= 3
    )


async def _rounds(client: MeshClient, session_id: str) -> AsyncIterator[int]:
    """Round numbers of a session as they finish (waits for the session to exist)."""
    for _ in range(200):
        try:
            async for event in client.coordination.WatchSession(
                coordination_pb2.WatchSessionRequest(session_id=session_id)
            ):
                if event.type == coordination_pb2.SESSION_EVENT_TYPE_ROUND:
                    yield event.round.number
            return
        except errors.NotFound:
            await asyncio.sleep(0.01)


async def test_list_sessions_filters_and_pages(
    coordination_mesh: tuple[MeshClient, MeshServer], traders: dict[str, Trader]
) -> None:
    client, _ = coordination_mesh
    for i in range(5):
        await client.coordination.RunAuction(
            coordination_pb2.RunAuctionRequest(
                settings=settings("t10", "t20"), type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE, item=f"i{i}"
            )
        )
    await client.coordination.RunConsensus(
        coordination_pb2.RunConsensusRequest(
            settings=settings("t10", "t30"), question="q", rule=coordination_pb2.CONSENSUS_RULE_MAJORITY
        )
    )
    everything = (await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest())).sessions
    assert everything[0].protocol == "consensus"  # newest first
    assert all(not s.rounds for s in everything)  # BASIC view
    seen, token = [], ""
    while True:
        page = await client.coordination.ListSessions(
            coordination_pb2.ListSessionsRequest(protocol="first_price", page_size=2, page_token=token)
        )
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    later = await client.coordination.ListSessions(
        coordination_pb2.ListSessionsRequest(started_after=everything[0].started_at)
    )
    assert [s.session_id for s in later.sessions] == [everything[0].session_id]
    with pytest.raises(errors.InvalidArgument) as info:
        await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(page_size=-3))
    assert info.value.field == "page_size"
    # An agent's coordination history: the sessions it was invited to, newest first, paged.
    history = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(participant="t30"))
    assert [s.session_id for s in history.sessions] == [everything[0].session_id]
    assert not history.next_page_token
    seen, token = [], ""
    while True:
        page = await client.coordination.ListSessions(
            coordination_pb2.ListSessionsRequest(participant="t20", page_size=2, page_token=token)
        )
        assert all("t20" in s.participants for s in page.sessions)
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [s.session_id for s in everything if s.protocol == "first_price"]
    nobody = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(participant="t99"))
    assert not nobody.sessions and not nobody.next_page_token
    with pytest.raises(errors.InvalidArgument) as info:
        await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(participant="not an id"))
    assert info.value.field == "participant"


SLACK_S = 2.0  # past a session's deadline, for a loaded 2-core machine (the client waits 6 s)


async def test_a_session_whose_outcome_cannot_be_stored_ends_at_its_deadline(
    private_etcd: Any, mesh_config: Any, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    """etcd frozen (SIGSTOP) under a session: it answers DEADLINE_EXCEEDED at its deadline, not later."""
    config = await enrolled(dataclasses.replace(mesh_config, etcd_endpoints=(private_etcd.endpoint,)))
    registry = await service("registry", config)
    coordination = await service("coordination", config)
    host = AgentHost([Trader("f1", 1), Trader("f2", 2)], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(coordination=coordination.address)
    loop = asyncio.get_running_loop()
    try:
        request = coordination_pb2.RunAuctionRequest(
            settings=settings("f1", "f2"), type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE, item="x"
        )
        # Well under the ~1 s in which etcd's client may find the frozen connection dead (and fail UNAVAILABLE).
        request.settings.deadline.FromMilliseconds(500)
        assert (await client.coordination.RunAuction(request)).session.outcome.winners == ["f2"]
        await private_etcd.freeze()
        started = loop.time()
        with pytest.raises(errors.DeadlineExceeded) as caught:
            await client.coordination.RunAuction(request, timeout=6)
        elapsed = loop.time() - started
        # At the deadline, not at the client's 6 s: the slack is for a loaded machine's event loops.
        assert elapsed < 0.5 + SLACK_S, f"answered after {elapsed:.2f} s"
        # The first wait that etcd leaves unanswered may be the request_id's record or the session's.
        assert "deadline (0.5 s)" in caught.value.message
        # Without a request_id (a raw stub), the session's own write is what waits.
        private_etcd.kill(signal.SIGCONT)
        assert (await client.coordination.RunAuction(request)).session.outcome.winners == ["f2"]
        await private_etcd.freeze()
        async with mesh_channel(coordination.address) as channel:
            raw = coordination_pb2_grpc.CoordinationServiceStub(channel)
            started = loop.time()
            with pytest.raises(aio.AioRpcError) as failed:
                answered = await raw.RunAuction(request, timeout=6)
                # Not expected: say what came back, and whether etcd was still frozen.
                pytest.fail(
                    f"answered with etcd frozen: {answered.session}; "
                    f"etcd threads all stopped: {process.all_threads_stopped(private_etcd.pid or 0)}"
                )
            elapsed = loop.time() - started
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 0.5 + SLACK_S, elapsed
        err = errors.from_rpc_error(failed.value)
        assert "before its outcome could be stored" in err.message and err.metadata["session_id"]
    finally:
        private_etcd.kill(signal.SIGCONT)
        await client.close()
        await host.stop()
