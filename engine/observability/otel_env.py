"""Exporters from the standard OTEL_* variables, for `stepline` commands.

A library never installs a provider; the `stepline worker`/`serve`/`dev`
commands do (through `configure_logging`), from the variables the
OpenTelemetry SDKs read everywhere:

* OTEL_SDK_DISABLED=true: nothing is installed, and Stepline records no span
  nor metric even through a provider given to `use_tracer_provider`
  (engine/observability/tracing.py reads it too).
* OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER: `otlp`, `console` or `none`;
  OTEL_EXPORTER_OTLP_ENDPOINT (or a per-signal endpoint) alone means `otlp`.
* OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES: the resource (default
  service.name "stepline").
* OTEL_PROPAGATORS is read by the API itself (`opentelemetry.propagate`),
  which Stepline injects and extracts through; nothing to install here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import metrics, trace

from stepline.observability.tracing import (
    global_meter_provider,
    global_tracer_provider,
    sdk_disabled,
)

_log = logging.getLogger(__name__)

__all__ = ["configure_from_env"]



def configure_from_env(service_name: str = "stepline") -> None:
    """Install exporters from the standard OTEL_* variables, for `stepline` commands.

    Nothing happens under OTEL_SDK_DISABLED=true, nor unless OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal
    `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`), OTEL_TRACES_EXPORTER or
    OTEL_METRICS_EXPORTER is set, nor for a signal whose global provider the
    process already has. Exporters: `otlp` (needs the package
    opentelemetry-exporter-otlp-proto-http, or -grpc with
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc), `console`, `none`.
    """
    if sdk_disabled():
        return
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces = _exporter_choice("TRACES", endpoint)
    meters = _exporter_choice("METRICS", endpoint)
    if traces is None and meters is None:
        return
    from opentelemetry.sdk.resources import Resource

    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": service_name})
    if traces is not None and global_tracer_provider() is None:
        _install_tracing(traces, resource)
    if meters is not None and global_meter_provider() is None:
        _install_metrics(meters, resource)


def _exporter_choice(signal: str, endpoint: str | None) -> str | None:
    chosen = os.environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if not chosen:
        chosen = "otlp" if endpoint or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") else ""
    if chosen in ("", "none"):
        return None
    if chosen not in ("otlp", "console"):
        _log.warning("OTEL_%s_EXPORTER=%s is not supported by stepline (otlp, console, none)", signal, chosen)
        return None
    return chosen


def _otlp(kind: str) -> Any:
    """The OTLP exporter class for `kind` ("trace" or "metric"), or None if not installed."""
    grpc = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip().lower() == "grpc"
    module_name = f"opentelemetry.exporter.otlp.proto.{'grpc' if grpc else 'http'}.{kind}_exporter"
    cls_name = "OTLPSpanExporter" if kind == "trace" else "OTLPMetricExporter"
    try:
        import importlib

        return getattr(importlib.import_module(module_name), cls_name)
    except ImportError:
        package = f"opentelemetry-exporter-otlp-proto-{'grpc' if grpc else 'http'}"
        _log.warning("OTLP export is configured but %s is not installed: no %ss are exported "
                     "(pip install %s)", package, kind, package)
        return None


def _install_tracing(choice: str, resource: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if choice == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        cls = _otlp("trace")
        if cls is None:
            return
        exporter = cls()  # endpoint, headers, timeout from the OTEL_EXPORTER_OTLP_* variables
    provider = SdkTracerProvider(resource=resource)  # shut down (flushed) at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _install_metrics(choice: str, resource: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if choice == "console":
        exporter: Any = ConsoleMetricExporter()
    else:
        cls = _otlp("metric")
        if cls is None:
            return
        exporter = cls()
    # OTEL_METRIC_EXPORT_INTERVAL (default 60 s) sets the reader's period.
    metrics.set_meter_provider(SdkMeterProvider(resource=resource,
                                                metric_readers=[PeriodicExportingMetricReader(exporter)]))
