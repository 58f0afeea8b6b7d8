"""muse.eval against a live `muse serve` (uvicorn in a thread on loopback) of the same weights as a local
provider: identical greedy outputs and log-likelihoods within 1e-5; and an eval killed half way, rerun,
sends no request twice (the server's usage ledger says so) and ends with the results of an uninterrupted run."""

from __future__ import annotations

import asyncio

import pytest

import muse.tasks as tasks
from eval_kit import DyingCache, Killed
from muse.eval import EvalOptions, ModelSpec, NoCache, ResponseCache, evaluate
from muse.eval.local import MuseProvider
from muse.eval.remote import OpenAIProvider
from muse.infer.client import ThreadEngineClient
from muse.server.app import ServedModel
from muse.server.store import Store
from server_kit import Server, engine_for, tiny_model
from test_eval import write_tasks

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]

CONCURRENCY = 4


@pytest.fixture(scope="module")
def tok(tiny_tok):
    return tiny_tok


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, 0)


@pytest.fixture(scope="module")
def server(tok, model, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("serve") / "serve.sqlite3")
    srv = Server([ServedModel.from_engine("tiny", engine_for(model, tok))], store)
    yield srv
    srv.stop()
    store.close()


@pytest.fixture(scope="module")
def task_list(tmp_path_factory):
    paths = write_tasks(tmp_path_factory.mktemp("tasks"))
    chat = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    chat.write_text('{"task": {"name": "talk", "kind": "chat", "generation": {"max_tokens": 6}}}\n'
                    '{"id": "c1", "messages": [{"role": "user", "content": "speak of the king"}], "answer": "fair"}\n'
                    '{"id": "c2", "messages": [{"role": "user", "content": "the night"}], "answer": "day"}\n')
    return [tasks.get(str(p)) for p in (*paths.values(), chat)]


def remote(server, key_env, monkeypatch, key) -> OpenAIProvider:
    monkeypatch.setenv(key_env, key)
    return OpenAIProvider(ModelSpec("served", "openai", server.url + "/v1", "tiny"), api_key_env=key_env,
                          concurrency=CONCURRENCY, retries=1, backoff=0.01)


def run_one(provider, task_list, cache=None, clients=()):
    async def go():
        try:
            return await evaluate([provider], task_list, cache=cache or NoCache(), opts=EvalOptions(show_progress=False))
        finally:
            for c in clients:
                await c.shutdown()
    return asyncio.run(go())


def test_local_and_served_agree_sample_by_sample(server, tok, model, task_list, monkeypatch):
    client = ThreadEngineClient(engine_for(model, tok))
    local = run_one(MuseProvider.from_client("local", client, "muse:test"), task_list, clients=[client])
    key, _ = server.store.create_key("evals")
    served = run_one(remote(server, "EVAL_TEST_KEY", monkeypatch, key), task_list)
    for task in task_list:
        assert served.data["results"][task.name]["served"]["status"] == "ok", served.data["results"][task.name]
        a = {r["id"]: r for r in local.records[("local", task.name)]}
        b = {r["id"]: r for r in served.records[("served", task.name)]}
        assert a.keys() == b.keys()
        assert not any(r["failed"] for r in (*a.values(), *b.values())), [r.get("reason") for r in b.values()]
        for sid in a:
            if task.kind == "multiple_choice":
                assert b[sid]["logliks"] == pytest.approx(a[sid]["logliks"], abs=1e-5)
                assert b[sid]["pred"] == a[sid]["pred"]
            elif task.kind == "bpb":
                assert b[sid]["nll"] == pytest.approx(a[sid]["nll"], abs=1e-4)
                assert b[sid]["tokens"] == a[sid]["tokens"]
            else:
                assert b[sid]["output"] == a[sid]["output"], sid
        assert served.data["results"][task.name]["served"]["metrics"] == local.data["results"][task.name]["local"]["metrics"]


def test_a_killed_eval_reruns_without_sending_a_request_twice(server, task_list, monkeypatch, tmp_path):
    key, info = server.store.create_key("resume")
    path = tmp_path / "cache.sqlite3"
    # the whole job: the probe + one request per sample (mc 6, gen 3, texts 3, talk 2)
    total = 1 + 6 + 3 + 3 + 2
    dying = DyingCache(path, after=total // 2)
    with pytest.raises(Killed):
        run_one(remote(server, "EVAL_TEST_KEY", monkeypatch, key), task_list, cache=dying)
    dying.close()
    stored = ResponseCache(path)
    assert stored.count() == total // 2
    resumed = run_one(remote(server, "EVAL_TEST_KEY", monkeypatch, key), task_list, cache=stored)
    sent_again = sum(r["served"]["requests"]["sent"] for r in resumed.data["results"].values())
    assert sent_again == total - total // 2  # all but what was received (the probe, too, came from the cache)
    assert stored.count() == total
    stored.close()
    server.settle()
    rows = server.store.usage(key_id=info.key_id)
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) <= total + CONCURRENCY and len(rows) - len(ok) <= CONCURRENCY  # only in-flight ones again
    assert len(ok) >= total

    key2, _ = server.store.create_key("reference")
    reference = run_one(remote(server, "EVAL_TEST_KEY", monkeypatch, key2), task_list)
    for task in task_list:
        assert resumed.data["results"][task.name]["served"]["metrics"] == \
            reference.data["results"][task.name]["served"]["metrics"]
        # Log-likelihoods agree to float tolerance, not bit for bit: the engine's attention backend
        # ("auto") depends on how many sequences share a step, and the resumed run's batches differ.
        for got, want in zip(resumed.records[("served", task.name)], reference.records[("served", task.name)],
                             strict=True):
            assert {k: v for k, v in got.items() if k not in ("logliks", "nll")} == \
                {k: v for k, v in want.items() if k not in ("logliks", "nll")}
            for field in ("logliks", "nll"):
                if want.get(field) is None:
                    assert got.get(field) is None
                else:
                    assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-5), (task.name, field)
