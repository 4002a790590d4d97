"""Webhooks signed the way Stripe, GitHub and Standard Webhooks senders sign them,
received by `stepline serve` beside Stepline's own scheme.

The signatures are computed here from each service's documentation, and,
where the service ships a library, by that library (stripe's
`WebhookSignature.generate_signature_header`, standardwebhooks' `Webhook.sign`)
to show that what they send gets in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import standardwebhooks
import stripe

import stepline as sl
from stepline.errors import ServeConfigError
from stepline.server import WebhookSource, create_app
from stepline.settings import load_settings

from .test_server import TOKEN, appended, call, config, output_of, serving

STRIPE_SECRET = "whsec_test_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"the standard webhooks key, 32 b.").decode()
GITHUB_SECRET = "It's a Secret to Everybody"  # GitHub's own documentation example


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "memory":
        return f"memory://hooks-{os.getpid()}-{id(request)}"
    return f"sqlite:///{tmp_path}/stepline.db"


def hooks_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="on-stripe", registry=reg, on=sl.Subscription("webhook.stripe"))
    async def on_stripe(event: dict) -> str:
        return str(event["id"])

    @sl.task(id="on-standard", registry=reg, on=sl.Subscription("webhook.standard"))
    async def on_standard(event: dict) -> str:
        return str(event["type"])

    @sl.task(id="on-github", registry=reg, on=sl.Subscription("webhook.github"))
    async def on_github(event: dict) -> str:
        return str(event["zen"])

    return reg


def hooks_config() -> Any:
    return config(webhooks={
        "stripe": WebhookSource("stripe", STRIPE_SECRET, scheme="stripe"),
        "standard": WebhookSource("standard", STANDARD_SECRET, scheme="standard"),
        "github": WebhookSource("github", GITHUB_SECRET, scheme="github"),
    })


def stripe_by_hand(secret: str, body: bytes, t: int) -> str:
    # stripe.com/docs/webhooks#verify-manually: HMAC-SHA256 of "<t>.<payload>" keyed with the endpoint secret.
    return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + body, hashlib.sha256).hexdigest()}"


def standard_by_hand(secret: str, msg_id: str, t: int, body: bytes) -> dict[str, str]:
    # The Standard Webhooks spec: base64 HMAC-SHA256 of "<id>.<timestamp>.<body>", key = base64 after whsec_.
    key = base64.b64decode(secret.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{t}.".encode() + body, hashlib.sha256).digest()).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": str(t), "webhook-signature": f"v1,{sig}"}


def github_by_hand(secret: str, body: bytes, delivery: str) -> dict[str, str]:
    # docs.github.com "Validating webhook deliveries": sha256= hex HMAC of the body.
    sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={sig}", "X-GitHub-Delivery": delivery}


async def refused(http: Any, url: str, body: bytes, headers: dict[str, str]) -> str:
    status, answer = await call(http, "POST", url, body, headers=headers)
    assert status == 401, (status, answer)
    return str(answer["error"])


async def test_stripe_deliveries_signed_by_the_stripe_library_are_accepted_once(engine_factory):
    e = await engine_factory(hooks_app())
    events = e.client.topics.events
    body = json.dumps({"id": "evt_1", "type": "payment_intent.succeeded"}).encode()
    async with serving(create_app(e.client, hooks_config(), e.registry)) as base:
        url = base + "/v1/webhooks/stripe"
        async with aiohttp.ClientSession() as http:
            before = await appended(e, events)
            t = int(time.time())
            assert "does not match" in await refused(
                http, url, body, {"Stripe-Signature": stripe_by_hand("whsec_wrong", body, t)})
            assert "outside the 300 s tolerance window" in await refused(
                http, url, body, {"Stripe-Signature": stripe_by_hand(STRIPE_SECRET, body, t - 301)})
            assert "missing Stripe-Signature header" in await refused(http, url, body, {})
            # Stepline's own header is not Stripe's: this source reads only Stripe-Signature.
            assert "missing Stripe-Signature" in await refused(
                http, url, body, {"Stepline-Signature": stripe_by_hand(STRIPE_SECRET, body, t)})
            assert await appended(e, events) == before

            header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
            assert header == stripe_by_hand(STRIPE_SECRET, body, int(header.split(",")[0][2:]))
            status, _ = await call(http, "POST", url, body, headers={"Stripe-Signature": header})
            assert status == 202
            assert "signature was already accepted" in await refused(
                http, url, body, {"Stripe-Signature": header})
            assert await appended(e, events) == before + 1
    assert await output_of(e, "on-stripe") == "evt_1"


async def test_standard_webhooks_signed_by_their_library_are_accepted_once_per_message_id(engine_factory):
    e = await engine_factory(hooks_app())
    events = e.client.topics.events
    body = json.dumps({"type": "invoice.paid", "data": {"n": 1}}).encode()
    signer = standardwebhooks.Webhook(STANDARD_SECRET)
    async with serving(create_app(e.client, hooks_config(), e.registry)) as base:
        url = base + "/v1/webhooks/standard"
        async with aiohttp.ClientSession() as http:
            before = await appended(e, events)
            t = int(time.time())
            forged = standard_by_hand("whsec_" + base64.b64encode(b"another key").decode(), "msg_1", t, body)
            assert "webhook-signature does not match" in await refused(http, url, body, forged)
            stale = standard_by_hand(STANDARD_SECRET, "msg_1", t - 301, body)
            assert "outside the 300 s tolerance window" in await refused(http, url, body, stale)
            tampered = standard_by_hand(STANDARD_SECRET, "msg_1", t, body)
            assert "does not match" in await refused(http, url, body + b" ", tampered)
            partial = {k: v for k, v in tampered.items() if k != "webhook-timestamp"}
            assert "missing webhook-timestamp header" in await refused(http, url, body, partial)
            assert await appended(e, events) == before

            now = datetime.now(tz=UTC)
            signature = signer.sign("msg_1", now, body.decode())
            by_library = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp())),
                          "webhook-signature": f"v1a,ignored {signature}"}  # other versions are skipped
            assert signature == standard_by_hand(STANDARD_SECRET, "msg_1", int(now.timestamp()),
                                                 body)["webhook-signature"]
            status, _ = await call(http, "POST", url, body, headers=by_library)
            assert status == 202
            # The sender's retry of the same message (same id, signed again later) is the same delivery.
            again = standard_by_hand(STANDARD_SECRET, "msg_1", t + 1, body)
            assert "webhook-id was already accepted" in await refused(http, url, body, again)
            assert await appended(e, events) == before + 1
    assert await output_of(e, "on-standard") == "invoice.paid"


async def test_github_deliveries_are_checked_without_a_replay_window_and_deduplicated_by_delivery_id(
    engine_factory,
):
    e = await engine_factory(hooks_app())
    events = e.client.topics.events
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    async with serving(create_app(e.client, hooks_config(), e.registry)) as base:
        url = base + "/v1/webhooks/github"
        async with aiohttp.ClientSession() as http:
            before = await appended(e, events)
            assert "X-Hub-Signature-256 does not match" in await refused(
                http, url, body, github_by_hand("not the secret", body, "d-1"))
            assert "malformed X-Hub-Signature-256" in await refused(
                http, url, body, {"X-Hub-Signature-256": "sha1=abc"})
            assert "missing X-Hub-Signature-256 header" in await refused(http, url, body, {})
            assert await appended(e, events) == before

            # GitHub's documented example: this secret and body give this signature.
            example = github_by_hand(GITHUB_SECRET, b"Hello, World!", "x")["X-Hub-Signature-256"]
            assert example == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

            status, _ = await call(http, "POST", url, body, headers=github_by_hand(GITHUB_SECRET, body, "d-1"))
            assert status == 202
            assert "X-GitHub-Delivery was already accepted" in await refused(
                http, url, body, github_by_hand(GITHUB_SECRET, body, "d-1"))
            # No timestamp is signed: the same body under another delivery id verifies (documented).
            status, _ = await call(http, "POST", url, body, headers=github_by_hand(GITHUB_SECRET, body, "d-2"))
            assert status == 202
            assert await appended(e, events) == before + 2


def test_a_source_names_a_known_scheme_and_a_secret_that_scheme_can_use() -> None:
    with pytest.raises(ServeConfigError, match="unknown webhook scheme 'svix'.*stepline, stripe, standard, github"):
        WebhookSource("hooks", "s3cret", scheme="svix")
    with pytest.raises(ServeConfigError, match="'std'.*'whsec_' followed by base64"):
        WebhookSource("std", "whsec_not base64!", scheme="standard")
    assert WebhookSource("plain", "s3cret").scheme == "stepline"


def test_schemes_come_from_the_variable_or_the_toml_table(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WEBHOOK_SCHEMES", "payments=stripe, gh=github")
    assert load_settings().webhook_schemes == {"payments": "stripe", "gh": "github"}
    monkeypatch.delenv("STEPLINE_WEBHOOK_SCHEMES")
    toml = tmp_path / "stepline.toml"
    toml.write_text('[webhook_schemes]\nsignup = "standard"\n')
    monkeypatch.setenv("STEPLINE_CONFIG", str(toml))
    assert load_settings().webhook_schemes == {"signup": "standard"}


def serve_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, STEPLINE_LOG="memory://cli-serve", COLUMNS="200", **env)
    for name in ("STEPLINE_API_TOKEN", "STEPLINE_WEBHOOKS", "STEPLINE_APP", "STEPLINE_WEBHOOK_SCHEMES"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", "serve", "--api-token", TOKEN, *args],
                          env=environ, capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_scheme_for_an_unknown_source_or_an_unknown_scheme_in_one_line() -> None:
    proc = serve_cli("--webhook", "gh=s3cret", "--webhook-scheme", "payments=stripe")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "--webhook-scheme for source(s) without a --webhook secret: payments" in proc.stderr
    proc = serve_cli("--port", "0", STEPLINE_WEBHOOKS="gh=s3cret", STEPLINE_WEBHOOK_SCHEMES="gh=gitlab")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "unknown webhook scheme 'gitlab'" in proc.stderr and "s3cret" not in proc.stderr
