"""Kafka brokers that testcontainers starts: the Kafka suite on one, and the users' fixture.

The Kafka tests (KAFKA_SUITE) run a second time, in a pytest subprocess with
STEPLINE_TEST_BROKER=testcontainers: their broker is then a container on the
Kafka image scripts/images.sh builds (tests/kafka_broker.py), where the main
run uses scripts/kafka.sh's broker from Maven Central's jars. A user's test
module, run by pytest with the plugin, gets `stepline_kafka_url` and runs a
task on it. Brokers are published on 127.0.0.1 only; Ryuk stays off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from stepline.testing import KafkaContainerError, KafkaTestContainer
from tests.docker_env import ROOT, require_images

# The broker check, the Kafka log and tail, the log contract and the worker processes (~1 min).
KAFKA_SUITE = ["tests/test_kafka_broker.py", "tests/test_kafka_log.py", "tests/test_kafka_tail.py",
               "tests/test_log_contract.py", "tests/test_kafka_workers.py"]

pytest_plugins = ["pytester"]

USER_TESTS = '''
import urllib.parse

import stepline as sl

registry = sl.Registry()


@sl.step
async def double(x: int) -> int:
    return 2 * x


@sl.task(id="double-it", registry=registry)
async def double_it(x: int) -> int:
    return await double(x)


async def test_a_task_runs_on_the_containers_broker(stepline_kafka_url, stepline_kafka_container):
    parts = urllib.parse.urlsplit(stepline_kafka_url)
    assert parts.scheme == "kafka" and parts.hostname == "127.0.0.1"
    assert stepline_kafka_container.bootstrap_servers == parts.netloc
    async with sl.Client(stepline_kafka_url) as client:
        async with sl.Worker(registry, client.log, client=client):
            handle = await client.trigger(double_it, 21)
            assert await handle.result(timeout=90) == 42
        history = [ev.type for _, ev in await client.history(handle.run_id)]
    assert history.count("StepCompleted") == 1 and history[-1] == "RunCompleted", history


def test_each_test_gets_its_own_namespace(stepline_kafka_url, stepline_kafka_container):
    other = stepline_kafka_container.log_url()
    assert "namespace=test-" in stepline_kafka_url and other != stepline_kafka_url
'''


def test_the_kafka_suite_passes_on_a_broker_testcontainers_starts() -> None:
    require_images()
    env = {**os.environ, "STEPLINE_TEST_BROKER": "testcontainers", "TESTCONTAINERS_RYUK_DISABLED": "true"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-k", "kafka",
                           *KAFKA_SUITE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # Every selected test ran: none skipped for want of a broker.
    assert passed and int(passed.group(1)) >= 40 and "skipped" not in summary, tail


def test_the_fixture_gives_users_a_kafka_log_url(pytester: pytest.Pytester) -> None:
    names = require_images()
    pytester.makeconftest('pytest_plugins = ["stepline.testing"]\n')
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user=USER_TESTS)
    # Ryuk's image cannot be pulled here; STEPLINE_KAFKA_IMAGE is how a user picks the image.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ["STEPLINE_KAFKA_IMAGE"] = names["KAFKA_IMAGE"]
    try:
        result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=300)
    finally:
        del os.environ["STEPLINE_KAFKA_IMAGE"]
    assert result.ret == 0, "\n".join(result.outlines[-60:] + result.errlines[-30:])
    result.assert_outcomes(passed=2)


def test_a_missing_image_is_named_and_never_pulled() -> None:
    require_images()
    kafka = KafkaTestContainer("stepline/no-such-kafka:0", pull=False)
    with pytest.raises(KafkaContainerError, match=r"stepline/no-such-kafka:0 is not on this Docker engine"):
        kafka.start()
    with pytest.raises(KafkaContainerError, match="not started"):
        kafka.log_url()


def test_without_testcontainers_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "testcontainers.core.container", None)  # import fails
    with pytest.raises(KafkaContainerError, match=r"needs the testcontainers package \(pip install testcontainers\)"):
        KafkaTestContainer().start()


def test_no_engine_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(KafkaContainerError, match="no Docker engine answers"):
        KafkaTestContainer().start()


def test_a_broker_that_never_comes_up_is_an_error_with_its_output() -> None:
    names = require_images()
    # A controller-only node may not advertise listeners: the image's entrypoint exits at once.
    kafka = KafkaTestContainer(names["KAFKA_IMAGE"], pull=False, start_timeout=60,
                               env={"KAFKA_PROCESS_ROLES": "controller"})
    with pytest.raises(KafkaContainerError, match=r"(?s)did not come up.*KAFKA_ADVERTISED_LISTENERS is not supported"):
        kafka.start()
    assert kafka.container is None, "the failed container was not removed"
