"""`muse serve`: the official openai SDK against a live server on loopback (tiny random models).

One module-scoped server carries most tests (each test uses its own keys, so the order does not
matter); tests that break a server on purpose (a dead engine, a full queue) start their own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from muse.infer.generate import generate
from muse.server.app import ServedModel, ServerConfig
from muse.server.store import Store
from muse.tokenizer import END_ID, EOT_ID, render_prompt
from server_kit import ADMIN, Server, engine_for, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]



@pytest.fixture(scope="module")
def tok(tiny_tok):
    return tiny_tok


@pytest.fixture(scope="module")
def models(tok):
    return {"tiny": tiny_model(tok, 0), "other": tiny_model(tok, 1)}


@pytest.fixture(scope="module")
def server(tok, models, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("serve") / "serve.sqlite3")
    served = [ServedModel.from_engine(name, engine_for(m, tok)) for name, m in models.items()]
    srv = Server(served, store)
    yield srv
    srv.stop()
    store.close()


def new_key(server, partner="acme", **kw) -> str:
    key, _ = server.store.create_key(partner, **kw)
    return key


def greedy(model, prompt, n):
    return generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=False, stop_ids=[EOT_ID])


def settled_rows(server, key_id, why, timeout=10.0):
    """The key's ledger rows once none is "running" any more (a row is written at admission)."""
    deadline = time.monotonic() + timeout
    while not (rows := server.store.usage(key_id=key_id)) or any(r.status == "running" for r in rows):
        assert time.monotonic() < deadline, why
        time.sleep(0.01)
    return rows


def assert_blocks_free(server):
    server.settle()
    for m in server.state.models.values():
        e = m.client.engine
        assert e.scheduler.kv.num_free_blocks == e.num_blocks


# ---- routes ---------------------------------------------------------------------------------------------


def test_models_lists_what_the_key_may_use(server):
    assert [m.id for m in server.client(new_key(server)).models.list()] == ["tiny", "other"]
    only = server.client(new_key(server, models=["other"]))
    assert [m.id for m in only.models.list()] == ["other"]
    assert only.models.retrieve("other").id == "other"


def test_completions_equal_naive_greedy_generation(server, tok, models):
    c = server.client(new_key(server))
    r = c.completions.create(model="tiny", prompt="the king speaks", max_tokens=12, temperature=0)
    ids = [EOT_ID] + tok.encode("the king speaks")        # a text prompt starts after a document boundary
    ref = greedy(models["tiny"], ids, 12)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.usage.total_tokens == len(ids) + len(ref)
    # token-id prompts, one or several, are used as given
    r2 = c.completions.create(model="tiny", prompt=[ids, ids[1:]], max_tokens=12, temperature=0)
    assert [ch.index for ch in r2.choices] == [0, 1]
    assert r2.choices[0].text == r.choices[0].text
    assert r2.choices[1].text == tok.decode(greedy(models["tiny"], ids[1:], 12), skip_special_tokens=True)
    # another model gives other text for the same prompt
    r3 = c.completions.create(model="other", prompt="the king speaks", max_tokens=12, temperature=0)
    assert r3.choices[0].text == tok.decode(greedy(models["other"], ids, 12), skip_special_tokens=True)
    assert_blocks_free(server)


def test_completions_n_seed_echo_logprobs(server, tok, models):
    c = server.client(new_key(server))
    kw = dict(model="tiny", prompt=["the king", "a lady"], max_tokens=6, n=2, seed=7, temperature=1.0)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]      # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text or a.choices[0].text == ""    # the n samples differ
    r = c.completions.create(model="tiny", prompt="the king", max_tokens=3, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.text.startswith("the king")
    ids = [EOT_ID] + tok.encode("the king")
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the prompt's logprobs are those of one full forward pass
    with torch.no_grad():
        full = torch.log_softmax(models["tiny"](torch.tensor([ids]))[0].float(), -1)
    for k in range(1, len(ids)):
        assert lp.token_logprobs[k] == pytest.approx(full[k - 1, ids[k]].item(), abs=1e-4)
        assert len(lp.top_logprobs[k]) <= 2
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[1] == 0  # the boundary token takes no room


def test_echo_logprobs_of_prompts_sharing_a_context_equal_each_prompt_alone(server):
    """Several prompts in one echo + logprobs request (muse eval's multiple-choice questions): each
    prompt after the first takes the logprobs of the context it shares with prompt 0 from prompt 0
    and computes only its own tail, the context from the prefix cache. The fast path against the
    slow one: each prompt sent alone."""
    c = server.client(new_key(server))
    context = "the king and the queen speak of love and night and the fair lady hear the sword and crown"
    prompts = [context + tail for tail in (" day", " heart come", " go", "", " the king speaks")] + ["a lady"]
    kw = dict(model="tiny", max_tokens=1, temperature=0, echo=True, logprobs=2)
    together = c.completions.create(prompt=prompts, **kw)
    assert together.usage.prompt_tokens_details.cached_tokens > 0   # the context was computed once
    for i, p in enumerate(prompts):
        alone = c.completions.create(prompt=p, **kw).choices[0].logprobs
        got = together.choices[i].logprobs
        assert together.choices[i].text == p + c.completions.create(prompt=p, **kw).choices[0].text[len(p):]
        assert got.tokens == alone.tokens and got.text_offset == alone.text_offset
        assert got.token_logprobs[0] is None and alone.token_logprobs[0] is None
        assert got.token_logprobs[1:] == pytest.approx(alone.token_logprobs[1:], abs=1e-5)
        for g, a in zip(got.top_logprobs[1:], alone.top_logprobs[1:]):
            assert list(g) == list(a) and list(g.values()) == pytest.approx(list(a.values()), abs=1e-5)
    assert_blocks_free(server)


def test_echo_logprobs_of_a_chunked_prompt_are_complete(tok, models, tmp_path):
    """A prompt computed in chunks (8 tokens a step) gets its prompt logprobs over several steps: the
    echo carries all of them (the job keeps the latest cumulative output, not the first), streamed or not."""
    store = Store(tmp_path / "s.sqlite3")
    srv = Server([ServedModel.from_engine("tiny", engine_for(models["tiny"], tok, max_num_batched_tokens=8))], store)
    try:
        c = srv.client(store.create_key("p")[0])
        prompt = "the king and the queen speak of love and night and the fair lady"
        ids = [EOT_ID] + tok.encode(prompt)
        assert len(ids) > 16
        with torch.no_grad():
            full = torch.log_softmax(models["tiny"](torch.tensor([ids]))[0].float(), -1)
        want = [full[k - 1, ids[k]].item() for k in range(1, len(ids))]
        kw = dict(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=0)
        plain = c.completions.create(**kw).choices[0].logprobs.token_logprobs
        assert plain[0] is None and plain[1:len(ids)] == pytest.approx(want, abs=1e-4)
        streamed = [ch for ev in c.completions.create(stream=True, **kw) for ch in ev.choices if ch.logprobs]
        assert streamed[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    finally:
        srv.stop()
        store.close()


def test_chat_matches_the_chat_format_and_streams_the_same_text(server, tok, models):
    c = server.client(new_key(server))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "speak of the king"}]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                  logprobs=True, top_logprobs=2)
    prompt = render_prompt(tok, messages)
    ref = generate(models["tiny"], prompt, max_new_tokens=10, temperature=0, use_cache=False,
                   stop_ids=[EOT_ID, END_ID])
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref)
    content = r.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in content] == [tok.token_bytes(t) for t in ref if t != END_ID]
    assert all(len(e.top_logprobs) == 2 for e in content)

    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert_blocks_free(server)


def test_completion_stream_and_stop_strings(server, tok):
    c = server.client(new_key(server))
    full = c.completions.create(model="tiny", prompt="the queen", max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full[:full.index(stop)]
    r = c.completions.create(model="tiny", prompt="the queen", max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    stream = c.completions.create(model="tiny", prompt="the queen", max_tokens=24, temperature=0, stop=stop,
                                  stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == cut      # no piece of the stop string leaks out
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_blocks_free(server)


def test_tokenize_detokenize_tokenizer_info(server, tok):
    key = new_key(server)
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "<|endoftext|>the king", "add_special_tokens": False},
                   headers=h).json()
    assert r["tokens"] == [EOT_ID] + tok.encode("the king") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                   headers=h).json()
    assert r["tokens"] == render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok.encode("the king")},
                      headers=h).json() == {"prompt": "the king"}
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == tok.chat_template
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").status_code == 200       # no key needed
    key = new_key(server)
    server.client(key).completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    for name in ("muse_requests_total", "muse_prompt_tokens_total", "muse_completion_tokens_total",
                 "muse_time_to_first_token_seconds_bucket", "muse_inter_token_latency_seconds_bucket",
                 "muse_queue_depth", "muse_kv_cache_usage_ratio", "muse_kv_cache_blocks", "muse_engine_steps_total"):
        assert name in text, name


# ---- the error contract -----------------------------------------------------------------------------------


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_keys_are_checked_and_never_echoed(server):
    good = new_key(server)
    url = server.url + "/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert _error(httpx.post(url, json=body))["code"] == "invalid_api_key"
    typo = good[:-1] + ("0" if good[-1] != "0" else "1")
    revoked = new_key(server)
    server.store.revoke(server.store.authenticate(revoked).key_id)
    expired = new_key(server, expires_at=time.time() - 1, now=time.time() - 100)
    unknown = server.store.create_key("ghost")[0]
    server.store.revoke(server.store.authenticate(unknown).key_id)
    for key, needle in ((typo, "Incorrect"), (revoked, "revoked"), (expired, "expired"), ("sk-not-ours", "Incorrect")):
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(key).completions.create(**body)
        msg = json.dumps(e.value.body)
        assert needle in msg and key[8:20] not in msg and key[-10:] not in msg
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-not-ours").models.list()
    for path in ("/tokenize", "/detokenize", "/tokenizer_info", "/v1/models"):
        resp = httpx.request("GET" if path in ("/tokenizer_info", "/v1/models") else "POST", server.url + path,
                             json={"prompt": "x", "tokens": [1]})
        assert resp.status_code == 401, path


def test_model_access_and_unknown_models(server):
    key = new_key(server, models=["other"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        server.client(key).completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as e:
        server.client(key).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    resp = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 404 and _error(resp)["code"] == "unknown_url"


@pytest.mark.parametrize("body, param", [
    ({"temperature": 5}, "temperature"),
    ({"temprature": 1}, "temprature"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"model": 3}, "model"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"suffix": "x"}, "suffix"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"presence_penalty": 9}, "presence_penalty"),
])
def test_bad_completion_requests_are_400_naming_the_field(server, body, param):
    key = new_key(server)
    req = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **body}
    resp = httpx.post(server.url + "/v1/completions", json=req, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"messages": "hi"}, "messages"),
])
def test_bad_chat_requests_are_400_naming_the_field(server, body, param):
    key = new_key(server)
    req = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    resp = httpx.post(server.url + "/v1/chat/completions", json=req, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400, resp.text
    assert _error(resp)["param"] == param, resp.text


def test_malformed_bodies_context_length_and_body_size(server):
    key = new_key(server)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = server.url + "/v1/completions"
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        resp = httpx.post(url, content=raw, headers=h)
        assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error", raw
    c = server.client(key)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the king " * 20, max_tokens=120)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "love " * 200}])
    assert e.value.body["code"] == "context_length_exceeded"
    resp = httpx.post(url, content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}', headers=h)
    assert resp.status_code == 413 and _error(resp)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="tiny", prompt="a" * (2 << 20), max_tokens=1)
    assert e.value.status_code == 413


def test_rate_limits_headers_and_429(server):
    key = new_key(server, rpm=2, tpm=10_000)
    c = server.client(key)
    raw = c.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000" and "x-ratelimit-reset-tokens" in raw.headers
    assert raw.headers["x-request-id"].startswith("cmpl-")
    with c.chat.completions.with_streaming_response.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=2, stream=True) as s:
        assert s.headers["x-ratelimit-remaining-requests"] == "0"    # streams carry them too
        list(s.iter_lines())
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "rate_limit_exceeded" and float(e.value.response.headers["retry-after"]) > 0
    # a request larger than the whole tokens-per-minute budget can never run
    big = server.client(new_key(server, tpm=50))
    with pytest.raises(openai.RateLimitError) as e:
        big.completions.create(model="tiny", prompt="hi", max_tokens=100)
    assert "tokens" in e.value.body["message"]


def test_quota_is_never_overspent_by_concurrent_requests(server):
    prompt, max_tokens = [3, 4, 5, 6], 5
    cost = len(prompt) + max_tokens
    key = new_key(server, token_quota=10 * cost, period="day")
    key_id = server.store.authenticate(key).key_id

    async def run():
        c = server.aclient(key)

        async def one():
            try:
                await c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
                return "ok"
            except openai.RateLimitError as e:
                assert e.body["code"] == "insufficient_quota"
                assert e.response.headers["x-should-retry"] == "false"
                return "quota"
        try:
            return await asyncio.gather(*(one() for _ in range(50)))
        finally:
            await c.close()

    results = asyncio.run(run())
    assert results.count("ok") == 10 and results.count("quota") == 40
    server.settle()
    assert server.store.tokens_used(key_id, 0) == 10 * cost
    rows = server.store.usage(key_id=key_id)
    assert len(rows) == 50 and sum(r.status == "ok" for r in rows) == 10
    assert sorted({r.http_status for r in rows}) == [200, 429]


def test_ledger_has_one_row_per_request_and_matches_the_responses(server):
    key = new_key(server, partner="ledger-co")
    key_id = server.store.authenticate(key).key_id
    c = server.client(key)
    r1 = c.completions.create(model="tiny", prompt="the king", max_tokens=5)
    r2 = c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
    list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   stream=True))
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=9)
    server.settle()
    rows = {r.request_id: r for r in server.store.usage(key_id=key_id)}
    assert len(rows) == 4
    for resp, endpoint, model in ((r1, "completions", "tiny"), (r2, "chat.completions", "other")):
        row = rows[resp.id]
        assert (row.endpoint, row.model, row.partner, row.status) == (endpoint, model, "ledger-co", "ok")
        assert (row.prompt_tokens, row.completion_tokens) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
        assert row.ttft_s is not None and row.latency_s >= row.ttft_s
    assert sorted(r.status for r in rows.values()) == ["error", "ok", "ok", "ok"]


def test_disconnect_mid_stream_aborts_and_is_recorded(server):
    key = new_key(server)
    key_id = server.store.authenticate(key).key_id
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
            rid = resp.headers["x-request-id"]
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(line.startswith("data: ") or not line for line in got)
    (row,) = settled_rows(server, key_id, "no ledger row for the aborted stream")
    assert row.request_id == rid
    assert row.status == "aborted" and 3 <= row.completion_tokens < 100 and row.prompt_tokens == 3
    assert_blocks_free(server)


def test_a_client_that_hangs_up_on_a_plain_request_aborts_it(server, monkeypatch):
    """Not streamed: the client times out and closes the connection; generation stops within a step or
    so, the ledger gets an "aborted" row with the tokens made so far, every block is free."""
    key = new_key(server)
    key_id = server.store.authenticate(key).key_id
    runner = server.engine().runner
    execute, steps = runner.execute, []

    def slow(so):  # ~10 ms a step: 120 tokens take > 1 s, the client waits 0.3 s
        steps.append(1)
        time.sleep(0.01)
        return execute(so)
    monkeypatch.setattr(runner, "execute", slow)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                   timeout=httpx.Timeout(0.3, connect=5))
    (row,) = settled_rows(server, key_id, "no ledger row for the abandoned request")
    assert row.status == "aborted" and 0 < row.completion_tokens < 120 and row.prompt_tokens == 3
    assert len(steps) < 110  # it stopped long before the end
    assert_blocks_free(server)


def test_503_while_draining_and_when_the_queue_is_full(server, tok, tmp_path):
    key = new_key(server)
    c = server.client(key)
    server.state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.state.draining = False

    # one request may run and none may wait: a second one is turned away with 503 at once
    store = Store(tmp_path / "s.sqlite3")
    engine = engine_for(tiny_model(tok), tok)
    small = Server([ServedModel.from_engine("tiny", engine)], store,
                   ServerConfig(admin_key=ADMIN, max_running=1, max_waiting=0))
    execute, gate = engine.runner.execute, threading.Event()

    def held(so):  # the engine waits until the test lets it go: the first request keeps its slot
        gate.wait(10)
        return execute(so)
    engine.runner.execute = held
    try:
        k = store.create_key("p")[0]
        c = small.client(k)
        body = dict(model="tiny", prompt=[5, 6], max_tokens=20)
        with c.completions.with_streaming_response.create(stream=True, **body) as s:
            assert s.status_code == 200
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(**body)
            assert e.value.status_code == 503 and e.value.body["code"] == "overloaded"
            gate.set()
            s.read()
        small.settle()
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason
    finally:
        small.stop()
        store.close()


def test_engine_failure_mid_stream_sends_an_error_then_done(tok, tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    engine = engine_for(tiny_model(tok), tok)
    srv = Server([ServedModel.from_engine("tiny", engine)], store)
    try:
        key = store.create_key("p")[0]
        execute, calls = engine.runner.execute, []

        def flaky(so):
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("device lost")
            return execute(so)
        engine.runner.execute = flaky
        with httpx.stream("POST", srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "max_tokens": 50, "ignore_eos": True}, timeout=10) as resp:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        # the client hears what happened and what to do, never the exception's text (the log has it)
        assert err["type"] == "server_error" and err["code"] == "engine_unavailable"
        assert "device lost" not in err["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError):
            srv.client(key).completions.create(model="tiny", prompt="hi", max_tokens=2)
        srv.settle()
        rows = [r for r in store.usage() if r.endpoint == "chat.completions"]
        # the stream's status line (200) had gone out: the ledger records what the client got
        assert len(rows) == 1 and rows[0].status == "error" and rows[0].http_status == 200
    finally:
        srv.stop()
        store.close()


def test_rotating_a_key_keeps_its_quota_spent(server):
    prompt, max_tokens = [3, 4, 5], 4
    cost = len(prompt) + max_tokens
    key = new_key(server, token_quota=3 * cost, period="month")
    body = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, extra_body={"ignore_eos": True})
    for _ in range(2):
        server.client(key).completions.create(**body)
    server.settle()
    new, _ = server.store.rotate(server.store.authenticate(key).key_id)
    with pytest.raises(openai.AuthenticationError):
        server.client(key).completions.create(**body)
    server.client(new).completions.create(**body)                 # the third of three
    with pytest.raises(openai.RateLimitError) as e:
        server.client(new).completions.create(**body)
    assert e.value.body["code"] == "insufficient_quota"


def test_a_stream_sends_one_finish_when_events_queue_up(server):
    """A stream that reads several queued events of one choice at once (a slow client, a busy loop) sends
    the finish once, after the last: the finish travels with its event, not read off the choice (which is
    already finished when the earlier events are read). This failed under load in a fresh-clone run."""
    import types

    from muse.server.serving import Serving

    choice = types.SimpleNamespace(index=0, finish_reason="length")   # finished by the time the stream reads

    async def collect():
        events: asyncio.Queue = asyncio.Queue()
        for item in ((choice, "a", [1], [], False), (choice, "b", [2], [], False), (choice, "c", [3], [], True), None):
            events.put_nowait(item)
        done = asyncio.Event()
        done.set()
        job = types.SimpleNamespace(choices=[choice], events=events, done=done, error=None, http_status=None,
                                    cancel=lambda: None)
        request = types.SimpleNamespace(state=types.SimpleNamespace(rl_headers={}))
        resp = Serving(server.state).stream_response(
            request, job, lambda c, d, n, lps, first: None if first else {"text": d},
            lambda c: {"finish": c.finish_reason}, False, None)
        return [chunk async for chunk in resp.body_iterator]

    body = b"".join(asyncio.run(collect())).decode()
    assert body.count('"finish"') == 1 and body.index('"finish"') > body.index('"text":"c"')
    assert body.endswith("data: [DONE]\n\n")
