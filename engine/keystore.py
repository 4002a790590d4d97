"""The key store port for sensitive fields (docs/sensitive-data.md); lives in `stepline.security.keystore`."""

from stepline.security.keystore import (
    KEYS_ENV,
    KeyStore,
    MemoryKeyStore,
    SqliteKeyStore,
    SubjectKey,
    default_keystore,
    open_keystore,
)

__all__ = ["KEYS_ENV", "KeyStore", "MemoryKeyStore", "SqliteKeyStore", "SubjectKey", "default_keystore", "open_keystore"]
