"""The one server bootstrap of the mesh, used by the four services and by agents.

A :class:`MeshServer` is a ``grpc.aio`` server with, always:

* the error interceptor: exceptions from :mod:`mabeam.errors` become gRPC
  statuses with rich details; etcd being unreachable becomes ``UNAVAILABLE``;
  anything else becomes ``INTERNAL`` and is logged — a handler's bug never
  takes the server down;
* ``grpc.health.v1.Health`` (overall and per service) and server reflection,
  so ``grpcurl -plaintext HOST:PORT list`` works with no proto files;
* optional TLS / mutual TLS from :class:`mabeam.tls.TLS`;
* ownership of background tasks (:meth:`MeshServer.spawn`): they are cancelled
  and awaited on :meth:`MeshServer.stop`, so nothing outlives the server;
* graceful stop: health goes NOT_SERVING, the withdrawal callbacks run (a
  service deletes its discovery endpoint there, so clients stop picking it),
  then in-flight calls get ``grace`` seconds, then the stop callbacks run;
* with ``MeshConfig.health_port`` (``--health-port``, ``MABEAM_HEALTH_PORT``),
  a second listener on the same host serving ``grpc.health.v1.Health`` alone
  (the same servicer, so the same statuses), in plaintext even with TLS on and
  without auth, for Kubernetes' gRPC probes, which speak no TLS. No reflection
  and no mesh service there (UNIMPLEMENTED). It stops with the server, after
  the grace period, during which it answers NOT_SERVING.

It knows nothing of etcd: what the four services add (the etcd connection,
publication of the address for discovery, etcd's errors, the entry point)
is :mod:`mabeam.runtime.service`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mabeam import auth, telemetry
from mabeam import config as mesh_config
from mabeam._interceptor import ErrorInterceptor, ErrorMapper
from mabeam._interceptor import to_mabeam_error as to_mabeam_error  # part of this module's API
from mabeam.client import MeshClient
from mabeam.config import MeshConfig

log = logging.getLogger("mabeam.server")

# Each step of MeshServer.stop (a withdrawal, the drain beyond its grace, the tasks, a stop callback)
# gets this long before it is logged and given up on.
STOP_STEP_LIMIT_S = 10.0

# The shortest interval between keep-alive pings a server accepts, calls or
# not. grpc's default (5 minutes, and no pings at all on an idle connection)
# answers the SDK's pings (every 10 s, idle too: mabeam.client.CHANNEL_OPTIONS)
# with GOAWAY "too_many_pings", which broke idle channels and a heartbeat
# stream. A client of any language with grpc's defaults sends no pings at all.
MIN_PING_INTERVAL_MS = 5_000

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # grpc enables SO_REUSEPORT by default on Linux, which lets a second server
    # bind a port that is in use without any error; the mesh wants the error.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
)


class PortInUse(mesh_config.ConfigError):
    """The port asked for is taken."""


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (checked before grpc binds, for a clear error)."""
    if port == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # grpc binds with SO_REUSEADDR: a port in TIME_WAIT is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# A process that starts a server (mabeam up, a supervisor) passes a path here
# and waits for the file (mabeam.runtime.process.ReadyFile): a structured
# readiness signal instead of a line of output to parse.
READY_FILE_ENV = "MABEAM_READY_FILE"


def announce_ready(address: str, path: str | None = None) -> None:
    """Tell the process that started this one that it serves: ``{"address", "pid"}`` in its ready file.

    ``path`` defaults to ``$MABEAM_READY_FILE``, which is then unset so that
    processes this one starts do not write to its parent's file. The document
    is renamed into place, so it appears whole. Does nothing when no parent asked.
    """
    if path is None:
        path = os.environ.pop(READY_FILE_ENV, None)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"address": address, "pid": os.getpid()}, f)
    os.replace(tmp, path)


class MeshServer:
    """A grpc.aio server with health, reflection, error mapping, TLS and owned tasks.

    Example::

        server = MeshServer("registry", config)
        server.add_service("mabeam.v1.RegistryService",
                           registry_pb2_grpc.add_RegistryServiceServicer_to_server, servicer)
        port = await server.start(port=0)
        ...
        await server.stop()
    """

    def __init__(
        self,
        kind: str,
        config: MeshConfig,
        *,
        instance_id: str | None = None,
        interceptors: Sequence[aio.ServerInterceptor] = (),
        error_mapper: ErrorMapper | None = None,
        authorizer: auth.Authorizer | None = None,
    ) -> None:
        self.kind = kind
        self.config = config
        self.instance_id = (
            instance_id or f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self._interceptors = [
            *telemetry.server_interceptors(),
            ErrorInterceptor(error_mapper, kind, authorizer),
            *interceptors,
        ]
        self._server = aio.server(interceptors=self._interceptors, options=SERVER_OPTIONS)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # The plaintext health-only listener (config.health_port), made in start().
        self._health_server: aio.Server | None = None
        self.health_port = 0
        self.authorizer = authorizer
        self._service_names: list[str] = []
        # full service name -> the servicer serving it (for tests and task dumps)
        self.servicers: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_withdraw: list[Callable[[], Awaitable[None]]] = []
        self._started = False
        self._stopped = False
        self.port = 0
        self.address = ""

    @property
    def grpc_server(self) -> aio.Server:
        """The underlying grpc.aio server."""
        return self._server

    async def connect_mesh(self) -> MeshClient:
        """A client of the other services as this server: found through its etcd, with its client
        TLS and its token (the caller closes it)."""
        config = self.config
        return await MeshClient.connect(
            etcd=list(config.etcd_endpoints),
            prefix=config.prefix,
            tls=config.client_tls(),
            token=config.token or "",
            etcd_tls=config.etcd_tls,
        )

    def add_service(self, full_name: str, add_fn: Callable[[Any, aio.Server], None], servicer: Any) -> None:
        """Serve ``servicer`` (added with the generated ``add_..._to_server``) as ``full_name``."""
        add_fn(servicer, self._server)
        self._service_names.append(full_name)
        self.servicers[full_name] = servicer

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` on stop, once calls have ended (the last added runs first)."""
        self._on_stop.append(callback)

    def on_withdraw(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` on stop before the grace period: health is NOT_SERVING, calls still run.

        For what tells clients to go elsewhere (the discovery endpoint), so that
        no new call arrives while the calls in flight drain.
        """
        self._on_withdraw.append(callback)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task owned by this server: cancelled and awaited on stop.

        A task that dies with an exception is logged, not silently lost.
        """
        task = asyncio.create_task(coro, name=f"{self.kind}:{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", t.get_name(), exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def start(self, port: int | None = None) -> int:
        """Bind and start serving; returns the bound port (``port=0`` picks a free one)."""
        if port is None:
            port = self.config.port(self.kind) if self.kind in self.config.ports else 0
        host = self.config.host
        if not port_is_free(host, port):
            raise PortInUse(
                f"port {port} is already in use: choose another with --{self.kind}-port "
                f"or MABEAM_{self.kind.upper()}_PORT"
            )
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        health_port = self.config.health_port
        if health_port and health_port == port:
            raise mesh_config.ConfigError(
                f"--health-port (MABEAM_HEALTH_PORT) {health_port} is the {self.kind} port itself: "
                "the health listener needs a port of its own"
            )
        if health_port and not port_is_free(host, health_port):
            raise PortInUse(
                f"port {health_port} is already in use: choose another with --health-port "
                "or MABEAM_HEALTH_PORT"
            )
        bind = _bind_address(host, port)
        try:
            if self.config.tls is not None:
                bound = self._server.add_secure_port(bind, self.config.tls.server_credentials())
            else:
                bound = self._server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise PortInUse(
                f"cannot listen on {bind} ({exc}): choose another port with --{self.kind}-port"
            ) from None
        health_server = self._health_listener(host, health_port, bound) if health_port else None
        await self._server.start()
        self._started = True
        if health_server is not None:
            await health_server.start()
            self._health_server = health_server
            self.health_port = health_port
            log.info(
                "%s: plaintext health port %s: grpc.health.v1.Health only, no TLS and no auth even "
                "beyond loopback (it reveals only SERVING/NOT_SERVING per service name)",
                self.kind,
                _bind_address(host, health_port),
            )
        self.port = bound
        self.address = f"{self.config.published_host}:{bound}"
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self._service_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s", self.kind, self.address)
        return bound

    def _health_listener(self, host: str, port: int, main_port: int) -> aio.Server:
        """A server with this server's health servicer alone, bound in plaintext to ``host:port``."""
        server = aio.server(options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bind = _bind_address(host, port)
        try:
            server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise PortInUse(
                f"cannot listen on {bind} ({exc}): choose another port with --health-port "
                f"(MABEAM_HEALTH_PORT); the {self.kind} port is {main_port}"
            ) from None
        return server

    async def set_serving(self, serving: bool) -> None:
        """Report the server as (not) serving on every health check name."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            await self._health.set(name, status)

    async def set_health(self, name: str, serving: bool) -> None:
        """Report the health check name ``name`` alone (a signal of its own, e.g. ``mabeam.store``)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully; safe to call twice.

        Every step is bounded (STOP_STEP_LIMIT_S beyond the grace period): a
        step that overruns (an etcd call nobody answers, a task that ignores
        its cancellation) is logged with its stack and left cancelled, so a
        stopping service always ends.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace if grace is None else grace
        if self._started:
            await self._health.enter_graceful_shutdown()
        # Withdraw first, then drain: a client that resolves this replica during
        # the grace period would otherwise send it calls it is about to refuse.
        for callback in self._on_withdraw:
            await self._stop_step(_callback_name(callback), callback())
        if self._started:
            await self._stop_step("the gRPC server's stop", self._server.stop(grace), grace)
        if self._health_server is not None:
            # After the drain: probes read NOT_SERVING here throughout the grace period.
            await self._stop_step("the health port's stop", self._health_server.stop(0))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await self._stop_step(
                "the background tasks", asyncio.gather(*self._tasks, return_exceptions=True)
            )
        for callback in reversed(self._on_stop):
            await self._stop_step(_callback_name(callback), callback())

    async def _stop_step(self, what: str, step: Awaitable[Any], extra: float = 0.0) -> None:
        """Await one step of :meth:`stop` for at most STOP_STEP_LIMIT_S (+ ``extra``); log, never raise."""
        task = asyncio.ensure_future(step)
        try:
            done, _ = await asyncio.wait({task}, timeout=STOP_STEP_LIMIT_S + extra)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: stopping: %s failed", self.kind, what, exc_info=task.exception())
            return
        stuck = [task, *(t for t in self._tasks if not t.done())]
        log.error(
            "%s: stopping: %s did not end within %g s; given up on (cancelled). Still running:\n%s",
            self.kind,
            what,
            STOP_STEP_LIMIT_S + extra,
            "".join(describe_task(t) for t in stuck),
        )
        task.cancel()

    async def wait_for_termination(self) -> None:
        """Wait until the server stops."""
        await self._server.wait_for_termination()


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _callback_name(callback: Callable[..., Any]) -> str:
    return getattr(callback, "__qualname__", None) or repr(callback)


def describe_task(task: asyncio.Future[Any], limit: int = 24) -> str:
    """A task's name and the chain of awaits it is suspended in, outermost first (for the log of
    a stop step that overran, or of a service asked with SIGUSR1); ``Task.print_stack`` shows
    one frame of a suspended task, and fails on grpc's compiled coroutines."""
    if not isinstance(task, asyncio.Task):
        return f"future {task!r}\n"
    lines = [f"task {task.get_name()}:"]
    awaited: Any = task.get_coro()
    while awaited is not None and len(lines) <= limit:
        frame = next(
            (f for f in (getattr(awaited, a, None) for a in ("cr_frame", "gi_frame", "ag_frame")) if f), None
        )
        if frame is None:
            lines.append(f"  awaiting {awaited!r:.200}")
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno or '?'} in {frame.f_code.co_name}")
        awaited = next(
            (n for n in (getattr(awaited, a, None) for a in ("cr_await", "gi_yieldfrom", "ag_await")) if n),
            None,
        )
    return "\n".join(lines) + "\n"


async def serve_until_signalled(
    servers: Sequence[MeshServer], stop_event: asyncio.Event | None = None
) -> None:
    """Wait for SIGINT/SIGTERM (or ``stop_event``), then stop ``servers`` gracefully."""
    event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    try:
        await event.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
