"""The web dashboard: static HTML, CSS and JavaScript over the `/v1/` API.

No build step and nothing fetched at run time: the files ship inside the
package (`index.html`, `static/*`) and the page reads everything it shows
from the JSON API of `stepline.server`, with the token the person gives it
when the API requires one. This module only serves the files.
"""

from __future__ import annotations

import re
from importlib import resources

from aiohttp import web

from stepline.server._http import Reply, Routes
from stepline.server.models import FilePath

# A flat folder of our own files: a name is letters, digits, '-' or '_' and
# one known extension, so no request can reach outside `static/`.
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+\.(css|js|svg)")
_CONTENT_TYPES = {
    "css": "text/css",
    # Module scripts are refused by browsers unless served as JavaScript.
    "js": "text/javascript",
    "svg": "image/svg+xml",
}
# The files change with the installed version, never while a server runs;
# revalidating keeps an upgraded server from mixing old and new scripts.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _read(*parts: str) -> bytes:
    return resources.files(__name__).joinpath(*parts).read_bytes()


ROUTES = Routes()


@ROUTES("GET", "/", "dashboard", "the dashboard page", {200: Reply("HTML", media=("text/html",))},
        auth="none", tags=("dashboard",))
async def _index(request: web.Request) -> web.Response:
    return web.Response(
        body=_read("index.html"), content_type="text/html", charset="utf-8",
        headers={**_HEADERS, "Content-Security-Policy": _CSP},
    )


@ROUTES("GET", "/static/{name}", "dashboardFile", "a file of the dashboard", {
    200: Reply("the file", media=tuple(_CONTENT_TYPES.values())), 404: "no such file"},
    auth="none", params=FilePath, tags=("dashboard",))
async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    match = _STATIC_NAME.fullmatch(name)
    if match is None:
        raise web.HTTPNotFound()
    try:
        body = _read("static", name)
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    return web.Response(body=body, content_type=_CONTENT_TYPES[match.group(1)], charset="utf-8",
                        headers=_HEADERS)


# Everything the page loads is ours: no inline script, no third-party origin.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the dashboard at `/` and its files at `/static/<name>`.

    The page calls the `/v1/` API of the same app; nothing here is
    authenticated, since the files hold no data.
    """
    ROUTES.mount(app, None)


__all__ = ["ROUTES", "add_dashboard_routes"]
