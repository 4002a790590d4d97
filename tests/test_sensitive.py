"""Sensitive payload fields: encrypted on the log, redacted when shown, erased by forgetting the subject.

Backed by engine/security/sensitive.py and engine/security/keystore.py; docs/sensitive-data.md
states the guarantees these tests check.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from pydantic import BaseModel

import stepline as sl
from stepline.core.ids import wait_token
from stepline.errors import (
    KeyNotFound,
    KeyStoreError,
    PayloadValidationError,
    RunFailedError,
    TaskDefinitionError,
)
from stepline.history.replay import check_runs
from stepline.projections.query import QueryProjector, QueryStore
from stepline.sdk.sealing import open_for_replay
from stepline.security.keystore import MemoryKeyStore, SqliteKeyStore, default_keystore_url, open_keystore
from stepline.security.sensitive import ERASED, REDACTED, redact_secret_fields, redact_text
from stepline.server import ServeConfig, create_app

from .conftest import eventually

ADA = "ada.lovelace@example.com"
BOB = "bob.builder@example.org"
API_TOKEN = "test-api-token-9f3a"


class SignUp(BaseModel):
    user_id: str
    email: Annotated[str, sl.Sensitive]
    plan: str = "free"


def signup_app(delivered: list[str]) -> sl.Registry:
    reg = sl.Registry()
    failures: dict[str, int] = {}

    @sl.step
    async def send_welcome(address: str) -> str:
        # Fails once with the address in its message: the error, the retry
        # reason and the step's recorded input must not keep it.
        failures[address] = failures.get(address, 0) + 1
        if failures[address] == 1:
            raise ConnectionError(f"mail server refused {address}")
        delivered.append(address)
        return "sent"

    @sl.task(id="welcome", subject="user_id", registry=reg, retry=sl.Retry.fixed_delay(0.01, max_attempts=3))
    async def welcome(p: SignUp) -> dict[str, str]:
        sl.logger.info(f"welcoming {p.email}", address=p.email, plan=p.plan)
        status = await send_welcome(p.email)
        return {"status": status, "domain": p.email.rsplit("@", 1)[1]}

    @sl.task(id="confirm", subject="user_id", registry=reg)
    async def confirm(p: SignUp) -> str:
        await sl.wait_for_token()
        return f"confirmed {len(p.email)}"

    return reg


@pytest.fixture
def keys_env(backend_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared log needs its key store named; memory and sqlite logs use their default."""
    if backend_url.startswith("kafka://"):
        monkeypatch.setenv("STEPLINE_KEYS", f"sqlite:///{tmp_path}/keys.db")
    else:
        monkeypatch.delenv("STEPLINE_KEYS", raising=False)


async def every_record(e: Any) -> list[bytes]:
    """The raw value of every record of every topic the engine uses."""
    log = e.client.log
    out: list[bytes] = []
    for spec in e.topics.specs():
        for p in range(await log.partitions(spec.name)):
            end, offset = await log.end_offset(spec.name, p), 0
            while offset < end:
                recs = await log.read(spec.name, p, offset, 5000)
                out += [r.value for r in recs]
                offset = recs[-1].offset + 1 if recs else end
    return out


def files_holding(directory: Path, prefix: str, needle: bytes) -> list[str]:
    return [f.name for f in directory.iterdir() if f.name.startswith(prefix) and needle in f.read_bytes()]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def get(session: aiohttp.ClientSession, url: str, method: str = "GET",
              token: str | None = API_TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, await resp.text()


# --- on the log and in the worker ----------------------------------------------------------


async def test_a_sensitive_field_never_reaches_the_log_in_plaintext_and_the_task_reads_it(
    engine_factory: Any, keys_env: None, backend_url: str, tmp_path: Path
) -> None:
    delivered: list[str] = []
    e = await engine_factory(signup_app(delivered))

    handle = await e.client.trigger("welcome", {"user_id": "u-ada", "email": ADA})

    assert await handle.result(timeout=30) == {"status": "sent", "domain": "example.com"}
    assert delivered == [ADA]  # the task got the decrypted value, on its second attempt too
    records = await every_record(e)
    assert records and not [r for r in records if ADA.encode() in r]
    if backend_url.startswith("sqlite://"):
        assert files_holding(tmp_path, "stepline.db", ADA.encode()) == []
        assert files_holding(tmp_path, "stepline.db", b'"$enc"')  # the ciphertext is there
    state = await e.client.get_run(handle.run_id)
    triggered = json.loads(state.payload.data)
    assert triggered["user_id"] == "u-ada" and triggered["email"]["$enc"] == "v1"
    step = state.steps[0]
    assert json.loads(step.input.data) == [REDACTED]
    assert [json.loads(line.fields)["address"] for line in state.logs] == [REDACTED, REDACTED]
    assert all(ADA not in line.message for line in state.logs)
    assert [err.error.message for err in state.errors] == [f"mail server refused {REDACTED}"]


async def test_a_run_waiting_when_its_subject_is_forgotten_fails_with_subject_erased(
    engine_factory: Any, keys_env: None
) -> None:
    e = await engine_factory(signup_app([]))
    ada = await e.client.trigger("confirm", {"user_id": "u-ada", "email": ADA})
    bob = await e.client.trigger("confirm", {"user_id": "u-bob", "email": BOB})

    async def waiting(run_id: str) -> bool:
        return (await e.client.get_run(run_id)).status == "suspended"

    await eventually(lambda: waiting(ada.run_id), timeout=30, what="ada's run to wait for its token")
    await eventually(lambda: waiting(bob.run_id), timeout=30, what="bob's run to wait for its token")
    assert await e.client.forget("u-ada") != []
    await e.client.complete_token(wait_token(ada.run_id, 0), {"ok": True})
    await e.client.complete_token(wait_token(bob.run_id, 0), {"ok": True})

    with pytest.raises(RunFailedError) as failed:
        await ada.result(timeout=30)
    assert failed.value.error_type == "SubjectErased"
    state = await e.client.get_run(ada.run_id)
    assert state.status == "failed" and state.dead_lettered
    assert state.error is not None and "u-ada" not in state.error.message
    types = [ev.type for _, ev in await e.client.history(ada.run_id)]
    assert "RetryScheduled" not in types  # never retried: the key is gone for good
    assert await bob.result(timeout=30) == f"confirmed {len(BOB)}"


async def test_after_forget_the_history_keeps_its_shape_and_still_replays(
    engine_factory: Any, keys_env: None
) -> None:
    e = await engine_factory(signup_app([]))
    ada = await e.client.trigger("welcome", {"user_id": "u-ada", "email": ADA})
    await ada.result(timeout=30)
    before = await e.client.history(ada.run_id)

    assert len(await e.client.forget("u-ada")) == 1

    assert [ev.type for _, ev in await e.client.history(ada.run_id)] == [ev.type for _, ev in before]
    state = await e.client.get_run(ada.run_id)
    assert state.status == "completed" and json.loads(state.output.data)["domain"] == "example.com"
    opened, erased = await open_for_replay(e.registry.get("welcome"), state.payload, e.client.keys)
    assert erased and json.loads(opened.data) == {"user_id": "u-ada", "email": ERASED, "plan": "free"}
    report = await check_runs(e.url, e.registry, run_ids=[ada.run_id])
    assert report.passed and report.ok == 1, report.to_dict()
    # Another subject's run is unaffected, before and after.
    bob = await e.client.trigger("welcome", {"user_id": "u-bob", "email": BOB})
    assert await bob.result(timeout=30) == {"status": "sent", "domain": "example.org"}
    assert (await check_runs(e.url, e.registry, task_ids=["welcome"])).ok == 2


# --- shown: API, dashboard, query projection, logs -----------------------------------------


async def test_the_api_shows_sensitive_fields_redacted_then_erased_after_forget(
    engine_factory: Any, keys_env: None, tmp_path: Path
) -> None:
    e = await engine_factory(signup_app([]))
    ada = await e.client.trigger("welcome", {"user_id": "u-ada", "email": ADA})
    bob = await e.client.trigger("welcome", {"user_id": "u-bob", "email": BOB})
    await ada.result(timeout=30)
    await bob.result(timeout=30)
    config = ServeConfig(api_token=API_TOKEN, webhooks={})
    async with QueryStore(tmp_path / "query.db") as store:
        async with QueryProjector(e.client.log, store, topics=e.topics) as projector:
            await projector.wait_caught_up()
            async with serving(create_app(e.client, config, e.registry, query=store)) as base:
                async with aiohttp.ClientSession() as s:
                    texts = [await get(s, f"{base}/v1/runs/{ada.run_id}"),
                             await get(s, f"{base}/v1/runs/{ada.run_id}/history"),
                             await get(s, f"{base}/v1/runs?q=lovelace")]
                    assert [status for status, _ in texts] == [200, 200, 200]
                    assert not [text for _, text in texts if ADA in text]
                    assert json.loads(texts[0][1])["payload"] == {"user_id": "u-ada", "email": REDACTED,
                                                                   "plan": "free"}
                    assert json.loads(texts[2][1])["runs"] == []  # search never sees the plaintext

                    assert (await get(s, f"{base}/v1/subjects/u-ada", "DELETE", token=None))[0] == 401
                    status, text = await get(s, f"{base}/v1/subjects/u-ada", "DELETE")
                    assert (status, json.loads(text)) == (200, {"subject": "u-ada", "erased": True,
                                                                "keys_deleted": 1})
                    status, text = await get(s, f"{base}/v1/subjects/u-ada", "DELETE")
                    assert json.loads(text)["erased"] is False

                    run = json.loads((await get(s, f"{base}/v1/runs/{ada.run_id}"))[1])
                    history = json.loads((await get(s, f"{base}/v1/runs/{ada.run_id}/history"))[1])
                    other = json.loads((await get(s, f"{base}/v1/runs/{bob.run_id}"))[1])
    assert run["payload"]["email"] == ERASED and run["status"] == "completed"
    assert history["events"][0]["body"]["payload"]["email"] == ERASED
    assert other["payload"]["email"] == REDACTED
    assert files_holding(tmp_path, "query.db", ADA.encode()) == []


async def test_log_lines_of_a_run_never_carry_its_sensitive_values(engine_factory: Any, keys_env: None) -> None:
    e = await engine_factory(signup_app([]))
    with structlog.testing.capture_logs() as lines:
        handle = await e.client.trigger("welcome", {"user_id": "u-ada", "email": ADA})
        await handle.result(timeout=30)

    mine = [line for line in lines if line.get("run_id") == handle.run_id]
    assert [line["address"] for line in mine] == [REDACTED, REDACTED]
    assert not [line for line in lines if ADA in json.dumps(line, default=str)]


def test_secrets_are_masked_in_every_configured_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    sl.configure_logging(json_logs=True, level=logging.INFO)
    try:
        structlog.get_logger("t").info(
            "connecting to kafka://b:9092?sasl_plain_password=hunter2-pw&security_protocol=SASL_SSL",
            api_token="tok-123456", webhook_secret="whsec-abcdef", authorization="Bearer abc.def",
            tokens_used=42,
        )
    finally:
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    for secret in ("hunter2-pw", "tok-123456", "whsec-abcdef", "abc.def"):
        assert secret not in json.dumps(line)
    assert line["api_token"] == REDACTED and line["tokens_used"] == 42
    assert "security_protocol=SASL_SSL" in line["event"]


def test_secret_masking_keeps_ordinary_text_and_fields() -> None:
    assert redact_text("Authorization: Bearer s3cr3t.t0ken") == f"Authorization: Bearer {REDACTED}"
    assert redact_text("retrying in 5 s") == "retrying in 5 s"
    assert redact_secret_fields({"password": None, "token_count": 3, "url": "x?token=abc"}) == {
        "password": None, "token_count": 3, "url": f"x?token={REDACTED}"}


# --- declaring and triggering ----------------------------------------------------------------


class Card(BaseModel):
    number: Annotated[str, sl.Sensitive]
    brand: str


class Order(BaseModel):
    customer: str
    card: Card
    contacts: list[Annotated[str, sl.Sensitive]] = []
    note: str | None = None


def test_markers_are_found_in_nested_models_and_lists_and_paths_can_be_named() -> None:
    reg = sl.Registry()

    @sl.task(id="pay", subject="customer", sensitive=["note"], registry=reg)
    async def pay(o: Order) -> None: ...

    assert pay.sensitive is not None
    assert sorted(pay.sensitive.describe()) == ["card.number", "contacts.*", "note"]

    @sl.task(id="plain", registry=reg)
    async def plain(o: dict[str, Any]) -> None: ...

    assert plain.sensitive is None


@pytest.mark.parametrize(("options", "message"), [
    ({"sensitive": ["email"]}, "no subject="),
    ({"subject": "user_id"}, "no sensitive field"),
    ({"sensitive": "email", "subject": "user_id"}, "list of field paths"),
    ({"sensitive": ["a..b"], "subject": "user_id"}, "dotted field path"),
    ({"sensitive": ["email"], "subject": "users.*"}, "without '*'"),
])
def test_a_wrong_declaration_is_refused_with_the_reason(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message.replace("*", r"\*")):
        @sl.task(id="bad", registry=sl.Registry(), **options)
        async def bad(p: dict[str, Any]) -> None: ...


async def test_a_payload_without_its_subject_or_with_a_forged_envelope_appends_nothing(tmp_path: Path) -> None:
    reg = sl.Registry()

    @sl.task(id="notify", subject="user.id", sensitive=["user.email"], registry=reg)
    async def notify(p: dict[str, Any]) -> None: ...

    async with sl.Client(f"sqlite:///{tmp_path}/log.db", registry=reg) as client:
        with pytest.raises(PayloadValidationError, match=r"user\.id: the subject"):
            await client.trigger("notify", {"user": {"email": ADA}})
        forged = {"user": {"id": "u1", "email": {"$enc": "v1", "kid": "k", "ct": "AAAA"}}}
        with pytest.raises(PayloadValidationError, match="reserved for encrypted fields"):
            await client.trigger("notify", forged)
        async with sl.Client(f"sqlite:///{tmp_path}/log.db") as bare:  # no registry: no task to check against
            with pytest.raises(PayloadValidationError, match="reserved"):
                await bare.trigger("other-task", {"$enc": "v1"})
        assert await client.list_runs() == []


async def test_a_kafka_log_without_a_key_store_refuses_to_trigger(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPLINE_KEYS", raising=False)
    reg = sl.Registry()

    @sl.task(id="notify", subject="uid", sensitive=["email"], registry=reg)
    async def notify(p: dict[str, Any]) -> None: ...

    url = f"kafka://{kafka_bootstrap}?namespace=test-{uuid.uuid4().hex[:12]}"
    async with sl.Client(url, registry=reg) as client:
        with pytest.raises(KeyStoreError, match="STEPLINE_KEYS"):
            await client.trigger("notify", {"uid": "u1", "email": ADA})
        assert await client.list_runs() == []


async def test_a_worker_on_another_key_store_fails_the_run_saying_so(tmp_path: Path) -> None:
    reg = sl.Registry()

    @sl.task(id="notify", subject="uid", sensitive=["email"], registry=reg, retry=sl.Retry(max_attempts=1))
    async def notify(p: dict[str, Any]) -> str:
        return "never"

    url = f"sqlite:///{tmp_path}/log.db"
    async with sl.Client(url, registry=reg, keys=SqliteKeyStore(tmp_path / "a.db")) as client:
        async with sl.Worker(reg, client.log, client=client, keys=SqliteKeyStore(tmp_path / "b.db")):
            handle = await notify.trigger({"uid": "u1", "email": ADA}, client=client)
            with pytest.raises(RunFailedError) as failed:
                await handle.result(timeout=30)
    assert failed.value.error_type == "KeyNotFound"
    assert "same key store" in failed.value.message


# --- key stores ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_key_store_keeps_one_key_per_subject_until_forgotten(kind: str, tmp_path: Path) -> None:
    store = MemoryKeyStore("t") if kind == "memory" else open_keystore(f"sqlite:///{tmp_path}/k.db")
    first = await store.key_for("u1")
    assert await store.key_for("u1") == first
    assert (await store.key_for("u2")).kid != first.kid
    assert await store.get(first.kid) == first.key

    assert await store.forget("u1") == [first.kid]

    assert await store.get(first.kid) is None and await store.is_erased(first.kid)
    assert not await store.is_erased("never-issued")
    assert await store.forget("u1") == []
    assert (await store.key_for("u1")).kid != first.kid  # new data after erasure gets a new key
    await store.close()
    if kind == "sqlite":
        assert files_holding(tmp_path, "k.db", first.key) == []  # overwritten, and out of the WAL


async def test_a_key_forgotten_by_another_process_is_never_served_from_cache(tmp_path: Path) -> None:
    mine, theirs = SqliteKeyStore(tmp_path / "k.db"), SqliteKeyStore(tmp_path / "k.db")
    sk = await mine.key_for("u1")
    assert await mine.get(sk.kid) == sk.key and await theirs.get(sk.kid) == sk.key

    await theirs.forget("u1")

    assert await mine.get(sk.kid) is None and await mine.is_erased(sk.kid)
    assert (await mine.key_for("u1")).kid != sk.kid


def test_key_stores_default_beside_an_embedded_log_and_refuse_unknown_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STEPLINE_KEYS", raising=False)
    assert default_keystore_url("sqlite:////srv/app/.stepline/stepline.db") == \
        "sqlite:////srv/app/.stepline/stepline.keys.db"
    assert default_keystore_url("memory://t1") == "memory://t1"
    monkeypatch.setenv("STEPLINE_KEYS", "sqlite:///keys.db")
    assert default_keystore_url("kafka://b:9092") == "sqlite:///keys.db"
    with pytest.raises(KeyStoreError, match="unsupported key store URL"):
        open_keystore("vault://x")
    assert issubclass(KeyNotFound, KeyStoreError)


# --- the command line ------------------------------------------------------------------------

CLI_APP = '''
from typing import Annotated

from pydantic import BaseModel

import stepline as sl

registry = sl.Registry()


class SignUp(BaseModel):
    user_id: str
    email: Annotated[str, sl.Sensitive]


@sl.step
async def send_welcome(address: str) -> str:
    return "sent"


@sl.task(id="welcome", subject="user_id", registry=registry)
async def welcome(p: SignUp) -> str:
    return await send_welcome(p.email)
'''


def stepline(*args: str, url: str) -> Any:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200")
    for name in ("STEPLINE_APP", "STEPLINE_KEYS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "stepline.cli", *args, "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"stepline {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    assert ADA not in proc.stdout + proc.stderr
    return json.loads(proc.stdout)


async def test_the_cli_shows_redacted_forgets_and_still_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEPLINE_KEYS", raising=False)
    module = tmp_path / "sensitive_cli_app.py"
    module.write_text(CLI_APP)
    reg = sl.load_app(str(module))
    url = f"sqlite:///{tmp_path}/stepline.db"
    async with sl.Client(url, registry=reg) as client, sl.Worker(reg, client.log, client=client):
        handle = await client.trigger("welcome", {"user_id": "u-ada", "email": ADA})
        assert await handle.result(timeout=30) == "sent"

    assert stepline("runs", "show", handle.run_id, url=url)["payload"]["email"] == REDACTED
    assert stepline("forget", "u-ada", url=url) == {"subject": "u-ada", "erased": True, "keys_deleted": 1}

    assert stepline("runs", "show", handle.run_id, url=url)["payload"]["email"] == ERASED
    assert stepline("history", handle.run_id, url=url)[0]["body"]["payload"]["email"] == ERASED
    report = stepline("replay", "--check", str(module), url=url)
    assert report["checked"] == 1 and report["ok"] == 1 and report["problems"] == []


ISOLATED_APP = '''
from typing import Annotated

from pydantic import BaseModel

import stepline as sl

registry = sl.Registry()


class SignUp(BaseModel):
    user_id: str
    email: Annotated[str, sl.Sensitive]


@sl.step
async def measure(address: str) -> int:
    return len(address)


@sl.task(id="isolated-welcome", subject="user_id", isolation="process", registry=registry)
async def isolated_welcome(p: SignUp) -> int:
    sl.logger.info("measuring", address=p.email)
    return await measure(p.email)
'''


async def test_an_isolated_task_gets_the_plain_value_and_records_it_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEPLINE_KEYS", raising=False)
    module = tmp_path / "sensitive_isolated_app.py"
    module.write_text(ISOLATED_APP)
    reg = sl.load_app(str(module))
    async with sl.Client(f"sqlite:///{tmp_path}/stepline.db", registry=reg) as client:
        async with sl.Worker(reg, client.log, client=client):
            handle = await client.trigger("isolated-welcome", {"user_id": "u-ada", "email": ADA})
            assert await handle.result(timeout=60) == len(ADA)
        state = await client.get_run(handle.run_id)
    assert json.loads(state.steps[0].input.data) == [REDACTED]
    assert [json.loads(line.fields) for line in state.logs] == [{"address": REDACTED}]
    assert files_holding(tmp_path, "stepline.db", ADA.encode()) == []
