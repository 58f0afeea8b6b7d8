"""The OpenAI-compatible HTTP API: `create_app` puts the routers, the error handlers and the request
middleware together over one `AppState`.

    app = create_app([ServedModel.from_engine("muse-base", engine)], Store(path), ServerConfig())
    uvicorn.run(app)                 # `muse serve` does this, with a drain on SIGTERM

Where things live: state.py (config, served models, shared state), serving.py (the request pipeline:
auth, bodies, limits, admission, responses), generation.py (completions and chat over one skeleton),
jobs.py (one generation request to its ledger row), routes.py, admin.py and accounts.py (thin routes),
ui.py (the web pages at /ui/).

Error contract: every failure is `{"error": {"message", "type", "param", "code"}}` with OpenAI's
status codes (docs/serving.md); nothing a client sends produces a 500 or a 422, no message echoes any
part of an API key, and every response carries an `x-request-id`. A 500 (a bug) also carries
`Connection: close`, so the client's next request starts on a fresh connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from muse.common.logging import get_logger
from muse.server.accounts import accounts_router
from muse.server.admin import admin_router
from muse.server.limits import QuotaManager, RateLimiter
from muse.server.metrics import ServerMetrics
from muse.server.protocol import ApiError, invalid
from muse.server.routes import openai_router
from muse.server.serving import error_response, new_request_hex
from muse.server.sqlstore import STORE_TIME, StoreTime
from muse.server.sqlstore import SqlStore as Store
from muse.server.state import AppState, ServedModel, ServerConfig
from muse.server.ui import ui_router

log = get_logger("muse.server")

__all__ = ["AppState", "ServedModel", "ServerConfig", "create_app", "shutdown", "drain"]


class RequestContext:
    """ASGI middleware: a request id and arrival times for every request, the `x-request-id` header on
    every response, and the request counter labelled by route TEMPLATE (`/v1/models/{name:path}`, or
    "unmatched"), never the raw path: labels come from a closed set, so no client can grow /metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_hex()
        st = scope.setdefault("state", {})
        st.update(request_hex=rid, request_id=f"req-{rid}", arrived=time.monotonic(), arrived_wall=time.time())
        status = None

        async def send_with_id(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", ()), (b"x-request-id", st["request_id"].encode())]}
            await send(msg)

        store_time = StoreTime()
        token = STORE_TIME.set(store_time)  # the store adds its wall time per call (sqlstore.timed)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            STORE_TIME.reset(token)
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status or 500)).inc()
            self.metrics.observe_store(store_time)


def create_app(models: Sequence[ServedModel], store: Store, config: ServerConfig | None = None, *,
               limiter: RateLimiter | None = None, quotas: QuotaManager | None = None, ui: bool = True,
               run_dirs: dict[str, str] | None = None) -> FastAPI:
    """`ui=False` (`muse serve --no-ui`) leaves out the web pages at /ui/ (ui.py); `run_dirs` (model name ->
    the directory it was served from) feeds the operator's run dashboard (GET /admin/runs)."""
    config = config or ServerConfig()
    state = AppState(models, store, config, limiter, quotas)
    store.set_bootstrap_admin(config.admin_key)  # operator credentials are hashes in the store (accounts.py)
    store.report_state(state.live_state)         # replicas publish it with their heartbeat (pgstore.py)
    state.metrics.replica.labels(store.replica or "", store.kind).set(1)

    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        yield
        await shutdown(state)

    app = FastAPI(title="Muse", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  description="An OpenAI-compatible API for Muse models (docs/serving.md).")
    app.state.muse = state
    app.add_middleware(RequestContext, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e, getattr(request.state, "rl_headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(invalid("Invalid request parameters."))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path[:200]}.", code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed for {request.url.path[:200]}.",
                           code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        # Starlette calls this outside the middleware: the request id and Connection: close go on here
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, "The server had an error while processing your request. The error "
                                       "was logged; retry, and report it with the x-request-id if it persists.",
                                       type="server_error"),
                              {"connection": "close", "x-request-id": getattr(request.state, "request_id", "")})

    app.include_router(openai_router(state))
    app.include_router(admin_router(state, app))
    app.include_router(accounts_router(state, run_dirs))
    if ui:
        app.include_router(ui_router())
    return app


async def drain(state: AppState, grace: float | None = None) -> None:
    """Stop admitting (new requests get 503 shutting_down), let running jobs finish for `grace` seconds,
    then abort the rest: a plain request gets 503 shutting_down, a stream that error as its last event;
    each is accounted ("error", 503, what it generated) before this returns."""
    state.draining = True
    state.admission.close()
    grace = state.config.shutdown_grace_s if grace is None else grace
    jobs = list(state.jobs)
    if not jobs:
        return
    log.info("shutdown: waiting up to %.0fs for %d running requests", grace, len(jobs))
    _, pending = await asyncio.wait([asyncio.ensure_future(j.done.wait()) for j in jobs], timeout=grace)
    if pending:
        log.warning("shutdown: aborting %d requests still running after the grace period", len(pending))
        for j in list(state.jobs):
            j.shut_down()
        await asyncio.wait(pending, timeout=10)


async def shutdown(state: AppState, grace: float | None = None) -> None:
    """drain(), stop the engines, flush the ledger (bounded: a stuck disk cannot hold the exit forever)."""
    await drain(state, grace)
    for m in state.models.values():
        await m.client.shutdown()
    await asyncio.to_thread(state.store.flush, 10.0)
