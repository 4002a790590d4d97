"""OpenTelemetry set-up for applications (README, Observability); lives in `stepline.observability`."""

from stepline.observability.otel_env import configure_from_env
from stepline.observability.tracing import use_meter_provider, use_tracer_provider

__all__ = ["configure_from_env", "use_meter_provider", "use_tracer_provider"]
