"""The JSON routes behind the web pages (and any script): a partner's own usage, and the operator's
key management and live engine state.

    GET   /v1/usage                         partner key: quota, limits, usage by day and model, last requests
    POST  /admin/keys                       create a key (its text is in this one response, never again)
    PATCH /admin/keys/{key_id}              set models, rpm, tpm, token_quota + period, expires_at
    POST  /admin/keys/{key_id}/revoke       revoke (at once, also for requests already authenticated next time)
    POST  /admin/keys/{key_id}/rotate       a new key with the same settings and quota owner; the old one revoked
    GET   /admin/engine                     each engine's counters and gauges, for a live view; with several
                                            replicas, every replica's as of its last heartbeat
    GET   /admin/runs                       the served models' run directories for the dashboard (rundata.py)

Operator credentials live in the store as sha256 hashes (admin_keys, Store.is_admin), like partner
keys; `create_app` writes the server's admin key there at start (Store.set_bootstrap_admin). A
partner key sent to an admin route is a 401 that says so, never a way in.

What a partner sees is its key's rotation chain (the keys sharing its quota owner), never another
partner's rows. Bodies are read by the shared pipeline (size cap, depth, Unicode) and validated by
pydantic models with extra fields forbidden, so a typo is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from muse.common.errors import UsageError
from muse.server import keys as keyfmt
from muse.server.protocol import ApiError, invalid, validation_error
from muse.server.records import ApiKey, UsageRecord, parse_utc, utc_iso
from muse.server.routes import body_doc
from muse.server.rundata import read_run
from muse.server.serving import SafeJSONResponse, Serving
from muse.server.sqlstore import AuthError
from muse.server.sqlstore import SqlStore as Store
from muse.server.state import AppState

USAGE_DAYS = 30          # /v1/usage covers this many UTC days (today included) unless ?days= says otherwise
MAX_USAGE_DAYS = 92
RECENT_REQUESTS = 20     # last requests /v1/usage lists (?recent=, at most MAX_RECENT)
MAX_RECENT = 100
MAX_LIMIT = 2**53 - 1    # rpm, tpm, token_quota
LAST_DATE = 253402300800.0   # 10000-01-01T00:00:00Z: expiry dates are printed as ISO


# ---- operator credentials ------------------------------------------------------------------------------

def require_admin(state: AppState, request: Request) -> None:
    """The admin check of every /admin route, /metrics and /openapi.json: a bearer credential whose hash
    is an operator credential in the store. 403 when the server has no admin key; 401 otherwise (a
    partner key's message says that partner keys never open these routes). No message echoes the credential."""
    if not state.config.admin_key:
        raise ApiError(403, "Admin routes are disabled: start the server with an admin key "
                       "(MUSE_ADMIN_KEY or --admin-key-file).", type="permission_error")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if state.store.is_admin(token):
            return
        if keyfmt.check_format(token) and _is_partner_key(state.store, token):
            # 401 like any wrong credential (the contract the API had), with words that say why
            raise ApiError(401, "A partner API key cannot open admin routes; send the operator's admin key: "
                           "'Authorization: Bearer ADMIN_KEY'.", code="invalid_api_key")
    raise ApiError(401, "This route needs the admin key: 'Authorization: Bearer ADMIN_KEY'.",
                   code="invalid_api_key")


def _is_partner_key(store: Store, token: str) -> bool:
    try:
        store.authenticate(token)
    except AuthError as e:
        return e.reason != "invalid"  # revoked or expired: still a partner's key, still no way in
    return True


# ---- bodies --------------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# SQLite stores 64-bit integers and the pages' JavaScript 53-bit ones exactly: larger limits are refused
# here (400 naming the field) instead of failing in the database.
Limit = Annotated[int, Field(le=MAX_LIMIT)] | None


class KeyCreate(_Body):
    partner: str
    models: list[str] | None = None
    rpm: Limit = None
    tpm: Limit = None
    token_quota: Limit = None
    period: str | None = None
    expires_at: str | float | None = None    # ISO date/time (UTC unless an offset is given) or epoch seconds


class KeyUpdate(_Body):
    models: list[str] | None = None
    rpm: Limit = None
    tpm: Limit = None
    token_quota: Limit = None
    period: str | None = None
    expires_at: str | float | None = None


def _expiry(value: str | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_utc(value, what="expires_at")
        except (UsageError, OverflowError, ValueError) as e:
            raise invalid(str(e) if isinstance(e, UsageError) else f"expires_at {value!r:.40} is not a date",
                          "expires_at") from None
    if not (math.isfinite(value) and 0 < value < LAST_DATE):
        raise invalid("expires_at must be a date before 9999-12-31 (ISO, e.g. 2026-12-31, or epoch seconds).",
                      "expires_at")
    return float(value)


def key_view(key: ApiKey, now: float | None = None) -> dict:
    return key.as_dict(time.time() if now is None else now)


# ---- usage views ---------------------------------------------------------------------------------------

def chain_key_ids(store: Store, key: ApiKey) -> list[str]:
    """The key and every key of its rotation chain (same quota owner), so a rotated key keeps its history."""
    owner = store.quota_owner(key)
    return sorted({k.key_id for k in store.list_keys(include_revoked=True, partner=key.partner)
                   if (k.owner_id or k.key_id) == owner} | {key.key_id, owner})


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def usage_views(rows: list[UsageRecord], recent: int) -> dict:
    """Ledger rows -> usage by UTC day and model, totals per model, and the last `recent` requests."""
    by_day: dict[tuple[str, str], dict] = {}
    by_model: dict[str, dict] = {}
    for r in rows:
        for bucket in (by_day.setdefault((_day(r.created_at), r.model), {"day": _day(r.created_at), "model": r.model}),
                       by_model.setdefault(r.model, {"model": r.model})):
            bucket["requests"] = bucket.get("requests", 0) + 1
            bucket["prompt_tokens"] = bucket.get("prompt_tokens", 0) + r.prompt_tokens
            bucket["completion_tokens"] = bucket.get("completion_tokens", 0) + r.completion_tokens
    last = sorted(rows, key=lambda r: (r.created_at, r.request_id), reverse=True)[:recent]
    return {
        "by_day": [by_day[k] for k in sorted(by_day)],
        "by_model": [by_model[k] for k in sorted(by_model)],
        "recent": [{"request_id": r.request_id, "created_at": utc_iso(r.created_at), "model": r.model,
                    "endpoint": r.endpoint, "status": r.status, "http_status": r.http_status,
                    "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "finish_reason": r.finish_reason, "latency_s": round(r.latency_s, 4),
                    "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4)} for r in last],
    }


def _int_param(request: Request, name: str, default: int, top: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= top:
        raise invalid(f"{name} must be a whole number from 1 to {top}.", name)
    return int(text)


def partner_usage(state: AppState, key: ApiKey, days: int, recent: int) -> dict:
    store, now = state.store, time.time()
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    since = today - (days - 1) * 86400.0
    ids = chain_key_ids(store, key)
    rows = [r for kid in ids for r in store.usage(key_id=kid, since=since)]
    quota = None
    if key.token_quota is not None:
        start = key.period_start(now)
        used = store.chain_tokens_used(store.quota_owner(key), start)
        quota = {"token_quota": key.token_quota, "period": key.period, "period_start": utc_iso(start),
                 "resets_at": utc_iso(key.period_end(now)), "used": used,
                 "left": state.quotas.remaining(key)}
    return {"object": "usage", "key_id": key.key_id, "partner": key.partner, "since": utc_iso(since),
            "limits": {"rpm": key.rpm, "tpm": key.tpm, "models": None if key.models is None else list(key.models),
                       "expires_at": utc_iso(key.expires_at)},
            "quota": quota, **usage_views(rows, recent)}


# ---- the router ----------------------------------------------------------------------------------------

def served_runs(run_dirs: dict[str, str]) -> list[dict]:
    """The dashboard's data of each served model's run directory, read now (a run still training shows
    its newest steps); a directory with nothing to show is listed with the reason instead."""
    out = []
    for model, path in run_dirs.items():
        try:
            out.append({**read_run(path), "name": model})
        except UsageError as e:
            out.append({"name": model, "path": str(path), "error": str(e), "stages": {}, "eval": None,
                        "samples": {}, "report": None, "skipped_lines": 0})
    return out


def accounts_router(state: AppState, run_dirs: dict[str, str] | None = None) -> APIRouter:
    """`run_dirs`: served model name -> the run (or checkpoint) directory it was loaded from."""
    serving = Serving(state)
    store = state.store
    r = APIRouter()

    def admin(request: Request) -> None:
        require_admin(state, request)

    async def body(request: Request, model: type[BaseModel]):
        data = await serving.read_json(request)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def key_op(fn, *args, **kw):
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except UsageError as e:
            text = str(e)
            if text.startswith("no key with id"):
                raise ApiError(404, text, param="key_id", code="key_not_found") from None
            raise invalid(text) from None

    def check_id(key_id: str) -> str:
        if not keyfmt.is_key_id(key_id):
            raise ApiError(404, "No such key: a key id looks like key_ followed by 12 hex digits.",
                           param="key_id", code="key_not_found")
        return key_id

    @r.get("/v1/usage")
    async def usage(request: Request):
        key = serving.authenticate(request)
        days = _int_param(request, "days", USAGE_DAYS, MAX_USAGE_DAYS)
        recent = _int_param(request, "recent", RECENT_REQUESTS, MAX_RECENT)
        data = await asyncio.to_thread(partner_usage, state, key, days, recent)
        return SafeJSONResponse(data, headers=serving.headers_for(request))

    @r.post("/admin/keys", status_code=201, openapi_extra=body_doc(KeyCreate))
    async def create_key(request: Request):
        admin(request)
        b: KeyCreate = await body(request, KeyCreate)
        text, key = await key_op(store.create_key, b.partner, models=b.models, rpm=b.rpm, tpm=b.tpm,
                                 token_quota=b.token_quota, period=b.period, expires_at=_expiry(b.expires_at))
        return SafeJSONResponse({"key": text, "data": key_view(key)}, status_code=201)

    @r.patch("/admin/keys/{key_id}", openapi_extra=body_doc(KeyUpdate))
    async def update_key(key_id: str, request: Request):
        admin(request)
        b: KeyUpdate = await body(request, KeyUpdate)
        changes = b.model_dump(exclude_unset=True)
        if "expires_at" in changes:
            changes["expires_at"] = _expiry(changes["expires_at"])
        key = await key_op(store.update_key, check_id(key_id), **changes)
        return SafeJSONResponse({"data": key_view(key)})

    @r.post("/admin/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, request: Request):
        admin(request)
        key = await key_op(store.revoke, check_id(key_id))
        return SafeJSONResponse({"data": key_view(key)})

    @r.post("/admin/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request):
        admin(request)
        text, key = await key_op(store.rotate, check_id(key_id))
        return SafeJSONResponse({"key": text, "data": key_view(key)})

    @r.get("/admin/engine")
    async def engine(request: Request):
        admin(request)
        # this server's state now, and every replica's as of its last heartbeat (PostgreSQL store; [] alone)
        replicas = await asyncio.to_thread(store.replicas)
        return SafeJSONResponse({**state.live_state(), "replicas": replicas})

    @r.get("/admin/runs")
    async def runs(request: Request):
        admin(request)
        data = await asyncio.to_thread(served_runs, run_dirs or {})
        return SafeJSONResponse({"object": "list", "data": data})

    return r

