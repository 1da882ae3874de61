"""An AgentHost process of many light bidders with a long lease (``python tests/harness/bidder_host.py``).

The load test's agents (:class:`load_host.LoadAgent`: agent n bids
``(n * 7919) % 1009``, capability ``load``) on one endpoint, registered with a
lease TTL of ``--lease-ttl`` seconds (default 60): ten thousand agents on a
slow machine keep their leases with a few hundred refreshes a second, not
thousands. Prints ``agents ready on HOST:PORT`` once all are registered; runs
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from load_host import LoadAgent

from mabeam.agent import AgentHost
from mabeam.server import serve_until_signalled


async def main(args: argparse.Namespace) -> None:
    agents = [LoadAgent(f"{args.prefix}{n:04d}", n, 1) for n in range(args.count)]
    host = AgentHost(agents, registry=args.registry, lease_ttl=args.lease_ttl)
    await host.start()
    print(f"agents ready on {host.address}", flush=True)
    try:
        await serve_until_signalled([])
    finally:
        await host.stop()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("MABEAM_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--prefix", default="big-")
    parser.add_argument("--lease-ttl", type=float, default=60.0)
    asyncio.run(main(parser.parse_args()))
