"""Tracing and metrics: OpenTelemetry spans and instruments, hooked into the runtime as an interceptor."""
