"""``python -m mabeam.health_check HOST:PORT [SERVICE]``: exit 0 when grpc.health.v1 says SERVING.

For container health checks (compose.yaml), where grpcurl is not installed.
:func:`check` takes a :class:`mabeam.tls.TLS` for a service that serves TLS
(``mabeam status --tls-ca``): the CA its certificate chains to, and a client
certificate when it requires one. The command reads them from the variables
the ``mabeam`` command reads (``MABEAM_CLIENT_TLS_CA``, ``_CERT``, ``_KEY``,
``_SERVER_NAME``): with none set it talks plaintext.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mabeam.tls import TLS


def _channel(address: str, tls: TLS | None) -> aio.Channel:
    if tls is None:
        return aio.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return aio.secure_channel(address, tls.channel_credentials(), options=options)


async def check(address: str, service: str = "", timeout: float = 2.0, *, tls: TLS | None = None) -> bool:
    """True when ``service`` at ``address`` reports SERVING; ``tls``: talk TLS to it (None: plaintext)."""
    serving, _ = await probe(address, service, timeout, tls=tls)
    return serving


async def probe(
    address: str, service: str = "", timeout: float = 2.0, *, tls: TLS | None = None
) -> tuple[bool, str]:
    """Like :func:`check`, with why not: ``(False, "NOT_SERVING")``, or the call's error in one line."""
    async with _channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            return False, f"{code.name if code else 'ERROR'}: {(details.splitlines() or [''])[0]}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return True, ""
    return False, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m mabeam.health_check HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    try:
        tls = tls_from_env()
    except ValueError as exc:
        print(f"mabeam.health_check: {exc} (MABEAM_CLIENT_TLS_CERT and _KEY)", file=sys.stderr)
        return 2
    return 0 if asyncio.run(check(args[0], args[1] if len(args) > 1 else "", tls=tls)) else 1


def tls_from_env() -> TLS | None:
    """The client TLS the ``MABEAM_CLIENT_TLS_*`` variables name; None (plaintext) when none is set."""
    ca, cert, key, name = (
        os.environ.get(f"MABEAM_CLIENT_TLS_{v}") or None for v in ("CA", "CERT", "KEY", "SERVER_NAME")
    )
    if not (ca or cert or key or name):
        return None
    return TLS(ca_file=ca, cert_file=cert, key_file=key, server_name=name)


if __name__ == "__main__":
    sys.exit(main())
