"""An AgentHost process of one lab host (``python tests/harness/multihost_agents.py``), for tests/test_multihost.py.

Serves ``--count`` agents ``<host>-a<n>`` on one endpoint bound to ``--bind``
(the host's address, advertised as such), registered through ``--registry``
(the host's own registry replica) with a lease of ``--lease-ttl`` seconds. TLS
as the services have it, from ``MABEAM_TLS_*`` (mutual: it serves with the
mesh's certificate and requires the mesh's CA of callers); the token from
``MABEAM_TOKEN_FILE`` (an agent-role token).

Every agent offers ``bid``, ``compute``, ``on-<host>`` (so a goal can pin a
step to a host) and ``prefer-<h>`` for every host ``h`` of ``--hosts`` (a
step any host may run, its own host's agents cheapest in Contract Net). It
bids a value derived from its id in sealed-bid auctions, proposes it as its
cost in Contract Net (plus 1,000 for a ``prefer-`` step of another host), acknowledges awards and rejections,
and executes a step by returning the sum of the numbers in its input and its
dependencies' sums, with its own id and host; an input ``{"sleep": s}`` first
prints ``step <id> started on <agent>`` and waits ``s`` seconds. Prints ``agents ready on
ADDRESS`` once every agent is registered.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import zlib
from typing import Any

from mabeam import config
from mabeam.agent import Agent, AgentHost, from_value
from mabeam.server import serve_until_signalled
from mabeam.v1 import agent_pb2


def _numbers(data: Any) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, int | float):
        return [float(data)]
    if isinstance(data, list):
        return [n for item in data for n in _numbers(item)]
    if isinstance(data, dict):
        return _numbers(data.get("values", []))
    return []


class HostAgent(Agent):
    """Bids, proposes and computes; see the module docstring."""

    def __init__(self, agent_id: str, host: str, hosts: list[str]) -> None:
        super().__init__(
            agent_id, capabilities=["bid", "compute", f"on-{host}", *(f"prefer-{h}" for h in hosts)]
        )
        self.home = host
        self.value = float(zlib.crc32(agent_id.encode()) % 1000) / 10

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        if request.HasField("bid_request"):
            reply.bid.amount = self.value
        elif request.HasField("task_announcement"):
            # Contract Net for a `prefer-<host>` step: that host's agents are the cheapest.
            preferred = request.task_announcement.task == f"prefer-{self.home}"
            reply.proposal.cost = self.value if preferred else 1000 + self.value
            reply.proposal.quality = 0.5
        elif request.HasField("award") or request.HasField("reject"):
            reply.ack.SetInParent()
        else:
            reply.decline.reason = "host agent: bids, proposals and acknowledgements only"
        return reply

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        data = from_value(request.input) if request.HasField("input") else None
        if isinstance(data, dict) and data.get("sleep"):
            print(f"step {request.step_id} started on {self.agent_id}", flush=True)
            await asyncio.sleep(float(data["sleep"]))
        total = sum(_numbers(data))
        for dep in request.dependency_outputs.values():
            value = from_value(dep)
            if isinstance(value, dict) and isinstance(value.get("sum"), int | float):
                total += float(value["sum"])
        return {"sum": total, "agent": self.agent_id, "host": self.home}


async def main(args: argparse.Namespace) -> None:
    tls = config.load().tls
    hosts = [h for h in args.hosts.split(",") if h]
    agents = [HostAgent(f"{args.host}-a{n}", args.host, hosts) for n in range(args.count)]
    host = AgentHost(
        agents,
        registry=args.registry,
        bind_host=args.bind,
        lease_ttl=args.lease_ttl,
        tls=tls,
        client_tls=tls,
    )
    await host.start()
    print(f"agents ready on {host.address}", flush=True)
    try:
        await serve_until_signalled([])
    finally:
        await host.stop()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("MABEAM_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="the lab host's name (h0, h1, ...)")
    parser.add_argument("--bind", required=True, help="the host's address: bound and advertised")
    parser.add_argument("--registry", required=True, help="the host's registry, ADDRESS:PORT")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--hosts", default="", help="every host of the lab, comma-separated")
    parser.add_argument("--lease-ttl", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
