"""Settings: flag > STEPLINE_* variable > stepline.toml > default, with clear errors.

Each test runs in an empty directory with every STEPLINE_* variable
removed, so neither the developer's shell nor the repository leaks in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

import stepline
import stepline.cli
from stepline.cli import app as cli_app
from stepline.settings import (
    CONFIG_ENV,
    DEFAULT_MAX_PAYLOAD_BYTES,
    Settings,
    SettingsError,
    env_var,
    load_settings,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("STEPLINE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _params(*args: str) -> dict[str, Any]:
    """The values a `stepline` command line resolves to, without running it."""
    name, *rest = args
    group: Any = typer.main.get_command(cli_app)
    command = group.commands[name]
    params: dict[str, Any] = command.make_context(name, list(rest)).params
    return params


# --- sources ------------------------------------------------------------------------------


def test_without_variables_or_file_every_setting_has_its_default() -> None:
    s = load_settings()
    assert s.log == stepline.DEFAULT_LOG_URL
    assert s.concurrency == 256 and s.port == 8080 and s.json_logs is True
    assert s.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES
    assert s.api_token is None and s.webhooks == {}
    assert s.model_fields_set == set()


def test_environment_variables_set_typed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_LOG", "memory://from-env")
    monkeypatch.setenv("STEPLINE_CONCURRENCY", "12")
    monkeypatch.setenv("STEPLINE_JSON_LOGS", "false")
    monkeypatch.setenv("STEPLINE_API_TOKEN", "tok-env")
    monkeypatch.setenv("STEPLINE_WEBHOOKS", "payments=whsec_1, github=gh_2")
    s = load_settings()
    assert (s.log, s.concurrency, s.json_logs) == ("memory://from-env", 12, False)
    assert s.api_token is not None and s.api_token.get_secret_value() == "tok-env"
    assert {k: v.get_secret_value() for k, v in s.webhooks.items()} == {"payments": "whsec_1", "github": "gh_2"}


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    # compose.yaml passes STEPLINE_WEBHOOKS: ${STEPLINE_WEBHOOKS:-}
    _toml(clean / "stepline.toml", "concurrency = 7\n")
    monkeypatch.setenv("STEPLINE_WEBHOOKS", "")
    monkeypatch.setenv("STEPLINE_CONCURRENCY", "")
    s = load_settings()
    assert s.webhooks == {} and s.concurrency == 7


def test_stepline_toml_in_the_working_directory_is_read(clean: Path) -> None:
    _toml(clean / "stepline.toml", 'log = "memory://from-file"\nport = 9090\n[webhooks]\npayments = "whsec_f"\n')
    s = load_settings()
    assert (s.log, s.port) == ("memory://from-file", 9090)
    assert s.webhooks["payments"].get_secret_value() == "whsec_f"
    assert s.model_fields_set == {"log", "port", "webhooks"}


def test_stepline_config_names_the_file_and_wins_over_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, clean: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _toml(clean / "stepline.toml", "port = 1111\n")
    elsewhere = _toml(tmp_path_factory.mktemp("etc") / "prod.toml", "port = 2222\n")
    monkeypatch.setenv(CONFIG_ENV, str(elsewhere))
    assert load_settings().port == 2222


def test_precedence_is_argument_then_variable_then_file_then_default(
    monkeypatch: pytest.MonkeyPatch, clean: Path,
) -> None:
    _toml(clean / "stepline.toml", "concurrency = 3\nport = 3\nhost = '10.0.0.3'\n")
    monkeypatch.setenv("STEPLINE_CONCURRENCY", "2")
    monkeypatch.setenv("STEPLINE_PORT", "2")
    s = load_settings(concurrency=1)
    assert s.concurrency == 1  # argument over variable and file
    assert s.port == 2  # variable over file
    assert s.host == "10.0.0.3"  # file over default
    assert s.max_body_bytes == 1 << 20  # default


# --- the CLI ----------------------------------------------------------------------------------


def test_a_cli_flag_beats_the_variable_which_beats_the_file(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    _toml(clean / "stepline.toml", 'log = "memory://file"\nconcurrency = 3\njson_logs = false\nhttp_port = 9191\n')
    assert _params("worker", "app.py") == {
        "module": "app.py", "log": "memory://file", "concurrency": 3, "grace": "30", "json_logs": False,
        "http_port": 9191, "http_host": "0.0.0.0", "pool": "default", "instance_id": None,
        "processes": "1", "member": None,
    }
    monkeypatch.setenv("STEPLINE_WORKER_INSTANCE_ID", "worker-0")
    assert _params("worker", "app.py")["instance_id"] == "worker-0"
    assert _params("worker", "app.py", "--instance-id", "worker-1")["instance_id"] == "worker-1"
    monkeypatch.setenv("STEPLINE_POOL", "gpu")
    assert _params("worker", "app.py")["pool"] == "gpu"
    assert _params("worker", "app.py", "--pool", "web")["pool"] == "web"
    monkeypatch.setenv("STEPLINE_LOG", "memory://env")
    monkeypatch.setenv("STEPLINE_CONCURRENCY", "2")
    params = _params("worker", "app.py")
    assert (params["log"], params["concurrency"]) == ("memory://env", 2)
    params = _params("worker", "app.py", "--log", "memory://flag", "--concurrency", "1", "--json-logs")
    assert (params["log"], params["concurrency"], params["json_logs"]) == ("memory://flag", 1, True)


def test_serve_takes_its_token_and_webhooks_from_the_file(clean: Path) -> None:
    _toml(clean / "stepline.toml", 'api_token = "tok"\nhost = "0.0.0.0"\n[webhooks]\npayments = "whsec_x"\n')
    params = _params("serve")
    assert (params["api_token"], params["host"], params["port"]) == ("tok", "0.0.0.0", 8080)
    assert params["webhook"] == ["payments=whsec_x"]
    # A --webhook flag replaces the configured sources rather than adding to them.
    assert _params("serve", "--webhook", "github=gh")["webhook"] == ["github=gh"]


def test_a_command_keeps_its_own_default_when_nothing_sets_the_setting(clean: Path) -> None:
    # dev puts its query projection beside a SQLite log unless query_db is configured.
    assert _params("dev", "app.py")["query_db"] is None
    _toml(clean / "stepline.toml", 'query_db = "q.db"\n')
    assert _params("dev", "app.py")["query_db"] == "q.db"


def test_an_invalid_variable_stops_the_cli_with_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_CONCURRENCY", "many")
    result = CliRunner().invoke(cli_app, ["worker", "app.py"])
    assert result.exit_code == 1
    assert "STEPLINE_CONCURRENCY='many'" in result.output and "concurrency" in result.output
    assert "Traceback" not in result.output


# --- errors -------------------------------------------------------------------------------------


def test_an_invalid_variable_names_the_setting_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_PORT", "70000")
    with pytest.raises(SettingsError, match=r"setting 'port' \(environment variable STEPLINE_PORT='70000'\)"):
        load_settings()


def test_an_invalid_file_value_names_the_file_and_the_key(clean: Path) -> None:
    path = _toml(clean / "stepline.toml", 'concurrency = "lots"\n')
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert f"setting 'concurrency' ({path}, key concurrency = 'lots')" in str(info.value)


def test_an_unknown_key_in_the_file_is_an_error_not_ignored(clean: Path) -> None:
    _toml(clean / "stepline.toml", "concurency = 8\n")
    with pytest.raises(SettingsError, match=r"stepline.toml: unknown setting\(s\) concurency; the settings are log"):
        load_settings()


def test_a_file_that_is_not_toml_is_named(clean: Path) -> None:
    path = _toml(clean / "stepline.toml", "port = \n")
    with pytest.raises(SettingsError, match=f"{re.escape(str(path))} is not valid TOML"):
        load_settings()


def test_stepline_config_naming_a_missing_file_is_an_error(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(clean / "nope.toml"))
    with pytest.raises(SettingsError, match="STEPLINE_CONFIG=.*nope.toml' names no file"):
        load_settings()


def test_secrets_never_appear_in_error_messages(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    monkeypatch.setenv("STEPLINE_WEBHOOKS", "payments=whsec_TOPSECRET,broken_TOPSECRET2")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "STEPLINE_WEBHOOKS" in str(info.value) and "entry #2 is not SOURCE=SECRET" in str(info.value)
    assert "TOPSECRET" not in str(info.value)
    monkeypatch.delenv("STEPLINE_WEBHOOKS")
    _toml(clean / "stepline.toml", "api_token = 12345678\n")
    with pytest.raises(SettingsError, match="setting 'api_token'") as info:
        load_settings()
    assert "12345678" not in str(info.value)


def test_a_webhook_source_named_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WEBHOOKS", "a=1,a=2")
    with pytest.raises(SettingsError, match="source 'a' is named twice"):
        load_settings()


async def test_the_client_takes_its_payload_limit_from_the_file(clean: Path) -> None:
    _toml(clean / "stepline.toml", "max_payload_bytes = 64\n")
    async with stepline.Client("memory://settings-payload") as client:
        assert client.max_payload_bytes == 64
        with pytest.raises(stepline.PayloadTooLarge, match="64-byte limit"):
            await client.publish("big.thing", "x" * 100)
    assert stepline.Client("memory://settings-payload-2", max_payload_bytes=5).max_payload_bytes == 5


# --- the documentation table -------------------------------------------------------------------


def _doc_rows() -> dict[str, list[str]]:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("<!-- settings-table:start")
    end = text.index("<!-- settings-table:end -->")
    lines = [ln for ln in text[start:end].splitlines() if ln.startswith("|")]
    header, rule, *rows = lines
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "name (stepline.toml key)", "environment variable", "flag", "type", "default", "meaning"]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))] for row in rows]
    return {c[0].strip("`"): c for c in cells}


def test_the_docs_table_lists_exactly_the_settings_of_the_model() -> None:
    rows = _doc_rows()
    assert list(rows) == list(Settings.model_fields), (
        "docs/configuration.md lists other settings than engine/settings.py has: run make apidoc")
    for name, (_, env, flag, kind, default, meaning) in rows.items():
        field = Settings.model_fields[name]
        assert env == f"`{env_var(name)}`"
        assert meaning and kind, f"{name}: the table has no type or meaning"
        value = field.default_factory() if field.default_factory is not None else field.default
        if isinstance(value, int) and not isinstance(value, bool):
            assert default == f"`{value}`", f"{name}: the table says default {default}, the model {value}"
        elif isinstance(value, str):
            assert default == f'`"{value}"`', f"{name}: the table says default {default}, the model {value!r}"
        if flag != "-":
            for shown in re.findall(r"`(--[\w-]+)", flag):
                assert any(shown in _options(cmd) for cmd in _commands()), f"{name}: no command has {shown}"


def _commands() -> list[Any]:
    group: Any = typer.main.get_command(cli_app)
    found = []
    stack = list(group.commands.values())
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        found.append(cmd)
    return found


def _options(cmd: Any) -> set[str]:
    return {opt for p in cmd.params if stepline.cli.option_setting(p) for opt in p.opts}


def test_every_stepline_variable_the_engine_reads_is_a_setting() -> None:
    """No module reads STEPLINE_* around the settings model (tests and docs rely on one table)."""
    documented = {env_var(n) for n in Settings.model_fields} | {CONFIG_ENV}
    for folder in ("engine", "projections", "consumers"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            read = set(re.findall(r"(?:environ(?:\.get)?\(?\[?|getenv\()\s*[\"'](STEPLINE_\w+)", source))
            assert read <= documented, f"{path.relative_to(ROOT)} reads {sorted(read - documented)} directly"
