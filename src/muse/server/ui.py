"""The web pages at /ui/: one router over the static files in muse/server/web/ (plain HTML, CSS and
JavaScript, no build step, no CDN: the machines a server runs on may be offline).

    /ui/                  the playground (partner key)        /ui/partner.html    a partner's usage
    /ui/operator.html     keys, engine state, usage (admin)   /ui/dashboard.html  training runs (`muse dashboard`)

The pages only call the documented JSON routes (routes.py, accounts.py, admin.py) with the key the
user typed, kept in the tab's sessionStorage and sent as a bearer token: no cookies, so no CSRF, and
nothing secret in a URL. Every page is served with a Content-Security-Policy that allows scripts
and styles from this origin only (no inline script, no eval), requires Trusted Types (so even a
future `innerHTML = string` throws instead of parsing model output as HTML), and forbids framing.

`dashboard_app(runs)` is the small app `muse dashboard` serves: the same router plus the runs' data
(rundata.py). This module knows files and headers; it knows nothing about keys, models or runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response

from muse.server.protocol import ApiError

WEB_DIR = Path(__file__).with_name("web")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; "
       "trusted-types 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-cache",
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:html|js|css|svg)\Z")


def load_assets(directory: Path = WEB_DIR) -> dict[str, bytes]:
    """Every servable file of the web directory, read once (they are small: ~60 KB in all)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if _NAME.match(p.name)}


def asset_response(assets: dict[str, bytes], name: str) -> Response:
    body = assets.get(name)
    if body is None:
        raise ApiError(404, f"Unknown request URL: GET /ui/{name[:100]}.", code="unknown_url")
    return Response(body, media_type=MEDIA_TYPES[Path(name).suffix], headers=SECURITY_HEADERS)


def ui_router(directory: Path = WEB_DIR, index: str = "index.html") -> APIRouter:
    """GET /ui -> /ui/, /ui/ -> `index`, /ui/NAME -> that file; never a path outside `directory`
    (names are matched against a closed pattern and looked up in a dict, not joined to a path)."""
    assets = load_assets(directory)
    r = APIRouter(include_in_schema=False)

    @r.get("/ui")
    async def ui_root():
        return RedirectResponse("/ui/", status_code=308)

    @r.get("/ui/")
    async def ui_index():
        return asset_response(assets, index)

    @r.get("/ui/{name}")
    async def ui_file(name: str):
        return asset_response(assets, name)

    return r


def dashboard_app(runs: list[dict]) -> FastAPI:
    """`muse dashboard`'s app: the pages, with the dashboard as the index, and GET /ui/api/runs (the
    runs read once at start by rundata.read_runs; restart to see newer steps)."""
    from muse.server.serving import SafeJSONResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/ui/api/runs")
    async def run_data():
        return SafeJSONResponse({"object": "list", "data": runs}, headers={"cache-control": "no-cache"})

    @app.get("/")
    async def root():
        return RedirectResponse("/ui/", status_code=307)

    app.include_router(ui_router(index="dashboard.html"))

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return SafeJSONResponse(e.body(), status_code=e.status)

    return app
