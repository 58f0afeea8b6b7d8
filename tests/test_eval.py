"""muse.eval without a server: the local provider against a plain forward pass, the runner, the cache,
the gate, the report, the CLI's errors, and the HTTP provider against scripted endpoints (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import math
import socket

import httpx
import pytest
import torch

import muse.tasks as tasks
from muse.cli.main import main
from muse.common.errors import UsageError
from muse.eval import (
    EvalOptions,
    ModelSpec,
    NoCache,
    ProviderFailed,
    ResponseCache,
    check_gate,
    evaluate,
    load_gate,
    parse_model_spec,
    write_report,
)
from muse.eval.local import MuseProvider, auto_style, split_context, windows
from muse.eval.remote import OpenAIProvider, retry_after
from muse.eval.runner import bootstrap_bpb, bootstrap_stderr, plan_task
from muse.infer.client import ThreadEngineClient
from muse.tokenizer.text import prompt_ids

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]


def write_tasks(d):
    """A multiple-choice, a generate and a bpb task, small enough for a 128-token context."""
    d.mkdir(parents=True, exist_ok=True)
    mc = [{"task": {"name": "mc", "kind": "multiple_choice"}}] + [
        {"id": f"q{i}", "context": f"the {w} of the", "choices": ["king", "queen speak", "night"], "gold": i % 3}
        for i, w in enumerate(["love", "crown", "heart", "sword", "day", "lady"])]
    gen = [{"task": {"name": "gen", "kind": "generate", "generation": {"max_tokens": 8, "stop": ["\n", " go"]}}}] + [
        {"id": f"g{i}", "prompt": f"the {w} is", "answer": "fair"} for i, w in enumerate(["king", "night", "lord"])]
    bpb = [{"task": {"name": "texts", "kind": "bpb"}}] + [
        {"id": f"t{i}", "text": "the king and the queen speak of love " * (i + 1)} for i in range(3)]
    paths = {}
    for name, rows in (("mc", mc), ("gen", gen), ("texts", bpb)):
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from muse.checkpoint import load

    model, tok, _ = load(tiny_checkpoint)
    return model, tok


def local_provider(model, tok, name="tiny", **kw):
    from muse.infer.engine import Engine, EngineConfig

    client = ThreadEngineClient(Engine(model, EngineConfig(block_size=8, num_blocks=200, max_num_seqs=16), tokenizer=tok))
    return MuseProvider.from_client(name, client, f"muse:test-{name}", **kw), client


def run(coro):
    return asyncio.run(coro)


def forward_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
        logits = logits[0] if isinstance(logits, tuple) else logits
        return torch.log_softmax(logits[0].double(), dim=-1)


# ---- pieces ------------------------------------------------------------------------------------------


def test_model_specs():
    assert parse_model_spec("runs/x") == ModelSpec("x", "muse", "runs/x")
    assert parse_model_spec("runs/x/base/step_000010").name == "x"
    assert parse_model_spec("A=runs/x") == ModelSpec("A", "muse", "runs/x")
    assert parse_model_spec("B=openai:http://h:8000/v1@speedrun") == ModelSpec("B", "openai", "http://h:8000/v1", "speedrun")
    assert parse_model_spec("openai:https://api.x.com/v1@gpt").name == "gpt"
    for bad in ("B=openai:http://h:8000", "B=openai:ftp://h@m", "bad name=runs/x", "A="):
        with pytest.raises(UsageError):
            parse_model_spec(bad)


def test_split_context_and_windows():
    assert split_context("Answer: ", "12") == ("Answer:", " 12")
    assert split_context("Answer:", " 12") == ("Answer:", " 12")
    assert windows(5, 8) == [(0, 5)]
    spans = windows(20, 8)
    assert spans[0] == (0, 8) and spans[-1][1] == 20
    assert sum(b - a - 1 for a, b in spans) == 19  # every token after the first is predicted once


def test_auto_style_reads_the_stage_the_checkpoint_recorded(tmp_path):
    # a chat stage's checkpoint copied out of its run keeps its style; the folder decides only without a record
    assert auto_style({"stage": "sft"}, tmp_path / "copies" / "step_000150") == "chat"
    assert auto_style({"stage": "base"}, tmp_path / "sft" / "step_000150") == "completion"
    assert auto_style({}, tmp_path / "grpo" / "step_000030") == "chat"
    assert auto_style({}, tmp_path / "base" / "step_000480") == "completion"


def test_bootstrap():
    assert bootstrap_stderr([1.0]) is None
    x = [0.0, 1.0] * 200
    assert abs(bootstrap_stderr(x) - 0.5 / math.sqrt(400)) < 0.005
    value, se = bootstrap_bpb([10.0, 20.0], [10, 10])
    assert value == pytest.approx(30 / (math.log(2) * 20)) and se > 0


def test_cache_roundtrip_and_key(tmp_path):
    c = ResponseCache(tmp_path / "c.sqlite3")
    k = c.key("muse:abc", {"op": "loglik", "context": "x", "continuations": ["a"]})
    assert k != c.key("muse:abd", {"op": "loglik", "context": "x", "continuations": ["a"]})
    assert c.get(k) is None
    c.put(k, "muse:abc", {"op": "loglik"}, {"logliks": [-1.5]})
    c.close()
    again = ResponseCache(tmp_path / "c.sqlite3")
    assert again.get(k) == {"logliks": [-1.5]} and again.count("muse:abc") == 1


def test_retry_after_reads_seconds_and_dates():
    assert retry_after(httpx.Response(429, headers={"retry-after": "2"})) == 2.0
    assert retry_after(httpx.Response(429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(httpx.Response(429)) is None


def test_gate(tmp_path):
    g = tmp_path / "gate.toml"
    g.write_text("[mc]\nacc = 0.9\n[texts]\nbpb = 9.0\n[gen]\nscore = {min = 0.0, max = 1.0}\n")
    gate = load_gate(g)
    data = {"models": {"A": {}}, "results": {
        "mc": {"A": {"status": "ok", "metrics": {"acc": {"value": 0.5}}}},
        "texts": {"A": {"status": "ok", "metrics": {"bpb": {"value": 8.0}}}},
        "gen": {"A": {"status": "skipped", "reason": "no completions"}}}}
    failures = check_gate(data, gate)
    assert failures == ["model A: mc acc 0.5000 < 0.9", "model A: gen skipped: no completions"]
    g.write_text("[mc]\nacc = 'high'\n")
    with pytest.raises(UsageError, match=r"\[mc\] acc must be a number"):
        load_gate(g)


# ---- the local provider against a plain forward pass ---------------------------------------------------


def test_local_logliks_and_bpb_match_a_forward_pass(loaded):
    model, tok = loaded
    provider, client = local_provider(model, tok)

    async def go():
        ll = await provider.call({"op": "loglik", "context": "the king of the", "continuations": [" queen", " night day"]})
        nll = await provider.call({"op": "text_nll", "text": "the lady and the lord " * 40})  # > 128 tokens: windows
        await client.shutdown()
        return ll, nll

    ll, nll = run(go())
    for cont, got in zip([" queen", " night day"], ll["logliks"]):
        ctx = prompt_ids(tok, "the king of the")
        whole = prompt_ids(tok, "the king of the" + cont)
        lp = forward_logprobs(model, whole)
        want = sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert got == pytest.approx(want, abs=1e-4)
    ids = prompt_ids(tok, "the lady and the lord " * 40)
    assert len(ids) > 128
    want = 0.0
    for a, b in windows(len(ids), 127):
        lp = forward_logprobs(model, ids[a:b])
        want -= sum(lp[i - 1, ids[a + i]].item() for i in range(1, b - a))
    assert nll["tokens"] == len(ids) - 1 and nll["nll"] == pytest.approx(want, rel=1e-4)


def test_local_logliks_with_prefix_reuse_equal_every_prompt_logprob(loaded):
    """The choices of one question ask for prompt logprobs from the continuation on, so their shared
    context comes from the prefix cache (fast path); equal to asking for every prompt logprob."""
    model, tok = loaded
    context = "the king and the queen speak of love and the lady of the night and the lord of the"
    request = {"op": "loglik", "context": context, "continuations": [" crown", " sword and day", " heart", " day"]}
    results = {}
    for reuse in (True, False):
        provider, client = local_provider(model, tok, prefix_reuse=reuse)

        async def go(provider=provider, client=client):
            out = await provider.call(request)
            stats = client.stats()
            await client.shutdown()
            return out, stats

        results[reuse] = run(go())
    (fast, fast_stats), (slow, slow_stats) = results[True], results[False]
    assert fast_stats.prefix_cache_hit_rate > 0 and slow_stats.prefix_cache_hit_rate == 0
    assert fast["tokens"] == slow["tokens"]
    assert fast["logliks"] == pytest.approx(slow["logliks"], abs=1e-5)


def test_runner_scores_caches_and_reports(loaded, tmp_path):
    model, tok = loaded
    paths = write_tasks(tmp_path / "tasks")
    task_list = [tasks.get(str(p)) for p in paths.values()]
    cache_path = tmp_path / "cache.sqlite3"

    def once():
        provider, client = local_provider(model, tok)
        cache = ResponseCache(cache_path)

        async def go():
            try:
                return await evaluate([provider], task_list, cache=cache, opts=EvalOptions(show_progress=False))
            finally:
                await client.shutdown()
        try:
            return run(go())
        finally:
            cache.close()

    first = once()
    r = first.data["results"]
    assert r["mc"]["tiny"]["status"] == "ok" and r["mc"]["tiny"]["n"] == 6
    assert set(r["mc"]["tiny"]["metrics"]) == {"acc", "acc_norm"}
    assert r["gen"]["tiny"]["requests"] == {"sent": 3, "cached": 0}
    assert r["texts"]["tiny"]["metrics"]["bpb"]["value"] > 0
    for rec in first.records[("tiny", "gen")]:
        assert "\n" not in rec["output"] and " go" not in rec["output"]
    second = once()  # everything from the cache: the same numbers, nothing sent
    for t in ("mc", "gen", "texts"):
        assert second.data["results"][t]["tiny"]["metrics"] == r[t]["tiny"]["metrics"]
        assert second.data["results"][t]["tiny"]["requests"]["sent"] == 0
    out = write_report(second, tmp_path / "out")
    assert (out / "results.json").is_file() and (out / "scores.png").is_file() and (out / "bpb.png").is_file()
    assert "| mc | acc |" in (out / "report.md").read_text()
    assert len((out / "samples" / "tiny" / "mc.jsonl").read_text().splitlines()) == 6


# ---- the CLI: end to end, bad input, the gate -----------------------------------------------------------


def test_cli_end_to_end_with_gate(tiny_checkpoint, tmp_path, capsys):
    paths = write_tasks(tmp_path / "tasks")
    gate = tmp_path / "gate.toml"
    gate.write_text("[mc]\nacc = 1.01\n")
    args = ["eval", "--model", f"A={tiny_checkpoint}", "--tasks", f"{paths['mc']},{paths['gen']}",
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c.sqlite3"), "--device", "cpu"]
    assert main([*args, "--gate", str(gate)]) == 3
    captured = capsys.readouterr()
    assert "gate failed: model A: mc acc" in captured.err and "< 1.01" in captured.err
    assert "| mc | acc |" in captured.out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"]["gen"]["A"]["requests"]["sent"] == 0  # the rerun reads the cache


@pytest.mark.parametrize("tasks_arg, message", [
    ("speling", "unknown task 'speling'. Did you mean: spelling?"),
    ("BAD", "bad.jsonl:3: not valid JSON"),
])
def test_cli_bad_tasks_are_one_line(tmp_path, capsys, tasks_arg, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": {"name": "b", "kind": "multiple_choice"}}\n'
                   '{"context": "x", "choices": ["a", "b"], "gold": 0}\n{"context": "y", \n')
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--tasks", str(bad) if tasks_arg == "BAD" else tasks_arg,
                 "--no-cache", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_api_key_flag_names_a_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code = main(["eval", "--model", "B=openai:http://127.0.0.1:9/v1@m", "--api-key-env", "NO_SUCH_KEY_VAR",
                 "--tasks", "identity", "--no-cache", "--out", str(tmp_path / "o")])
    assert code == 2 and "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err


# ---- the HTTP provider against scripted endpoints ---------------------------------------------------------


def scripted(handler, **kw) -> OpenAIProvider:
    return OpenAIProvider(ModelSpec("ep", "openai", "http://ep.test/v1", "m"), transport=httpx.MockTransport(handler),
                          backoff=0.001, **kw)


def eval_remote(provider, task_list, cache=None):
    return run(evaluate([provider], task_list, cache=cache or NoCache(), opts=EvalOptions(show_progress=False)))


def chat_reply(text="fair"):
    return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


def test_a_chat_only_endpoint_skips_likelihood_tasks_with_a_reason(tmp_path):
    paths = write_tasks(tmp_path)
    seen = []

    def handler(request: httpx.Request):
        seen.append(request.url.path)
        if request.url.path == "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        return chat_reply()

    res = eval_remote(scripted(handler), [tasks.get(str(p)) for p in paths.values()])
    r = res.data["results"]
    assert r["mc"]["ep"]["status"] == "skipped" and "no prompt log-likelihoods" in r["mc"]["ep"]["reason"]
    assert r["texts"]["ep"]["status"] == "skipped"
    assert r["gen"]["ep"]["status"] == "ok" and r["gen"]["ep"]["metrics"]["score"]["value"] == 1.0
    assert res.data["models"]["ep"]["style"] == "chat" and res.errors == []
    assert seen.count("/v1/completions") == 1  # the probe, once


def test_a_wrong_key_is_reported_once_and_not_retried(tmp_path):
    paths = write_tasks(tmp_path)
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return httpx.Response(401, json={"error": {"message": "Incorrect API key", "code": "invalid_api_key"}})

    res = eval_remote(scripted(handler), [tasks.get(str(p)) for p in paths.values()])
    assert len(calls) == 1 and len(res.errors) == 1 and "refused the API key" in res.errors[0]
    assert {r["ep"]["status"] for r in res.data["results"].values()} == {"failed"}


def test_retries_429_and_5xx_then_records_garbage_as_failed_samples(tmp_path):
    paths = write_tasks(tmp_path)
    state = {"n": 0}

    def handler(request):
        body = json.loads(request.content)
        if body.get("echo") and body["prompt"] == "Hello, world":  # the probe: fine
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "Hello, world!", "logprobs": {
                "tokens": ["Hello", ",", " world", "!"], "token_logprobs": [None, -1.0, -2.0, -0.5],
                "text_offset": [0, 5, 6, 12]}}]})
        state["n"] += 1
        if state["n"] == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow down"}})
        if state["n"] == 2:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        if body.get("echo"):
            return httpx.Response(200, json={"choices": "nope"})
        return httpx.Response(200, text="<html>oops</html>")

    res = eval_remote(scripted(handler, retries=2), [tasks.get(str(paths["mc"])), tasks.get(str(paths["gen"]))])
    mc, gen = res.data["results"]["mc"]["ep"], res.data["results"]["gen"]["ep"]
    assert mc["status"] == "ok" and mc["n_failed"] == 6 and "no echoed logprobs" in mc["failures"][0]
    assert gen["n_failed"] == 3 and "not JSON" in gen["failures"][0]
    assert mc["metrics"]["acc"]["value"] == 0.0 and res.errors == []


def test_an_unreachable_url_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OpenAIProvider(ModelSpec("gone", "openai", f"http://127.0.0.1:{port}/v1", "m"), retries=0)
    res = eval_remote(provider, [tasks.get(str(write_tasks(tmp_path)["gen"]))])
    assert len(res.errors) == 1 and "cannot reach" in res.errors[0]
    with pytest.raises(ProviderFailed):
        run(OpenAIProvider(ModelSpec("gone", "openai", f"http://127.0.0.1:{port}/v1", "m"), retries=0).call(
            {"op": "complete", "prompt": "x", "max_tokens": 1}))


def test_cli_reports_contaminated_test_items(tiny_checkpoint, tmp_path, capsys):
    """A post-training file that holds a copy of one quote_completion test item: `muse eval
    --contamination-data` finds exactly that one and reports it per task."""
    import muse.tasks as tasks_lib
    from muse.tasks.contamination import item_text

    item = tasks_lib.get("quote_completion").samples("test")[0]
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Recite."},
                                             {"role": "assistant", "content": item_text(item)}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                   "content": "hello"}]}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", f"A={tiny_checkpoint}", "--tasks", "quote_completion", "--limit", "2",
                 "--out", str(out), "--no-cache", "--device", "cpu", "--contamination-data", str(data)]) == 0
    err = capsys.readouterr().err
    (report,) = json.loads((out / "contamination.json").read_text())
    assert report["task"] == "quote_completion" and report["contaminated"] == 1 and report["checked"] >= 1000
    assert "1 of" in err and "quote_completion" in err
    assert "## Contamination" in (out / "report.md").read_text()


@pytest.mark.parametrize("shots", [0, 1])  # the task's own k is 3
def test_shots_sets_the_few_shot_examples_of_every_prompt(shots):
    sent = []

    def handler(request: httpx.Request):
        if request.url.path == "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        sent.append(json.loads(request.content)["messages"])
        return chat_reply("7")

    task = tasks.get("arithmetic_1digit")
    opts = EvalOptions(show_progress=False, limit=4, shots=shots)
    res = run(evaluate([scripted(handler)], [task], cache=NoCache(), opts=opts))
    assert len(sent) == 4 and res.data["settings"]["shots"] == shots
    assert res.data["tasks"]["arithmetic_1digit"]["shots"] == shots
    for messages in sent:  # each shot is one user turn and one assistant answer before the question
        assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"] * shots + ["user"]


def test_few_shot_prompts_too_long_for_the_context_lose_examples_until_they_fit(save_tiny_checkpoint, tmp_path):
    from muse.checkpoint import load

    # a 512-token context and a 300-token vocabulary: 8 shots of arithmetic do not fit, 3 do
    model, tok, _ = load(save_tiny_checkpoint("long_context", max_seq_len=512))
    task = tasks.get("arithmetic_1digit")

    def once(shots):
        provider, client = local_provider(model, tok)

        async def go():
            try:
                opts = EvalOptions(show_progress=False, limit=6, shots=shots)
                return await evaluate([provider], [task], cache=NoCache(), opts=opts), provider
            finally:
                await client.shutdown()
        return run(go())

    res, provider = once(8)
    r = res.data["results"]["arithmetic_1digit"]["tiny"]
    recs = res.records[("tiny", "arithmetic_1digit")]
    assert r["n_failed"] == 0 and r["shots_reduced"]["n"] == 6 and 0 < r["shots_reduced"]["min_shots"] < 8
    for rec in recs:
        assert 0 <= rec["shots"] < 8
    plan = plan_task(task, provider, EvalOptions(limit=6, shots=8))
    for w, rec in zip(plan, recs):  # what was sent fits, and one more example would not have
        req, shots = w.requests[0], tasks.fewshot_examples(task, w.sample, 8)
        assert req["prompt"] == tasks.build_prompt(task, w.sample, shots[:rec["shots"]])
        assert provider.prompt_tokens(req) + req["max_tokens"] <= provider.max_len
        more = {**req, "prompt": tasks.build_prompt(task, w.sample, shots[:rec["shots"] + 1])}
        assert provider.prompt_tokens(more) + req["max_tokens"] > provider.max_len
    longer = plan_task(task, provider, EvalOptions(limit=6, shots=0))
    assert all("shots" not in w.extra for w in longer)  # nothing to drop: nothing reported
    report = write_report(res, tmp_path / "out")
    assert "prompts were asked with fewer few-shot examples" in (report / "report.md").read_text()


def test_cli_refuses_negative_shots(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--tasks", "identity", "--shots", "-1",
                 "--no-cache", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--shots must be >= 0" in err and "Traceback" not in err
