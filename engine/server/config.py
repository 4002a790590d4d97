"""What `stepline serve` is configured with: the API token, the webhook sources, the limits.

Below app.py and the route modules, which all read it (the shadow route reads
`shadow_path`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from stepline.client import check_event_name
from stepline.errors import InvalidEventName, ServeConfigError
from stepline.server.webhook_schemes import check_scheme

_SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class WebhookSource:
    """A sender of webhooks, e.g. a payment provider, the secret it signs with, and how it signs.

    Deliveries are published as domain events named `event_name`
    (`webhook.<name>` by default), for tasks to subscribe to.
    """

    name: str
    secret: str
    event_name: str | None = None
    # How its deliveries are signed: stepline | stripe | standard | github
    # (engine/server/webhook_schemes.py).
    scheme: str = "stepline"

    def __post_init__(self) -> None:
        if not _SOURCE_NAME.fullmatch(self.name):
            raise ServeConfigError(
                f"webhook source name must be letters, digits, '_' or '-' (it is part of the URL), "
                f"got {self.name!r}"
            )
        if not self.secret:
            raise ServeConfigError(f"webhook source {self.name!r} needs a non-empty secret")
        try:
            check_scheme(self.scheme, self.secret)
        except ValueError as exc:
            raise ServeConfigError(f"webhook source {self.name!r}: {exc}") from None
        try:
            check_event_name(self.event)
        except InvalidEventName as exc:
            raise ServeConfigError(f"webhook source {self.name!r}: {exc}") from exc

    @property
    def event(self) -> str:
        """The name its deliveries are published under."""
        return self.event_name or f"webhook.{self.name}"


@dataclass(frozen=True)
class ServeConfig:
    api_token: str | None
    webhooks: Mapping[str, WebhookSource]
    max_body_bytes: int = 1 << 20
    signature_tolerance_s: int = 300
    # False only for `stepline dev`: a local API anyone on the machine may call.
    auth_required: bool = True
    # Where `?module=` of the shadow route may import new code from
    # (engine/server/history_api.py); None refuses every module.
    shadow_path: str | None = None
    # How long /readyz waits for the log to answer before it says "not ready".
    ready_bound_s: float = 5.0

    def __post_init__(self) -> None:
        if self.auth_required and not self.api_token:
            raise ServeConfigError("an API token is required unless auth_required=False")
        if self.max_body_bytes < 1 or self.signature_tolerance_s < 1:
            raise ServeConfigError("max_body_bytes and signature_tolerance_s must be positive")
        for key, source in self.webhooks.items():
            if key != source.name:
                raise ServeConfigError(f"webhooks[{key!r}] holds the source named {source.name!r}")


__all__ = ["ServeConfig", "WebhookSource"]
