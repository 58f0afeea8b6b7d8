"""Schema-driven fuzzing of `muse serve` (schemathesis over the server's own /openapi.json): thousands of
generated requests, valid and not, against a live server on loopback; zero 5xx, and the engine alive
and idle at the end. Sized to take well under a minute on 2 cores."""

from __future__ import annotations

import random

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from muse.server.app import ServedModel
from muse.server.store import Store
from muse.tokenizer import train_bpe
from server_kit import ADMIN, Server, engine_for, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(240)]

EXAMPLES = 250  # per operation: 9 operations, ~2,250 requests


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    rng = random.Random(0)
    words = "the king queen lord lady love night day sword crown heart".split()
    tok = train_bpe([" ".join(rng.choice(words) for _ in range(40)) for _ in range(20)], vocab_size=280)
    store = Store(tmp_path_factory.mktemp("fuzz") / "serve.sqlite3")
    srv = Server([ServedModel.from_engine("tiny", engine_for(tiny_model(tok), tok))], store)
    # generous limits: the fuzzer should reach the generation code, not stop at 429
    srv.key = store.create_key("fuzz", rpm=None)[0]
    yield srv
    srv.stop()
    store.close()


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"})


def operations(api) -> dict[str, object]:
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in api.get_all_operations())}


def test_the_schema_documents_every_route(api):
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
            "GET /v1/models", "GET /admin/usage", "GET /health"} <= set(operations(api))


@pytest.mark.parametrize("name", ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
                                  "POST /detokenize", "GET /v1/models", "GET /v1/models/{name}",
                                  "GET /tokenizer_info", "GET /admin/keys", "GET /admin/usage"])
def test_no_request_gets_a_server_error(api, live, name):
    # schemathesis' pytest plugin does not run on pytest 9; its strategies drive hypothesis directly
    op = operations(api)[name]
    admin = op.path.startswith(("/admin", "/metrics"))
    key = ADMIN if admin else live.key

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        if isinstance(case.body, dict) and case.path.startswith("/v1/") and "max_tokens" not in case.body:
            case.body["max_tokens"] = 4  # keep generations short; the fuzzer still sends every other field
        response = case.call(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code >= 400 and content_type.startswith("application/json"):
            assert set(response.json()) == {"error"}, response.text[:500]

    fuzz()


def test_the_engine_survived_the_fuzzing(live):
    live.settle(timeout=30)
    m = live.state.models["tiny"]
    assert m.client.is_healthy and m.client.engine.scheduler.kv.num_free_blocks == m.client.engine.num_blocks
    ok = httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {live.key}"},
                    json={"model": "tiny", "prompt": "the king", "max_tokens": 2})
    assert ok.status_code == 200
