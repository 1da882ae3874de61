"""OpenTelemetry wiring shared by every server and client of the mesh.

Tracing is off by default (it costs every call). It is switched on by the
standard variables: ``OTEL_TRACES_EXPORTER`` set to anything but ``none``
(``console`` works out of the box), or a tracer provider installed by the
embedding program (tests install one with an in-memory exporter) followed by
:func:`enable`. Health checks are never traced.
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
    """Install a tracer provider from the ``OTEL_*`` environment, if it asks for one."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter in ("", "none"):
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
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
