"""Where the tests get a real Kafka broker from (a helper, not a test module).

`ensure_broker()` returns bootstrap servers ("host:port[,host:port]"), trying
in order:

1. `KAFKA_BOOTSTRAP_SERVERS` from the environment, used as is;
2. testcontainers' Kafka module, only when a Docker engine answers (checked
   in at most ~3 s, and skipped at once when no engine socket exists);
3. `scripts/kafka.sh start`: a single-node KRaft broker from Maven Central on
   the local Java, no Docker needed (first run downloads its jars).

If none works it raises `BrokerUnavailable` with every reason; the caller
decides whether that is a skip (locally) or a failure (CI=true).

`stop_broker_if_started()` stops only what this process started: a container
it ran, or a script broker that was not already running when it asked (so a
broker started beforehand by .ci/run or by hand with `scripts/kafka.sh start`
is left alone and reused across test runs). It is also registered with
`atexit`, so a broker started here never outlives the test process.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"

# Cold start: Maven downloads ~65 MB (jars and its plugin), then the broker boots.
SCRIPT_TIMEOUT_S = float(os.environ.get("KAFKA_SCRIPT_TIMEOUT", "900"))
DOCKER_PING_TIMEOUT_S = 3


class BrokerUnavailable(RuntimeError):
    """No Kafka broker could be obtained; the message lists why, per source."""


_lock = threading.Lock()
_bootstrap: str | None = None
_container: Any = None  # testcontainers KafkaContainer we started
_script_pid: str | None = None  # pid of the broker our `kafka.sh start` launched
_atexit_registered = False


def ensure_broker() -> str:
    """Bootstrap servers of a running broker; starts one if needed (cached)."""
    global _bootstrap
    with _lock:
        if _bootstrap is not None:
            return _bootstrap
        env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        if env:
            _bootstrap = env
            return env
        reasons: list[str] = []
        for source in (_from_testcontainers, _from_script):
            try:
                found = source(reasons)
            except Exception as exc:  # noqa: BLE001 - every reason goes in the error
                reasons.append(f"{source.__name__}: {type(exc).__name__}: {exc}")
                continue
            if found:
                _bootstrap = found
                return found
        raise BrokerUnavailable("no Kafka broker: KAFKA_BOOTSTRAP_SERVERS is unset; " + "; ".join(reasons))


def stop_broker_if_started() -> None:
    """Stop the container or script broker that this process started, if any."""
    global _bootstrap, _container, _script_pid
    with _lock:
        if _container is not None:
            container, _container = _container, None
            _bootstrap = None
            try:
                container.stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        if _script_pid is not None:
            pid, _script_pid = _script_pid, None
            _bootstrap = None
            if _script_broker_pid() != pid:
                return  # stopped or replaced meanwhile: not ours to stop any more
            subprocess.run(
                [str(KAFKA_SH), "stop"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
            )


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(stop_broker_if_started)
        _atexit_registered = True


# --- sources -------------------------------------------------------------------


def docker_engine_answers(timeout: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """True when a Docker engine answers a ping within `timeout` seconds."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False  # no engine configured: don't even import the SDK
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no usable engine"
        return False


def _from_testcontainers(reasons: list[str]) -> str | None:
    global _container
    if not docker_engine_answers():
        reasons.append("testcontainers: no Docker engine answers")
        return None
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.kafka import KafkaContainer

    container = (
        KafkaContainer()
        .with_kraft()
        # Same topic policy as scripts/kafka.sh: tests create their topics.
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    )
    container.start()
    _container = container
    _register_atexit()
    return str(container.get_bootstrap_server())


def _script_broker_pid() -> str | None:
    state = Path(os.environ.get("KAFKA_STATE_DIR") or ROOT / ".kafka")
    try:
        return (state / "broker.pid").read_text().strip() or None
    except OSError:
        return None


def _script_running() -> bool:
    done = subprocess.run(
        [str(KAFKA_SH), "status"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0 and done.stdout.startswith("running")


def _from_script(reasons: list[str]) -> str | None:
    global _script_pid
    if not KAFKA_SH.exists():
        reasons.append(f"scripts/kafka.sh: {KAFKA_SH} is missing")
        return None
    was_running = _script_running()
    try:
        done = subprocess.run(
            [str(KAFKA_SH), "start"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        reasons.append(f"scripts/kafka.sh start: timed out after {SCRIPT_TIMEOUT_S:.0f} s")
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-40:])
        reasons.append(f"scripts/kafka.sh start exited {done.returncode}:\n{tail}")
        return None
    if not was_running:
        _script_pid = _script_broker_pid()
        _register_atexit()
    return lines[-1].strip()
