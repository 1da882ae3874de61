"""OpenTelemetry wiring shared by every server and client of the mesh.

Only the OpenTelemetry API and the gRPC instrumentation are used here, and
only once tracing is on: exporters and providers are the business of the
program (the services install them from the standard ``OTEL_*`` variables,
:mod:`mabeam.runtime.exporters`). Tracing is off by default (it costs every
call); an embedding program installs its own tracer provider (tests install
one with an in-memory exporter) and calls :func:`enable`. Health checks are
never traced.
"""

from __future__ import annotations

from typing import Any

_enabled = False

_HEALTH_FILTER_PREFIX = "grpc.health.v1.Health"


def enable() -> None:
    """Trace every server and client created from now on in this process."""
    global _enabled
    _enabled = True


def disable() -> None:
    """Stop adding tracing interceptors to servers and clients created from now on."""
    global _enabled
    _enabled = False


def enabled() -> bool:
    """True when servers and clients created now get tracing interceptors."""
    return _enabled


def _health_filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.service_name(_HEALTH_FILTER_PREFIX))


def server_interceptors() -> list[Any]:
    """The aio server interceptors for tracing (none when tracing is off)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_health_filter())]


def client_interceptors() -> list[Any]:
    """The aio client interceptors for tracing (none when tracing is off)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_health_filter()))


# -- metrics -------------------------------------------------------------------------
#
# Instruments come from the OpenTelemetry API: they cost next to nothing until a
# meter provider is installed — by the services' exporters
# (mabeam.runtime.exporters) when MABEAM_METRICS_PORT asks for a Prometheus
# endpoint, or by an embedding program (tests install an in-memory reader).


def meter() -> Any:
    """The mesh's meter."""
    from opentelemetry import metrics

    return metrics.get_meter("mabeam")


class _Instruments:
    """The mesh's instruments, created once per process."""

    def __init__(self) -> None:
        m = meter()
        self.rpc_duration = m.create_histogram(
            "mabeam.rpc.server.duration", unit="s", description="time to answer an RPC"
        )
        self.rpc_calls = m.create_counter(
            "mabeam.rpc.server.calls", description="RPCs answered, by method and status"
        )
        self.sessions = m.create_counter(
            "mabeam.coordination.sessions",
            description="coordination sessions finished, by protocol and state",
        )
        self.session_duration = m.create_histogram(
            "mabeam.coordination.session.duration",
            unit="s",
            description="how long a finished session ran (its replica's monotonic clock), by protocol and state",
        )
        self.session_participants = m.create_histogram(
            "mabeam.coordination.session.participants",
            description="agents invited to a finished session, by protocol",
        )
        self.exclusions = m.create_counter(
            "mabeam.coordination.exclusions",
            description="agents excluded from sessions, by protocol and reason",
        )
        self.variable_coordinations = m.create_counter(
            "mabeam.orchestrator.coordinations",
            description="variables coordinated (CoordinateVariable, CoordinateSystem, adaptation), by trigger "
            "and result (written, not_written, failed)",
        )
        self.variable_coordination_duration = m.create_histogram(
            "mabeam.orchestrator.coordination.duration",
            unit="s",
            description="time to coordinate a variable (the protocol's run and the write), by trigger",
        )
        self.goals = m.create_counter("mabeam.planner.goals", description="goals finished, by state")
        self.watch_cut = m.create_counter(
            "mabeam.watch.cut",
            description="Watch* streams ended because their consumer fell behind the per-stream limit, by method",
        )


_instruments: _Instruments | None = None


def instruments() -> _Instruments:
    """The shared instruments (created on first use)."""
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def observe(name: str, description: str, read: Any) -> None:
    """An observable gauge: ``read()`` gives the current value when metrics are collected."""
    from opentelemetry.metrics import Observation

    meter().create_observable_gauge(
        name, callbacks=[lambda options: [Observation(read())]], description=description
    )


class TraceIdFilter:
    """A logging filter that puts the current trace and span ids on every record.

    ``%(trace_id)s`` and ``%(span_id)s``: empty outside a span (or with tracing off).
    """

    def filter(self, record: Any) -> bool:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        record.trace_id = f"{context.trace_id:032x}" if context.is_valid else ""
        record.span_id = f"{context.span_id:016x}" if context.is_valid else ""
        return True
