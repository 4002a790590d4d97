# The image of the `worker` and `api` services in compose.yaml: stepline
# installed as a regular (non-editable) package in a virtualenv, plus the
# examples to run.
#
#   docker build -t stepline/stepline:local .          # on the official Python image
#
# BASE picks the base image. The default is the official python:3.11-slim; any
# Debian 12 image works too: where it has no Python, Debian's python3 (3.11 on
# bookworm) is installed with apt. scripts/images.sh builds it that way on its
# own Debian base, with no image registry, and PIP_ARGS=--no-index: pip then
# installs only from build/docker-wheels, the wheels the host's pip fetched.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/stepline/bin:$PATH

RUN if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/stepline

WORKDIR /app

# Wheels for an offline build, when scripts/images.sh put them there; the
# glob lets the build go on without them (pyproject.toml always matches).
COPY pyproject.toml build/docker-wheel[s] /wheels/
# pyproject.toml names README.md as the long description (the glob keeps the
# build going if it is absent) and LICENSE as the license file.
COPY pyproject.toml README.m[d] LICENSE ./
COPY engine/ engine/
COPY schemas/ schemas/
COPY projections/ projections/
COPY consumers/ consumers/
# [otlp]: the OTLP exporter, so OTEL_EXPORTER_OTLP_ENDPOINT (compose.yaml) exports traces and metrics.
# /app belongs to the stepline user: `stepline serve` keeps its run lists in .stepline/ there.
ARG PIP_ARGS=
RUN pip install $PIP_ARGS --find-links /wheels ".[otlp]" \
    && rm -rf /wheels \
    && useradd --create-home stepline \
    && chown stepline:stepline /app

COPY examples/ examples/

USER stepline
ENTRYPOINT ["stepline"]
CMD ["--help"]
