"""Sensitive payload fields: encrypted on the log, redacted when shown, erasable.

A task marks fields of its payload sensitive and names the subject (the
person) they belong to:

    class SignUp(BaseModel):
        user_id: str
        email: Annotated[str, sl.Sensitive]

    @sl.task(id="welcome", subject="user_id")          # or sensitive=["email", "card.number"]
    async def welcome(p: SignUp) -> None: ...

1. Trigger (`seal`): the client validates the payload, then replaces each
   sensitive value by an envelope `{"$enc": "v1", "kid": ..., "ct": ...}`,
   AES-256-GCM with the subject's key from the key store (engine/security/keystore.py),
   before anything is appended. The log, its snapshots and the query
   projection only ever hold the ciphertext. The payload stays JSON, so the
   codec and the schemas do not change.
2. Attempt (`open_run`): the worker decrypts the envelopes at the task's
   sensitive paths and hands the task the plain values. While the attempt
   runs, those values are cut out of whatever it records besides results
   (log lines, step inputs, errors, retry reasons, wait conditions) and
   out of its structlog lines: they appear as "[redacted]".
3. Display (`shown`): the API, the dashboard and the CLI render an envelope
   as "[redacted]", or as "[erased]" once its key is gone; they never decrypt.
4. Forget (`Client.forget`, `stepline forget`, `DELETE /v1/subjects/{s}`):
   the subject's key is deleted. Every envelope made with it is now noise;
   the history keeps its shape, folds and replays (the field reads as
   "[erased]"), and a run that needs the value again fails with
   SubjectErased, which is never retried.

What is not covered: values the task's code returns (step outputs, the
run's output) or sends elsewhere, domain events published with the values
in them, and the match of `wait_for_event` (kept on the waits topic).
docs/sensitive-data.md says so for users.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import typing
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel

from stepline.core.events import (
    JSON,
    Body,
    ErrorInfo,
    LogRecorded,
    Payload,
    RetryScheduled,
    RunFailed,
    RunSuspended,
    StepFailed,
    StepStarted,
)
from stepline.errors import (
    KeyNotFound,
    KeyStoreError,
    PayloadValidationError,
    SubjectErased,
    TaskDefinitionError,
)
from stepline.log.redact import is_wait_token, redact_url
from stepline.security.keystore import KeyStore

REDACTED = "[redacted]"
ERASED = "[erased]"

ENC = "$enc"
VERSION = "v1"
# Binds a ciphertext to its envelope version and key id.
_AAD = b"stepline/enc/v1/"
_NONCE = 12
# Values shorter than this are not cut out of log lines and errors: "42" or
# "yes" would shred unrelated text. They are still encrypted on the log.
MIN_SCRUB_CHARS = 4

Path = tuple[str, ...]
ANY_ITEM = "*"


class Sensitive:
    """Marks a payload field sensitive: `email: Annotated[str, sl.Sensitive]`.

    The value is encrypted on the log with the subject's key (the task's
    `subject=`), never shown by the API or dashboard, and unreadable
    everywhere once the subject is forgotten.
    """

    def __init__(self) -> None:
        raise TypeError("use stepline.Sensitive itself as the marker: Annotated[str, sl.Sensitive]")


def _is_marker(meta: object) -> bool:
    return meta is Sensitive or isinstance(meta, Sensitive)


@dataclasses.dataclass(frozen=True, slots=True)
class SensitiveSpec:
    """A task's sensitive field paths and the path of its subject id."""

    paths: tuple[Path, ...]
    subject: Path

    def describe(self) -> list[str]:
        return [".".join(p) for p in self.paths]


def _parse_path(task_id: str, text: object, what: str, wildcard: bool) -> Path:
    if not isinstance(text, str) or not text or any(not seg for seg in text.split(".")):
        raise TaskDefinitionError(
            f"task {task_id!r}: {what} must be a dotted field path such as 'email' or 'card.number', got {text!r}"
        )
    path = tuple(text.split("."))
    if not wildcard and ANY_ITEM in path:
        raise TaskDefinitionError(f"task {task_id!r}: {what} {text!r} must name one field, without '*'")
    return path


def _marked(tp: Any, prefix: Path, seen: set[int]) -> list[Path]:
    """Paths of the fields marked Sensitive inside a payload type."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        return [prefix] if any(_is_marker(m) for m in meta) else _marked(base, prefix, seen)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if id(tp) in seen:
            return []
        seen = seen | {id(tp)}
        out: list[Path] = []
        for name, info in tp.model_fields.items():
            if any(_is_marker(m) for m in info.metadata):
                out.append((*prefix, name))
            else:
                out += _marked(info.annotation, (*prefix, name), seen)
        return out
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        if id(tp) in seen:
            return []
        seen = seen | {id(tp)}
        hints = typing.get_type_hints(tp, include_extras=True)
        return [p for name, hint in hints.items() for p in _marked(hint, (*prefix, name), seen)]
    args = typing.get_args(tp)
    if origin in (list, tuple, set, frozenset, Sequence) or (origin is not None and origin is Iterable):
        return [p for a in args if a is not Ellipsis for p in _marked(a, (*prefix, ANY_ITEM), seen)]
    if origin is dict and len(args) == 2:
        return _marked(args[1], (*prefix, ANY_ITEM), seen)
    # Unions (X | None, Optional[X]): a field's type is any of its members.
    return [p for a in args for p in _marked(a, prefix, seen)] if args else []


def sensitive_spec(
    task_id: str, payload_type: Any, sensitive: Sequence[str] | None, subject: str | None
) -> SensitiveSpec | None:
    """The task's spec from `sensitive=`, `subject=` and Sensitive markers; None without any."""
    if isinstance(sensitive, str):
        raise TaskDefinitionError(f"task {task_id!r}: sensitive must be a list of field paths, got {sensitive!r}")
    paths = [_parse_path(task_id, p, "a sensitive field", True) for p in (sensitive or ())]
    try:
        paths += _marked(payload_type, (), set())
    except Exception as exc:  # an annotation typing cannot resolve
        raise TaskDefinitionError(f"task {task_id!r}: cannot read Sensitive markers of its payload: {exc}") from exc
    unique = tuple(dict.fromkeys(paths))
    if subject is None:
        if unique:
            raise TaskDefinitionError(
                f"task {task_id!r} has sensitive fields ({', '.join('.'.join(p) for p in unique)}) but no "
                f"subject=: name the payload field that says whose data it is, e.g. subject='user_id', "
                f"so that forgetting that subject erases them"
            )
        return None
    if not unique:
        raise TaskDefinitionError(
            f"task {task_id!r} names subject={subject!r} but no sensitive field: mark fields with "
            f"Annotated[..., stepline.Sensitive] or pass sensitive=['field', ...]"
        )
    return SensitiveSpec(unique, _parse_path(task_id, subject, "subject", False))


# --- walking JSON ------------------------------------------------------------


def _at(doc: Any, path: Path) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value a path reaches; missing parts reach nothing."""
    head, rest = path[0], path[1:]
    if head == ANY_ITEM:
        keys: Iterable[Any] = (range(len(doc)) if isinstance(doc, list)
                               else list(doc) if isinstance(doc, dict) else ())
    elif isinstance(doc, dict) and head in doc:
        keys = (head,)
    else:
        keys = ()
    for k in keys:
        if rest:
            yield from _at(doc[k], rest)
        else:
            yield doc, k


def values_at(spec: SensitiveSpec, doc: Any) -> list[Any]:
    """Every value of `doc` that the spec marks sensitive (plain, as a task body sees them)."""
    return [c[k] for p in spec.paths for c, k in _at(doc, p)]


def is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and value.get(ENC) == VERSION and "kid" in value and "ct" in value


def _has_envelope_key(doc: Any) -> bool:
    if isinstance(doc, dict):
        return ENC in doc or any(_has_envelope_key(v) for v in doc.values())
    if isinstance(doc, list):
        return any(_has_envelope_key(v) for v in doc)
    return False


def refuse_envelopes(payload: Payload, where: str) -> None:
    """A caller may not send an envelope of its own: copied from another run's
    history into a sensitive field, it would make the worker decrypt someone
    else's data. Costs a substring search unless the key occurs."""
    if payload.content_type != JSON or f'"{ENC}"'.encode() not in payload.data:
        return
    if _has_envelope_key(json.loads(payload.data)):
        raise PayloadValidationError(where, f"the key {ENC!r} is reserved for encrypted fields")


def _subject_of(doc: Any, spec: SensitiveSpec, where: str) -> str:
    found = [c[k] for c, k in _at(doc, spec.subject)]
    value = found[0] if found else None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise PayloadValidationError(
            where, f"{'.'.join(spec.subject)}: the subject (whose sensitive data this is) must be a "
                   f"non-empty string or integer, got {value!r}"
        )
    return str(value)


# --- encryption --------------------------------------------------------------


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _encrypt(kid: str, key: bytes, value: Any) -> dict[str, str]:
    import os

    nonce = os.urandom(_NONCE)
    plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    ct = _aesgcm(key).encrypt(nonce, plain, _AAD + kid.encode())
    return {ENC: VERSION, "kid": kid, "ct": base64.b64encode(nonce + ct).decode()}


def _decrypt(key: bytes, envelope: dict[str, Any]) -> Any:
    from cryptography.exceptions import InvalidTag

    kid = str(envelope["kid"])
    try:
        raw = base64.b64decode(envelope["ct"], validate=True)
        plain = _aesgcm(key).decrypt(raw[:_NONCE], raw[_NONCE:], _AAD + kid.encode())
    except (InvalidTag, ValueError, TypeError) as exc:
        raise KeyStoreError(f"an encrypted field under key {kid} does not decrypt with that key "
                            f"(corrupted, or not made by this key store)") from exc
    return json.loads(plain)


def _no_keys(what: str) -> KeyStoreError:
    return KeyStoreError(
        f"{what} needs a key store for its sensitive fields, and none is configured: set "
        f"STEPLINE_KEYS=sqlite:///path/to/keys.db (on every client, worker and API process, all "
        f"reaching the same store), or pass keys= to Client / Worker. An embedded (sqlite) log "
        f"keeps one beside its file by default; a shared log such as Kafka needs it set"
    )


async def seal(spec: SensitiveSpec, payload: Payload, keys: KeyStore | None, where: str) -> Payload:
    """The payload with every sensitive value replaced by its envelope."""
    refuse_envelopes(payload, where)
    doc = json.loads(payload.data)
    subject = _subject_of(doc, spec, where)
    targets = [(c, k) for path in spec.paths for c, k in _at(doc, path) if c[k] is not None]
    if not targets:
        return payload
    if keys is None:
        raise _no_keys(where)
    sk = await keys.key_for(subject)
    for container, k in targets:
        container[k] = _encrypt(sk.kid, sk.key, container[k])
    return Payload(JSON, json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())


async def _key(keys: KeyStore | None, kid: str, what: str) -> bytes | None:
    """The key, or None when erased; KeyNotFound when this store never had it."""
    if keys is None:
        raise _no_keys(what)
    key = await keys.get(kid)
    if key is None and not await keys.is_erased(kid):
        raise KeyNotFound(kid, keys.url)
    return key


async def unseal(
    spec: SensitiveSpec, payload: Payload, keys: KeyStore | None, what: str, *, erased_as: str | None = None
) -> tuple[Payload, list[Any], bool]:
    """(plain payload, the sensitive values, whether any was erased).

    Only envelopes at the task's sensitive paths are opened. An erased key
    raises SubjectErased, or, given `erased_as`, leaves that text in the
    field's place (replays of the history).
    """
    if payload.content_type != JSON or f'"{ENC}"'.encode() not in payload.data:
        doc = json.loads(payload.data) if payload.content_type == JSON else None
        return payload, [c[k] for p in spec.paths for c, k in _at(doc, p)], False
    doc = json.loads(payload.data)
    values: list[Any] = []
    erased = False
    for path in spec.paths:
        for container, k in _at(doc, path):
            value = container[k]
            if is_envelope(value):
                key = await _key(keys, str(value["kid"]), what)
                if key is None:
                    if erased_as is None:
                        raise SubjectErased(str(value["kid"]))
                    erased = True
                    container[k] = erased_as
                    continue
                container[k] = _decrypt(key, value)
            values.append(container[k])
    return Payload(JSON, json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()), values, erased


# --- display -----------------------------------------------------------------


def _envelopes(doc: Any, out: set[str]) -> None:
    if isinstance(doc, dict):
        if is_envelope(doc):
            out.add(str(doc["kid"]))
        else:
            for v in doc.values():
                _envelopes(v, out)
    elif isinstance(doc, list):
        for v in doc:
            _envelopes(v, out)


def _replace(doc: Any, erased: set[str]) -> Any:
    if isinstance(doc, dict):
        if is_envelope(doc):
            return ERASED if doc["kid"] in erased else REDACTED
        return {k: _replace(v, erased) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_replace(v, erased) for v in doc]
    return doc


async def shown(doc: Any, keys: KeyStore | None) -> Any:
    """JSON for people (API, dashboard, CLI): every envelope as "[redacted]",
    or "[erased]" when the key store says its key was forgotten. Never decrypts."""
    kids: set[str] = set()
    _envelopes(doc, kids)
    if not kids:
        return doc
    erased = {k for k in kids if keys is not None and await keys.is_erased(k)}
    return _replace(doc, erased)


# --- keeping values out of what an attempt records -----------------------------


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


class Scrubber:
    """Cuts known sensitive values out of text and JSON an attempt records."""

    def __init__(self, values: Iterable[Any]) -> None:
        texts: set[str] = set()
        numbers: set[int | float] = set()
        for v in _leaves(list(values)):
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int | float):
                if len(str(v)) >= MIN_SCRUB_CHARS:
                    numbers.add(v)
                    texts.add(str(v))
            elif isinstance(v, str) and len(v) >= MIN_SCRUB_CHARS:
                texts.add(v)
        # Longest first, so a value containing another is cut whole.
        self.texts = sorted(texts, key=len, reverse=True)
        self.numbers = numbers

    def __bool__(self) -> bool:
        return bool(self.texts)

    def text(self, s: str) -> str:
        for t in self.texts:
            if t in s:
                s = s.replace(t, REDACTED)
        return s

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {self.text(str(k)): self.value(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [self.value(x) for x in v]
        if not isinstance(v, bool) and isinstance(v, int | float) and v in self.numbers:
            return REDACTED
        return v

    def json_text(self, s: str) -> str:
        if not any(t in s for t in self.texts):
            return s
        try:
            return json.dumps(self.value(json.loads(s)), separators=(",", ":"), ensure_ascii=False)
        except ValueError:
            return self.text(s)

    def payload(self, p: Payload | None) -> Payload | None:
        if p is None or p.content_type != JSON:
            return p
        text = p.data.decode("utf-8", "replace")
        cut = self.json_text(text)
        return p if cut is text else Payload(JSON, cut.encode())

    def error(self, e: ErrorInfo) -> ErrorInfo:
        return dataclasses.replace(e, message=self.text(e.message), stack=self.text(e.stack))

    def body(self, body: Body) -> Body:
        """The event with the values cut out; results (step and run outputs) pass unchanged."""
        if isinstance(body, LogRecorded):
            return dataclasses.replace(body, message=self.text(body.message), fields=self.json_text(body.fields))
        if isinstance(body, StepStarted):
            return dataclasses.replace(body, input=self.payload(body.input))
        if isinstance(body, StepFailed | RunFailed):
            return dataclasses.replace(body, error=self.error(body.error))
        if isinstance(body, RetryScheduled):
            return dataclasses.replace(body, reason=self.text(body.reason))
        if isinstance(body, RunSuspended) and body.condition is not None:
            return dataclasses.replace(body, condition=self.json_text(body.condition))
        return body


# --- secrets in log lines ------------------------------------------------------

# Field names that hold secrets: `token`, `api_token`, `webhook_secret`,
# `sasl_plain_password`, `authorization`... but not `tokens` or `tokens_used`.
# A wait token's id (`tok_<run id>_<step>`) under such a name is shown: it
# is how a person finds the wait, and the run lists it anyway.
_SECRET_NAME = re.compile(r"(?i)(?:^|_)(?:password|passwd|secret|token|api_?key|authorization|credentials?)$")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact_text(text: str) -> str:
    """Secrets written as `password=...` (e.g. in a Kafka URL) or `Bearer ...`, masked."""
    if "=" not in text and "earer" not in text:
        return text
    # Bearer tokens first: in "Bearer abc=def" the whole token is the secret.
    if "earer" in text:
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    # The same names as URL options or `key=value` text.
    return redact_url(text, REDACTED)


def _wait_token_id(name: str, value: Any) -> bool:
    return name.lower().endswith("token") and is_wait_token(value)


def redact_secret_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Log fields with secret-named values masked, and secrets in text masked."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(k, str) and _SECRET_NAME.search(k) and v is not None and not _wait_token_id(k, v):
            out[k] = REDACTED
        elif isinstance(v, str):
            out[k] = redact_text(v)
        else:
            out[k] = v
    return out


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """A structlog processor: no API token, webhook secret or Kafka password in a log line."""
    return redact_secret_fields(event_dict)


__all__ = [
    "ERASED",
    "REDACTED",
    "Scrubber",
    "Sensitive",
    "SensitiveSpec",
    "redact_secret_fields",
    "redact_secrets",
    "redact_text",
    "refuse_envelopes",
    "seal",
    "sensitive_spec",
    "shown",
    "unseal",
    "values_at",
]
