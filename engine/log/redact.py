"""Secrets in URLs, masked wherever a URL is shown.

A log URL carries its passwords as options (kafka://host:9092?
sasl_plain_password=...&ssl_password=...), and URLs end up in error
messages, in `Log.url`, in the CLI's banners and in log lines. One function
masks them all: the log package for its messages and `Log.url`, and
stepline.security for log lines and other text.
"""

from __future__ import annotations

import re
import urllib.parse

from ..core.ids import parse_token
from ..errors import InvalidToken

__all__ = ["is_wait_token", "redact_url"]

# Option names that hold secrets: `sasl_plain_password`, `ssl_password`,
# `token`, `api_key`, `webhook_secret`... but not `tokens` or `passwordless`.
_SECRET_NAME = re.compile(r"(?i)(?:password|passwd|secret|token|api_?key|credentials?)$")
# `name=value`: the name runs back to the last space, quote, `?` or `&` (or
# the start), the value up to the next space, quote or `&`. A name starts
# only after one of those, so a long run without any is scanned once.
_OPTION = re.compile(r"(?:(?<=[\s'\"?&])|^)([^\s'\"?&=]+)=([^\s'\"&]+)")


def is_wait_token(value: object) -> bool:
    """A wait token's id (`sl.create_token()`, `tok_<run id>_<step>`), or a
    WaitToken: shown under a secret-sounding name such as `token`.

    Its id is no credential of the engine's: `stepline runs show` and the
    API list it with the run, which is where it is looked up.
    """
    if value is None or isinstance(value, bool | int | float):
        return False
    try:
        parse_token(str(value))
    except InvalidToken:
        return False
    return True


def _masks(name: str, value: object) -> bool:
    """Whether a value under `name` is masked: the name says secret, and the
    value is not a wait token's id under a `...token` name."""
    if not _SECRET_NAME.search(name):
        return False
    return not (_TOKEN_NAME.search(name) and is_wait_token(value))


_TOKEN_NAME = re.compile(r"(?i)token$")


def redact_url(text: str, mask: str = "***") -> str:
    """`text` (a URL, or any text with URLs in it) with the value of every
    secret-named option replaced by `mask`.

    Names are compared as a URL parser reads them (percent-escapes
    decoded), so `sasl%5Fplain%5Fpassword=...`, which open_log accepts as
    the password, is masked too. A wait token's id (`token=tok_...`) is
    not a secret, and stays.
    """
    if "=" not in text:
        return text

    def masked(m: re.Match[str]) -> str:
        name = m.group(1)
        if _masks(urllib.parse.unquote_plus(name), m.group(2)):
            return f"{name}={mask}"
        return m.group(0)

    return _OPTION.sub(masked, text)
