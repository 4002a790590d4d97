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

from typing import Any

from aiohttp import web

from stepline.errors import InvalidFork, TaskDefinitionError
from stepline.history.shadow import shadow_run
from stepline.history.shadow_code import load_code_under
from stepline.sdk.task import Registry
from stepline.server._http import _Api, _HttpError, _json_object, _optional_str, _read_body

_FORK_FIELDS = frozenset({"at_step", "payload", "step_outputs", "idempotency_key"})
_SHADOW_FIELDS = frozenset({"module"})


def _step_outputs(value: Any) -> dict[int, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isascii() and k.isdigit() for k in value):
        raise _HttpError(400, 'step_outputs must be an object from step positions to outputs, e.g. {"2": 10}')
    return {int(k): v for k, v in value.items()}


class HistoryRoutes:
    def __init__(self, api: _Api) -> None:
        self.api = api

    async def fork(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        run_id = request.match_info["run_id"]
        body = _json_object(await _read_body(request, self.api.config.max_body_bytes), _FORK_FIELDS)
        at_step = body.get("at_step")
        if isinstance(at_step, float) and at_step.is_integer():
            at_step = int(at_step)  # JSON has one number type: 3.0 is the integer 3
        if isinstance(at_step, bool) or not isinstance(at_step, int):
            raise _HttpError(400, "at_step must be an integer: the first journal position to run live")
        try:
            handle = await self.api.client.fork(
                run_id, at_step, payload=body.get("payload"), new_payload="payload" in body,
                step_outputs=_step_outputs(body.get("step_outputs")),
                idempotency_key=_optional_str(body, "idempotency_key"),
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

    async def shadow(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        run_id = request.match_info["run_id"]
        module = request.query.get("module") or None
        if request.method == "POST":
            raw = await _read_body(request, self.api.config.max_body_bytes)
            if raw.strip():
                module = _optional_str(_json_object(raw, _SHADOW_FIELDS), "module") or module
        state = await self.api.client.get_run(run_id)  # UnknownRun: 404
        registry, code = self._code(module)
        result = await shadow_run(registry.find(state.task_id), state, keys=self.api.client.keys)
        return web.json_response({**result.to_dict(), "code": code})


def add_history_routes(app: web.Application, api: _Api) -> HistoryRoutes:
    routes = HistoryRoutes(api)
    app.router.add_post("/v1/runs/{run_id}/fork", routes.fork)
    app.router.add_get("/v1/runs/{run_id}/shadow", routes.shadow)
    app.router.add_post("/v1/runs/{run_id}/shadow", routes.shadow)
    return routes


__all__ = ["HistoryRoutes", "add_history_routes"]
