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
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from mabeam import auth, errors, telemetry
from mabeam import config as mesh_config
from mabeam.config import MeshConfig
from mabeam.runtime import cache, endpoints, etcd, exporters, process
from mabeam.runtime.auth import PrincipalBook
from mabeam.runtime.etcd.maintenance import STORE_HEALTH
from mabeam.server import MeshServer, announce_ready, describe_task, serve_until_signalled

BuildFn = Callable[[MeshServer, Any], Awaitable[None]]

log = logging.getLogger("mabeam.service")


class _JsonFormatter(JsonFormatter):
    """python-json-logger's formatter, with an exception's type and message as fields of their own.

    The traceback is the ``exc_info`` field (one string), so that a record with
    an exception is still one line.
    """

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            log_data["exc_type"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
            log_data["exc_message"] = str(exc)


def json_handler(stream: Any) -> logging.Handler:
    """A handler writing JSON lines to ``stream``: time, level, logger, trace and span ids, message.

    A record with an exception also has ``exc_type``, ``exc_message`` and
    ``exc_info`` (the traceback), each a field of the same line.
    """
    handler = logging.StreamHandler(stream)
    handler.addFilter(telemetry.TraceIdFilter())  # type: ignore[arg-type]
    handler.setFormatter(
        _JsonFormatter(
            "{asctime}{levelname}{name}{trace_id}{span_id}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    return handler


def configure_logging() -> None:
    """JSON lines on stderr (see :func:`json_handler`); Python's warnings go through it too."""
    level = os.environ.get("MABEAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[json_handler(sys.stderr)])
    logging.captureWarnings(True)


def _stdout_is_the_log() -> bool:
    """True when stdout and stderr are the same file and not a terminal (a log file, as under ``mabeam up``)."""
    try:
        out, err = os.fstat(1), os.fstat(2)
    except OSError:
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino) and not os.isatty(1)


def start_failure(kind: str, exc: BaseException, config: MeshConfig) -> str:
    """One line for people saying why ``kind`` could not start, and what to do."""
    if isinstance(exc, mesh_config.ConfigError):
        return f"mabeam {kind}: {exc}"
    if isinstance(etcd.to_mabeam_error(exc), errors.Unavailable):
        where = ",".join(config.etcd_endpoints)
        return (
            f"mabeam {kind}: etcd at {where} is not reachable: start it, or point --etcd "
            "(MABEAM_ETCD) at a running etcd"
        )
    return f"mabeam {kind} could not start: {type(exc).__name__}: {exc}"


async def start_service(
    kind: str, build: BuildFn, config: MeshConfig, *, port: int | None = None
) -> MeshServer:
    """Connect to etcd, build the service ``kind`` and start it; the caller stops it.

    Used by the service entry points, by ``mabeam up`` (in-process) and by tests.
    """
    if not config.etcd_endpoints:
        raise mesh_config.ConfigError(f"{kind}: no etcd endpoints: pass --etcd URL or set MABEAM_ETCD")
    config.check_exposure(f"the {kind} service")
    if config.insecure and not config.loopback_only and (config.tls is None or not config.auth):
        log.warning(
            "%s: --insecure: listening on %s beyond loopback without %s; anyone who reaches it can read or act",
            kind,
            config.host,
            " and ".join(w for w, on in (("TLS", config.tls is not None), ("auth", config.auth)) if not on),
        )
    if not config.auth:
        log.warning(
            "%s: authentication is OFF: any caller that reaches %s may do anything", kind, config.host
        )
    elif not config.token:
        raise mesh_config.ConfigError(
            f"{kind}: auth is on and the service has no service token: pass --token-file "
            "(MABEAM_TOKEN_FILE; `mabeam up` and `mabeam auth init` write service.token), "
            "or run with --no-auth on loopback"
        )
    client = await etcd.connect(config.etcd_endpoints, tls=config.etcd_tls)
    book: PrincipalBook | None = None
    try:
        if config.auth:
            book = PrincipalBook(client, config)
            await book.start()
            own = book.by_token(config.token or "")
            if own is None or own.role != auth.SERVICE:
                raise mesh_config.ConfigError(
                    f"{kind}: the token in --token-file (MABEAM_TOKEN_FILE) is "
                    + (
                        "not a service token"
                        if own is not None
                        else "unknown to this mesh (revoked, or another etcd prefix)"
                    )
                    + ": `mabeam auth init` writes a valid one"
                )
    except BaseException:
        if book is not None:
            await book.stop()
        with contextlib.suppress(Exception):
            await client.close()
        raise
    # etcd's NOSPACE alarm, checked every few seconds and at once after a write
    # refused for lack of space: the health name STORE_HEALTH says whether etcd
    # accepts writes (docs/operations.md).
    alarm_watch = etcd.AlarmWatch(client)

    def map_error(exc: BaseException) -> errors.MabeamError | None:
        mapped = etcd.to_mabeam_error(exc)
        if isinstance(mapped, errors.ResourceExhausted):
            alarm_watch.check_soon()
        return mapped

    server = MeshServer(
        kind,
        config,
        error_mapper=map_error,
        authorizer=auth.Authorizer(book) if book is not None else None,
    )
    _report_store_health(server, alarm_watch)

    async def close_client() -> None:
        await alarm_watch.stop()
        if book is not None:
            await book.stop()
        with contextlib.suppress(Exception):
            await client.close()

    server.on_stop(close_client)
    try:
        if book is not None:
            cache.report_health(server, book.cache)
        await build(server, client)
        await server.start(port)
        cache.republish_health(server)  # a cache that broke since build() makes it NOT_SERVING
        await endpoints.publish(server, client)
        alarm_watch.start()
    except BaseException:
        await server.stop(0)
        raise
    return server


def _report_store_health(server: MeshServer, watch: etcd.AlarmWatch) -> None:
    """Keep ``server``'s health name STORE_HEALTH in step with etcd's NOSPACE alarm."""
    pending: set[asyncio.Task[None]] = set()

    def on_alarms(_active: object) -> None:
        task = asyncio.get_running_loop().create_task(server.set_health(STORE_HEALTH, not watch.nospace))
        pending.add(task)
        task.add_done_callback(pending.discard)

    watch.add_listener(on_alarms)
    on_alarms(())


def run_service(
    kind: str,
    build: BuildFn,
    argv: Sequence[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    configure: Callable[[argparse.Namespace], BuildFn] | None = None,
) -> int:
    """Entry point of ``python -m mabeam.services.<kind>``: serve until SIGTERM/SIGINT.

    A service with flags of its own adds them with ``add_arguments``;
    ``configure`` turns the parsed flags into the build function to use (a
    ConfigError from it is one line and exit status 2, as a bad mesh flag).
    """
    parser = argparse.ArgumentParser(prog=f"mabeam-{kind}", description=f"the mabeam {kind} service")
    mesh_config.add_mesh_arguments(parser, services=(kind,))
    parser.add_argument("--port", type=int, help=f"alias of --{kind}-port")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.port is not None:
        setattr(args, f"{kind}_port", args.port)
    # Taken now, so that no process this service starts inherits its parent's ready file.
    ready_file = os.environ.pop(process.READY_FILE_ENV, None)
    configure_logging()
    try:
        config = mesh_config.load(args)
        if configure is not None:
            build = configure(args)
    except mesh_config.ConfigError as exc:
        log.error("mabeam %s: %s", kind, exc)
        return 2
    exporters.configure_tracing(service_name=f"mabeam-{kind}")
    exporters.configure_metrics(service_name=f"mabeam-{kind}")

    async def main() -> int:
        try:
            server = await start_service(kind, build, config)
        except Exception as exc:
            # One record, the traceback a field of it: the log stays JSON lines,
            # and whoever started this process reads one line for people.
            log.critical("%s", start_failure(kind, exc, config), exc_info=exc)
            return 2 if isinstance(exc, mesh_config.ConfigError) else 1
        # The structured signal for the process that started this one (MABEAM_READY_FILE).
        announce_ready(server.address, ready_file)
        log.info("mabeam %s serving on %s", kind, server.address, extra={"address": server.address})
        if not _stdout_is_the_log():
            # The line for people (and compose logs) where stdout is not the JSON log.
            print(f"mabeam {kind} serving on {server.address}", flush=True)
        # `kill -USR1 PID`: every task of this process and where it waits, in the log.
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_tasks)
        await serve_until_signalled([server])
        return 0

    return asyncio.run(main())


def log_tasks() -> None:
    """Log every asyncio task of this process with the stack it waits on (for a service that hangs)."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    log.warning("%d asyncio tasks (SIGUSR1):\n%s", len(tasks), "".join(describe_task(t) for t in tasks))
