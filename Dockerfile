# Minimal image for the `worker` service in compose.yaml: stepline installed
# as a regular (non-editable) package, plus the examples to run.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# pyproject.toml names README.md as the long description; the glob keeps the
# build going if it is absent.
COPY pyproject.toml README.m[d] ./
COPY engine/ engine/
COPY schemas/ schemas/
COPY projections/ projections/
COPY consumers/ consumers/
# [otlp]: the OTLP exporter, so OTEL_EXPORTER_OTLP_ENDPOINT (compose.yaml) exports traces and metrics.
RUN pip install ".[otlp]" && useradd --create-home stepline

COPY examples/ examples/

USER stepline
ENTRYPOINT ["stepline"]
CMD ["--help"]
