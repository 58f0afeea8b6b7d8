"""`muse eval --samples K --temperature T`: the pass@k estimator against a hand computation and a
subset-counting reference, K=1 leaving today's eval alone, K seeded samples per item on a tiny checkpoint
(records, seeds, metrics, the cache, a larger K), an endpoint's requests, paired items, and bad flags."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json

import httpx
import pytest

import muse.tasks as tasks
from muse.cli.main import main
from muse.common.errors import UsageError
from muse.eval import EvalOptions, ModelSpec, NoCache, ResponseCache, evaluate, write_report
from muse.eval.remote import OpenAIProvider
from muse.eval.report import paired_comparison
from muse.eval.runner import plan_task, summarize
from muse.eval.sampling import pass_at_k, pass_ks, sample_seed

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]

ITEMS = ["king", "night", "lord", "lady", "sword", "day"]


def gen_task(tmp_path, grader=None):
    """A generate task whose grade varies from sample to sample of a random tiny model: the regex
    [a-z]{3} (three lowercase letters in a row) matches some of its byte-soup outputs and not others."""
    grader = grader or {"type": "regex", "pattern": "[a-z]{3}", "compare": "match"}
    rows = [{"task": {"name": "gen", "kind": "generate", "grader": grader,
                      "generation": {"max_tokens": 8, "stop": ["\n"]}}}]
    rows += [{"id": f"g{i}", "prompt": f"the {w} is", "answer": "fair"} for i, w in enumerate(ITEMS)]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tasks.get(str(path))


def mc_task(tmp_path):
    rows = [{"task": {"name": "mc", "kind": "multiple_choice"}}] + [
        {"id": f"q{i}", "context": f"the {w} of the", "choices": ["king", "queen speak"], "gold": i % 2}
        for i, w in enumerate(ITEMS[:4])]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tasks.get(str(path))


# ---- the estimator -----------------------------------------------------------------------------------


def subsets_pass_at_k(n, c, k):
    """The definition: the fraction of the k-subsets of n samples (c right) that hold a right one."""
    right = [i < c for i in range(n)]
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(right[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand_and_against_counting_subsets():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - 5 / 70)          # 1 - C(5,4)/C(8,4)
    assert pass_at_k(5, 2, 4) == 1.0                                 # n - c = 3 < k: every subset has a right one
    for n in (1, 4, 5):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n, k) == 1.0
        assert pass_at_k(n, 1, n) == 1.0                             # k = n: any right sample is in the one subset
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(subsets_pass_at_k(n, c, k), abs=1e-12)
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_the_ks_reported_and_the_seeds():
    assert pass_ks(1) == [1] and pass_ks(2) == [1, 2] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(8) == [1, 2, 4, 8]
    # sample 0 keeps the seed a single sampled request always had, so a K-sample run reuses a 1-sample run's answer
    old = int.from_bytes(hashlib.sha256(b"g0").digest()[:4], "little") & 0x7FFFFFFF
    assert sample_seed("g0") == sample_seed("g0", 0) == old
    seeds = {sample_seed(f"g{i}", j) for i in range(20) for j in range(16)}
    assert len(seeds) == 320 and all(0 <= s < 2**31 for s in seeds)


def test_summarize_means_items_and_counts_only_full_marks_as_passes(tmp_path):
    task = gen_task(tmp_path)
    grades = {"a": [1.0, 0.0, 0.0, 1.0], "b": [0.5, 0.5, 0.5, 0.5], "c": [0.0, 0.0, 0.0, 0.0]}
    recs = [{"id": i, "sample": j, "failed": False, "scores": {"score": g}}
            for i, gs in grades.items() for j, g in enumerate(gs)]
    m = summarize(task, recs, 200, samples=4)
    assert set(m) == {"score", "pass@1", "pass@2", "pass@4"}
    assert m["score"]["value"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m["pass@1"]["value"] == pytest.approx((0.5 + 0 + 0) / 3)  # a half grade is not a pass
    assert m["pass@2"]["value"] == pytest.approx((1 - 1 / 6) / 3)    # item a: 1 - C(2,2)/C(4,2)
    assert m["pass@4"]["value"] == pytest.approx(1 / 3)
    assert m["score"]["stderr"] > 0  # over 3 items: bootstrap of [0.5, 0.5, 0.0]


def test_the_table_gives_no_chance_for_pass_at_k_above_1():
    from muse.eval import results_table

    ok = {"status": "ok", "n": 20, "metrics": {m: {"value": 0.5, "stderr": None} for m in ("score", "pass@1", "pass@2")}}
    data = {"models": {"A": {}}, "results": {"t": {"A": ok}},
            "tasks": {"t": {"metrics": ["score", "pass@1", "pass@2"], "higher_is_better": True, "chance": 0.07}}}
    rows = results_table(data).splitlines()
    assert rows[2:] == ["| t | score | 0.500 | 0.070 | 20 |", "| t | pass@1 | 0.500 | 0.070 | 20 |",
                        "| t | pass@2 | 0.500 | - | 20 |"]


# ---- K = 1 is today's eval ------------------------------------------------------------------------------


def test_one_sample_and_no_temperature_change_nothing(tmp_path):
    """The default plans the task's own greedy requests (no seed), and results.json, the task info and
    the records carry no sampling keys (byte-identical results.json was checked against the code before)."""
    task = gen_task(tmp_path)
    provider = OpenAIProvider(ModelSpec("ep", "openai", "http://ep.test/v1", "m"))
    for w in plan_task(task, provider, EvalOptions(samples=1)):
        (req,) = w.requests
        assert req["temperature"] == 0.0 and "seed" not in req and "sample" not in w.extra
    res = run_scripted([scripted("ep", lambda body: "fair")], [task], EvalOptions(show_progress=False))
    assert "sampling" not in res.data["settings"] and "sampling" not in res.data["tasks"]["gen"]
    assert res.data["tasks"]["gen"]["metrics"] == ["score"]
    r = res.data["results"]["gen"]["ep"]
    assert r["n"] == 6 and "n_samples" not in r and set(r["metrics"]) == {"score"}
    assert all("sample" not in rec and "seed" not in rec for rec in res.records[("ep", "gen")])


# ---- an endpoint: K requests with temperature and seed, the numbers by hand, paired items ------------------


def scripted(name, reply):
    """An endpoint whose chat answer is reply(request body); it records every body it was sent."""
    sent = []

    def handler(request: httpx.Request):
        if request.url.path == "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        sent.append(body)
        return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": reply(body)}}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    p = OpenAIProvider(ModelSpec(name, "openai", "http://ep.test/v1", "m"), transport=httpx.MockTransport(handler),
                       backoff=0.001)
    p.sent = sent
    return p


def run_scripted(providers, task_list, opts):
    return asyncio.run(evaluate(providers, task_list, cache=NoCache(), opts=opts))


def test_an_endpoint_gets_k_seeded_requests_and_the_metrics_are_the_hand_computed_ones(tmp_path):
    task = gen_task(tmp_path, grader={"type": "exact"})
    right = lambda seed: seed % 3 == 0  # noqa: E731 - which samples the endpoint answers right
    a = scripted("A", lambda body: "fair" if right(body["seed"]) else "foul")
    b = scripted("B", lambda body: "fair" if body["seed"] % 2 == 0 else "foul")
    res = run_scripted([a, b], [task], EvalOptions(show_progress=False, samples=4, temperature=0.7))
    assert len(a.sent) == 6 * 4
    for body in a.sent:  # one answer per request: no `n`, the temperature and a seed on each
        assert body["temperature"] == 0.7 and "n" not in body and isinstance(body["seed"], int)
    assert sorted(x["seed"] for x in a.sent) == sorted(sample_seed(f"g{i}", j) for i in range(6) for j in range(4))
    c = {f"g{i}": sum(right(sample_seed(f"g{i}", j)) for j in range(4)) for i in range(6)}
    m = res.data["results"]["gen"]["A"]["metrics"]
    assert m["score"]["value"] == pytest.approx(sum(c.values()) / 24)
    for k in (1, 2, 4):
        assert m[f"pass@{k}"]["value"] == pytest.approx(sum(pass_at_k(4, ci, k) for ci in c.values()) / 6)
    assert res.data["results"]["gen"]["A"]["n"] == 6 and res.data["results"]["gen"]["A"]["n_samples"] == 24
    assert res.data["settings"]["sampling"] == {"samples": 4, "temperature": 0.7}
    # the paired comparison pairs the 6 items' means, not the 24 samples
    cmp = paired_comparison(res.data, res.records, n_boot=100)["tasks"]["gen"]["B"]
    assert cmp["n"] == 6 and cmp["baseline"] == pytest.approx(m["score"]["value"])
    assert cmp["value"] == pytest.approx(res.data["results"]["gen"]["B"]["metrics"]["score"]["value"])


# ---- a tiny checkpoint: K records per item, distinct seeds, the cache, a larger K --------------------------


def test_k_samples_on_a_tiny_checkpoint_with_the_cache(tiny_checkpoint, tmp_path):
    from muse.checkpoint import load
    from test_eval import local_provider

    model, tok, _ = load(tiny_checkpoint)
    gen, mc = gen_task(tmp_path), mc_task(tmp_path)
    cache_path = tmp_path / "cache.sqlite3"

    def once(samples):
        provider, client = local_provider(model, tok)
        cache = ResponseCache(cache_path)

        async def go():
            try:
                opts = EvalOptions(show_progress=False, samples=samples, temperature=1.0)
                return await evaluate([provider], [gen, mc], cache=cache, opts=opts)
            finally:
                await client.shutdown()
        try:
            return asyncio.run(go())
        finally:
            cache.close()

    first = once(4)
    recs = first.records[("tiny", "gen")]
    assert len(recs) == 6 * 4
    for i in range(6):
        mine = [r for r in recs if r["id"] == f"g{i}"]
        assert [r["sample"] for r in mine] == [0, 1, 2, 3]
        assert [r["seed"] for r in mine] == [sample_seed(f"g{i}", j) for j in range(4)]
    assert len({r["seed"] for r in recs}) == 24 and len({r["output"] for r in recs}) > 12  # samples differ
    r = first.data["results"]["gen"]["tiny"]
    grades = [rec["score"] for rec in recs]
    assert 0 < sum(grades) < len(grades)  # the grade varies, so the checks below can fail
    assert r["metrics"]["score"]["value"] == pytest.approx(sum(grades) / len(grades))
    assert r["metrics"]["pass@1"]["value"] == pytest.approx(sum(g >= 1.0 for g in grades) / len(grades))
    assert r["requests"] == {"sent": 24, "cached": 0}
    # multiple choice is unaffected: one record per question, no sampling keys, acc as ever
    assert len(first.records[("tiny", "mc")]) == 4 and "sample" not in first.records[("tiny", "mc")][0]
    assert set(first.data["results"]["mc"]["tiny"]["metrics"]) == {"acc", "acc_norm"}

    second = once(4)  # every sample from the cache: nothing sent, the same samples
    assert second.data["results"]["gen"]["tiny"]["requests"] == {"sent": 0, "cached": 24}
    assert second.data["results"]["gen"]["tiny"]["metrics"] == r["metrics"]
    assert [x["output"] for x in second.records[("tiny", "gen")]] == [x["output"] for x in recs]

    third = once(6)  # a larger K sends only the new samples; the old ones come back unchanged
    assert third.data["results"]["gen"]["tiny"]["requests"] == {"sent": 6 * 2, "cached": 24}
    old = {(x["id"], x["sample"]): x["output"] for x in recs}
    assert all(old[(x["id"], x["sample"])] == x["output"] for x in third.records[("tiny", "gen")] if x["sample"] < 4)
    assert set(third.data["results"]["gen"]["tiny"]["metrics"]) == {"score", "pass@1", "pass@2", "pass@4", "pass@6"}

    out = write_report(first, tmp_path / "out")
    report = (out / "report.md").read_text()
    assert "Sampled, not greedy" in report and "4 times at temperature 1" in report
    assert "| gen | pass@4 |" in report
    lines = (out / "samples" / "tiny" / "gen.jsonl").read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[1])["sample"] == 1
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"]["gen"]["sampling"] == {"samples": 4, "temperature": 1.0} and "sampling" not in data["tasks"]["mc"]


# ---- bad flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--samples", "4", "--temperature", "0"], "asks the same greedy question 4 times"),
    (["--temperature", "11"], "--temperature must be in [0, 10], got 11.0"),
    (["--temperature", "-1"], "--temperature must be in [0, 10]"),
    (["--temperature", "nan"], "--temperature must be in [0, 10]"),
])
def test_bad_sampling_flags_are_one_line(tmp_path, capsys, flags, message):
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--tasks", "identity", "--no-cache",
                 "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_eval_refuses_bad_sampling_too():
    from muse.eval import run_eval

    with pytest.raises(UsageError, match="greedy question 3 times"):
        run_eval(["nowhere"], "identity", samples=3, temperature=0.0, cache=False)
