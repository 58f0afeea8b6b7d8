"""The JSON routes behind the web pages (plain HTTP against a live server on loopback), the /ui/ router's
files and headers, operator credentials in the store (schema 3), and the run dashboard's data.

The pages themselves run in a real browser in test_web_browser.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import httpx
import pytest

from muse.server import schema
from muse.server.app import ServedModel, ServerConfig, create_app
from muse.server.store import SCHEMA_VERSION, Store
from muse.server.ui import CSP, WEB_DIR
from server_kit import ADMIN, Server, engine_for, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server(tiny_tok, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("web") / "serve.sqlite3")
    srv = Server([ServedModel.from_engine("tiny", engine_for(tiny_model(tiny_tok), tiny_tok))], store)
    yield srv
    srv.stop()
    store.close()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def get(server, path, key=None, **kw):
    return httpx.get(server.url + path, headers=auth(key) if key else {}, timeout=30, **kw)


def post(server, path, key=None, **kw):
    return httpx.post(server.url + path, headers=auth(key) if key else {}, timeout=30, **kw)


def complete(server, key, n=3, **kw):
    resp = post(server, "/v1/completions", key, json={"model": "tiny", "prompt": "the king", "max_tokens": n,
                                                       "temperature": 0, **kw})
    assert resp.status_code == 200, resp.text
    return resp.json()


def error_of(resp):
    return resp.json()["error"]


# ---- GET /v1/usage ------------------------------------------------------------------------------------

def test_usage_shows_the_partners_own_requests_quota_and_limits(server):
    key, k = server.store.create_key("usage-acme", rpm=100, tpm=50_000, token_quota=10_000, period="day")
    other, _ = server.store.create_key("usage-other")
    for _ in range(2):
        complete(server, key, n=3)
    complete(server, other, n=2)
    post(server, "/v1/completions", key, json={"model": "nope", "prompt": "x"})   # a 404, still a request
    server.settle()
    u = get(server, "/v1/usage", key).json()
    assert u["key_id"] == k.key_id and u["partner"] == "usage-acme"
    assert u["limits"] == {"rpm": 100, "tpm": 50_000, "models": None, "expires_at": None}
    ok = [r for r in u["recent"] if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["completion_tokens"] == 3 and r["model"] == "tiny" for r in ok)
    tiny = next(m for m in u["by_model"] if m["model"] == "tiny")
    assert tiny["requests"] == 2 and tiny["completion_tokens"] == 6
    assert sum(d["requests"] for d in u["by_day"]) == sum(m["requests"] for m in u["by_model"]) == len(u["recent"])
    q = u["quota"]
    assert q["token_quota"] == 10_000 and q["period"] == "day" and q["used"] == tiny["prompt_tokens"] + 6
    assert q["left"] == 10_000 - q["used"] and q["resets_at"].endswith("Z")
    assert "usage-other" not in json.dumps(u)                        # never another partner's rows
    assert get(server, "/v1/usage?recent=1", key).json()["recent"] == u["recent"][:1]


def test_usage_follows_the_rotation_chain_and_refuses_bad_parameters(server):
    key, k = server.store.create_key("usage-rot")
    complete(server, key, n=2)
    server.settle()
    new, _ = server.store.rotate(k.key_id)
    u = get(server, "/v1/usage", new).json()
    assert [r["completion_tokens"] for r in u["recent"]] == [2] and u["quota"] is None
    assert get(server, "/v1/usage", key).status_code == 401                          # the old key is revoked
    assert error_of(get(server, "/v1/usage"))["code"] == "invalid_api_key"
    for q, param in (("days=0", "days"), ("days=1000", "days"), ("recent=x", "recent")):
        resp = get(server, "/v1/usage?" + q, new)
        assert resp.status_code == 400 and error_of(resp)["param"] == param


# ---- operator routes ----------------------------------------------------------------------------------

def test_the_operator_creates_a_key_that_works_and_is_shown_once(server, caplog):
    resp = post(server, "/admin/keys", ADMIN, json={"partner": "made-in-the-page", "rpm": 30, "models": ["tiny"],
                                                     "token_quota": 1000, "period": "month",
                                                     "expires_at": "2999-01-01"})
    assert resp.status_code == 201, resp.text
    text, data = resp.json()["key"], resp.json()["data"]
    assert text.startswith("muse-sk-") and data["status"] == "active" and data["expires_at"] == "2999-01-01T00:00:00Z"
    assert (data["partner"], data["rpm"], data["models"], data["token_quota"]) == ("made-in-the-page", 30, ["tiny"], 1000)
    assert [m["id"] for m in get(server, "/v1/models", text).json()["data"]] == ["tiny"]
    listed = get(server, "/admin/keys", ADMIN).text
    assert data["key_id"] in listed and text not in listed and text not in caplog.text
    db = server.store.path.read_bytes() + Path(str(server.store.path) + "-wal").read_bytes()
    assert text.encode() not in db and hashlib.sha256(text.encode()).hexdigest().encode() in db


def test_set_limits_revoke_and_rotate_apply_to_the_next_request(server):
    text = post(server, "/admin/keys", ADMIN, json={"partner": "limits"}).json()["key"]
    key_id = get(server, "/v1/usage", text).json()["key_id"]
    resp = httpx.patch(f"{server.url}/admin/keys/{key_id}", headers=auth(ADMIN), json={"rpm": 1})
    assert resp.status_code == 200 and resp.json()["data"]["rpm"] == 1
    assert get(server, "/v1/usage", text).json()["limits"]["rpm"] == 1
    complete(server, text, n=1)
    limited = post(server, "/v1/completions", text, json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    resp = httpx.patch(f"{server.url}/admin/keys/{key_id}", headers=auth(ADMIN), json={"rpm": None})
    assert resp.json()["data"]["rpm"] is None
    complete(server, text, n=1)

    rotated = post(server, f"/admin/keys/{key_id}/rotate", ADMIN).json()
    assert rotated["data"]["rotated_from"] == key_id and rotated["key"] != text
    assert get(server, "/v1/models", text).status_code == 401
    assert get(server, "/v1/models", rotated["key"]).status_code == 200
    revoked = post(server, f"/admin/keys/{rotated['data']['key_id']}/revoke", ADMIN).json()["data"]
    assert revoked["status"] == "revoked" and get(server, "/v1/models", rotated["key"]).status_code == 401


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", "/admin/keys", {"partner": "x", "colour": "red"}, 400, "colour"),
    ("POST", "/admin/keys", {"rpm": 5}, 400, "partner"),
    ("POST", "/admin/keys", {"partner": "x", "token_quota": 5}, 400, None),            # a quota needs a period
    ("POST", "/admin/keys", {"partner": "x", "rpm": -1}, 400, None),
    ("POST", "/admin/keys", {"partner": "x", "expires_at": "soon"}, 400, "expires_at"),
    ("POST", "/admin/keys", {"partner": "x", "expires_at": 1e300}, 400, "expires_at"),
    ("POST", "/admin/keys", {"partner": "x", "rpm": 10**30}, 400, "rpm"),
    ("PATCH", "/admin/keys/key_000000000000", {"rpm": 5}, 404, "key_id"),
    ("PATCH", "/admin/keys/not-an-id", {"rpm": 5}, 404, "key_id"),
    ("POST", "/admin/keys/key_000000000000/rotate", None, 404, "key_id"),
    ("POST", "/admin/keys/key_000000000000/revoke", None, 404, "key_id"),
])
def test_bad_operator_requests_get_the_apis_error_shape(server, method, path, body, status, param):
    resp = httpx.request(method, server.url + path, headers=auth(ADMIN), json=body, timeout=30)
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and error_of(resp)["param"] == param and error_of(resp)["message"]


@pytest.mark.parametrize("name", ["POST /admin/keys", "PATCH /admin/keys/{key_id}", "POST /admin/keys/{key_id}/rotate",
                                  "GET /v1/usage", "GET /admin/engine"])
def test_generated_requests_never_get_a_server_error(server, name):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    api = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=auth(ADMIN))
    op = next(r.ok() for r in api.get_all_operations() if f"{r.ok().method.upper()} {r.ok().path}" == name)
    partner_key = server.store.create_key("fuzzed")[0]

    @given(case=op.as_strategy())
    @settings(max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        key = partner_key if case.path.startswith("/v1/") else ADMIN
        resp = case.call(base_url=server.url, headers=auth(key), timeout=30)
        assert resp.status_code < 500, (case.method, case.path, case.body, resp.text[:300])
        if resp.status_code >= 400:
            assert set(resp.json()) == {"error"}, resp.text[:300]

    fuzz()


def test_a_partner_key_never_opens_admin_routes(server):
    key, _ = server.store.create_key("sneaky")
    routes = [("GET", "/admin/keys"), ("GET", "/admin/usage"), ("GET", "/admin/engine"), ("GET", "/metrics"),
              ("POST", "/admin/keys"), ("GET", "/openapi.json")]
    for method, path in routes:
        resp = httpx.request(method, server.url + path, headers=auth(key), json={"partner": "me"}, timeout=30)
        assert resp.status_code == 401 and "partner API key cannot open admin" in error_of(resp)["message"], path
        assert key not in resp.text
        assert httpx.request(method, server.url + path, timeout=30).status_code == 401, path
    assert [k.partner for k in server.store.list_keys() if k.partner == "me"] == []


def test_engine_state_for_the_live_view(server):
    complete(server, server.store.create_key("engine-view")[0], n=2)
    e = get(server, "/admin/engine", ADMIN).json()
    s = e["models"]["tiny"]
    assert e["healthy"] is True and e["admission_waiting"] >= 0 and e["time"] > 0
    assert s["num_generation_tokens"] >= 2 and s["num_blocks"] >= s["num_free_blocks"] >= 0
    assert {"num_running", "num_waiting", "kv_usage", "prefix_cache_hit_rate", "restarts"} <= set(s)


# ---- operator credentials in the store ------------------------------------------------------------------

def test_the_admin_key_is_stored_as_a_hash_and_follows_the_servers_key(tiny_tok, tmp_path):
    path = tmp_path / "serve.sqlite3"
    store = Store(path)
    engine = engine_for(tiny_model(tiny_tok), tiny_tok)
    models = [ServedModel.from_engine("tiny", engine)]
    create_app(models, store, ServerConfig(admin_key=ADMIN))
    rows = sqlite3.connect(path).execute("SELECT admin_id, key_hash FROM admin_keys").fetchall()
    assert rows == [("admin_bootstrap", hashlib.sha256(ADMIN.encode()).hexdigest())]
    assert store.is_admin(ADMIN) and not store.is_admin(ADMIN + "x")
    new_admin = "another-admin-key-" + "y" * 20
    create_app(models, store, ServerConfig(admin_key=new_admin))          # a restart with a new admin key
    assert store.is_admin(new_admin) and not store.is_admin(ADMIN)
    create_app(models, store, ServerConfig(admin_key=None))               # and one without: no admin at all
    assert not store.is_admin(new_admin)
    assert ADMIN.encode() not in path.read_bytes() + Path(str(path) + "-wal").read_bytes()
    store.close()


def test_a_version_2_database_is_upgraded_to_3_in_place(tmp_path):
    path = tmp_path / "serve.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    for v in (1, 2):
        schema.MIGRATIONS[v](conn)
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (2)")
    conn.execute("INSERT INTO api_keys (key_id, key_hash, partner, created_at, owner_id) "
                 "VALUES ('key_aaaaaaaaaaaa', 'h', 'acme', 1.0, 'key_aaaaaaaaaaaa')")
    conn.execute("COMMIT")
    conn.close()
    store = Store(path)
    assert [k.key_id for k in store.list_keys()] == ["key_aaaaaaaaaaaa"]
    store.set_bootstrap_admin(ADMIN)
    assert store.is_admin(ADMIN)
    store.close()
    fresh = tmp_path / "fresh.sqlite3"
    Store(fresh).close()
    master = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert sqlite3.connect(path).execute(master).fetchall() == sqlite3.connect(fresh).execute(master).fetchall()
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


# ---- the /ui/ router ----------------------------------------------------------------------------------

PAGES = ["/ui/", "/ui/partner.html", "/ui/operator.html", "/ui/dashboard.html"]


def test_pages_are_served_with_a_strict_content_security_policy(server):
    assert get(server, "/ui", follow_redirects=False).headers["location"] == "/ui/"
    for path in PAGES + ["/ui/common.js", "/ui/style.css", "/ui/favicon.svg"]:
        resp = get(server, path)
        assert resp.status_code == 200, path
        assert resp.headers["content-security-policy"] == CSP and resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer" and "set-cookie" not in resp.headers
    assert "script-src 'self';" in CSP and "unsafe" not in CSP and "frame-ancestors 'none'" in CSP
    assert get(server, "/ui/common.js").headers["content-type"].startswith("text/javascript")


@pytest.mark.parametrize("path", ["/ui/ui.py", "/ui/..%2fui.py", "/ui/../app.py", "/ui/%2e%2e/store.py",
                                  "/ui/nothing.html", "/ui/web", "/ui/COMMON.JS"])
def test_nothing_outside_the_web_files_is_served(server, path):
    resp = get(server, path)
    assert resp.status_code == 404 and "def " not in resp.text


def test_no_inline_script_no_html_sinks_in_the_assets():
    for f in WEB_DIR.glob("*.html"):
        html = f.read_text()
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), f.name
        assert not re.search(r"\son\w+\s*=", html) and " style=" not in html and "http" not in html, f.name
    for f in WEB_DIR.glob("*.js"):
        js = re.sub(r"^\s*//.*$", "", f.read_text(), flags=re.M)   # comments may name what the code avoids
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "localStorage", "document.cookie"):
            assert sink not in js, (f.name, sink)


def test_no_ui_leaves_the_pages_out(tiny_tok, tmp_path):
    from fastapi.testclient import TestClient

    from muse.cli.main import build_parser

    store = Store(tmp_path / "serve.sqlite3")
    models = [ServedModel.from_engine("tiny", engine_for(tiny_model(tiny_tok), tiny_tok))]
    app = create_app(models, store, ServerConfig(admin_key=ADMIN), ui=False)
    with TestClient(app) as client:
        assert client.get("/ui/").status_code == 404 and client.get("/health").status_code == 200
    store.close()
    parser, _ = build_parser("serve")
    assert parser.parse_args(["ckpt", "--no-ui"]).ui is False and parser.parse_args(["ckpt"]).ui is True


def test_admin_runs_reads_the_served_models_run_directories(tiny_tok, tmp_path):
    from fastapi.testclient import TestClient

    store = Store(tmp_path / "serve.sqlite3")
    key, _ = store.create_key("runs-partner")
    models = [ServedModel.from_engine("tiny", engine_for(tiny_model(tiny_tok), tiny_tok))]
    app = create_app(models, store, ServerConfig(admin_key=ADMIN),
                     run_dirs={"tiny": str(make_run(tmp_path)), "gone": str(tmp_path / "missing")})
    with TestClient(app) as client:
        data = client.get("/admin/runs", headers=auth(ADMIN)).json()["data"]
        assert [r["name"] for r in data] == ["tiny", "gone"] and sorted(data[0]["stages"]) == ["base", "sft"]
        assert "is not a directory" in data[1]["error"]
        assert client.get("/admin/runs", headers=auth(key)).status_code == 401
    store.close()


# ---- the run dashboard's data ----------------------------------------------------------------------------

def make_run(root: Path, name="run-a", steps=30) -> Path:
    run = root / name
    (run / "base").mkdir(parents=True)
    rows = [{"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0 + s, "mfu": 0.3} for s in range(steps)]
    rows += [{"step": 10, "val_bpb": 2.5, "note": "text is dropped"}, {"step": 20, "val_loss": float("nan")}]
    (run / "base" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 3')
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5}) + "\n")
    (run / "eval" / "samples" / "m").mkdir(parents=True)
    results = {"schema_version": 1, "models": {"m": {"kind": "muse"}},
               "tasks": {"arith": {"primary": "accuracy", "chance": 0.0, "metrics": ["accuracy"]}},
               "results": {"arith": {"m": {"status": "ok", "metrics": {"accuracy": {"value": 0.5, "stderr": 0.1}}}}}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    (run / "eval" / "samples" / "m" / "arith.jsonl").write_text(
        json.dumps({"id": 1, "output": "<img src=x onerror=alert(1)>"}) + "\n")
    (run / "report.md").write_text("# Speedrun\n\n| a | b |\n|---|---|\n| 1 | <script>alert(1)</script> |\n")
    return run


def test_read_run_collects_stages_eval_and_report(tmp_path):
    from muse.server.rundata import read_run, read_runs, thin

    d = read_run(make_run(tmp_path))
    assert sorted(d["stages"]) == ["base", "sft"] and d["skipped_lines"] == 1
    base = d["stages"]["base"]
    assert len(base) == 32 and base[0] == {"step": 0, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.3}
    assert base[-2] == {"step": 10, "val_bpb": 2.5} and base[-1] == {"step": 20}        # text and NaN dropped
    assert d["eval"]["results"]["arith"]["m"]["status"] == "ok" and d["samples"]["m"]["arith"][0]["id"] == 1
    assert d["report"].startswith("# Speedrun")
    rows = [{"step": i} for i in range(10_001)]
    assert len(thin(rows)) <= 2001 and thin(rows)[-1] == {"step": 10_000}
    b = make_run(tmp_path / "x", name="run-a")
    assert [r["name"] for r in read_runs([tmp_path / "run-a", b])] == [str(tmp_path / "run-a"), str(b)]


def test_dashboard_cli_refuses_what_it_cannot_show(muse, tmp_path):
    code, _, err = muse("dashboard", str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = muse("dashboard", str(tmp_path / "empty"))
    assert code == 2 and "no metrics.jsonl" in err
    code, out, _ = muse("dashboard", str(make_run(tmp_path)), "--json")
    assert code == 0 and json.loads(out)["runs"][0]["stages"]["sft"] == [{"step": 1, "loss": 1.5}]
