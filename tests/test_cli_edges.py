"""The command line as a new user meets it (issue 18, "Rough edges"): reads
that create nothing, output that stays whole in a pipe, filters checked alike,
the usual entry points, logs that are all JSON when asked, one-line errors.

Every command runs as a real process whose stdout is a pipe (or a file, or a
pseudo-terminal where that is the point), on a real sqlite file.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from stepline.log import open_log
from stepline.security.sensitive import REDACTED, redact_secret_fields, redact_text

APP = str(Path(__file__).parent / "apps" / "edges_app.py")
LONG_TASK = "a-task-with-a-rather-long-name-for-a-narrow-column"
# Nothing listens here (this test file's own port; no broker is started on it).
NO_KAFKA = "kafka://127.0.0.1:19340?connect_timeout_ms=1000"
ANSI = "\x1b["

T = TypeVar("T")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STEPLINE_LOG", "STEPLINE_APP", "COLUMNS", "LINES", "FORCE_COLOR", "PY_COLORS")}
    env.update(extra)
    return env


def stepline(*args: str, cwd: Path | None = None, check: bool = False,
             timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`stepline ARGS` with stdout and stderr as pipes."""
    proc = subprocess.run([sys.executable, "-m", "stepline", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepline {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def as_json(*args: str) -> Any:
    return json.loads(stepline(*args, "--json", check=True).stdout)


def wait_for(fn: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def create_log(url: str) -> None:
    async def go() -> None:
        async with open_log(url):
            pass

    asyncio.run(go())


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/log/stepline.db"


@pytest.fixture
def worker(url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "stepline", "worker", APP, "--log", url], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc
    proc.terminate()
    proc.wait(30)


# --- reads create nothing; the lock files ------------------------------------------------


@pytest.mark.parametrize("args", [
    ["runs", "ls"], ["runs", "show", "run_x"], ["history", "run_x"], ["dlq", "ls"], ["events"],
    ["pause", "ls"], ["runs", "cancel", "--yes"],
])
def test_reading_a_log_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path, args: list[str]) -> None:
    proc = stepline(*args, "--log", "sqlite:///typo/dir/x.db", cwd=tmp_path)
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "sqlite:///typo/dir/x.db" in line and "does not exist" in line, line
    assert list(tmp_path.iterdir()) == [], "a read created files"


def test_a_command_that_writes_creates_the_log_and_its_locks_sit_in_one_hidden_folder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/typo/dir/x.db"
    stepline("trigger", "fails-at-once", "--app", APP, "--payload", "{}", "--log", url, check=True)
    folder = tmp_path / "typo" / "dir"

    async def joined() -> list[str]:
        async with open_log(url) as log:
            async def nothing(_: Any) -> None:
                return None

            member = await log.join_group("workers", "stepline.runs", nothing, nothing)
            try:
                return sorted(p.name for p in folder.iterdir())
            finally:
                await member.leave()

    beside = asyncio.run(joined())
    # Only SQLite's own files and the one hidden folder: no *.lock beside the log.
    assert set(beside) - {"x.db-wal", "x.db-shm"} == {"x.db", ".x.db.locks"}, beside
    locks = sorted(p.name for p in (folder / ".x.db.locks").iterdir())
    # The commits' doorbell (engine/log/sqlite_bell.py), the group's membership
    # lock, and one per partition of the topic it joined (4).
    assert locks == ["commits", "group-workers.lock", *(f"group-workers.p{p}.lock" for p in range(4)),
                     "write-turn.lock", "write.lock"]
    assert [r["task_id"] for r in as_json("runs", "ls", "--log", url)] == ["fails-at-once"]


# --- whole and plain in a pipe ------------------------------------------------------------


def test_a_table_piped_keeps_every_column_whole(url: str, worker: subprocess.Popen[bytes]) -> None:
    res = as_json("trigger", LONG_TASK, "--app", APP, "--payload", '{"n": 1}', "--wait", "--timeout", "60",
                  "--log", url)
    assert res["status"] == "completed"
    out = stepline("runs", "ls", "--log", url, check=True).stdout
    row = next(line for line in out.splitlines() if res["run_id"] in line)
    assert LONG_TASK in row and "completed" in row, out
    assert "…" not in out and ANSI not in out


@pytest.mark.parametrize("command", [
    ["serve"], ["trigger"], ["fork"], ["runs", "ls"], ["runs", "cancel"], ["dlq", "retry"], ["worker"], [],
])
def test_help_piped_is_whole_plain_and_names_values_plainly(command: list[str]) -> None:
    text = stepline(*command, "--help", check=True).stdout
    assert ANSI not in text and "…" not in text
    assert not re.search(r"<(bool|str|int|float|list\[str\])>", text), text
    usage = text.splitlines()[0]
    assert not re.search(r"\{[a-z_]+\}", usage), usage
    if command == ["serve"]:
        assert "STEPLINE_API_TOKEN" in text
    if command == ["trigger"]:
        assert re.search(r"--idempotency-key IDEMPOTENCY_KEY\s+Trigger at most once per key", text), text
        assert usage.endswith("stepline trigger [OPTIONS] TASK"), usage
    if command == ["dlq", "retry"]:
        assert usage.endswith("stepline dlq retry [OPTIONS] RUN_ID"), usage
    if command == ["runs", "cancel"]:
        assert "--text TEXT" in text and not re.search(r"--q\s", text)  # the old name, hidden


def test_help_on_a_terminal_shows_no_type_markers() -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "stepline", "dlq", "retry", "--help"],
                            env=_env(COLUMNS="200"), stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    proc.wait(60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    assert "RUN_ID" in text and "--payload" in text, text
    assert "<bool>" not in text and "<str>" not in text and "{run_id}" not in text, text


def test_stepline_dev_writes_no_colour_codes_into_a_file(tmp_path: Path, url: str) -> None:
    out_file = tmp_path / "dev.out"
    with out_file.open("w") as sink:
        dev = subprocess.Popen([sys.executable, "-m", "stepline", "dev", APP, "--port", "0", "--log", url],
                               cwd=tmp_path, env=_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "dashboard:" in out_file.read_text())
        res = as_json("trigger", LONG_TASK, "--app", APP, "--payload", '{"n": 3}', "--wait", "--timeout", "60",
                      "--log", url)
        assert res["status"] == "completed"
        wait_for(lambda: "greeting the pipe" in out_file.read_text())  # a structlog line of the task
    finally:
        dev.terminate()
        dev.wait(30)
    assert ANSI not in out_file.read_text()


# --- filters -------------------------------------------------------------------------------


def test_runs_ls_refuses_an_unknown_status_as_runs_cancel_does(url: str) -> None:
    create_log(url)
    for args in (["runs", "ls"], ["runs", "cancel", "--yes"]):
        proc = stepline(*args, "--status", "bogus", "--log", url)
        assert proc.returncode != 0
        assert "unknown status 'bogus'" in one_line(proc.stderr)


def test_runs_ls_filters_by_tag_and_creation_time(url: str) -> None:
    for tags in (["a", "b"], ["a"]):
        stepline("trigger", "fails-at-once", "--app", APP, "--payload", "{}", *[f"--tag={t}" for t in tags],
                 "--log", url, check=True)

    def listed(*args: str) -> int:
        return len(as_json("runs", "ls", "--log", url, *args))

    assert listed("--tag", "a") == 2 and listed("--tag", "b") == 1 and listed("--tag", "a", "--tag", "b") == 1
    assert listed("--since", "1h") == 2 and listed("--until", "1h") == 0
    assert listed("--since", "2999-01-01T00:00:00+00:00") == 0
    assert listed("--status", "pending") == 2 and listed("--status", "completed") == 0
    bad = stepline("runs", "ls", "--since", "yesterday", "--log", url)
    assert bad.returncode != 0 and "--since" in one_line(bad.stderr)


def test_the_text_filter_is_spelled_text_and_q_still_works(url: str) -> None:
    stepline("trigger", "fails-at-once", "--app", APP, "--payload", '{"n": 7771}', "--log", url, check=True)

    def matched(*args: str) -> int:
        report: dict[str, Any] = as_json("runs", "cancel", "--dry-run", *args, "--log", url)
        return int(report["matched"])

    assert matched("--text", "7771") == 1
    assert matched("--q", "7771") == 1
    assert matched("--text", "9999") == 0


# --- entry points --------------------------------------------------------------------------


def test_version_python_m_stepline_and_shell_completion() -> None:
    version = importlib.metadata.version("stepline")
    import stepline as sl

    assert sl.__version__ == version
    assert stepline("--version", check=True).stdout == f"stepline {version}\n"
    script = subprocess.run([sys.executable, "-m", "stepline", "--show-completion", "bash"],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete" in script.stdout
    # What the installed script does when the shell asks it to complete "stepline ru".
    script_path = str(Path(sys.executable).parent / "stepline")
    completed = subprocess.run([script_path], capture_output=True, text=True, timeout=60,
                               env=_env(_STEPLINE_COMPLETE="complete_bash", COMP_WORDS="stepline ru",
                                        COMP_CWORD="1"))
    assert completed.stdout.split() == ["runs"], completed


# --- messages ------------------------------------------------------------------------------


def test_dlq_retry_of_a_run_with_no_completed_step_says_it_starts_over(
    url: str, worker: subprocess.Popen[bytes]
) -> None:
    proc = stepline("trigger", "fails-at-once", "--app", APP, "--payload", "{}", "--wait", "--timeout", "60",
                    "--json", "--log", url)
    run_id = json.loads(proc.stdout)["run_id"]
    wait_for(lambda: [d for d in as_json("dlq", "ls", "--log", url) if d["run_id"] == run_id])
    said = stepline("dlq", "retry", run_id, "--app", APP, "--log", url, check=True).stdout
    assert "no step had completed" in said and "step -" not in said, said


def test_a_wait_token_id_logged_as_token_is_shown_and_api_tokens_stay_masked(
    url: str, worker: subprocess.Popen[bytes]
) -> None:
    res = as_json("trigger", "hands-out-a-token", "--app", APP, "--payload", "{}", "--wait", "--timeout", "60",
                  "--log", url)
    token_id = res["output"]
    assert token_id.startswith("tok_run_")
    fields = as_json("runs", "show", res["run_id"], "--log", url)["logs"][0]["fields"]
    assert fields == {"token": token_id, "api_token": REDACTED}


def test_secret_rules_show_wait_token_ids_and_mask_everything_else() -> None:
    tok = "tok_run_01JABCDEFGHJKMNPQRSTVWXYZ0_3"
    assert redact_secret_fields({"token": tok, "wait_token": tok, "token_b": "x"}) == {
        "token": tok, "wait_token": tok, "token_b": "x"}
    assert redact_secret_fields({"token": "ghp_abc123", "password": tok, "api_token": "tok_x"}) == {
        "token": REDACTED, "password": REDACTED, "api_token": REDACTED}
    assert redact_text(f"resume with token={tok}") == f"resume with token={tok}"
    assert redact_text("x?token=abc&password=pw") == f"x?token={REDACTED}&password={REDACTED}"


def test_unreachable_kafka_is_stepline_s_one_line() -> None:
    proc = stepline("runs", "ls", "--log", NO_KAFKA)
    assert proc.returncode != 0
    assert "cannot reach Kafka" in one_line(proc.stderr)


def test_worker_json_logs_on_unreachable_kafka_are_json_lines_only(tmp_path: Path) -> None:
    proc = stepline("worker", APP, "--json-logs", "--log", NO_KAFKA, cwd=tmp_path)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert any(r.get("logger") == "aiokafka" for r in records), lines
    assert "cannot reach Kafka" in records[-1]["event"] and records[-1]["level"] == "error"


def test_worker_json_logs_banner_is_a_json_line(url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "stepline", "worker", APP, "--json-logs", "--log", url],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict[str, Any]] = []
    try:
        assert proc.stderr is not None
        while not any(r["event"].startswith("stepline worker ") for r in seen):
            line = proc.stderr.readline()
            assert line, f"the worker ended before its banner: {seen}"
            seen.append(json.loads(line))
    finally:
        proc.terminate()
        rest_out, rest_err = proc.communicate(timeout=30)
    banner = next(r for r in seen if r["event"].startswith("stepline worker "))
    assert sorted(banner["tasks"]) == [LONG_TASK, "fails-at-once", "hands-out-a-token"]
    for line in (rest_out + rest_err).splitlines():
        json.loads(line)


def test_an_app_with_a_syntax_error_is_one_line_naming_file_and_line(tmp_path: Path, url: str) -> None:
    bad = tmp_path / "bad_app.py"
    bad.write_text("import stepline as sl\n\n\nasync def broken(p: dict) -> int\n    return 1\n")
    for args in (["trigger", "x", "--app", str(bad), "--payload", "{}"], ["worker", str(bad), "--console-logs"]):
        proc = stepline(*args, "--log", url)
        assert proc.returncode != 0
        line = one_line(proc.stderr)
        assert f"{bad}:4" in line and "syntax error" in line, line
