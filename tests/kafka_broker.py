"""Where the tests get a real Kafka broker from (a helper, not a test module).

`ensure_broker()` returns bootstrap servers ("host:port[,host:port]"):

1. `KAFKA_BOOTSTRAP_SERVERS` from the environment, used as is;
2. else by `STEPLINE_TEST_BROKER`:
   - `script` (and the default, `auto`, first): `scripts/kafka.sh start`, a
     single-node KRaft broker from Maven Central's jars on the local Java, no
     Docker needed (the first run downloads its jars);
   - `testcontainers` (and `auto`, when the script cannot): a container that
     testcontainers starts (stepline.testing.KafkaTestContainer, the fixture
     users get) on the Kafka image scripts/images.sh builds, never pulled;
     Ryuk stays off (TESTCONTAINERS_RYUK_DISABLED=true: its image cannot be
     pulled without a registry), so this module removes its own containers,
     and those of test processes that died before they could.

`make test` runs the whole suite on the script broker, and in it
tests/test_testcontainers.py runs the Kafka tests again, in a pytest
subprocess with STEPLINE_TEST_BROKER=testcontainers.

If no source works it raises `BrokerUnavailable` with every reason; the
caller decides whether that is a skip (locally) or a failure (CI=true).

`stop_broker_if_started()` stops only what this process started: a container
it ran, or a script broker that was not already running when it asked (so a
broker started beforehand by .ci/run or by hand with `scripts/kafka.sh start`
is left alone and reused across test runs). It is also registered with
`atexit`, so a broker started here never outlives the test process.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
IMAGES_SH = ROOT / "scripts" / "images.sh"

# Cold start: Maven downloads ~65 MB (jars and its plugin), then the broker boots.
SCRIPT_TIMEOUT_S = float(os.environ.get("KAFKA_SCRIPT_TIMEOUT", "900"))
DOCKER_PING_TIMEOUT_S = 3


class BrokerUnavailable(RuntimeError):
    """No Kafka broker could be obtained; the message lists why, per source."""


_lock = threading.Lock()
_bootstrap: str | None = None
_container: Any = None  # the KafkaTestContainer we started
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
        choice = os.environ.get("STEPLINE_TEST_BROKER", "auto").strip().lower() or "auto"
        sources = {"auto": (_from_script, _from_testcontainers), "script": (_from_script,),
                   "testcontainers": (_from_testcontainers,)}.get(choice)
        if sources is None:
            raise BrokerUnavailable(f"STEPLINE_TEST_BROKER={choice!r}: expected auto, script or testcontainers")
        for source in sources:
            try:
                found = source(reasons)
            except Exception as exc:  # noqa: BLE001 - every reason goes in the error
                reasons.append(f"{source.__name__}: {type(exc).__name__}: {exc}")
                continue
            if found:
                _bootstrap = found
                return found
        raise BrokerUnavailable("no Kafka broker: KAFKA_BOOTSTRAP_SERVERS is unset; " + "; ".join(reasons))


def started_container() -> Any:
    """The KafkaTestContainer this process started for the tests, if any."""
    return _container


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


# Containers this helper starts carry these labels, so a later run can remove
# those whose test process died (no Ryuk to do it).
OWNER_LABEL = "dev.stepline.test-owner"


def remove_orphan_containers() -> list[str]:
    """Remove containers labelled by a test process on this host that is gone; their names."""
    import docker

    client = docker.from_env(timeout=10)
    removed = []
    try:
        for container in client.containers.list(all=True, filters={"label": OWNER_LABEL}):
            host, _, pid = container.labels.get(OWNER_LABEL, "").partition(":")
            if host != socket.gethostname() or not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            container.remove(force=True, v=True)
            removed.append(container.name)
    finally:
        client.close()
    return removed


def kafka_image() -> str:
    """The Kafka image scripts/images.sh builds (its `names`), e.g. apache/kafka:4.4.0."""
    done = subprocess.run([str(IMAGES_SH), "names"], capture_output=True, text=True, timeout=30, check=True)
    names = dict(line.split("=", 1) for line in done.stdout.split())
    return names["KAFKA_IMAGE"]


def _from_testcontainers(reasons: list[str]) -> str | None:
    global _container
    from stepline.testing import KafkaContainerError, KafkaTestContainer

    if not docker_engine_answers():
        reasons.append("testcontainers: no Docker engine answers (scripts/docker.sh start)")
        return None
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    remove_orphan_containers()
    container = KafkaTestContainer(
        kafka_image(),
        pull=False,  # no registry: the image is scripts/images.sh's
        # Same topic policy as scripts/kafka.sh (tests create their topics), and
        # its heap: the suite creates thousands of partitions.
        env={"KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false", "KAFKA_HEAP_OPTS": "-Xms256m -Xmx2g",
             "KAFKA_NUM_NETWORK_THREADS": "2", "KAFKA_NUM_IO_THREADS": "2"},
        labels={OWNER_LABEL: f"{socket.gethostname()}:{os.getpid()}"},
    )
    try:
        found = container.start()
    except KafkaContainerError as exc:
        reasons.append(f"testcontainers: {exc}")
        return None
    _container = container
    _register_atexit()
    return found


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
