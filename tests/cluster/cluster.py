"""A 3-broker KRaft cluster and Stepline workers, as containers on a network of their own.

Three containers of scripts/images.sh's Kafka image (KRAFT, each node both
broker and controller, a quorum of three), and worker containers of the
project image running `stepline worker` on tests/apps/cluster_app.py, all
on one Docker network this class creates. Every broker has two client
listeners: INTERNAL (k<i>:9092, for the workers and the other brokers on
the network) and HOST, advertised as 127.0.0.1:<port> and published on
127.0.0.1 only, for the test on the host. Nothing listens anywhere else.

Faults are Docker's: `kill_broker` (SIGKILL) and `start_broker`, `cut` and
`heal` (`docker network disconnect`/`connect`: the worker keeps running
with no route to the brokers), `pause` and `resume` (`docker pause`: the
cgroup freezer, SIGSTOP for every process in it). `close` removes every
container and the network whatever state they are in; every docker call
is bounded in time.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from tests.docker_env import ROOT, docker

BROKERS = (1, 2, 3)
PARTITIONS = 6
SESSION_TIMEOUT_MS = 6000
# Production durability: three replicas, a write acknowledged (acks=all,
# always, engine/log/kafka_clients.py) once two of them have it.
DURABILITY = "replication_factor=3&min_insync_replicas=2"
GROUP = (f"session_timeout_ms={SESSION_TIMEOUT_MS}&heartbeat_interval_ms=1000"
         "&rebalance_timeout_ms=20000")
# More URL options for both sides, to measure their effect (e.g. request_timeout_ms=8000).
EXTRA = "".join(f"&{o}" for o in os.environ.get("STEPLINE_CLUSTER_URL_OPTIONS", "").split("&") if o)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_env(node: int, host_port: int) -> dict[str, str]:
    """The official image's KAFKA_* variables for node `node` of the quorum."""
    return {
        "KAFKA_NODE_ID": str(node),
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": ",".join(f"{i}@k{i}:9093" for i in BROKERS),
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENERS": "INTERNAL://:9092,CONTROLLER://:9093,HOST://:9094",
        "KAFKA_ADVERTISED_LISTENERS": f"INTERNAL://k{node}:9092,HOST://127.0.0.1:{host_port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT,HOST:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "INTERNAL",
        # The internal topics (group offsets, transactions) as durable as ours.
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "2",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "3",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "2",
        "KAFKA_DEFAULT_REPLICATION_FACTOR": "3",
        "KAFKA_MIN_INSYNC_REPLICAS": "2",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        # A dead broker is fenced (and leaves every ISR) after 6 s, not 9.
        "KAFKA_BROKER_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_BROKER_HEARTBEAT_INTERVAL_MS": "1000",
        # Record timestamps are the leader's append time: the checks compare
        # them with when each step body began (one clock: the host's kernel).
        "KAFKA_LOG_MESSAGE_TIMESTAMP_TYPE": "LogAppendTime",
        "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m",
        "KAFKA_LOG4J_ROOT_LOGLEVEL": "WARN",
    }


class Cluster:
    def __init__(self, images: dict[str, str], workdir: Path, *, stepline_image: str | None = None) -> None:
        self.name = f"sl-cluster-{uuid.uuid4().hex[:8]}"
        self.kafka_image = images["KAFKA_IMAGE"]
        self.stepline_image = stepline_image or images["STEPLINE_IMAGE"]
        self.workdir = workdir
        self.records = workdir / "records"
        self.records.mkdir()
        self.records.chmod(0o777)  # the image's `stepline` user writes here
        self.ports = {i: free_port() for i in BROKERS}
        self.workers: list[str] = []
        self._network_made = False

    # --- names and URLs -------------------------------------------------------

    def broker(self, node: int) -> str:
        return f"{self.name}-k{node}"

    def worker(self, n: int) -> str:
        return f"{self.name}-w{n}"

    @property
    def host_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.ports[i]}" for i in BROKERS)

    def host_url(self) -> str:
        """The log URL for a client on the host (through the published ports)."""
        return f"kafka://{self.host_bootstrap}?partitions={PARTITIONS}&{DURABILITY}&{GROUP}{EXTRA}"

    def network_url(self) -> str:
        """The same log, for a container on the cluster's network."""
        nodes = ",".join(f"k{i}:9092" for i in BROKERS)
        return f"kafka://{nodes}?partitions={PARTITIONS}&{DURABILITY}&{GROUP}{EXTRA}"

    # --- lifecycle ------------------------------------------------------------

    def start_brokers(self) -> None:
        docker("network", "create", "--label", f"dev.stepline.test={self.name}", self.name)
        self._network_made = True
        for i in BROKERS:
            env = [arg for k, v in broker_env(i, self.ports[i]).items() for arg in ("-e", f"{k}={v}")]
            docker("run", "-d", "--name", self.broker(i), "--hostname", f"k{i}", "--network", self.name,
                   "--network-alias", f"k{i}", "--label", f"dev.stepline.test={self.name}",
                   "-p", f"127.0.0.1:{self.ports[i]}:9094", *env, self.kafka_image)

    def start_worker(self, concurrency: int, step_seconds: float) -> str:
        n = len(self.workers) + 1
        name = self.worker(n)
        docker("run", "-d", "--name", name, "--hostname", f"w{n}", "--network", self.name,
               "--label", f"dev.stepline.test={self.name}",
               "-v", f"{ROOT / 'tests' / 'apps'}:/testapp:ro", "-v", f"{self.records}:/records",
               "-e", f"STEPLINE_LOG={self.network_url()}", "-e", "CLUSTER_RECORDS=/records/steps.log",
               "-e", f"CLUSTER_STEP_SECONDS={step_seconds}",
               self.stepline_image, "worker", "/testapp/cluster_app.py", "--concurrency", str(concurrency))
        self.workers.append(name)
        return name

    def close(self) -> None:
        """Save every container's log to the work folder, then remove them and the network."""
        found = docker("ps", "-aq", "--filter", f"label=dev.stepline.test={self.name}", check=False, timeout=60)
        ids = found.stdout.split()
        for cid in ids:
            docker("unpause", cid, check=False, timeout=30)  # a paused container cannot be removed
        names = [self.broker(i) for i in BROKERS] + self.workers
        for name in names:
            logs = docker("logs", "--tail", "3000", name, check=False, timeout=60)
            (self.workdir / f"{name}.log").write_text(logs.stdout + logs.stderr)
        if ids:
            docker("rm", "-f", "-v", *ids, check=False, timeout=120)
        if self._network_made:
            docker("network", "rm", self.name, check=False, timeout=60)

    def leftovers(self) -> str:
        containers = docker("ps", "-aq", "--filter", f"label=dev.stepline.test={self.name}", check=False).stdout
        networks = docker("network", "ls", "-q", "--filter", f"label=dev.stepline.test={self.name}",
                          check=False).stdout
        return (containers + networks).strip()

    # --- faults ---------------------------------------------------------------

    def kill_broker(self, node: int) -> None:
        docker("kill", "-s", "KILL", self.broker(node))

    def start_broker(self, node: int) -> None:
        # The same container: its KRaft storage (formatted once) and its data survive.
        docker("start", self.broker(node))

    def cut(self, worker: str) -> None:
        docker("network", "disconnect", self.name, worker)

    def heal(self, worker: str) -> None:
        docker("network", "connect", self.name, worker)

    def pause(self, worker: str) -> None:
        docker("pause", worker)

    def resume(self, worker: str) -> None:
        docker("unpause", worker)

    def running(self, container: str) -> bool:
        state = docker("inspect", "-f", "{{.State.Running}}", container, check=False)
        return state.stdout.strip() == "true"
