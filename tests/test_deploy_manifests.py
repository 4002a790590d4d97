"""The deployment files (deploy/**.yaml and compose.yaml) agree with the code.

Nothing here talks to Kubernetes, Docker or Kafka. The manifests are parsed
and checked against what the code itself defines: the `stepline`
subcommands and their options, the environment variables the CLI reads,
the routes the HTTP server answers, and the topic and group names of
engine/log/topics.py as the Kafka log names them on the broker.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from aiohttp.test_utils import TestClient, TestServer

import stepline.cli
import stepline.log
import stepline.tracing
from stepline.cli import app as cli_app
from stepline.client import Client
from stepline.log import open_log
from stepline.server import ServeConfig, create_app
from stepline.settings import env_var

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "compose.yaml"
# Files compose.yaml mounts (not Kubernetes objects).
COMPOSE_FILES = DEPLOY / "compose"
OTEL_CONFIG = COMPOSE_FILES / "otel-collector.yaml"
DOCKERFILE = ROOT / "Dockerfile"

WORKER = ("Deployment", "stepline-worker")
API = ("Deployment", "stepline-api")
API_SERVICE = ("Service", "stepline-api")
SCALER = ("ScaledObject", "stepline-worker")
CONFIG = ("ConfigMap", "stepline-config")
SECRET = ("Secret", "stepline-secrets")

# What the deployment files hand to `stepline`; each must be read by the CLI.
DEPLOY_ENV = {"STEPLINE_LOG", "STEPLINE_APP", "STEPLINE_API_TOKEN", "STEPLINE_WEBHOOKS"}
# A stand-in for the task module in commands, wherever it comes from.
APP = "<app>"
# Click's base error, wherever this Typer gets click from (newer ones vendor it).
CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*")
                  if p.suffix in (".yaml", ".yml") and COMPOSE_FILES not in p.parents)


def _documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in _manifest_files():
        for doc in _documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} is defined twice (again in {path.relative_to(ROOT)})"
            found[key] = doc
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def _cli() -> Any:
    """The `stepline` command group as click sees it."""
    group = typer.main.get_command(cli_app)
    assert hasattr(group, "commands"), "the stepline CLI is not a command group"
    return group


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, with ConfigMap and Secret references resolved."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = str(entry["value"])
            continue
        ref = entry["valueFrom"]
        for kind, ref_key, data_keys in (("ConfigMap", "configMapKeyRef", ("data",)),
                                         ("Secret", "secretKeyRef", ("stringData", "data"))):
            if ref_key not in ref:
                continue
            target = ref[ref_key]
            source = objects.get((kind, target["name"]))
            assert source is not None, f"env {name} refers to {kind} {target['name']!r}, which deploy/ does not define"
            data: dict[str, Any] = {}
            for field in data_keys:
                data.update(source.get(field) or {})
            if target["key"] in data:
                env[name] = str(data[target["key"]])
            else:
                assert target.get("optional"), f"env {name}: {kind} {target['name']!r} has no key {target['key']!r}"
            break
        else:
            raise AssertionError(f"env {name}: unsupported valueFrom {ref}")
    return env


def _k8s_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{arg!r} refers to $({m.group(1)}), which the container's env does not set"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def _compose_expand(arg: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} / ${VAR}, as if VAR were unset."""
    def sub(m: re.Match[str]) -> str:
        default = m.group(3) if m.group(2) == ":-" else ""
        return default or f"<{m.group(1)}>"

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-|:\?)?([^}]*)\}", sub, arg)


def _normalized(args: list[str]) -> list[str]:
    """Arguments with the task module reference replaced by APP, for comparison."""
    out = []
    for a in args:
        a = re.sub(r"\$\(STEPLINE_APP\)", APP, a)
        a = re.sub(r"\$\{STEPLINE_APP(:-[^}]*)?\}", APP, a)
        out.append(a)
    return out


def _parse(args: list[str]) -> Any:
    """Parse a `stepline` command line like the CLI would, without running it."""
    assert args, "no stepline subcommand given"
    name, *rest = args
    group = _cli()
    assert name in group.commands, f"`stepline {name}` is not a command; there are {sorted(group.commands)}"
    command = group.commands[name]
    try:
        return command.make_context(name, list(rest))
    except CLICK_ERROR as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        raise AssertionError(f"`stepline {' '.join(args)}` does not parse: {message}") from None


def _stepline_args(container: dict[str, Any]) -> list[str]:
    """The `stepline` arguments a container runs, checked to really invoke `stepline`."""
    command = container.get("command")
    if command is None:
        entrypoint = _dockerfile_entrypoint()
        assert entrypoint == ["stepline"], f"the image's entrypoint is {entrypoint}, not stepline"
    else:
        assert command == ["stepline"], f"container {container['name']} runs {command}, not stepline"
    return list(container.get("args", []))


def _dockerfile_entrypoint() -> list[str]:
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("ENTRYPOINT"):
            entry: list[str] = json.loads(line.removeprefix("ENTRYPOINT").strip())
            return entry
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def _cli_env_vars(command: Any = None) -> set[str]:
    """Environment variables the CLI reads: those of the settings behind its
    options (of one command, or of all), option envvars, plus those
    engine/cli/main.py and engine/log read from os.environ."""
    names: set[str] = set()

    def walk(cmd: Any) -> None:
        for param in cmd.params:
            envvar = getattr(param, "envvar", None)
            if envvar:
                names.update([envvar] if isinstance(envvar, str) else envvar)
            setting = stepline.cli.option_setting(param)
            if setting is not None:
                names.add(env_var(setting))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(command or _cli())
    for module in _modules_of(stepline.cli, stepline.log):
        names.update(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](STEPLINE_\w+)[\"']", inspect.getsource(module)))
    return names


def _modules_of(*packages: Any) -> list[Any]:
    """Every module of these packages, imported: their sources name the variables they read."""
    found = list(packages)
    for package in packages:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):  # importing it would run the CLI
                found.append(importlib.import_module(info.name))
    return found


def _partitions(url: str) -> int:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert "partitions" in query, f"STEPLINE_LOG {url!r} sets no partitions=; the topic size is then unknown here"
    return int(query["partitions"][-1])


# --- well-formed ---------------------------------------------------------------


def test_the_deploy_folder_holds_the_kubernetes_example() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in _manifest_files()}
    expected = {f"kubernetes/{n}.yaml" for n in (
        "namespace", "configmap", "secret.example", "worker-deployment", "api-deployment", "api-service",
        "keda-scaledobject",
    )}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    assert (DEPLOY / "README.md").is_file()


@pytest.mark.parametrize("path", [*_manifest_files(), COMPOSE, OTEL_CONFIG],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_manifest_is_well_formed_yaml(path: Path) -> None:
    docs = _documents(path)
    assert docs, f"{path.name} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is {type(doc).__name__}, not a mapping"
        if path == COMPOSE:
            assert isinstance(doc.get("services"), dict) and doc["services"], "compose.yaml defines no services"
        elif path == OTEL_CONFIG:
            assert isinstance(doc.get("service"), dict), f"{path.name} has no service section"
        else:
            for field in ("apiVersion", "kind", "metadata"):
                assert field in doc, f"{path.name}: a document has no {field}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} has no name"


def test_every_object_is_in_one_namespace(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    namespaces = {doc["metadata"].get("namespace") for (kind, _), doc in objects.items() if kind != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"objects spread over namespaces {namespaces}"
    declared = [name for kind, name in objects if kind == "Namespace"]
    assert declared in ([], list(namespaces)), f"namespace.yaml declares {declared}, objects use {namespaces}"


def test_the_objects_the_example_needs_exist(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for key in (WORKER, API, API_SERVICE, SCALER, CONFIG, SECRET):
        assert key in objects, f"deploy/ defines no {key[0]} {key[1]!r}"


# --- commands ---------------------------------------------------------------------


@pytest.mark.parametrize("key", [WORKER, API], ids=lambda k: k[1])
def test_containers_run_real_stepline_subcommands(objects: dict[tuple[str, str], dict[str, Any]],
                                                   key: tuple[str, str]) -> None:
    container = _container(objects[key])
    env = _env(objects, container)
    args = [_k8s_expand(a, env) for a in _stepline_args(container)]
    ctx = _parse(args)
    expected = "worker" if key == WORKER else "serve"
    assert ctx.info_name == expected, f"{key[1]} runs `stepline {ctx.info_name}`, expected `stepline {expected}`"
    if expected == "worker":
        assert ctx.params["module"] == env["STEPLINE_APP"]
    else:
        assert ctx.params["app_module"] == env["STEPLINE_APP"]
        assert ctx.params["host"] == "0.0.0.0", "serve must listen on all interfaces in a pod"


@pytest.mark.parametrize("service", ["worker", "api"])
def test_compose_runs_the_same_commands_as_kubernetes(objects: dict[tuple[str, str], dict[str, Any]],
                                                      compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    assert isinstance(command, list), f"compose service {service}: command should be a list"
    assert _dockerfile_entrypoint() == ["stepline"], "compose's commands rely on the image's stepline entrypoint"
    _parse([_compose_expand(a) for a in command])
    k8s = _stepline_args(_container(objects[WORKER if service == "worker" else API]))
    assert _normalized(command) == _normalized(k8s), (
        f"compose runs `stepline {' '.join(command)}`, Kubernetes `stepline {' '.join(k8s)}`"
    )


# --- environment --------------------------------------------------------------------


def test_the_cli_reads_every_variable_the_deployment_sets() -> None:
    read = _cli_env_vars()
    assert DEPLOY_ENV <= read, f"the CLI no longer reads {sorted(DEPLOY_ENV - read)}"


@pytest.mark.parametrize("key", [WORKER, API], ids=lambda k: k[1])
def test_container_variables_are_read_by_the_command_they_run(objects: dict[tuple[str, str], dict[str, Any]],
                                                              key: tuple[str, str]) -> None:
    container = _container(objects[key])
    args = _stepline_args(container)
    command = _cli().commands[args[0]]
    used = _cli_env_vars(command) | set(re.findall(r"\$\((\w+)\)", " ".join(args)))
    names = {e["name"] for e in container.get("env", [])}
    unused = {n for n in names if n.startswith("STEPLINE_")} - used
    assert not unused, f"{key[1]} sets {sorted(unused)}, which `stepline {args[0]}` does not read"
    assert "STEPLINE_LOG" in names, f"{key[1]} sets no STEPLINE_LOG: it would use the embedded SQLite file"


def test_compose_variables_are_read_by_the_cli(compose: dict[str, Any]) -> None:
    read = _cli_env_vars()
    for name, service in compose["services"].items():
        variables = service.get("environment") or {}
        names = set(variables) if isinstance(variables, dict) else {v.split("=", 1)[0] for v in variables}
        unknown = {n for n in names if n.startswith("STEPLINE_")} - read
        assert not unknown, f"compose service {name} sets {sorted(unknown)}, which the CLI does not read"


def test_log_urls_are_valid_and_shared(objects: dict[tuple[str, str], dict[str, Any]],
                                       compose: dict[str, Any]) -> None:
    k8s = {key[1]: _env(objects, _container(objects[key]))["STEPLINE_LOG"] for key in (WORKER, API)}
    assert len(set(k8s.values())) == 1, f"worker and API open different logs: {k8s}"
    services = {n: s["environment"]["STEPLINE_LOG"] for n, s in compose["services"].items()
                if "STEPLINE_LOG" in (s.get("environment") or {})}
    assert set(services) >= {"worker", "api"}
    assert len(set(services.values())) == 1, f"compose services open different logs: {services}"
    for url in {*k8s.values(), *services.values()}:
        log = open_log(url)  # the CLI's own parser: unknown options, bad numbers, ... raise
        assert type(log).__name__ == "KafkaLog", f"{url!r} is not a Kafka log"
        assert _partitions(url) >= 1


# --- autoscaling ----------------------------------------------------------------------


def test_keda_scales_the_workers_on_the_apis_backlog(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The Prometheus trigger's query reads gauges the API serves at /metrics
    (tests/test_autoscaling.py evaluates it against a live API)."""
    from stepline.observability.metrics import GAUGES
    from stepline.server.backlog import KINDS

    scaled = objects[SCALER]["spec"]
    target = scaled["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == WORKER, f"KEDA scales {target}, not the workers"
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus", "the workers scale on the API's backlog gauges (Prometheus)"
    meta = trigger["metadata"]
    names = set(re.findall(r"\bstepline_[a-z_]+", meta["query"]))
    assert names and names <= {f"stepline_runs_{k}" for k in KINDS} <= set(GAUGES), (
        f"the query reads {sorted(names)}, which the API's backlog does not serve")
    assert float(meta["threshold"]) > 0
    assert meta.get("ignoreNullValues") == "false" and "fallback" in scaled, (
        "a lost scrape must hold the workers (fallback), not read as no work")
    # Prometheus finds the API's /metrics through the pod's annotations.
    api = objects[API]["spec"]["template"]["metadata"].get("annotations", {})
    assert api.get("prometheus.io/scrape") == "true" and api.get("prometheus.io/path") == "/metrics"
    container = _container(objects[API])
    port = _parse([_k8s_expand(a, _env(objects, container)) for a in _stepline_args(container)]).params["port"]
    assert int(api["prometheus.io/port"]) == port, "Prometheus would scrape another port than the API's"


def test_keda_never_scales_past_the_runs_partitions(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    scaled = objects[SCALER]["spec"]
    partitions = _partitions(_env(objects, _container(objects[WORKER]))["STEPLINE_LOG"])
    low, high = scaled.get("minReplicaCount", 0), scaled["maxReplicaCount"]
    assert 1 <= low <= high, f"minReplicaCount {low}, maxReplicaCount {high}"
    assert high <= partitions, f"maxReplicaCount {high} > {partitions} partitions: the extra workers would idle"
    assert objects[WORKER]["spec"].get("replicas", 1) <= partitions


# --- the API's probes and service ----------------------------------------------------------


def _server_app() -> Any:
    return create_app(Client("memory://deploy-manifests"), ServeConfig("test-token", {}))


def _get_routes() -> set[str]:
    return {r.resource.canonical for r in _server_app().router.routes()
            if r.method == "GET" and r.resource is not None}


def _container_port(container: dict[str, Any], port: int | str) -> int:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port {port!r}")


async def test_api_probes_hit_a_route_the_server_answers_without_a_token(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = _container(objects[API])
    env = _env(objects, container)
    port = _parse([_k8s_expand(a, env) for a in _stepline_args(container)]).params["port"]
    probes = [container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in container]
    assert {"readinessProbe", "livenessProbe"} <= set(container), "the API needs readiness and liveness probes"
    routes = _get_routes()
    # /readyz asks the log: the client is started, as `stepline serve` starts it.
    async with Client("memory://deploy-manifests") as client, \
            TestClient(TestServer(create_app(client, ServeConfig("test-token", {})))) as http:
        for probe in probes:
            get = probe["httpGet"]
            assert get["path"] in routes, f"probe path {get['path']!r} is not a GET route of stepline serve"
            assert _container_port(container, get["port"]) == port, "the probe targets another port than --port"
            response = await http.get(get["path"])  # no Authorization header, as the kubelet sends none
            assert response.status == 200, f"GET {get['path']} answers {response.status} to a probe"


async def test_worker_probes_hit_the_routes_of_its_http_port(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    from stepline.server.probes import WorkerProbes

    container = _container(objects[WORKER])
    env = _env(objects, container)
    assert env.get(env_var("http_port")), "the worker serves no probe port (STEPLINE_HTTP_PORT)"
    port = int(env[env_var("http_port")])
    assert {"readinessProbe", "livenessProbe"} <= set(container), "the worker needs readiness and liveness probes"
    paths = {}
    for kind in ("readinessProbe", "livenessProbe"):
        get = container[kind]["httpGet"]
        assert _container_port(container, get["port"]) == port, f"the {kind} targets another port"
        paths[kind] = get["path"]
    assert paths == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    annotations = objects[WORKER]["spec"]["template"]["metadata"].get("annotations", {})
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics"
    # The real server answers those paths (ready only once a worker has joined).
    async with WorkerProbes("127.0.0.1", 0) as probes:
        for path, status in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200)):
            response = await asyncio.to_thread(_http_status, f"http://127.0.0.1:{probes.port}{path}")
            assert response == status, f"GET {path} answers {response}"


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_service_reaches_the_api_port(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = objects[API_SERVICE]["spec"]
    deployment = objects[API]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items(), "the Service selects no API pod"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deployment)
    env = _env(objects, container)
    port = _parse([_k8s_expand(a, env) for a in _stepline_args(container)]).params["port"]
    [service_port] = service["ports"]
    assert _container_port(container, service_port["targetPort"]) == port


def test_compose_healthcheck_hits_a_server_route(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    test = " ".join(api["healthcheck"]["test"])
    [url] = re.findall(r"https?://[^'\"\s)]+", test)
    parts = urllib.parse.urlsplit(url)
    assert parts.path in _get_routes(), f"compose's healthcheck asks for {parts.path!r}, not a server route"
    port = _parse([_compose_expand(a) for a in api["command"]]).params["port"]
    assert parts.port == port, f"compose's healthcheck asks port {parts.port}, serve listens on {port}"


# --- traces: the OpenTelemetry collector and Jaeger in compose.yaml ----------------------------------

COLLECTOR, JAEGER = "otel-collector", "jaeger"
# Jaeger all-in-one's OTLP/gRPC port (with COLLECTOR_OTLP_ENABLED).
JAEGER_OTLP_GRPC = 4317


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    variables = service.get("environment") or {}
    if isinstance(variables, list):
        return dict(v.split("=", 1) for v in variables)
    return {k: str(v) for k, v in variables.items()}


def _image(service: dict[str, Any]) -> tuple[str, str]:
    name, _, tag = service["image"].rpartition(":")
    return name, tag


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of a compose service's `ports` ("[ip:]host:container")."""
    found = {}
    for entry in service.get("ports", []):
        rest, _, container = _compose_expand(str(entry)).rpartition(":")
        found[int(container.split("/")[0])] = int(rest.rpartition(":")[2])
    return found


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), f"compose service {name} publishes {entry} beyond 127.0.0.1"


def test_images_that_cannot_be_built_here_are_under_a_profile(compose: dict[str, Any]) -> None:
    """The default `docker compose up` needs only Kafka and the project's image (scripts/images.sh)."""
    for name, service in compose["services"].items():
        if name in (COLLECTOR, JAEGER):
            assert "observability" in service.get("profiles", []), f"{name} runs without --profile observability"
            continue
        assert not service.get("profiles"), f"{name} is not in the default stack"
        needs = set(service.get("depends_on") or [])
        assert not needs & {COLLECTOR, JAEGER}, f"{name} depends on a service of the observability profile"


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def collector_config() -> dict[str, Any]:
    [doc] = _documents(OTEL_CONFIG)
    config: dict[str, Any] = doc
    return config


def test_compose_runs_a_collector_and_jaeger_from_pinned_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {COLLECTOR: "otel/opentelemetry-collector-contrib", JAEGER: "jaegertracing/all-in-one"}
    for name, image in expected.items():
        assert name in services, f"compose.yaml has no {name} service"
        repo, tag = _image(services[name])
        assert repo == image, f"{name} runs {repo}, expected {image}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{name}'s image tag {tag!r} is not a pinned version"
    assert _service_env(services[JAEGER]).get("COLLECTOR_OTLP_ENABLED") == "true", (
        "Jaeger all-in-one needs COLLECTOR_OTLP_ENABLED=true to receive OTLP from the collector")


def test_the_collector_loads_the_config_file_in_the_repository(compose: dict[str, Any]) -> None:
    collector = compose["services"][COLLECTOR]
    mounts = {}
    for volume in collector["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = (COMPOSE.parent / source).resolve()
    [config_arg] = [a for a in collector["command"] if a.startswith("--config=")]
    target = config_arg.removeprefix("--config=")
    assert target in mounts, f"the collector reads {target}, which no volume mounts"
    assert mounts[target] == OTEL_CONFIG.resolve(), f"{target} is mounted from {mounts[target]}, not {OTEL_CONFIG}"


def test_every_pipeline_component_is_defined(collector_config: dict[str, Any]) -> None:
    service = collector_config["service"]
    for extension in service.get("extensions", []):
        assert extension in (collector_config.get("extensions") or {}), f"extension {extension} is not defined"
    assert {"traces", "metrics"} <= set(service["pipelines"]), "the collector needs traces and metrics pipelines"
    for name, pipeline in service["pipelines"].items():
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"pipeline {name} is incomplete"
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in (collector_config.get(section) or {}), (
                    f"pipeline {name} names {section[:-1]} {component!r}, which the config does not define")


def test_the_traces_pipeline_exports_to_jaeger(compose: dict[str, Any], collector_config: dict[str, Any]) -> None:
    exporters = collector_config["exporters"]
    targets = []
    for name in collector_config["service"]["pipelines"]["traces"]["exporters"]:
        if name.split("/")[0] == "otlp":  # the OTLP/gRPC exporter, whatever its /suffix
            settings = exporters[name]
            host, port = settings["endpoint"].rsplit(":", 1)
            targets.append((host, int(port)))
            assert (settings.get("tls") or {}).get("insecure") is True, (
                f"{name}: Jaeger all-in-one serves OTLP without TLS; the exporter must not require it")
    assert (JAEGER, JAEGER_OTLP_GRPC) in targets, f"no traces exporter sends OTLP to {JAEGER}:{JAEGER_OTLP_GRPC}"
    assert JAEGER in compose["services"]
    assert JAEGER in compose["services"][COLLECTOR].get("depends_on", []), "the collector starts before Jaeger"


@pytest.mark.parametrize("service", ["worker", "api"])
def test_workers_and_api_export_otlp_to_the_collector(compose: dict[str, Any], collector_config: dict[str, Any],
                                                      service: str) -> None:
    from opentelemetry.sdk import environment_variables as otel_env

    env = _service_env(compose["services"][service])
    known = {n for n in dir(otel_env) if n.startswith("OTEL_")}
    unknown = {n for n in env if n.startswith("OTEL_")} - known
    assert not unknown, f"compose service {service} sets {sorted(unknown)}, which OpenTelemetry does not read"
    # The variable stepline's exporter set-up reads (stepline.tracing.configure_from_env).
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in inspect.getsource(stepline.tracing.configure_from_env)
    # Empty by default (no collector without the profile); the observability
    # profile's value is x-observability's.
    assert _compose_expand(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == "<OTEL_EXPORTER_OTLP_ENDPOINT>", (
        f"{service} should take OTEL_EXPORTER_OTLP_ENDPOINT from the shell, empty by default")
    url = urllib.parse.urlsplit(compose["x-observability"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert url.hostname == COLLECTOR, f"{service} exports to {url.hostname}, not the {COLLECTOR} service"
    # http/protobuf unless OTEL_EXPORTER_OTLP_PROTOCOL says grpc, as in stepline.tracing._otlp.
    protocol = "grpc" if env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").lower() == "grpc" else "http"
    receiver = collector_config["receivers"]["otlp"]["protocols"].get(protocol)
    assert receiver is not None, f"{service} exports OTLP/{protocol}; the collector does not receive it"
    assert url.port == _port_of(receiver["endpoint"]), (
        f"{service} exports to port {url.port}, the collector's {protocol} receiver listens on {receiver['endpoint']}")
    assert url.scheme == "http", "the collector's receiver has no TLS here"


def test_the_image_installs_the_otlp_exporter_the_code_imports() -> None:
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"pip install [^\n]*[\"' ]\.\[[^\]]*\botlp\b", dockerfile), "the Dockerfile does not install stepline[otlp]"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(req.startswith("opentelemetry-exporter-otlp-proto-http") for req in extras["otlp"]), (
        "the otlp extra lacks the OTLP/HTTP exporter that stepline.tracing imports")


def test_compose_environment_makes_the_cli_choose_otlp(compose: dict[str, Any]) -> None:
    """The worker's OTEL_* variables, given to the real set-up code in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({k: v for k, v in _service_env(compose["services"]["worker"]).items() if k.startswith("OTEL_")})
    env.update(compose["x-observability"])  # as with --profile observability
    script = (
        "import logging; logging.basicConfig()\n"
        "from opentelemetry import trace\n"
        "from stepline.tracing import configure_from_env\n"
        "configure_from_env()\n"
        "print('PROVIDER', type(trace.get_tracer_provider()).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:  # optional here, installed in the image: the code still chose OTLP/HTTP
        assert "opentelemetry-exporter-otlp-proto-http is not installed" in proc.stderr, proc.stderr
    else:
        assert "PROVIDER TracerProvider" in proc.stdout, proc.stdout


def test_collector_and_jaeger_ports_are_published(compose: dict[str, Any], collector_config: dict[str, Any]) -> None:
    collector = _published(compose["services"][COLLECTOR])
    for protocol, receiver in collector_config["receivers"]["otlp"]["protocols"].items():
        port = _port_of(receiver["endpoint"])
        assert port in collector, f"the collector's OTLP/{protocol} port {port} is not published"
    prometheus = collector_config["exporters"].get("prometheus")
    if prometheus is not None:
        assert _port_of(prometheus["endpoint"]) in collector, "the collector's metrics endpoint is not published"
    assert 16686 in _published(compose["services"][JAEGER]), "Jaeger's UI (16686) is not published"

