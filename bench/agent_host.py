"""``python -m mabeam.bench.agent_host``: an AgentHost process for benchmarks.

Serves ``--count`` agents ``<prefix><n>`` on one endpoint, registers them with
the registry and prints ``agents ready on HOST:PORT`` once all are registered.
Every ``--every``-th agent gets ``--capability``, the others ``other``. The
agents bid their index (sealed-bid auctions) and execute steps by echoing
their input. Runs until SIGTERM. A separate process, so the agents' work does
not share the benchmark client's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from mabeam.agent import Agent, AgentHost
from mabeam.server import serve_until_signalled
from mabeam.v1 import agent_pb2


class BenchAgent(Agent):
    """Bids a fixed amount; echoes step input."""

    def __init__(self, agent_id: str, capabilities: list[str], amount: float) -> None:
        super().__init__(agent_id, capabilities=capabilities)
        self.amount = amount

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        if request.HasField("bid_request"):
            reply.bid.amount = self.amount
        elif request.HasField("award") or request.HasField("reject"):
            reply.ack.SetInParent()
        else:
            reply.decline.reason = "bench agent"
        return reply

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"ok": True}

    async def on_message(self, message: agent_pb2.AgentMessage) -> None:
        """Takes every message (publish_1000) and does nothing with it."""


async def main(args: argparse.Namespace) -> None:
    agents = [
        BenchAgent(
            f"{args.prefix}{i:05d}",
            [args.capability if i % args.every == 0 else "other"],
            float(i % 997),
        )
        for i in range(args.count)
    ]
    host = AgentHost(agents, registry=args.registry, lease_ttl=args.lease_ttl)
    await host.start()
    print(f"agents ready on {host.address}", flush=True)
    try:
        await serve_until_signalled([])
    finally:
        await host.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--prefix", default="a")
    parser.add_argument("--capability", default="bench")
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--lease-ttl", type=float, default=60.0)
    asyncio.run(main(parser.parse_args()))
