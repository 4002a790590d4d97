"""Forks and shadow diffs over HTTP (the dashboard uses both).

    POST /v1/runs/{id}/fork     {"at_step": N, "payload"?: ..., "step_outputs"?: {"N": ...},
                                 "idempotency_key"?: "..."}  -> 202 {"run_id", "forked_from", ...}
    GET  /v1/runs/{id}/shadow   [?module=NAME]  -> the shadow diff (engine/history/shadow.py)
    POST /v1/runs/{id}/shadow   {"module"?: "NAME"}  -> the same

A shadow executes task code in the server process (the task body outside
its steps; steps answer from the journal). Which code:

* without `module`: the server's own app (`stepline serve --app`, or the
  module `stepline dev` runs). 409 when it has none.
* with `module`: importing a module runs it, so this is refused unless the
  server requires a token (`--api-token`, never under `--no-auth` or
  `dev`) and was given a shadow path (`--shadow-path DIR`,
  STEPLINE_SHADOW_PATH); the name must be a dotted module name whose file
  lies inside DIR (no file paths, nothing else on sys.path).
"""

from __future__ import annotations

from aiohttp import web

from stepline.errors import InvalidFork, TaskDefinitionError
from stepline.history.shadow import shadow_run
from stepline.history.shadow_code import load_code_under
from stepline.sdk.task import Registry
from stepline.server._http import Reply, Routes, _Api, _HttpError
from stepline.server.models import ForkRequest, RunPath, ShadowQuery, ShadowRequest
from stepline.server.openapi import BAD_BODY, LOG_DOWN, NO_RUN
from stepline.server.responses import Forked, ShadowDiff

ROUTES = Routes()
_SHADOW = ("replay a run against code (the server's app, or ?module= under --shadow-path) "
           "and show where it diverges")
_SHADOW_REPLIES: dict[int, str | Reply] = {
    200: Reply("the shadow diff", ShadowDiff), 400: "the module cannot be loaded, or " + BAD_BODY,
    403: "modules are refused: the server runs without a token or without --shadow-path",
    404: NO_RUN, 409: "the server has no app code", 503: LOG_DOWN}


class HistoryRoutes:
    def __init__(self, api: _Api) -> None:
        self.api = api

    @ROUTES("POST", "/v1/runs/{run_id}/fork", "forkRun",
            "a new run replaying this one's journal up to a step, then running live", {
                202: Reply("the fork is triggered", Forked, headers={"Location": "/v1/runs/{run_id}"},
                           links_run=True),
                400: "at_step or step_outputs do not fit the run's journal, or " + BAD_BODY,
                404: NO_RUN, 409: "the run cannot be forked in its state",
                422: "the new payload does not fit the task's model", 503: LOG_DOWN},
            body=ForkRequest, params=RunPath)
    async def fork(self, request: web.Request, body: ForkRequest) -> web.Response:
        run_id = request.match_info["run_id"]
        at_step = body.at_step
        try:
            handle = await self.api.client.fork(
                run_id, at_step, payload=body.payload, new_payload="payload" in body.model_fields_set,
                step_outputs={int(k): v for k, v in (body.step_outputs or {}).items()},
                idempotency_key=body.idempotency_key,
            )
        except InvalidFork as exc:
            raise _HttpError(400, str(exc)) from None
        return web.json_response(
            {"run_id": handle.run_id, "task_id": handle.task_id, "forked_from": run_id, "at_step": at_step},
            status=202, headers={"Location": f"/v1/runs/{handle.run_id}"},
        )

    def _code(self, module: str | None) -> tuple[Registry, str]:
        config = self.api.config
        if module is None:
            if self.api.registry is None:
                raise _HttpError(409, "this server has no app code to shadow with: start it with --app "
                                      "MODULE, or pass ?module= (needs --shadow-path and a token)")
            return self.api.registry, "the server's app"
        if not config.auth_required:
            raise _HttpError(403, "?module= imports and runs code, so it needs a server that requires a "
                                  "token; this one runs without auth. Shadow with the server's own app instead")
        if not config.shadow_path:
            raise _HttpError(403, "this server accepts no shadow modules: start it with --shadow-path DIR "
                                  "(STEPLINE_SHADOW_PATH) to allow modules from DIR")
        try:
            return load_code_under(config.shadow_path, module), module
        except TaskDefinitionError as exc:
            raise _HttpError(400, str(exc)) from None

    @ROUTES("GET", "/v1/runs/{run_id}/shadow", "shadowRunGet", _SHADOW, _SHADOW_REPLIES,
            params=RunPath, query=ShadowQuery)
    @ROUTES("POST", "/v1/runs/{run_id}/shadow", "shadowRunPost", _SHADOW, _SHADOW_REPLIES,
            params=RunPath, query=ShadowQuery, body=ShadowRequest, body_required=False)
    async def shadow(self, request: web.Request, query: ShadowQuery,
                     body: ShadowRequest | None = None) -> web.Response:
        run_id = request.match_info["run_id"]
        module = (body.module if body is not None else None) or query.module
        state = await self.api.client.get_run(run_id)  # UnknownRun: 404
        registry, code = self._code(module)
        result = await shadow_run(registry.find(state.task_id), state, keys=self.api.client.keys)
        return web.json_response({**result.to_dict(), "code": code})


def add_history_routes(app: web.Application, api: _Api) -> HistoryRoutes:
    routes = HistoryRoutes(api)
    ROUTES.mount(app, api, routes)
    return routes


__all__ = ["ROUTES", "HistoryRoutes", "add_history_routes"]
