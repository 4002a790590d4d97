"""The images scripts/images.sh builds offline, and the scripts' errors.

Debian 12 from debootstrap; Apache Kafka from Maven Central's jars, taking
the official image's KAFKA_* variables; the project's Dockerfile on Debian's
Python 3.11. A missing engine or image skips locally and fails under CI=true
(tests/docker_env.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid

import yaml

from stepline.settings import load_settings
from stepline.version import __version__
from tests.docker_env import DOCKER_SH, IMAGES_SH, ROOT, docker, image_names, require_images


def test_compose_runs_the_images_the_script_builds() -> None:
    names = image_names()
    services = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))["services"]
    assert services["kafka"]["image"] == names["KAFKA_IMAGE"], "compose.yaml's Kafka tag is not the one built here"
    assert services["worker"]["image"] == services["api"]["image"] == names["STEPLINE_IMAGE"]
    pom = (ROOT / "scripts" / "kafka" / "pom.xml").read_text(encoding="utf-8")
    [version] = re.findall(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert names["KAFKA_IMAGE"] == f"apache/kafka:{version}", "the image's tag is not the tests' Kafka version"
    assert load_settings().kafka_image == names["KAFKA_IMAGE"], "stepline.testing's default image is not the one built here"


def test_the_base_image_is_debian_12() -> None:
    names = require_images()
    out = docker("run", "--rm", names["DEBIAN_IMAGE"], "cat", "/etc/os-release").stdout
    assert 'VERSION_ID="12"' in out and "bookworm" in out, out


def test_the_stepline_image_runs_this_stepline_on_debians_python() -> None:
    names = require_images()
    image = names["STEPLINE_IMAGE"]
    probe = "import sys, stepline.version as v; print(sys.version_info[:2], sys.executable, v.__version__)"
    out = docker("run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout.split()
    assert out[:2] == ["(3,", "11)"], out
    assert out[2] == "/opt/stepline/bin/python" and out[3] == __version__, out
    # Debian's interpreter under the virtualenv, not a python.org build.
    assert docker("run", "--rm", "--entrypoint", "dpkg-query", image, "-W", "python3.11").returncode == 0
    help_text = docker("run", "--rm", image, "--help").stdout
    assert "worker" in help_text and "serve" in help_text


def test_the_kafka_image_maps_kafka_variables_like_the_official_one() -> None:
    names = require_images()
    name = f"stepline-kafka-image-test-{uuid.uuid4().hex[:8]}"
    env = {
        "KAFKA_NODE_ID": "7",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "7@localhost:9093",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://localhost:9092",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_LOG_RETENTION_MS": "4242",
        # `___` -> `-`, `__` -> `_`: a key no broker reads, only to see the mapping.
        "KAFKA_STEPLINE___PROBE__KEY": "x",
        "KAFKA_HEAP_OPTS": "-Xmx384m",  # launcher option, not a property
        "CLUSTER_ID": "c3RlcGxpbmUtaW1hZ2UtdA",
    }
    args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    docker("run", "-d", "--name", name, *args, names["KAFKA_IMAGE"])
    try:
        deadline = time.monotonic() + 120
        while "Kafka Server started" not in (logs := docker("logs", name).stdout):
            state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, f"the broker did not start:\n{logs[-3000:]}"
            time.sleep(1)
        config = docker("exec", name, "cat", "/opt/kafka/config/server.properties").stdout.splitlines()
        assert {"node.id=7", "log.retention.ms=4242", "stepline-probe_key=x",
                "advertised.listeners=PLAINTEXT://localhost:9092"} <= set(config), config
        assert not [line for line in config if "heap" in line or "cluster" in line], config
        # The image's tools talk to the broker it runs, with the configuration given.
        described = docker("exec", name, "kafka-configs.sh", "--bootstrap-server", "localhost:9092",
                           "--entity-type", "brokers", "--entity-name", "7", "--describe", "--all").stdout
        assert "log.retention.ms=4242" in described, described
        topic = f"probe-{uuid.uuid4().hex[:6]}"
        docker("exec", name, "kafka-topics.sh", "--bootstrap-server", "localhost:9092", "--create", "--topic", topic)
        listed = docker("exec", name, "kafka-topics.sh", "--bootstrap-server", "localhost:9092", "--list").stdout
        assert topic in listed.split()
        assert "CLUSTER_ID c3RlcGxpbmUtaW1hZ2UtdA" in logs or "c3RlcGxpbmUtaW1hZ2UtdA" in logs
    finally:
        docker("rm", "-f", "-v", name, check=False)


def test_the_kafka_image_refuses_advertised_listeners_on_a_controller() -> None:
    names = require_images()
    done = docker("run", "--rm", "-e", "KAFKA_PROCESS_ROLES=controller", "-e",
                  "KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://kafka:9092", names["KAFKA_IMAGE"], check=False)
    assert done.returncode == 1
    assert "KAFKA_ADVERTISED_LISTENERS is not supported on a KRaft controller" in done.stdout + done.stderr


def test_a_second_build_reuses_every_image() -> None:
    names = require_images()
    ids = {k: docker("image", "inspect", "-f", "{{.Id}}", v).stdout.strip() for k, v in names.items()}
    done = subprocess.run([str(IMAGES_SH), "build"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    for image in names.values():
        assert re.search(rf"{re.escape(image)}: (present|up to date|present and not built here)", done.stderr), done.stderr
    assert "docker build" not in done.stderr and "debootstrap" not in done.stderr.replace("debootstrap.log", "")
    assert ids == {k: docker("image", "inspect", "-f", "{{.Id}}", v).stdout.strip() for k, v in names.items()}


def test_scripts_name_the_problem() -> None:
    done = subprocess.run([str(IMAGES_SH), "build", "nonsense"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0 and "unknown image 'nonsense'" in done.stderr, done.stderr
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    done = subprocess.run([str(DOCKER_SH), "start"], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 1 and "no engine answers there" in done.stderr, done.stderr
    done = subprocess.run([str(DOCKER_SH), "status"], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert (done.returncode, done.stdout.strip()) == (3, "stopped")
    done = subprocess.run([str(IMAGES_SH), "check"], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 3 and "no Docker engine answers" in done.stdout


def test_every_kafka_tool_script_finds_its_class() -> None:
    names = require_images()
    loop = ('for s in /opt/kafka/bin/kafka-*.sh; do case $s in *run-class*|*server-start*) continue;; esac; '
            'echo "== $s"; $s --version 2>&1 | tail -n 3; done')
    out = docker("run", "--rm", "--entrypoint", "bash", names["KAFKA_IMAGE"], "-c", loop, timeout=300).stdout
    scripts = out.count("== ")
    assert scripts >= 10, out
    # argparse-based tools (kafka-storage, kafka-metadata-quorum) refuse --version, after their class loaded.
    assert "Could not find or load main class" not in out and "ClassNotFoundException" not in out, out
    version = image_names()["KAFKA_IMAGE"].rpartition(":")[2]
    assert out.count(version) >= scripts - 2, out
