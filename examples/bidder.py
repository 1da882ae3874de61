"""An agent that takes part in auctions, markets and votes, with a private value.

    python3 examples/bidder.py --id bidder-1 --value 42 --registry 127.0.0.1:50051

It bids its value in sealed-bid auctions (truthful: optimal in a Vickrey
auction), stays in an English auction while the price is below its value,
takes a Dutch offer once the price falls to its value, proposes its value as
its cost in Contract Net, votes for ``--vote`` (default the first option) and
reports Cobb-Douglas demand in a tatonnement market. ``--value`` defaults to
``MABEAM_BID_VALUE``, then to a number derived from the id.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import zlib

from mabeam.agent import Agent
from mabeam.v1 import agent_pb2


class Bidder(Agent):
    """Bids its private value; see the module docstring for each protocol."""

    capabilities = ("bid", "vote", "trade")

    def __init__(
        self, agent_id: str | None = None, value: float | None = None, vote: str | None = None
    ) -> None:
        super().__init__(agent_id)
        if value is None:
            raw = os.environ.get("MABEAM_BID_VALUE")
            value = float(raw) if raw else float(zlib.crc32(self.agent_id.encode()) % 1000) / 10
        self.value = value
        self.vote = vote or os.environ.get("MABEAM_VOTE") or ""
        self.wins = 0

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        kind = request.WhichOneof("message")
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        if kind == "bid_request":
            reply.bid.amount = self.value
        elif kind == "price_quote":
            reply.price_answer.accept = request.price_quote.price <= self.value
        elif kind == "task_announcement":
            reply.proposal.cost = self.value
        elif kind == "vote_request":
            options = list(request.vote_request.options)
            reply.vote.option = self.vote if self.vote in options else (options[0] if options else "")
        elif kind == "demand_request":
            # Cobb-Douglas with equal shares over the goods, endowment 1 of each:
            # demand_g = share * wealth / p_g, net = demand - endowment.
            prices = dict(request.demand_request.prices)
            wealth = sum(prices.values())
            share = 1.0 / max(len(prices), 1)
            for good, price in prices.items():
                reply.demand.net_demand[good] = share * wealth / price - 1.0
        elif kind == "order_request":
            side = (
                agent_pb2.ORDER_SIDE_BUY
                if zlib.crc32(self.agent_id.encode()) % 2
                else agent_pb2.ORDER_SIDE_SELL
            )
            reply.orders.orders.add(side=side, price=self.value, quantity=1.0)
        elif kind == "award":
            self.wins += 1
            reply.ack.SetInParent()
        elif kind == "reject":
            reply.ack.SetInParent()
        else:
            reply.decline.reason = f"bidder does not answer {kind}"
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description="a bidding agent")
    parser.add_argument(
        "--id", default=os.environ.get("MABEAM_AGENT_ID"), help="agent id (env MABEAM_AGENT_ID)"
    )
    parser.add_argument("--value", type=float, default=None, help="private value (env MABEAM_BID_VALUE)")
    parser.add_argument("--vote", default=None, help="option to vote for (env MABEAM_VOTE)")
    parser.add_argument("--registry", default=None, help="registry host:port (env MABEAM_REGISTRY)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any)")
    parser.add_argument(
        "--host",
        default=os.environ.get("MABEAM_AGENT_HOST", "127.0.0.1"),
        help="address to bind (env MABEAM_AGENT_HOST)",
    )
    parser.add_argument("--lease-ttl", type=float, default=5.0, help="registration lease TTL in seconds")
    args = parser.parse_args()
    agent = Bidder(args.id, args.value, args.vote)
    asyncio.run(agent.serve(registry=args.registry, host=args.host, port=args.port, lease_ttl=args.lease_ttl))


if __name__ == "__main__":
    main()
