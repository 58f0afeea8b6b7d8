"""The runner: tasks x models -> requests -> cached answers -> scored samples -> metrics with stderr.

    results = run_eval(["runs/x", "B=openai:http://localhost:8000/v1@speedrun"], "all", limit=100,
                       out_dir="runs/x/eval")
    results.data            # what results.json holds (report.py documents the schema)

Per model, one provider is started, then each task is planned (its samples of `split`, the first
`limit`), its requests are sent with at most `provider.concurrency` in flight (answers from the
cache first), and every sample is scored as soon as its answers are in. Models run one after the other,
each with its own progress bar; the tasks of one model run in order, so each has its own time.

How each kind is asked:
    multiple_choice  one "loglik" request per question (context + every choice); acc, acc_norm.
    generate         "complete" with the task's prompt (completion style) or "chat" with its messages
                     (chat style: a chat model, or an endpoint without /v1/completions); graded.
    chat             "chat"; graded. A judge grader asks the --judge model (its answers cached too).
                     generate and chat: with --samples K / --temperature T, K seeded requests per item at T,
                     K records per item, metrics over item means plus pass@k (sampling.py).
    bpb              a text file's chunks or the samples' `text` ("text_nll"); the run's own shards
                     (`data = "val"`: "ids_nll" windows, local checkpoints only). bits per byte.

A sample whose request failed (a 400, a timeout after retries) is recorded with its reason and scores
0 (a failure never raises a score); bpb leaves failed windows out. A provider that fails for good (a
refused key, an unreachable URL) fails the rest of that model's tasks with one stated reason, and the
other models still run. An operation the provider cannot do (likelihoods from a chat-only endpoint)
skips the task with the reason.

This module knows tasks, providers and the cache. It writes nothing (report.py does).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import muse
import muse.tasks as tasks_lib
from muse.common.errors import DataError, MuseError, UsageError
from muse.common.logging import get_logger, progress
from muse.eval.cache import NoCache, ResponseCache, default_cache_path
from muse.eval.providers import ModelSpec, ProviderFailed, SampleFailed, parse_model_spec, parse_model_specs
from muse.eval.sampling import MAX_TEMPERATURE, item_means, item_pass_at_k, pass_ks, sample_seed
from muse.tasks import Task
from muse.tasks.spec import Sample

log = get_logger("muse.eval")

SCHEMA_VERSION = 1
N_BOOTSTRAP = 1000
BPB_CHUNK_CHARS = 2000      # a bpb text file is scored in chunks of about this many characters
JUDGE_MAX_TOKENS = 512
LOWER_IS_BETTER = frozenset({"bpb"})
GENERATIVE = frozenset({"generate", "chat"})   # the kinds --samples and --temperature apply to


@dataclass
class EvalOptions:
    """What every model is asked, and how (the CLI's flags)."""

    split: str = "test"
    limit: int | None = None
    task_seed: int = 0
    shots: int | None = None          # few-shot examples per prompt; None: each task's own fewshot.k
    concurrency: int | None = None    # None: the provider's own default
    n_bootstrap: int = N_BOOTSTRAP
    show_progress: bool = True
    samples: int = 1                  # generate/chat: seeded samples per item (sampling.py)
    temperature: float | None = None  # generate/chat: None = each task's own (1.0 with samples > 1)

    @property
    def sampled(self) -> bool:
        """Whether --samples or --temperature changed how generative tasks are asked (else: as each task says)."""
        return self.samples > 1 or self.temperature is not None

    def sampling(self) -> dict | None:
        """{"samples", "temperature"} for results.json when sampled, else None."""
        if not self.sampled:
            return None
        return {"samples": self.samples, "temperature": 1.0 if self.temperature is None else self.temperature}


def check_sampling(samples: int, temperature: float | None) -> None:
    """UsageError for a sample count or temperature that cannot mean anything."""
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise UsageError(f"--temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
    if samples > 1 and temperature is not None and temperature <= 0:
        raise UsageError(f"--samples {samples} at --temperature {temperature:g} asks the same greedy question "
                         f"{samples} times; give a temperature > 0 (default 1.0) or drop --samples")


@dataclass
class Work:
    """One sample's requests and how its answers become a record."""

    sample: Sample | None
    requests: list[dict]
    kind: str
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# statistics


def bootstrap_stderr(values: Sequence[float], n_boot: int = N_BOOTSTRAP, seed: int = 0) -> float | None:
    """Standard error of the mean by bootstrap (resampling samples with replacement); None below 2 samples."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    return float(x[idx].mean(axis=1).std(ddof=1))


def bootstrap_bpb(nll: Sequence[float], n_bytes: Sequence[int], n_boot: int = N_BOOTSTRAP,
                  seed: int = 0) -> tuple[float, float | None]:
    """bits per byte of pooled windows, and its bootstrap stderr (windows resampled)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(n_bytes, dtype=np.float64)
    value = float(a.sum() / (math.log(2) * b.sum()))
    if len(a) < 2:
        return value, None
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ratios = a[idx].sum(axis=1) / (math.log(2) * np.maximum(b[idx].sum(axis=1), 1))
    return value, float(ratios.std(ddof=1))


# ------------------------------------------------------------------------------------------------------
# planning: a task's samples -> requests


def _text_chunks(text: str, size: int = BPB_CHUNK_CHARS) -> list[str]:
    """A text in chunks of about `size` characters, cut after a newline where one is near."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start + size // 2, end)
            end = nl + 1 if nl >= 0 else end
        out.append(text[start:end])
        start = end
    return out


def plan_task(task: Task, provider, opts: EvalOptions) -> list[Work]:
    """The work for one task on one provider; SampleFailed-free. Raises _Skip when it cannot run."""
    limit = opts.limit
    if task.kind == "bpb":
        if task.loader is not None:
            _check(provider, "text_nll")
            samples = task.samples(opts.split)[:limit]
            return [Work(s, [{"op": "text_nll", "text": s.text}], "bpb", {"bytes": len(s.text.encode())})
                    for s in samples]
        if task.data in ("val", "train"):
            _check(provider, "ids_nll")
            try:
                wins = provider.shard_windows(task.data, limit)
            except (DataError, OSError) as e:
                raise _Skip(f"{task.name} reads the run's '{task.data}' shards: {e}") from None
            return [Work(None, [{"op": "ids_nll", "ids": w}], "bpb", {"id": f"window-{i}"}) for i, w in enumerate(wins)]
        _check(provider, "text_nll")
        text = Path(task.data).read_text(encoding="utf-8")
        chunks = _text_chunks(text)[:limit]
        return [Work(None, [{"op": "text_nll", "text": c}], "bpb", {"id": f"chunk-{i}", "bytes": len(c.encode())})
                for i, c in enumerate(chunks)]

    samples = task.samples(opts.split)[:limit]
    work = []
    if task.kind == "multiple_choice":
        _check(provider, "loglik")
        for s in samples:
            try:
                pairs = tasks_lib.multiple_choice_requests(task, s, tasks_lib.fewshot_examples(task, s, opts.shots))
            except MuseError as e:
                work.append(Work(s, [], "failed", {"reason": str(e)}))
                continue
            work.append(Work(s, [{"op": "loglik", "context": pairs[0][0], "continuations": [c for _, c in pairs]}],
                             "multiple_choice"))
        return work
    gen = task.generation
    chat = task.kind == "chat" or provider.style == "chat" or provider.unsupported("complete") is not None
    _check(provider, "chat" if chat else "complete")
    sampling = opts.sampling()
    temperature = gen.temperature if sampling is None else sampling["temperature"]
    for s in samples:
        req = {"max_tokens": gen.max_tokens, "temperature": temperature}
        if temperature > 0:
            req["seed"] = sample_seed(s.id)
        try:
            shots = tasks_lib.fewshot_examples(task, s, opts.shots)
            asked = len(shots)
            while True:
                if chat or s.prompt is None:
                    req.update(op="chat", messages=tasks_lib.build_messages(task, s, shots), stop=list(gen.chat_stop))
                else:
                    req.update(op="complete", prompt=tasks_lib.build_prompt(task, s, shots), stop=list(gen.stop))
                if not shots or _fits(provider, req):
                    break
                shots = shots[:-1]
        except MuseError as e:
            work.append(Work(s, [], "failed", {"reason": str(e)}))
            continue
        work.append(Work(s, [req], "generate", {"shots": len(shots)} if len(shots) < asked else {}))
    if sampling is None:
        return work
    # K seeded samples of each item, item by item; a plan failure fails each of its samples (n stays K)
    out = []
    for w in work:
        for i in range(opts.samples):
            reqs = [{**r, "seed": sample_seed(w.sample.id, i)} if "seed" in r else r for r in w.requests]
            out.append(Work(w.sample, reqs, w.kind, {**w.extra, "sample": i}))
    return out


def _fits(provider, req: dict) -> bool:
    """Whether the prompt and its max_tokens fit the model's context, where the provider knows both (a local
    checkpoint does; an endpoint does not say). A few-shot prompt that does not fit loses examples, last first,
    until it does, as HELM does; the records and results say how many items were asked with fewer."""
    length = getattr(provider, "prompt_tokens", None)
    n = length(req) if length is not None else None
    return n is None or n + int(req["max_tokens"]) <= provider.max_len


class _Skip(Exception):
    pass


def _check(provider, op: str) -> None:
    reason = provider.unsupported(op)
    if reason:
        raise _Skip(reason)


# ------------------------------------------------------------------------------------------------------
# running


class _Counters:
    def __init__(self):
        self.sent = self.cached = self.prompt_tokens = self.completion_tokens = 0


class Fetcher:
    """provider.call through the cache, at most `concurrency` calls in flight."""

    def __init__(self, provider, cache, concurrency: int):
        self.provider, self.cache = provider, cache
        self.sem = asyncio.Semaphore(max(1, concurrency))
        self.counters = _Counters()

    async def __call__(self, request: Mapping) -> dict:
        key = self.cache.key(self.provider.identity, request)
        hit = self.cache.get(key)
        c = self.counters
        if hit is None:
            async with self.sem:
                try:
                    hit = await self.provider.call(request)
                except SampleFailed as e:
                    if e.cacheable:
                        self.cache.put(key, self.provider.identity, request, {"error": e.reason})
                    raise
                finally:
                    c.sent += 1
            self.cache.put(key, self.provider.identity, request, hit)
        else:
            c.cached += 1
        if "error" in hit and len(hit) == 1:
            raise SampleFailed(hit["error"])
        prompt = hit.get("prompt_tokens")
        if prompt is None and isinstance(hit.get("tokens"), int):  # bpb: the scored tokens
            prompt = hit["tokens"]
        c.prompt_tokens += int(prompt or 0)
        c.completion_tokens += int(hit.get("completion_tokens", 0))
        return hit


async def _gather_or_cancel(coros) -> list:
    """Run coroutines concurrently; the first exception cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _record_base(w: Work) -> dict:
    if w.sample is None:
        return {"id": w.extra.get("id", "")}
    if "sample" not in w.extra:
        return {"id": w.sample.id}
    seed = w.requests[0].get("seed") if w.requests else None
    return {"id": w.sample.id, "sample": w.extra["sample"], **({"seed": seed} if seed is not None else {})}


async def _score(task: Task, w: Work, fetch: Fetcher, ask) -> dict:
    rec = _record_base(w)
    if "shots" in w.extra:  # asked with fewer few-shot examples than the task's, to fit the context
        rec["shots"] = w.extra["shots"]
    if w.kind == "failed":
        return {**rec, "failed": True, "reason": w.extra["reason"], "scores": _zero(task)}
    try:
        answers = [await fetch(r) for r in w.requests]
    except SampleFailed as e:
        return {**rec, "failed": True, "reason": e.reason, "scores": _zero(task)}
    a = answers[0]
    try:
        if w.kind == "bpb":
            n_bytes = a.get("bytes", w.extra.get("bytes"))
            return {**rec, "failed": False, "nll": float(a["nll"]), "bytes": int(n_bytes), "tokens": int(a["tokens"])}
        if w.kind == "multiple_choice":
            logliks = [float(x) for x in a["logliks"]]
            scored = tasks_lib.score_multiple_choice(w.sample, logliks)
            return {**rec, "failed": False, "logliks": logliks, "pred": scored["pred"], "pred_norm": scored["pred_norm"],
                    "gold": w.sample.gold, "scores": {"acc": scored["acc"], "acc_norm": scored["acc_norm"]},
                    "output": w.sample.choices[scored["pred"]]}
        stop = w.requests[0].get("stop") or ()
        text = tasks_lib.truncate_at_stop(str(a["text"]), stop)
        if task.grader is not None and task.grader.type == "judge":
            grade = await asyncio.get_running_loop().run_in_executor(
                None, lambda: tasks_lib.grade_sample(task, w.sample, text, ask=ask))
        else:
            grade = tasks_lib.grade_sample(task, w.sample, text, ask=ask)
        return {**rec, "failed": False, "output": text, "score": grade.score, "reason": grade.reason,
                "scores": {"score": float(grade.score)}, "finish_reason": a.get("finish_reason"),
                "completion_tokens": a.get("completion_tokens")}
    except (KeyError, TypeError, ValueError) as e:
        return {**rec, "failed": True, "reason": f"malformed answer ({type(e).__name__}: {e})", "scores": _zero(task)}
    except MuseError as e:  # a grader that cannot run on this output (python grader raising a clear error)
        return {**rec, "failed": True, "reason": str(e), "scores": _zero(task)}


def _zero(task: Task) -> dict:
    return {} if task.kind == "bpb" else {m: 0.0 for m in task.metrics}


def summarize(task: Task, records: list[dict], n_boot: int, samples: int = 1) -> dict:
    """metrics {name: {value, stderr}} over the records (failed ones score 0; bpb leaves them out).

    With `samples` > 1 records per item (a sampled generative task) each metric is the mean over items of
    the item's mean over its samples, its stderr a bootstrap over items (the samples of an item are not
    independent draws of the task), and pass@k is added for every k of sampling.pass_ks(samples)."""
    if task.kind == "bpb":
        ok = [r for r in records if not r["failed"]]
        if not ok:
            return {}
        value, se = bootstrap_bpb([r["nll"] for r in ok], [r["bytes"] for r in ok], n_boot)
        return {"bpb": {"value": value, "stderr": se}}
    out = {}
    per_item = samples > 1 and task.kind in GENERATIVE
    for m in task.metrics:
        vals = list(item_means(records, m).values()) if per_item else [float(r["scores"].get(m, 0.0)) for r in records]
        if vals:
            out[m] = {"value": float(np.mean(vals)), "stderr": bootstrap_stderr(vals, n_boot)}
    if per_item and records:
        for k, vals in item_pass_at_k(records, task.metrics[0], pass_ks(samples)).items():
            out[f"pass@{k}"] = {"value": float(np.mean(vals)), "stderr": bootstrap_stderr(vals, n_boot)}
    return out


class EvalResults:
    """results.json's dict (`data`) and the per-sample records (`records[(model, task)]`)."""

    def __init__(self, data: dict, records: dict, errors: list[str]):
        self.data, self.records, self.errors = data, records, errors

    def metric(self, task: str, model: str, metric: str | None = None) -> float | None:
        r = self.data["results"].get(task, {}).get(model, {})
        metric = metric or self.data["tasks"][task]["primary"]
        return (r.get("metrics", {}).get(metric) or {}).get("value")


def _task_info(task: Task, shots: int | None = None, sampling: dict | None = None) -> dict:
    primary = task.metrics[0]
    try:
        chance = task.chance_level()
    except MuseError:
        chance = None
    metrics = list(task.metrics)
    sampled = sampling is not None and task.kind in GENERATIVE
    if sampled and sampling["samples"] > 1:
        metrics += [f"pass@{k}" for k in pass_ks(sampling["samples"])]
    return {"kind": task.kind, "description": task.description, "metrics": metrics, "primary": primary,
            "higher_is_better": primary not in LOWER_IS_BETTER, "chance": chance, "source": task.source,
            "shots": 0 if task.kind == "bpb" else (task.fewshot.k if shots is None else shots),
            **({"sampling": dict(sampling)} if sampled else {})}


async def _run_model(provider, tasks: list[Task], cache, opts: EvalOptions, judge_fetch) -> tuple[dict, dict]:
    results: dict[str, dict] = {}
    records: dict[str, list] = {}
    fetch = Fetcher(provider, cache, opts.concurrency or provider.concurrency)
    loop = asyncio.get_running_loop()

    def ask(prompt: str) -> str:
        if judge_fetch is None:
            raise tasks_lib.GraderError("this task is graded by a judge model, and none was given; pass --judge")
        req = {"op": "chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": JUDGE_MAX_TOKENS,
               "temperature": 0.0, "stop": []}
        try:
            return asyncio.run_coroutine_threadsafe(judge_fetch(req), loop).result()["text"]
        except SampleFailed as e:
            return f"(the judge failed: {e.reason})"

    plans: dict[str, list[Work] | str] = {}
    for task in tasks:
        try:
            plans[task.name] = plan_task(task, provider, opts)
        except _Skip as e:
            plans[task.name] = str(e)
    total = sum(len(p) for p in plans.values() if not isinstance(p, str))
    bar = progress(total=total, desc=provider.name, unit="sample") if opts.show_progress else None
    fatal: str | None = None
    try:
        for task in tasks:
            plan = plans[task.name]
            if isinstance(plan, str) or fatal:
                status = "failed" if fatal else "skipped"
                results[task.name] = {"status": status, "reason": fatal or plan, "n": 0}
                continue
            before = vars(fetch.counters).copy()
            t0 = time.perf_counter()

            async def one(w: Work, task: Task = task) -> dict:
                rec = await _score(task, w, fetch, ask)
                if bar is not None:
                    bar.update(1)
                return rec

            try:
                recs = await _gather_or_cancel(one(w) for w in plan)
            except ProviderFailed as e:
                fatal = str(e)
                results[task.name] = {"status": "failed", "reason": fatal, "n": 0}
                continue
            now = vars(fetch.counters)
            records[task.name] = recs
            failed = [r for r in recs if r["failed"]]
            per_item = opts.samples > 1 and task.kind in GENERATIVE
            firsts = [r for r in recs if r.get("sample", 0) == 0]  # one record per item (all when not sampled)
            results[task.name] = {
                "status": "ok", "reason": None, "n": len(firsts),
                **({"n_samples": len(recs)} if per_item else {}), "n_failed": len(failed),
                "failures": sorted({r["reason"] for r in failed})[:5],
                **({"shots_reduced": {"n": len(fewer), "min_shots": min(fewer)}}
                   if (fewer := [r["shots"] for r in firsts if "shots" in r]) else {}),
                "metrics": summarize(task, recs, opts.n_bootstrap, opts.samples if per_item else 1),
                "time_s": round(time.perf_counter() - t0, 3),
                "tokens": {"prompt": now["prompt_tokens"] - before["prompt_tokens"],
                           "completion": now["completion_tokens"] - before["completion_tokens"]},
                "requests": {"sent": now["sent"] - before["sent"], "cached": now["cached"] - before["cached"]},
            }
    finally:
        if bar is not None:
            bar.close()
    return results, records


def make_provider(spec: ModelSpec, *, stage=None, device="cpu", dtype=None, style="auto", api_key_env=None,
                  retries=4, timeout=120.0, engine_config=None, concurrency=None):
    if spec.kind == "openai":
        from muse.eval.remote import OpenAIProvider

        return OpenAIProvider(spec, api_key_env=api_key_env, concurrency=concurrency or 32, retries=retries,
                              timeout=timeout, style=style)
    from muse.eval.local import MuseProvider

    return MuseProvider(spec, stage=stage, device=device, dtype=dtype, engine_config=engine_config, style=style,
                        concurrency=concurrency)


async def evaluate(providers: Sequence, tasks: Sequence[Task], *, cache=None, opts: EvalOptions | None = None,
                   judge=None, specs: Mapping[str, str] | None = None) -> EvalResults:
    """Run started-or-not providers on tasks (the async core of run_eval; tests call it with their own)."""
    opts = opts or EvalOptions()
    check_sampling(opts.samples, opts.temperature)
    cache = cache if cache is not None else NoCache()
    data = {"schema_version": SCHEMA_VERSION, "muse_version": muse.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {"tasks": [t.name for t in tasks], "split": opts.split, "limit": opts.limit,
                         "task_seed": opts.task_seed, "shots": opts.shots, "bootstrap": opts.n_bootstrap,
                         "cache": str(getattr(cache, "path", None) or ""),
                         **({"sampling": opts.sampling()} if opts.sampled else {})},
            "models": {}, "tasks": {t.name: _task_info(t, opts.shots, opts.sampling()) for t in tasks},
            "results": {t.name: {} for t in tasks}}
    records: dict = {}
    errors: list[str] = []
    judge_fetch = None
    if judge is not None:
        await judge.start()
        judge_fetch = Fetcher(judge, cache, judge.concurrency)
        data["judge"] = judge.describe()
    try:
        for p in providers:
            t0 = time.perf_counter()
            try:
                fetch = Fetcher(p, cache, 1)
                await (p.start(fetch) if getattr(p, "kind", "") == "openai" else p.start())
                results, recs = await _run_model(p, list(tasks), cache, opts, judge_fetch)
                error = next((r["reason"] for r in results.values() if r["status"] == "failed"), None)
            except ProviderFailed as e:
                error = str(e)
                results, recs = {t.name: {"status": "failed", "reason": error, "n": 0} for t in tasks}, {}
            finally:
                await p.close()
            if error:
                errors.append(error)
            data["models"][p.name] = {**p.describe(), "spec": (specs or {}).get(p.name), "error": error,
                                      "time_s": round(time.perf_counter() - t0, 3)}
            for name, r in results.items():
                data["results"][name][p.name] = r
            for name, rs in recs.items():
                records[(p.name, name)] = rs
    finally:
        if judge is not None:
            await judge.close()
    return EvalResults(data, records, errors)


def run_eval(models: Sequence[str | ModelSpec], tasks: str | Sequence[str | Task] = "all", *, limit: int | None = None,
             out_dir: str | Path | None = None, split: str = "test", task_seed: int = 0,
             shots: int | None = None, cache: str | Path | bool | None = True, concurrency: int | None = None,
             judge: str | None = None,
             stage: str | None = None, device: str = "cpu", dtype: str | None = None, style: str = "auto",
             api_key_env: str | None = None, retries: int = 4, timeout: float = 120.0, engine_config=None,
             show_progress: bool = True, samples: int = 1, temperature: float | None = None) -> EvalResults:
    """Evaluate `models` (paths or `NAME=openai:URL@MODEL`) on `tasks` ("all", "a,b", names, paths or Task
    objects); writes results.json, report.md, charts and samples/ to `out_dir` when given.

    cache: True = the default file (default_cache_path()), a path, or False/None for no cache.
    samples, temperature: generate/chat tasks ask each item `samples` times at `temperature` (default: each
    task's own with 1 sample, 1.0 with more) and report pass@1 and pass@k (sampling.py); other kinds ignore them.
    """
    check_sampling(samples, temperature)
    specs = parse_model_specs(models)
    if isinstance(tasks, str):
        task_list = tasks_lib.resolve(tasks, seed=task_seed) if task_seed else tasks_lib.resolve(tasks)
    else:
        task_list = [t if isinstance(t, Task) else tasks_lib.get(t) for t in tasks]
    names = [t.name for t in task_list]
    if len(set(names)) != len(names):
        raise tasks_lib.TaskError(f"a task is named twice in {names}; each task runs once")
    store = (ResponseCache(default_cache_path() if cache is True else cache) if cache else NoCache())
    kw = dict(stage=stage, device=device, dtype=dtype, style=style, api_key_env=api_key_env, retries=retries,
              timeout=timeout, engine_config=engine_config, concurrency=concurrency)
    providers = [make_provider(s, **kw) for s in specs]
    judge_provider = make_provider(parse_model_spec(judge), **kw) if judge else None
    if shots is not None and shots < 0:
        raise UsageError(f"shots must be >= 0, got {shots}")
    opts = EvalOptions(split=split, limit=limit, task_seed=task_seed, shots=shots, concurrency=concurrency,
                       show_progress=show_progress, samples=samples, temperature=temperature)
    spec_text = {s.name: (f"openai:{s.target}@{s.model}" if s.kind == "openai" else s.target) for s in specs}
    try:
        results = asyncio.run(evaluate(providers, task_list, cache=store, opts=opts, judge=judge_provider,
                                       specs=spec_text))
    finally:
        store.close()
    if out_dir is not None:
        from muse.eval.report import write_report

        write_report(results, out_dir)
    return results
