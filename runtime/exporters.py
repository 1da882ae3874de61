"""Telemetry exporters of the services: where spans and metrics go.

The SDK (:mod:`mabeam.telemetry`) makes spans and metrics through the
OpenTelemetry API; a service process installs the providers and exporters
here, from the standard environment: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP
over gRPC) or ``OTEL_TRACES_EXPORTER=console`` for traces,
``MABEAM_METRICS_PORT`` for a Prometheus endpoint.
"""

from __future__ import annotations

import os

from mabeam import telemetry


def configure_tracing(service_name: str) -> None:
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
    telemetry.enable()


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
