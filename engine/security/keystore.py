"""Per-subject encryption keys, kept outside the log (crypto-shredding).

Sensitive payload fields are encrypted on the log with the key of the
subject (the person) they belong to (engine/security/sensitive.py). The keys live
here, never on the log, so deleting a subject's key makes every copy of
those fields unreadable, in every partition, snapshot and backup of the
log, while the events themselves stay where they are.

A key store is a small port (`KeyStore`) with adapters beside it: SQLite
(one file, the default next to an embedded log), memory (tests, shared by
name like `memory://` logs). A KMS or vault adapter implements the same
four methods.

Key ids are random, not derived from the subject: the log then holds no
identifier of the person beyond the fields left in plaintext. Forgetting a
subject leaves a tombstone for each of its key ids (the id and when, no
key and no subject), so that a reader can tell "erased" from "this process
is pointed at the wrong key store".
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from stepline.errors import KeyStoreError

# Names the key store: sqlite:///path/keys.db or memory://NAME.
KEYS_ENV = "STEPLINE_KEYS"

KEY_BYTES = 32  # AES-256-GCM

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SubjectKey:
    kid: str
    key: bytes


class KeyStore(abc.ABC):
    """Where subject keys live. Every method may be called from any task;
    `key_for` must make a new key durable before it returns it (a ciphertext
    on the log whose key was lost in a crash would be erased by accident)."""

    url: str

    @abc.abstractmethod
    async def key_for(self, subject: str) -> SubjectKey:
        """The subject's current key, created on first use."""

    @abc.abstractmethod
    async def get(self, kid: str) -> bytes | None:
        """The key with this id; None when it was erased or never existed here."""

    @abc.abstractmethod
    async def is_erased(self, kid: str) -> bool:
        """Whether this key id belonged to a subject that was forgotten."""

    @abc.abstractmethod
    async def forget(self, subject: str) -> list[str]:
        """Delete the subject's keys; the ids erased (empty when it had none)."""

    async def close(self) -> None:
        """Release connections; the store may be used again after (it reopens)."""
        return None


def _new_key(subject: str) -> tuple[str, bytes]:
    if not isinstance(subject, str) or not subject:
        raise KeyStoreError(f"a subject must be a non-empty string, got {subject!r}")
    return secrets.token_hex(12), secrets.token_bytes(KEY_BYTES)


class MemoryKeyStore(KeyStore):
    """Keys in process memory: for tests and `memory://` logs."""

    def __init__(self, name: str = "default") -> None:
        self.url = f"memory://{name}"
        self._by_subject: dict[str, SubjectKey] = {}
        self._by_kid: dict[str, bytes] = {}
        self._erased: set[str] = set()

    async def key_for(self, subject: str) -> SubjectKey:
        found = self._by_subject.get(subject)
        if found is None:
            kid, key = _new_key(subject)
            found = self._by_subject[subject] = SubjectKey(kid, key)
            self._by_kid[kid] = key
        return found

    async def get(self, kid: str) -> bytes | None:
        return self._by_kid.get(kid)

    async def is_erased(self, kid: str) -> bool:
        return kid in self._erased

    async def forget(self, subject: str) -> list[str]:
        found = self._by_subject.pop(subject, None)
        if found is None:
            return []
        self._by_kid.pop(found.kid, None)
        self._erased.add(found.kid)
        return [found.kid]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_keys (
    subject TEXT PRIMARY KEY,
    kid TEXT NOT NULL UNIQUE,
    key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS erased_keys (
    kid TEXT PRIMARY KEY,
    erased_at INTEGER NOT NULL
);
"""


class SqliteKeyStore(KeyStore):
    """Keys in one SQLite file, safe to share between the processes of one host.

    The file is created on first use, so an app without sensitive fields
    never gets one. Reads are answered on the caller's thread from a cache
    that is dropped whenever any connection has committed since
    (`PRAGMA data_version`), so a key forgotten by another process is never
    served again; in WAL mode they never wait for a writer. Writes (a new
    key is fsync'd before it is used; a forget) go to a thread.
    `secure_delete` overwrites a forgotten key's bytes, and a checkpoint
    right after the forget truncates the WAL that still held them; copies
    in backups of this file are the operator's to expire.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.url = f"sqlite:///{self.path}"
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._version: int | None = None
        self._keys: dict[str, bytes] = {}
        self._subjects: dict[str, SubjectKey] = {}

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA secure_delete=ON")
                conn.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise KeyStoreError(f"cannot open the key store {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def _fresh(self) -> sqlite3.Connection:
        """The connection, with the cache emptied if anyone committed since it was filled."""
        conn = self._connect()
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version = version
            self._keys.clear()
            self._subjects.clear()
        return conn

    def _key_for(self, subject: str) -> SubjectKey:
        kid, key = _new_key(subject)
        with self._lock:
            conn = self._fresh()
            row = conn.execute("SELECT kid, key FROM subject_keys WHERE subject = ?", (subject,)).fetchone()
            if row is None:
                # Two processes may race to create it: the first insert wins,
                # and both then read the same key back.
                conn.execute("INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?, ?)",
                             (subject, kid, key, int(time.time() * 1000)))
                row = conn.execute("SELECT kid, key FROM subject_keys WHERE subject = ?", (subject,)).fetchone()
            found = self._subjects[subject] = SubjectKey(row[0], bytes(row[1]))
            self._keys[found.kid] = found.key
            return found

    def _cached_subject(self, subject: str) -> SubjectKey | None:
        with self._lock:
            self._fresh()
            return self._subjects.get(subject)

    def _get(self, kid: str) -> bytes | None:
        with self._lock:
            conn = self._fresh()
            key = self._keys.get(kid)
            if key is None:
                row = conn.execute("SELECT key FROM subject_keys WHERE kid = ?", (kid,)).fetchone()
                if row is not None:
                    key = self._keys[kid] = bytes(row[0])
            return key

    def _is_erased(self, kid: str) -> bool:
        with self._lock:
            row = self._connect().execute("SELECT 1 FROM erased_keys WHERE kid = ?", (kid,)).fetchone()
        return row is not None

    def _forget(self, subject: str) -> list[str]:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                kids = [r[0] for r in conn.execute("SELECT kid FROM subject_keys WHERE subject = ?", (subject,))]
                now = int(time.time() * 1000)
                conn.executemany("INSERT OR IGNORE INTO erased_keys VALUES (?, ?)", [(k, now) for k in kids])
                conn.execute("DELETE FROM subject_keys WHERE subject = ?", (subject,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._version = None  # our own commit does not move data_version for us
            # Zeroed pages into the main file, and the WAL frames that held the key dropped.
            # A reader elsewhere may hold the WAL open: then its next checkpoint does this.
            # Briefly: an erasure must not stall behind another process's long read.
            conn.execute("PRAGMA busy_timeout=500")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.execute("PRAGMA busy_timeout=30000")
        return kids

    def _sync(self, fn: Callable[[str], T], arg: str) -> T:
        try:
            return fn(arg)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from exc

    async def _thread(self, fn: Callable[[str], T], arg: str) -> T:
        try:
            return await asyncio.to_thread(fn, arg)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from exc

    async def key_for(self, subject: str) -> SubjectKey:
        cached = self._sync(self._cached_subject, subject)
        return cached if cached is not None else await self._thread(self._key_for, subject)

    async def get(self, kid: str) -> bytes | None:
        return self._sync(self._get, kid)

    async def is_erased(self, kid: str) -> bool:
        return self._sync(self._is_erased, kid)

    async def forget(self, subject: str) -> list[str]:
        return await self._thread(self._forget, subject)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._version = None


# Memory key stores are shared by name, like memory:// logs, so a client
# and a worker on one memory log see the same keys.
_memory: dict[str, MemoryKeyStore] = {}
_memory_lock = threading.Lock()


def _memory_store(name: str) -> MemoryKeyStore:
    with _memory_lock:
        store = _memory.get(name)
        if store is None:
            store = _memory[name] = MemoryKeyStore(name)
        return store


def open_keystore(url: str) -> KeyStore:
    """The key store a URL names: `sqlite:///path/keys.db` or `memory://NAME`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "memory":
        return _memory_store((parts.netloc + parts.path) or "default")
    if parts.scheme == "sqlite" and not parts.netloc and parts.path[1:]:
        return SqliteKeyStore(urllib.parse.unquote(parts.path[1:]))
    raise KeyStoreError(
        f"unsupported key store URL {url!r}: use sqlite:///path/to/keys.db or memory://NAME "
        f"(a KMS is plugged in as a KeyStore object: Client(keys=...), Worker(keys=...))"
    )


def default_keystore_url(log_url: str) -> str | None:
    """Where keys live for a log, unless told: STEPLINE_KEYS; else beside an
    embedded log (`.stepline/stepline.db` -> `.stepline/stepline.keys.db`), or
    in memory for a memory log. None for a shared log such as Kafka: keys
    there must be in one place every process reaches, so it is configured."""
    from stepline.settings import load_settings  # settings import the log package, as we do

    configured = load_settings().keys
    if configured:
        return configured
    parts = urllib.parse.urlsplit(log_url)
    if parts.scheme == "memory":
        return f"memory://{parts.netloc}{parts.path}"
    if parts.scheme == "sqlite" and parts.path[1:]:
        log_path = Path(urllib.parse.unquote(parts.path[1:]))
        return f"sqlite:///{log_path.with_name(log_path.stem + '.keys.db')}"
    return None


def default_keystore(log_url: str) -> KeyStore | None:
    url = default_keystore_url(log_url)
    return None if url is None else open_keystore(url)


__all__ = [
    "KEYS_ENV",
    "KeyStore",
    "MemoryKeyStore",
    "SqliteKeyStore",
    "SubjectKey",
    "default_keystore",
    "default_keystore_url",
    "open_keystore",
]
