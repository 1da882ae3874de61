"""``python -m mabeam.health_check HOST:PORT [SERVICE]``: exit 0 when grpc.health.v1 says SERVING.

For container health checks (compose.yaml), where grpcurl is not installed.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(address: str, service: str = "", timeout: float = 2.0) -> bool:
    """True when ``service`` at ``address`` reports SERVING."""
    async with aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m mabeam.health_check HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    return 0 if asyncio.run(check(args[0], args[1] if len(args) > 1 else "")) else 1


if __name__ == "__main__":
    sys.exit(main())
