"""OpenTelemetry wiring shared by every server and client of the mesh.

Tracing is off by default (it costs every call). The standard variables
switch it on: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over gRPC) or
``OTEL_TRACES_EXPORTER=console``; an embedding program may instead install
its own tracer provider (tests install one with an in-memory exporter) and
call :func:`enable`. Health checks are never traced.
"""

from __future__ import annotations

import os
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


def configure(service_name: str) -> None:
    """Install a tracer provider from the standard ``OTEL_*`` environment, when it asks for one.

    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
    sends spans over OTLP/gRPC; ``OTEL_TRACES_EXPORTER=console`` prints them;
    ``OTEL_TRACES_EXPORTER=none`` (or nothing set) leaves tracing off.
    """
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    otlp = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter == "none" or (not exporter and not otlp):
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()  # endpoint, headers, TLS: from the OTEL_* variables
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    enable()


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
# meter provider is installed — by configure() when MABEAM_METRICS_PORT asks for
# a Prometheus endpoint, or by an embedding program (tests install an in-memory
# reader).


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
        self.goals = m.create_counter("mabeam.planner.goals", description="goals finished, by state")


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


def configure_metrics(service_name: str) -> None:
    """Serve Prometheus metrics on MABEAM_METRICS_PORT (off when unset)."""
    port = os.environ.get("MABEAM_METRICS_PORT", "").strip()
    if not port:
        return
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import start_http_server

    start_http_server(int(port), addr=os.environ.get("MABEAM_METRICS_HOST", "127.0.0.1"))
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader()], resource=Resource.create({"service.name": service_name})
    )
    metrics.set_meter_provider(provider)


class TraceIdFilter:
    """A logging filter that puts the current trace id on every record (``%(trace_id)s``)."""

    def filter(self, record: Any) -> bool:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        record.trace_id = f"{context.trace_id:032x}" if context.is_valid else ""
        return True
