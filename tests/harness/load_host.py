"""An AgentHost process for the load test (``python tests/harness/load_host.py``).

Serves ``--count`` agents ``<prefix><n>`` on one endpoint with the SDK's
default lease TTL (or ``--lease-ttl`` seconds: ten thousand agents on a slow
machine keep 60 s leases with a few hundred refreshes a second), registers them and prints ``agents ready on HOST:PORT``.
Agent n has the capabilities ``load`` and ``load-g<k>`` where k is its global
index (``--first`` + n) modulo ``--groups``, so a group spans every host.
Every agent bids in sealed-bid auctions, proposes in Contract Net (the
planner's auction strategy), acknowledges awards and rejections, and executes
steps by echoing its input.

On SIGTERM it prints one JSON line before it deregisters its agents and
exits: the host's heartbeat figures (:class:`mabeam.agent.HeartbeatStats`,
with every kept round trip in milliseconds) and how many protocol messages
and steps its agents handled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from mabeam.agent import Agent, AgentHost
from mabeam.server import serve_until_signalled
from mabeam.v1 import agent_pb2


class LoadAgent(Agent):
    """A light agent: answers every protocol message at once, echoes steps."""

    handled = 0
    steps = 0

    def __init__(self, agent_id: str, index: int, groups: int) -> None:
        super().__init__(agent_id, capabilities=["load", f"load-g{index % groups}"])
        self.index = index

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        LoadAgent.handled += 1
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        if request.HasField("bid_request"):
            reply.bid.amount = float((self.index * 7919) % 1009)
        elif request.HasField("task_announcement"):
            reply.proposal.cost = float((self.index * 104729) % 997)
            reply.proposal.quality = 0.5
        elif request.HasField("award") or request.HasField("reject"):
            reply.ack.SetInParent()
        else:
            reply.decline.reason = "load agent: bids, proposals and acknowledgements only"
        return reply

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        LoadAgent.steps += 1
        await asyncio.sleep(0)
        return {"agent": self.agent_id, "step": request.step_id}


async def main(args: argparse.Namespace) -> None:
    agents = [LoadAgent(f"{args.prefix}{n:04d}", args.first + n, args.groups) for n in range(args.count)]
    host = AgentHost(
        agents, registry=args.registry, **({"lease_ttl": args.lease_ttl} if args.lease_ttl else {})
    )
    await host.start()
    print(f"agents ready on {host.address}", flush=True)
    try:
        await serve_until_signalled([])
        stats = host.heartbeat_stats
        report = {
            "heartbeats": stats.summary(),
            "latencies_ms": [round(s * 1000, 2) for s in stats.latencies],
            "coordinate_handled": LoadAgent.handled,
            "steps_executed": LoadAgent.steps,
        }
        print(json.dumps(report), flush=True)
    finally:
        await host.stop()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("MABEAM_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--count", type=int, default=250)
    parser.add_argument("--first", type=int, default=0, help="global index of this host's first agent")
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--prefix", default="load-")
    parser.add_argument("--lease-ttl", type=float, help="lease TTL of every agent (default: the SDK's)")
    asyncio.run(main(parser.parse_args()))
