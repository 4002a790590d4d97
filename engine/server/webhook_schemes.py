"""How each webhook sender signs its deliveries, and how we check them.

A webhook source names one scheme (`WebhookSource.scheme`, the setting
`webhook_schemes`, `stepline serve --webhook-scheme SOURCE=SCHEME`):

| scheme | headers | signed bytes | replay window |
|---|---|---|---|
| `stepline` | `Stepline-Signature: t=<unix s>,v1=<hex>` | `"<t>." + body`, key: the secret's bytes | tolerance around `t`; each signature once |
| `stripe` | `Stripe-Signature: t=<unix s>,v1=<hex>` | the same as `stepline` (Stripe's scheme, its header) | the same |
| `standard` | `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>` | `"<id>.<timestamp>." + body`, key: base64 after `whsec_` | tolerance around the timestamp; each `webhook-id` once |
| `github` | `X-Hub-Signature-256: sha256=<hex>` | the body | none: GitHub signs no time, so a captured delivery stays valid; each `X-GitHub-Delivery` once while remembered |

Every digest is HMAC-SHA256. The signature is checked before the
timestamp, so a caller without the secret learns nothing but "no match".
This module only decides; the route (app.py) answers and publishes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SIGNATURE_HEADER = "Stepline-Signature"
STRIPE_HEADER = "Stripe-Signature"
GITHUB_HEADER = "X-Hub-Signature-256"
GITHUB_DELIVERY = "X-GitHub-Delivery"
STANDARD_ID, STANDARD_TIMESTAMP, STANDARD_SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"

_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_STANDARD_PREFIX = "whsec_"


class WebhookRejected(Exception):
    """A delivery refused: answered with `status` and `reason`, nothing published."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Accepted:
    """An authentic, timely delivery. `replay_key` is what must not be accepted
    twice (None: the scheme gives nothing to tell copies apart); `what` names
    it in the refusal of a copy."""

    replay_key: str | None
    what: str


Headers = Mapping[str, str]


def _digest(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign_webhook(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The `Stepline-Signature` (or `Stripe-Signature`) value for `body`, signed now unless `timestamp` is given."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret.encode(), f'{t}.'.encode() + body).hex()}"


def _within(timestamp: int, now: float, tolerance: int) -> None:
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected(f"signature timestamp is outside the {tolerance} s tolerance window")


# --- stepline and stripe: t=...,v1=<hex> -------------------------------------


def _parse_t_v1(header_name: str, header: str | None) -> tuple[int, list[str]]:
    """(timestamp, v1 signatures); entries of other schemes (Stripe's v0) are ignored."""
    malformed = f"malformed {header_name} header: expected t=<unix seconds>,v1=<hex HMAC-SHA256>"
    if header is None:
        raise WebhookRejected(f"missing {header_name} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise WebhookRejected(malformed)
        if key == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(value):
                raise WebhookRejected(malformed)
            timestamp = int(value)
        elif key == "v1":
            if not _HEX_DIGEST.fullmatch(value.lower()):
                raise WebhookRejected(malformed)
            signatures.append(value.lower())
    if timestamp is None or not signatures:
        raise WebhookRejected(malformed)
    return timestamp, signatures


def _t_v1(header_name: str) -> Callable[[str, str, Headers, bytes, float, int], Accepted]:
    def verify(source: str, secret: str, headers: Headers, body: bytes, now: float, tolerance: int) -> Accepted:
        timestamp, given = _parse_t_v1(header_name, headers.get(header_name))
        expected = _digest(secret.encode(), f"{timestamp}.".encode() + body).hex()
        if not any(hmac.compare_digest(expected, sig) for sig in given):
            raise WebhookRejected(f"{header_name} does not match the body for source {source!r}")
        _within(timestamp, now, tolerance)
        return Accepted(expected, "signature")

    return verify


# --- Standard Webhooks --------------------------------------------------------


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_<base64>`; the prefix is optional)."""
    encoded = secret.removeprefix(_STANDARD_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a Standard Webhooks secret is 'whsec_' followed by base64")
    return key


def _standard(source: str, secret: str, headers: Headers, body: bytes, now: float, tolerance: int) -> Accepted:
    missing = [h for h in (STANDARD_ID, STANDARD_TIMESTAMP, STANDARD_SIGNATURE) if not headers.get(h)]
    if missing:
        raise WebhookRejected(f"missing {', '.join(missing)} header{'s' * (len(missing) > 1)}")
    msg_id, stamp, header = headers[STANDARD_ID], headers[STANDARD_TIMESTAMP], headers[STANDARD_SIGNATURE]
    if not _TIMESTAMP.fullmatch(stamp):
        raise WebhookRejected(f"malformed {STANDARD_TIMESTAMP} header: expected unix seconds")
    # Space-separated "version,base64" entries; v1a (asymmetric) and others are not ours.
    given = [sig for version, sep, sig in (e.partition(",") for e in header.split()) if sep and version == "v1"]
    if not given:
        raise WebhookRejected(f"malformed {STANDARD_SIGNATURE} header: expected v1,<base64 HMAC-SHA256>")
    expected = base64.b64encode(_digest(standard_key(secret), f"{msg_id}.{stamp}.".encode() + body)).decode()
    # As bytes: compare_digest refuses non-ASCII str, and a header may hold any.
    if not any(hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")) for sig in given):
        raise WebhookRejected(f"{STANDARD_SIGNATURE} does not match the body for source {source!r}")
    _within(int(stamp), now, tolerance)
    # The spec's idempotency key: a sender's retry of one message keeps its id.
    return Accepted(msg_id, STANDARD_ID)


# --- GitHub -------------------------------------------------------------------


def _github(source: str, secret: str, headers: Headers, body: bytes, now: float, tolerance: int) -> Accepted:
    header = headers.get(GITHUB_HEADER)
    if header is None:
        raise WebhookRejected(f"missing {GITHUB_HEADER} header")
    algorithm, sep, given = header.partition("=")
    if algorithm != "sha256" or not sep or not _HEX_DIGEST.fullmatch(given.lower()):
        raise WebhookRejected(f"malformed {GITHUB_HEADER} header: expected sha256=<hex HMAC-SHA256>")
    expected = _digest(secret.encode(), body).hex()
    if not hmac.compare_digest(expected, given.lower()):
        raise WebhookRejected(f"{GITHUB_HEADER} does not match the body for source {source!r}")
    # Not signed, so not a defence against replays: it only drops GitHub's
    # own second copy of a delivery (a redelivery keeps the id).
    delivery = headers.get(GITHUB_DELIVERY)
    return Accepted(delivery or None, GITHUB_DELIVERY)


Verifier = Callable[[str, str, Headers, bytes, float, int], Accepted]

SCHEMES: dict[str, Verifier] = {
    "stepline": _t_v1(SIGNATURE_HEADER),
    "stripe": _t_v1(STRIPE_HEADER),
    "standard": _standard,
    "github": _github,
}


def check_scheme(scheme: str, secret: str) -> None:
    """ValueError unless `scheme` is known and `secret` is a secret it can use."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown webhook scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "standard":
        standard_key(secret)


def verify_delivery(
    scheme: str, source: str, secret: str, headers: Headers, body: bytes, tolerance: int,
    now: float | None = None,
) -> Accepted:
    """The delivery's replay key if it is authentic and timely under `scheme`; WebhookRejected otherwise."""
    return SCHEMES[scheme](source, secret, headers, body, time.time() if now is None else now, tolerance)


__all__ = [
    "GITHUB_DELIVERY",
    "GITHUB_HEADER",
    "SCHEMES",
    "SIGNATURE_HEADER",
    "STRIPE_HEADER",
    "Accepted",
    "WebhookRejected",
    "check_scheme",
    "sign_webhook",
    "standard_key",
    "verify_delivery",
]
