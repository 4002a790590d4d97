"""Settings: `STEPLINE_*` environment variables and a `stepline.toml` file.

Precedence, highest first:

1. a command-line flag (`stepline worker --concurrency 64`), or a keyword
   argument to `load_settings(...)`;
2. the environment variable `STEPLINE_<NAME>`;
3. the key `<name>` in the TOML file named by `STEPLINE_CONFIG`, else in
   `./stepline.toml` when that file exists;
4. the default below.

docs/configuration.md holds the table of every setting; `make apidoc`
writes it from this model, so the field descriptions here are the
documentation. Nothing is read at import time: `load_settings()` reads the
environment and the file each time it is called.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from stepline.errors import SteplineError
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.query_sql import DEFAULT_QUERY_DB

ENV_PREFIX = "STEPLINE_"
# Names the settings file; not a setting itself (the file cannot name itself).
CONFIG_ENV = "STEPLINE_CONFIG"
CONFIG_FILE = "stepline.toml"

# A log record is not a blob store: Kafka's default message limit is 1 MiB
# for a whole batch, so one payload stays well under it.
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Seconds a stopping worker lets its running steps finish (engine/runtime/worker.py, `Worker.drain`).
DEFAULT_SHUTDOWN_GRACE = 30.0


class SettingsError(SteplineError, ValueError):
    """A setting has an invalid value, or the settings file cannot be read.

    The message names the setting and where its value came from (the
    environment variable or the file), never a secret's value.
    """


def env_var(name: str) -> str:
    """The environment variable of setting `name`."""
    return f"{ENV_PREFIX}{name.upper()}"


def _kind(text: str) -> dict[str, Any]:
    # The "type" column of docs/configuration.md, in the words a user
    # writes values in (the Python annotation says less: "int" hides 0..65535).
    return {"kind": text}


def _source_pairs(value: Any, what: str, echo: bool) -> Any:
    """`SOURCE=VALUE,...` from a variable as a dict; a table from the file as it is."""
    if not isinstance(value, str):
        return value
    pairs: dict[str, str] = {}
    entries = [e.strip() for e in value.split(",") if e.strip()]
    for n, entry in enumerate(entries, 1):
        source, sep, found = entry.partition("=")
        if not sep or not source or not found:
            # Without echo, the entry's number, not its text: it holds a secret.
            shown = repr(entry) if echo else f"#{n}"
            raise ValueError(f"entry {shown} is not SOURCE={what}")
        if source in pairs:
            raise ValueError(f"source {source!r} is named twice")
        pairs[source] = found
    return pairs


def parse_processes(value: Any) -> int | Literal["auto"]:
    """`processes` (and `--processes`): a whole number ≥ 1, or `auto`."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{value!r} is not a number of processes: give a whole number ≥ 1, or auto "
                         "(one per usable core)")
    return int(text)


class Settings(BaseSettings):
    """Every Stepline setting, typed. Build it with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # A misspelt key in stepline.toml is an error, not a silent default.
        extra="forbid",
        # compose.yaml passes `STEPLINE_WEBHOOKS: ${STEPLINE_WEBHOOKS:-}`:
        # an empty variable means "not set", not "the empty value".
        env_ignore_empty=True,
        frozen=True,
    )

    log: str = Field(
        DEFAULT_LOG_URL,
        description="Log URL: `memory://NAME`, `sqlite:///PATH` or `kafka://HOST:PORT,...?OPTIONS` "
                    "(partitions, namespace, replication and security are URL options; see operations.md).",
        json_schema_extra=_kind("string (URL)"),
    )
    app: str | None = Field(
        None,
        description="Module (file path or dotted name) declaring the tasks, for `serve --app`, "
                    "`trigger` and `dlq retry`.",
        json_schema_extra=_kind("string"),
    )
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token `stepline serve` requires on `/v1/`. Prefer the variable to "
                    "`--api-token`, which other users can read in the process list.",
        json_schema_extra=_kind("string (secret)"),
    )
    webhooks: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        description="Signed webhook sources of `stepline serve`: deliveries signed with SECRET are "
                    "accepted at `/v1/webhooks/SOURCE`. Variable: `SOURCE=SECRET,...`; "
                    "file: a `[webhooks]` table of `SOURCE = \"SECRET\"`.",
        json_schema_extra=_kind("SOURCE=SECRET pairs (secret)"),
    )
    webhook_schemes: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="How each webhook source signs its deliveries: `stepline` (the default: "
                    "`Stepline-Signature`), `stripe` (`Stripe-Signature`), `standard` (Standard Webhooks: "
                    "`webhook-id`, `webhook-timestamp`, `webhook-signature`) or `github` "
                    "(`X-Hub-Signature-256`). Variable: `SOURCE=SCHEME,...`; file: a `[webhook_schemes]` "
                    "table of `SOURCE = \"SCHEME\"`.",
        json_schema_extra=_kind("SOURCE=SCHEME pairs"),
    )
    max_payload_bytes: int = Field(
        DEFAULT_MAX_PAYLOAD_BYTES, ge=1,
        description="Largest encoded payload or event data a `Client` appends; larger ones are "
                    "refused before anything is written (`PayloadTooLarge`, HTTP 413).",
        json_schema_extra=_kind("integer ≥ 1"),
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1,
        description="Largest HTTP request body `stepline serve` accepts.",
        json_schema_extra=_kind("integer ≥ 1"),
    )
    concurrency: int = Field(
        256, ge=1,
        description="Runs a worker (`stepline worker`, `stepline dev`) executes at once.",
        json_schema_extra=_kind("integer ≥ 1"),
    )
    processes: int | Literal["auto"] = Field(
        1,
        description="Worker processes `stepline worker` and `stepline dev` run, each on its own core: "
                    "`1` is one process doing everything; `N` starts N processes sharing the log and "
                    "splitting the partitions, supervised by the command's process (operations.md, "
                    "\"Processes\"); `auto` is one per usable core. A `memory://` log always runs one.",
        json_schema_extra=_kind("integer ≥ 1 or auto"),
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="Event loop of `stepline worker` and `stepline dev`: `uvloop` (libuv; less CPU per "
                    "run), `asyncio` (the standard loop) or `auto` (uvloop when it is installed, it is "
                    "by default on Linux and macOS).",
        json_schema_extra=_kind("auto, uvloop or asyncio"),
    )
    shutdown_grace: float = Field(
        DEFAULT_SHUTDOWN_GRACE, ge=0, allow_inf_nan=False,
        description="Seconds a worker (`stepline worker`, `stepline dev`) stopping on SIGTERM or SIGINT "
                    "gives its running steps to finish and checkpoint before it cancels what is left and "
                    "gives its partitions up (operations.md, \"Graceful shutdown\"); `0` cancels at once.",
        json_schema_extra=_kind("seconds ≥ 0"),
    )
    pool: str = Field(
        "default",
        description="Worker pool a worker (`stepline worker --pool`) runs: only the tasks declared "
                    "with that `pool=` (operations.md, \"Worker pools\"); a pool no task of the app "
                    "declares is refused.",
        json_schema_extra=_kind("pool name"),
    )
    worker_instance_id: str | None = Field(
        None, min_length=1, max_length=200,
        description="Stable identity of one worker process slot (`stepline worker --instance-id`) on "
                    "Kafka: static group membership (`group.instance.id`), so a worker restarted under "
                    "the same id (after a crash or kill) takes its partitions back at once instead of "
                    "after its predecessor's session expires. Give each worker its own (for example the "
                    "pod name of a StatefulSet); a worker that stops for good with one keeps its "
                    "partitions until its session expires. Unset: dynamic membership. Other logs ignore it.",
        json_schema_extra=_kind("string"),
    )
    host: str = Field(
        "127.0.0.1",
        description="Interface `stepline serve` listens on (`0.0.0.0` in a container).",
        json_schema_extra=_kind("string"),
    )
    port: int = Field(
        8080, ge=0, le=65535,
        description="TCP port of `stepline serve` and `stepline dev`; 0 picks a free one.",
        json_schema_extra=_kind("integer 0–65535"),
    )
    http_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of a worker's HTTP server (`stepline worker`): `/healthz`, `/readyz` and "
                    "Prometheus `/metrics` (operations.md, \"Health, metrics and autoscaling\"); "
                    "unset: none; 0 picks a free one.",
        json_schema_extra=_kind("integer 0–65535"),
    )
    http_host: str = Field(
        "0.0.0.0",
        description="Interface the worker's HTTP server (`http_port`) listens on: all of them by "
                    "default, for the kubelet's probes and Prometheus.",
        json_schema_extra=_kind("string"),
    )
    query_db: str = Field(
        DEFAULT_QUERY_DB,
        description="SQLite file of the query projection behind the API's run and event lists "
                    "(`serve`, `replay --projection`); `''` serves without lists. When unset, "
                    "`stepline dev` puts it beside a SQLite log.",
        json_schema_extra=_kind("string (path)"),
    )
    keys: str | None = Field(
        None,
        description="Key store of the subject keys that encrypt sensitive payload fields "
                    "(`sqlite:///PATH` or `memory://NAME`). Unset: `NAME.keys.db` beside an embedded "
                    "log; a Kafka log needs it set, the same on every process (sensitive-data.md).",
        json_schema_extra=_kind("string (URL)"),
    )
    json_logs: bool = Field(
        True,
        description="JSON log lines (`true`) or console lines (`false`) from `worker` and `serve`.",
        json_schema_extra=_kind("boolean"),
    )
    kafka_image: str = Field(
        "apache/kafka:4.4.0",
        description="The Kafka image `stepline.testing.KafkaTestContainer` (the `stepline_kafka_url` "
                    "fixture) starts: any image that takes the official image's `KAFKA_*` variables.",
        json_schema_extra=_kind("string (image)"),
    )

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        return parse_processes(value)

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhook_pairs(cls, value: Any) -> Any:
        return _source_pairs(value, "SECRET", echo=False)

    @field_validator("webhook_schemes", mode="before")
    @classmethod
    def _webhook_scheme_pairs(cls, value: Any) -> Any:
        return _source_pairs(value, "SCHEME", echo=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env file and no secrets directory: what is not in the
        # environment comes from stepline.toml, which load_settings() reads
        # and passes in as _FileSource.
        return init_settings, env_settings, _FileSource(settings_cls)


# The parsed stepline.toml of the load_settings() call in progress:
# pydantic-settings asks the class, not the call, for its sources.
_file_values: ContextVar[Mapping[str, Any] | None] = ContextVar("stepline_settings_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The values of stepline.toml, as `load_settings` parsed and checked them."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get() or {})


def config_path(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The settings file in force: $STEPLINE_CONFIG, else ./stepline.toml if it exists, else None."""
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"{CONFIG_ENV}={named!r} names no file")
        return path
    default = (cwd or Path.cwd()) / CONFIG_FILE
    return default if default.is_file() else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; the settings are "
            f"{', '.join(Settings.model_fields)} (docs/configuration.md)"
        )
    return values


def load_settings(**overrides: Any) -> Settings:
    """Settings from `overrides` > STEPLINE_* variables > stepline.toml > defaults.

    Raises `SettingsError` naming the setting and the variable or file its
    bad value came from.
    """
    path = config_path()
    file_values = _read_file(path) if path is not None else {}
    token = _file_values.set(file_values)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc, overrides, file_values, path)) from None
    finally:
        _file_values.reset(token)


def _explain(exc: ValidationError, overrides: Mapping[str, Any], file_values: Mapping[str, Any],
             path: Path | None) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        secret = name in ("api_token", "webhooks")
        variable = env_var(name)
        if name in overrides:
            where = f"given as {name}=" + ("<secret>" if secret else repr(overrides[name]))
        elif os.environ.get(variable):  # an empty variable counts as unset
            where = f"environment variable {variable}" + ("" if secret else f"={os.environ[variable]!r}")
        elif name in file_values:
            where = f"{path}, key {name}" + ("" if secret else f" = {file_values[name]!r}")
        else:
            where = "default"
        problems.append(f"setting {name!r} ({where}): {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


__all__ = [
    "CONFIG_ENV",
    "CONFIG_FILE",
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "config_path",
    "env_var",
    "load_settings",
]
