"""The bidder of ``bidder.py`` over TLS, configured from the environment: the example agent of
``deploy/kubernetes/agent-example.yaml``.

    MABEAM_TLS_CERT=tls.crt MABEAM_TLS_KEY=tls.key MABEAM_TLS_CA=ca.crt \\
    MABEAM_TLS_SERVER_NAME=mabeam-mesh MABEAM_REGISTRY=registry:50051 \\
    MABEAM_TOKEN_FILE=agent.token python3 examples/tls_bidder.py --id bidder-1 --port 7001

The TLS variables are the services' own (``mabeam.config``): the agent serves
``AgentService`` with the certificate (with ``MABEAM_TLS_CA``, callers must
present a certificate of that CA, as the mesh's services do) and calls the
registry over TLS, checking ``MABEAM_TLS_SERVER_NAME`` in its certificate
(the services dial the agent at its advertised pod IP, the agent dials a
Service name: one name in the certificate serves both). Without
``MABEAM_TLS_CERT`` it runs in the clear, like ``bidder.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bidder import Bidder  # the script's folder is on sys.path

from mabeam import config
from mabeam.agent import AgentHost


def main() -> None:
    parser = argparse.ArgumentParser(description="a bidding agent over TLS (env MABEAM_TLS_*)")
    parser.add_argument(
        "--id", default=os.environ.get("MABEAM_AGENT_ID"), help="agent id (env MABEAM_AGENT_ID)"
    )
    parser.add_argument("--value", type=float, default=None, help="private value (env MABEAM_BID_VALUE)")
    parser.add_argument("--registry", default=None, help="registry host:port (env MABEAM_REGISTRY)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any)")
    parser.add_argument(
        "--host",
        default=os.environ.get("MABEAM_AGENT_HOST", "127.0.0.1"),
        help="address to bind (env MABEAM_AGENT_HOST)",
    )
    args = parser.parse_args()
    asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> None:
    """Serve the bidder until SIGINT/SIGTERM (the host is made in the loop that runs it, as grpc.aio wants)."""
    tls = config.load().tls
    host = AgentHost(
        [Bidder(args.id, args.value)],
        registry=args.registry,
        bind_host=args.host,
        port=args.port,
        tls=tls,
        client_tls=tls,
    )
    await host.serve()


if __name__ == "__main__":
    main()
