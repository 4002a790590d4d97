"""OpenTelemetry set-up for applications (README, Observability); lives in `stepline.observability.tracing`."""

from stepline.observability.tracing import configure_from_env, use_meter_provider, use_tracer_provider

__all__ = ["configure_from_env", "use_meter_provider", "use_tracer_provider"]
