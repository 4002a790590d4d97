"""Kafka SASL/TLS settings reach aiokafka, bad ones are refused by name, and
secrets never show.

No broker is needed: the clients are built exactly as `KafkaLog.start()`
builds them and their configuration is read back without connecting. The
TLS files are a real CA, client certificate and encrypted key, made with
openssl for each test run.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from stepline.errors import InvalidLogUrl, LogUnavailable
from stepline.log import open_log
from stepline.log.kafka import KafkaLog

PASSWORD = "s3cr+t&pw"  # "+" and "&" percent-encoded in URLs
KEY_PASSWORD = "k3y-pass"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=stepline-test-ca")
    run("req", "-newkey", "rsa:2048", "-passout", f"pass:{KEY_PASSWORD}", "-keyout", "client.key",
        "-out", "client.csr", "-subj", "/CN=stepline-client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def secure_url(files: dict[str, Path], **extra: str) -> str:
    options = {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "stepline", "sasl_plain_password": "s3cr%2Bt%26pw",
        "ssl_cafile": str(files["ca"]), "ssl_certfile": str(files["cert"]), "ssl_keyfile": str(files["key"]),
        "ssl_password": KEY_PASSWORD, **extra,
    }
    return "kafka://b1.example.com:9096,b2.example.com:9096?" + "&".join(f"{k}={v}" for k, v in options.items())


def kafka_log(url: str) -> KafkaLog:
    log = open_log(url)
    assert isinstance(log, KafkaLog)
    return log


async def test_sasl_and_mutual_tls_settings_reach_the_clients_aiokafka_builds(tls_files) -> None:
    log = kafka_log(secure_url(tls_files))
    admin = AIOKafkaAdminClient(**log.admin_kwargs())
    producer = AIOKafkaProducer(**log.producer_kwargs())
    reader = AIOKafkaConsumer(**log.consumer_kwargs())
    member = AIOKafkaConsumer(**log.consumer_kwargs(group_id="g"))
    try:
        # The connection settings live in each client's AIOKafkaClient (aiokafka 0.11-0.14).
        inner = {"admin": admin._client, "producer": producer.client,
                 "reader": reader._client, "member": member._client}
        for name, c in inner.items():
            assert c._security_protocol == "SASL_SSL", name
            assert c._sasl_mechanism == "SCRAM-SHA-256", name
            assert (c._sasl_plain_username, c._sasl_plain_password) == ("stepline", PASSWORD), name
            context = c._ssl_context
            assert isinstance(context, ssl.SSLContext), name
            assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname, name
            # Our CA, not (only) the system's: the brokers' certificates are checked against it.
            assert any(dict(x[0] for x in ca["subject"]).get("commonName") == "stepline-test-ca"
                       for ca in context.get_ca_certs()), name
    finally:
        await admin.close()
        await producer.stop()
        await reader.stop()
        await member.stop()


def test_the_client_certificate_is_loaded_with_its_key_password(tls_files) -> None:
    # The key is encrypted: without ssl_password, or with a wrong one, it cannot be loaded.
    kafka_log(secure_url(tls_files))
    for wrong in ("", "&ssl_password=nope"):
        url = secure_url(tls_files).replace(f"&ssl_password={KEY_PASSWORD}", wrong)
        with pytest.raises(InvalidLogUrl) as caught:
            open_log(url)
        assert "TLS files" in str(caught.value)


def test_ssl_check_hostname_false_reaches_the_context(tls_files) -> None:
    context = kafka_log(secure_url(tls_files, ssl_check_hostname="false")).producer_kwargs()["ssl_context"]
    assert context.check_hostname is False and context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(("option", "problem"), [
    ("ssl_cafile", "does not exist"), ("ssl_certfile", "does not exist"), ("ssl_keyfile", "does not exist"),
])
def test_a_missing_tls_file_is_named(tls_files, tmp_path: Path, option: str, problem: str) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(InvalidLogUrl) as caught:
        open_log(secure_url(tls_files, **{option: str(missing)}))
    assert f"{option}={str(missing)!r} {problem}" in str(caught.value)
    assert PASSWORD not in str(caught.value) and KEY_PASSWORD not in str(caught.value)


def test_an_unreadable_key_file_is_named(tls_files, tmp_path: Path) -> None:
    key = tmp_path / "locked.key"
    key.write_bytes(tls_files["key"].read_bytes())
    key.chmod(0)
    if os.geteuid() == 0:
        # Root reads any file: a mode proves nothing there, so check with a
        # name that is not a file at all (CI runs as root).
        key.unlink()
        key.mkdir()
        expected = "is not a file"
    else:
        expected = "cannot be read"
    with pytest.raises(InvalidLogUrl) as caught:
        open_log(secure_url(tls_files, ssl_keyfile=str(key)))
    assert "ssl_keyfile" in str(caught.value) and expected in str(caught.value)


@pytest.mark.parametrize(("option", "value", "known"), [
    ("security_protocol", "TLS", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("sasl_mechanism", "SCRAM-SHA-1", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI"),
])
def test_an_unknown_protocol_or_mechanism_lists_the_known_ones(tls_files, option: str, value: str,
                                                               known: str) -> None:
    with pytest.raises(InvalidLogUrl) as caught:
        open_log(secure_url(tls_files, **{option: value}))
    message = str(caught.value)
    assert f"{option}={value!r}" in message
    assert all(k in message for k in known.replace(" or ", ", ").split(", "))
    assert PASSWORD not in message and "s3cr%2Bt" not in message and KEY_PASSWORD not in message


async def test_secrets_never_show_in_the_repr_the_url_or_the_logs(tls_files, caplog) -> None:
    url = secure_url(tls_files, connect_timeout_ms="1500").replace("b1.example.com:9096,b2.example.com:9096",
                                                                    "127.0.0.1:1")
    log = kafka_log(url)
    shown = [repr(log), str(log), log.url]
    for text in shown:
        assert PASSWORD not in text and "s3cr%2Bt" not in text and KEY_PASSWORD not in text, text
    assert "sasl_plain_password=***" in log.url and "ssl_password=***" in log.url

    # A failed start logs and raises; neither may carry a secret (aiokafka logs too).
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events, pytest.raises(LogUnavailable) as caught:
        await log.start()
    await log.close()
    everything = [str(caught.value), repr(caught.value), caplog.text, repr(events)]
    assert "127.0.0.1:1" in str(caught.value)
    for text in everything:
        assert PASSWORD not in text and "s3cr%2Bt" not in text and KEY_PASSWORD not in text
