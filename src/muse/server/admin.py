"""The operator's routes: /health (open), /metrics and /admin/* (admin key), /openapi.json and /docs
(admin key, or open with `--docs`). Key management and /admin/engine are in accounts.py, which also
holds the admin check (operator credentials are hashes in the store).

Query parameters are read after the admin check, by hand: FastAPI's binding would answer a bad
`since` with its own 422 shape before anyone is authenticated.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response

from muse.common.errors import UsageError
from muse.server.accounts import require_admin
from muse.server.metrics import CONTENT_TYPE
from muse.server.protocol import ApiError, invalid
from muse.server.records import parse_utc
from muse.server.serving import SafeJSONResponse
from muse.server.state import AppState

FLUSH_TIMEOUT_S = 5.0   # /admin/usage waits this long for queued ledger rows (they are counted anyway)


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_utc(text, what="since")
    except UsageError:
        raise invalid("since must be epoch seconds or an ISO date/time such as 2026-01-31T00:00:00Z.",
                      "since") from None


def _flag(text: str | None, name: str) -> bool:
    if text is None or text.lower() in ("0", "false", "no", ""):
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    raise invalid(f"{name} must be true or false.", name)


def admin_router(state: AppState, app: FastAPI) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health():
        if state.healthy:
            return SafeJSONResponse({"status": "ok"})
        why = "shutting down" if state.draining else "an engine is restarting or stopped"
        return SafeJSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    @r.get("/metrics")
    async def metrics(request: Request):
        require_admin(state, request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @r.get("/admin/keys")
    async def admin_keys(request: Request):
        require_admin(state, request)
        include = _flag(request.query_params.get("all"), "all")
        keys = await asyncio.to_thread(state.store.list_keys, include_revoked=include)
        return SafeJSONResponse({"object": "list", "data": [k.as_dict() for k in keys]})

    @r.get("/admin/usage")
    async def admin_usage(request: Request):
        require_admin(state, request)
        partner = request.query_params.get("partner")
        since = _since(request.query_params.get("since"))
        # Queued rows are counted by usage_summary whether or not they are on disk yet; the flush only
        # makes the answer durable, so a stuck disk costs it at most FLUSH_TIMEOUT_S, never the loop.
        await asyncio.to_thread(state.store.flush, FLUSH_TIMEOUT_S)
        data = await asyncio.to_thread(state.store.usage_summary, partner=partner, since=since)
        return SafeJSONResponse({"object": "list", "data": data})

    def open_docs(request: Request) -> None:
        if not state.config.docs:
            require_admin(state, request)

    @r.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        open_docs(request)
        return SafeJSONResponse(app.openapi())

    @r.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        if not state.config.docs:
            raise ApiError(404, "The API docs page is off; start the server with --docs (the OpenAPI document "
                           "is at /openapi.json with the admin key).", code="unknown_url")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Muse API")

    return r
