"""The HTTP API, webhooks and the dashboard (`stepline serve`).

`create_app` builds the aiohttp application; the route families live beside it
(`query_api`, `ops_api`, `history_api`, `backfill_api`), each declaring its routes
with the pydantic models of their input (`models`) and answers (`responses`); the
OpenAPI document is generated from those declarations in `openapi`, the dashboard's
files are in `dashboard/`. `ServeConfig` and `WebhookSource`
are in `config`; what the route modules share (errors as JSON, bodies read within
the limit, the API object) is in `_http`, so imports run app -> routes -> _http.
"""

from stepline.server.app import (
    SIGNATURE_HEADER,
    ServeConfig,
    WebhookSource,
    create_app,
    serve_api,
    sign_webhook,
)

__all__ = ["SIGNATURE_HEADER", "ServeConfig", "WebhookSource", "create_app", "serve_api", "sign_webhook"]
