"""A plain grpc.aio server with one unary method and no mabeam code: the raw baseline.

``python -m mabeam.bench.ping_server`` prints ``ping serving on HOST:PORT`` and
serves ``/mabeam.bench.Ping/Ping`` (bytes in, the same bytes out, no protobuf)
until SIGTERM. Benchmarks run it as a separate process, as the services are.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from grpc import aio

PING_METHOD = "/mabeam.bench.Ping/Ping"


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "mabeam.bench.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(_echo)}
    )


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    server = aio.server(options=(("grpc.so_reuseport", 0),))
    server.add_generic_rpc_handlers((_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"ping serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
