"""The HTTP API, webhooks and the dashboard (`stepline serve`).

`create_app` builds the aiohttp application; the route families live beside it
(`query_api`, `ops_api`, `history_api`, `backfill_api`), the OpenAPI description in
`openapi`, the dashboard's files in `dashboard/`. `ServeConfig` and `WebhookSource`
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
