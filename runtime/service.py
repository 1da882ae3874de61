"""What the four services stand on beyond the shared server bootstrap.

:func:`start_service` connects to etcd, builds a service on a
:class:`mabeam.server.MeshServer` (with etcd's errors mapped to statuses),
starts it and publishes its endpoint for discovery. :func:`run_service` is
the entry point of ``python -m mabeam.services.<kind>``: flags and
environment, JSON logs, telemetry exporters, signals, and the ready file
(:func:`mabeam.server.announce_ready`) once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from mabeam import config as mesh_config
from mabeam import telemetry
from mabeam.config import MeshConfig
from mabeam.runtime import endpoints, etcd, exporters, process
from mabeam.server import MeshServer, announce_ready, serve_until_signalled

BuildFn = Callable[[MeshServer, Any], Awaitable[None]]


def configure_logging() -> None:
    """JSON lines on stderr: time, level, logger, message, the trace id, and exceptions as fields."""
    level = os.environ.get("MABEAM_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(telemetry.TraceIdFilter())  # type: ignore[arg-type]
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{trace_id}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])


async def start_service(
    kind: str, build: BuildFn, config: MeshConfig, *, port: int | None = None
) -> MeshServer:
    """Connect to etcd, build the service ``kind`` and start it; the caller stops it.

    Used by the service entry points, by ``mabeam up`` (in-process) and by tests.
    """
    if not config.etcd_endpoints:
        raise mesh_config.ConfigError(f"{kind}: no etcd endpoints: pass --etcd URL or set MABEAM_ETCD")
    client = await etcd.connect(config.etcd_endpoints, tls=config.etcd_tls)
    server = MeshServer(kind, config, error_mapper=etcd.to_mabeam_error)

    async def close_client() -> None:
        with contextlib.suppress(Exception):
            await client.close()

    server.on_stop(close_client)
    try:
        await build(server, client)
        await server.start(port)
        await endpoints.publish(server, client)
    except BaseException:
        await server.stop(0)
        raise
    return server


def run_service(kind: str, build: BuildFn, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mabeam.services.<kind>``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog=f"mabeam-{kind}", description=f"the mabeam {kind} service")
    mesh_config.add_mesh_arguments(parser, services=(kind,))
    parser.add_argument("--port", type=int, help=f"alias of --{kind}-port")
    args = parser.parse_args(argv)
    if args.port is not None:
        setattr(args, f"{kind}_port", args.port)
    # Taken now, so that no process this service starts inherits its parent's ready file.
    ready_file = os.environ.pop(process.READY_FILE_ENV, None)
    configure_logging()
    try:
        config = mesh_config.load(args)
    except mesh_config.ConfigError as exc:
        print(f"mabeam {kind}: {exc}", file=sys.stderr)
        return 2
    exporters.configure_tracing(service_name=f"mabeam-{kind}")
    exporters.configure_metrics(service_name=f"mabeam-{kind}")

    async def main() -> int:
        try:
            server = await start_service(kind, build, config)
        except mesh_config.ConfigError as exc:
            print(f"mabeam {kind}: {exc}", file=sys.stderr)
            return 2
        # The structured signal for the process that started this one (MABEAM_READY_FILE);
        # the line is for people (and compose logs), nothing parses it for readiness.
        announce_ready(server.address, ready_file)
        print(f"mabeam {kind} serving on {server.address}", flush=True)
        await serve_until_signalled([server])
        return 0

    return asyncio.run(main())
