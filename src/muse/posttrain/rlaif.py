"""RLAIF: sample from the policy, critique and revise against a constitution, label preferences, write pairs.

    cfg = RLAIFConfig(critic="checks", samples=4)
    summary = run_rlaif(cfg, "runs/x")          # runs/x/rlaif/pairs.jsonl, summary.json

For each prompt (by default the `compliance` task's train questions and, one in five, the `identity`
task's: DEFAULT_PROMPT_TASKS; "task:NAME[=SHARE],..." names others; or a JSONL file of {"prompt"} or
{"messages"} rows), the policy (RUN/sft by default) writes `samples` responses through the paged engine
(muse.eval.local.MuseProvider: many requests in flight, batched by the engine; seeded per prompt and
sample, so a rerun draws the same ones). Then the critic:

    checks   (the default) the constitution's programmatic checks: a response's score is the share of
             checked principles it meets (judged against the prompt's last user message, for the
             principles that read it), its critique the failed ones with reasons, its revision the
             principles' programmatic fixes. Pairs: revised over original where the revision scores
             higher; the best over the worst of the samples where their scores differ (`pairing`
             "best_vs_worst", the default), or every sample that meets every checked principle over
             every sample that does not ("compliant_vs_rest": up to (samples - 1) pairs a prompt instead
             of one, none where no sample complies).
    policy   the policy itself, or
    NAME=openai:BASE_URL@MODEL (key from --api-key-env, MUSE_CRITIC_API_KEY by default), or a checkpoint:
             `revisions` rounds of critique -> revision per response, each with a principle drawn at random
             (seeded), as in Constitutional AI; then every two samples of a prompt compared (A/B order drawn
             at random against position bias). Pairs: the final revision over the original; the sample that
             won most comparisons over the one that won fewest. An answer with no readable letter is kept in
             the journal, skipped and counted (`unparseable_labels`).

Every critic and policy request goes through the eval harness's response cache (muse.eval.cache, by
default RUN/rlaif/cache.sqlite3), and every finished prompt is appended to RUN/rlaif/journal.jsonl: a
killed run started again skips the finished prompts and pays for no answer it already had. A rerun
with other settings (policy, constitution, critic, samples...) refuses to mix them in (pass force).

Outputs (atomic): RUN/rlaif/pairs.jsonl, one pair per line: {"prompt" or "messages", "chosen", "rejected",
"kind": "revision" | "best_vs_worst" | "compliant_vs_rest", "prompt_id", "critique", "scores"} (the critique text kept for
inspection); RUN/rlaif/summary.json (counts, pass rates per principle, skips; docs/posttrain.md).

What it does not know: training on the pairs (muse.posttrain.dpo / rm; the CLI calls them), HTTP
(muse.eval.remote), the checks themselves (muse.tasks.constitution).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from muse.common.errors import DataError, UsageError, closest
from muse.common.logging import get_logger, progress
from muse.common.paths import atomic_write_json, atomic_write_text
from muse.eval.cache import NoCache, ResponseCache, canonical
from muse.eval.providers import ModelSpec, SampleFailed, parse_model_spec
from muse.eval.runner import Fetcher
from muse.posttrain.constitution import (
    Constitution,
    compare_messages,
    critique_from_verdict,
    critique_messages,
    load_constitution,
    parse_choice,
    prompt_text,
    revision_messages,
)
from muse.tasks.spec import check_messages

log = get_logger("muse.posttrain")

PAIRINGS = ("best_vs_worst", "compliant_vs_rest")
JOURNAL, PAIRS, SUMMARY, SETTINGS, CACHE = "journal.jsonl", "pairs.jsonl", "summary.json", "settings.json", "cache.sqlite3"


@dataclass
class RLAIFConfig:
    constitution: str | None = None   # TOML file; None = the sample constitution
    prompts: str | None = None        # JSONL file or "task:NAME[=SHARE],..."; None = DEFAULT_PROMPT_TASKS
    limit: int | None = 1000          # prompts at most (None: all)
    samples: int = 4                  # responses per prompt
    max_tokens: int = 64              # per response (the compliance task's limit)
    temperature: float = 1.0
    seed: int = 0
    # best_vs_worst: one sample pair a prompt, its best over its worst; compliant_vs_rest (the checks critic
    # only): every sample meeting every checked principle over every sample that does not. On the sample
    # constitution the failures are mostly one principle (on_topic), and a prompt's on-topic sample over each
    # of the others is what moved compliance; pairing the best of partly compliant samples too cost the
    # identity task 17 points (BENCHMARKS.md section 11).
    pairing: str = "best_vs_worst"
    policy: str | None = None         # checkpoint or run; None = RUN's sft
    critic: str = "checks"            # checks | policy | NAME=openai:URL@MODEL | a checkpoint
    revisions: int = 1                # critique-revision rounds per response (model critics)
    critic_max_tokens: int = 256
    concurrency: int = 16             # model-critic requests in flight (the policy's: the engine's)
    prompts_in_flight: int = 0        # prompts worked on at once; 0 = enough to keep engine and critic busy
    api_key_env: str = "MUSE_CRITIC_API_KEY"
    cache: str | bool = True          # True = RUN/rlaif/cache.sqlite3, a path, or False for none
    device: str = "auto"
    force: bool = False               # start over: forget the journal (the cache stays)
    show_progress: bool = True

    def check(self) -> None:
        if self.samples < 2:
            raise UsageError(f"--samples must be at least 2 (best vs worst needs two), got {self.samples}")
        for name in ("max_tokens", "critic_max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pairing not in PAIRINGS:
            raise UsageError(f"--pairing must be one of {', '.join(p.replace('_', '-') for p in PAIRINGS)}, "
                             f"got {self.pairing.replace('_', '-')!r}")
        if self.pairing == "compliant_vs_rest" and self.critic != "checks":
            raise UsageError("--pairing compliant-vs-rest pairs by the programmatic checks: use it with --critic checks "
                             "(a model critic ranks by its comparisons: --pairing best-vs-worst)")
        if self.revisions < 0 or (self.limit is not None and self.limit < 1) or self.temperature < 0:
            raise UsageError("revisions must be >= 0, limit >= 1 and temperature >= 0")


# --------------------------------------------------------------------------------------------------
# prompts


def _prompt_id(messages) -> str:
    return hashlib.sha256(canonical(list(messages)).encode()).hexdigest()[:16]


# The default prompts: the compliance task's train questions, and one in five the identity task's train
# questions ("What is your name?"), where the introduction is the answer (the sample constitution exempts
# it from no_unasked_introduction and on_topic, and asks for it: introduces_itself_when_asked). Without
# them nothing in the pairs says where the introduction belongs, and DPO pushed it down everywhere: the
# identity task fell 7.6 points; with them and that principle, 2.7 over two rounds (BENCHMARKS.md 11).
DEFAULT_PROMPT_TASKS = "task:compliance=0.8,identity=0.2"


def parse_prompt_tasks(spec: str) -> list[tuple[str, float]]:
    """"task:NAME[=SHARE],..." -> [(name, share)] (shares default to 1, normalised to sum 1); UsageError."""
    import muse.tasks as tasks

    out = []
    for part in spec.removeprefix("task:").split(","):
        name, _, share = part.strip().partition("=")
        name = name.strip()
        if name not in tasks.names():
            raise UsageError(f"--prompts {spec}: unknown task {name!r}.{closest(name, tasks.names()) or ''} "
                             "Give task:NAME[=SHARE],... or a JSONL file")
        try:
            w = float(share) if share.strip() else 1.0
        except ValueError:
            w = -1.0
        if not w > 0:
            raise UsageError(f"--prompts {spec}: the share of {name!r} must be a positive number, got {share!r}")
        out.append((name, w))
    if len({n for n, _ in out}) != len(out):
        raise UsageError(f"--prompts {spec}: a task is named twice")
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def task_prompts(spec: str, limit: int | None) -> list[dict]:
    """The named tasks' train questions, interleaved by share: the first `limit` prompts hold each task at
    its share (to within one prompt) while it lasts; then the others fill in."""
    import muse.tasks as tasks

    pools = []
    for name, share in parse_prompt_tasks(spec):
        rows = [{"id": s.id, "messages": [dict(m) for m in s.messages]} for s in tasks.get(name).samples("train")
                if s.messages]
        if not rows:
            raise UsageError(f"--prompts {spec}: task {name!r} has no chat questions in its train split")
        pools.append([share, rows, 0])
    out: list[dict] = []
    want = limit or sum(len(rows) for _, rows, _ in pools)
    while len(out) < want:
        live = [p for p in pools if p[2] < len(p[1])]
        if not live:
            break
        # the task furthest behind its share next (ties: the order given), a deterministic even spread
        p = min(live, key=lambda p: (p[2] + 1) / p[0])
        out.append(p[1][p[2]])
        p[2] += 1
    return out


def load_prompts(path: str | None, limit: int | None) -> list[dict]:
    """[{"id", "messages", "prompt"?}] from a JSONL file, or "task:NAME[=SHARE],..." (the tasks' train
    splits, interleaved by share); None = DEFAULT_PROMPT_TASKS."""
    if path is None or str(path).startswith("task:"):
        return task_prompts(path or DEFAULT_PROMPT_TASKS, limit)
    out: list[dict] = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read prompts {p}: {e}") from None
    seen = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            if isinstance(row.get("prompt"), str) and row["prompt"].strip():
                messages, keep = [{"role": "user", "content": row["prompt"]}], {"prompt": row["prompt"]}
            elif row.get("messages") is not None:
                messages, keep = [dict(m) for m in check_messages(row["messages"])], {}
                if messages[-1]["role"] != "user":
                    raise ValueError("the last message must be the user's: the policy answers it")
            else:
                raise ValueError("no 'prompt' (a non-empty string) or 'messages' field")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{p}:{n}: {e}") from None
        pid = _prompt_id(messages)
        if pid not in seen:
            seen.add(pid)
            out.append({"id": pid, "messages": messages, **keep})
    if not out:
        raise DataError(f"{p} holds no prompts; write one JSON object per line: {{\"prompt\": \"...\"}}")
    return out[:limit] if limit else out


# --------------------------------------------------------------------------------------------------
# the work for one prompt


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


class _Ask:
    """One request through the cache; SampleFailed counted in `failed[what]` and returned as None."""

    def __init__(self, fetch: Fetcher, failed: dict, what: str):
        self.fetch, self.failed, self.what = fetch, failed, what

    async def chat(self, messages, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str | None:
        req = {"op": "chat", "messages": list(messages), "max_tokens": max_tokens, "temperature": temperature,
               "stop": []}
        if temperature > 0 and seed is not None:
            req["seed"] = seed
        try:
            return str((await self.fetch(req))["text"]).strip()
        except SampleFailed as e:
            self.failed[self.what] = self.failed.get(self.what, 0) + 1
            log.debug("%s request failed: %s", self.what, e.reason)
            return None


class Worker:
    """Turns one prompt into its journal record (samples, critiques, revisions, labels, pairs)."""

    def __init__(self, cfg: RLAIFConfig, constitution: Constitution, policy: _Ask, critic: _Ask | None):
        self.cfg, self.c, self.policy, self.critic = cfg, constitution, policy, critic

    async def __call__(self, prompt: dict) -> dict:
        cfg, messages = self.cfg, prompt["messages"]
        texts = await asyncio.gather(*(self.policy.chat(messages, cfg.max_tokens, cfg.temperature,
                                                        _seed(cfg.seed, prompt["id"], i)) for i in range(cfg.samples)))
        samples = [{"index": i, "text": t} for i, t in enumerate(texts) if t is not None]
        if self.critic is None:
            comparisons, unparseable = [], 0
            for s in samples:
                self._by_checks(s, messages)
        else:
            await asyncio.gather(*(self._by_model(prompt, s) for s in samples))
            comparisons = await self._compare(prompt, samples)
            unparseable = sum(1 for c in comparisons if c["choice"] is None)
        for s in samples:  # the programmatic view, for the summary, whoever the critic is
            s["score"], s["failed"] = self._score(s["text"], messages)
            if s.get("revision") is not None:
                s["revised_score"], s["revised_failed"] = self._score(s["revision"], messages)
        pairs = self._pairs(prompt, samples, comparisons)
        return {"id": prompt["id"], "messages": messages, "samples": samples, "comparisons": comparisons,
                "unparseable": unparseable, "pairs": pairs}

    def _score(self, text: str, messages) -> tuple[float, list[str]]:
        v = self.c.check(text, prompt_text(messages))  # against the question too (on_topic and the like)
        return v.score, v.failed

    def _by_checks(self, s: dict, messages) -> None:
        prompt = prompt_text(messages)
        verdict = self.c.check(s["text"], prompt)
        s["critique"] = critique_from_verdict(verdict)
        revised = self.c.revise(s["text"], prompt) if not verdict.passed else s["text"]
        s["revision"] = revised if revised.strip() and revised != s["text"] else None

    async def _by_model(self, prompt: dict, s: dict) -> None:
        cfg = self.cfg
        rng = random.Random(_seed(cfg.seed, prompt["id"], s["index"], "principles"))
        text, critiques = s["text"], []
        for _ in range(cfg.revisions):
            p = rng.choice(self.c.principles)
            critique = await self.critic.chat(critique_messages(prompt["messages"], text, p), cfg.critic_max_tokens)
            if critique is None:
                break
            revised = await self.critic.chat(revision_messages(prompt["messages"], text, p, critique),
                                             cfg.critic_max_tokens)
            critiques.append(f"{p.name}: {critique}")
            if revised is None:
                break
            if revised:
                text = revised
        s["critique"] = "\n".join(critiques)
        s["revision"] = text if text != s["text"] else None

    async def _compare(self, prompt: dict, samples: list[dict]) -> list[dict]:
        pairs = [(a, b) for i, a in enumerate(samples) for b in samples[i + 1:] if a["text"] != b["text"]]

        async def one(a: dict, b: dict) -> dict | None:
            swap = random.Random(_seed(self.cfg.seed, prompt["id"], a["index"], b["index"], "order")).random() < 0.5
            first, second = (b, a) if swap else (a, b)
            answer = await self.critic.chat(compare_messages(prompt["messages"], first["text"], second["text"], self.c),
                                            self.cfg.critic_max_tokens)
            if answer is None:
                return None
            choice = parse_choice(answer)
            winner = None if choice is None else (first if choice == "A" else second)["index"]
            return {"a": first["index"], "b": second["index"], "answer": answer, "choice": choice, "winner": winner}

        return [r for r in await asyncio.gather(*(one(a, b) for a, b in pairs)) if r is not None]

    def _pairs(self, prompt: dict, samples: list[dict], comparisons: list[dict]) -> list[dict]:
        base = {"prompt": prompt["prompt"]} if "prompt" in prompt else {"messages": prompt["messages"]}
        by_checks = self.critic is None
        out = []
        for s in samples:
            rev = s.get("revision")
            if rev is None or rev.strip() == s["text"].strip() or (by_checks and s["revised_score"] <= s["score"]):
                continue
            out.append({**base, "chosen": rev, "rejected": s["text"], "kind": "revision", "prompt_id": prompt["id"],
                        "critique": s["critique"], "scores": {"chosen": s["revised_score"], "rejected": s["score"]}})
        if by_checks:
            rank = {s["index"]: s["score"] for s in samples}
            why = "programmatic checks: {:.2f} vs {:.2f}"
        else:
            rank = {s["index"]: 0.0 for s in samples}
            for c in comparisons:
                if c["winner"] is not None:
                    rank[c["winner"]] += 1
            why = "won {:g} vs {:g} comparisons"
        if len(rank) < 2:
            return out
        texts = {s["index"]: s for s in samples}

        def pair(i: int, j: int, kind: str) -> dict:
            b, w = texts[i], texts[j]
            critique = why.format(rank[i], rank[j])
            if not by_checks:
                critique += "\n" + "\n".join(c["answer"] for c in comparisons
                                             if {c["a"], c["b"]} == {i, j} and c["winner"] is not None)
            return {**base, "chosen": b["text"], "rejected": w["text"], "kind": kind, "prompt_id": prompt["id"],
                    "critique": critique.strip(), "scores": {"chosen": b["score"], "rejected": w["score"]}}

        if self.cfg.pairing == "compliant_vs_rest":  # (checks: rank is the share of principles met)
            seen = set()
            for i in sorted(rank):
                text = texts[i]["text"].strip()
                if rank[i] < 1.0 or text in seen:
                    continue
                seen.add(text)
                out += [pair(i, j, "compliant_vs_rest") for j in sorted(rank)
                        if rank[j] < 1.0 and texts[j]["text"].strip() != text]
            return out
        best = max(rank, key=lambda i: (rank[i], -i))
        worst = min(rank, key=lambda i: (rank[i], i))
        if rank[best] > rank[worst] and texts[best]["text"].strip() != texts[worst]["text"].strip():
            out.append(pair(best, worst, "best_vs_worst"))
        return out


# --------------------------------------------------------------------------------------------------
# the run


def _read_journal(path: Path) -> dict[str, dict]:
    """Finished prompts by id; a torn last line (a kill mid-write) is ignored."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            done[rec["id"]] = rec
    return done


def _end_torn_line(path: Path) -> None:
    """A kill mid-write leaves a record without its newline: end that line, so the next record has its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _resolve_policy(cfg: RLAIFConfig, run_dir: Path) -> Path:
    from muse.checkpoint import resolve_checkpoint, resolve_stage

    if cfg.policy:
        return resolve_stage(cfg.policy, fast=True)
    return resolve_checkpoint(run_dir, ("sft",), fast=True)


def _critic_spec(cfg: RLAIFConfig) -> ModelSpec | None:
    if cfg.critic == "checks":
        return None
    if cfg.critic == "policy":
        return ModelSpec("policy", "muse", "<policy>")
    return parse_model_spec(cfg.critic)


def _settings(cfg: RLAIFConfig, constitution: Constitution, policy: Path, critic: ModelSpec | None) -> dict:
    from muse.checkpoint.manifest import MANIFEST, file_sha256

    spec = cfg.prompts or DEFAULT_PROMPT_TASKS
    prompts = ({"tasks": dict(parse_prompt_tasks(spec)), "split": "train"} if spec.startswith("task:")
               else {"file": str(Path(spec).resolve()), "sha256": file_sha256(spec)})
    critic_id = ("checks" if critic is None else "policy" if critic.target == "<policy>" else
                 f"openai:{critic.target}@{critic.model}" if critic.kind == "openai" else
                 f"muse:{Path(critic.target).resolve()}")
    return {"policy": str(policy.resolve()), "policy_manifest": file_sha256(policy / MANIFEST),
            "constitution": constitution.sha256, "critic": critic_id, "prompts": prompts,
            **{k: getattr(cfg, k) for k in ("samples", "max_tokens", "temperature", "seed", "revisions",
                                            "critic_max_tokens")},
            **({"pairing": cfg.pairing} if cfg.pairing != "best_vs_worst" else {})}


def _check_settings(out: Path, settings: dict, force: bool) -> None:
    path = out / SETTINGS
    if force:
        for name in (JOURNAL, PAIRS, SUMMARY, SETTINGS):
            (out / name).unlink(missing_ok=True)
    elif path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in [*settings, *(k for k in old if k not in settings)] if old.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise UsageError(f"{out} holds work made with another {k} ({old.get(k)!r}, now {settings.get(k)!r}); "
                             "pass --force to start over")
    atomic_write_json(path, settings)


def _open_cache(cfg: RLAIFConfig, out: Path):
    if not isinstance(cfg.cache, (str, bool, os.PathLike)) and cfg.cache is not None:
        return cfg.cache  # a cache object (tests)
    if cfg.cache is True:
        return ResponseCache(out / CACHE)
    return ResponseCache(cfg.cache) if cfg.cache else NoCache()


async def _run(cfg: RLAIFConfig, out: Path, constitution: Constitution, prompts: list[dict],
               policy_ckpt: Path, critic_spec: ModelSpec | None, cache, stats: dict) -> None:
    from muse.common.device import pick_device
    from muse.eval.local import MuseProvider
    from muse.eval.runner import make_provider

    policy = MuseProvider(ModelSpec("policy", "muse", str(policy_ckpt)), device=str(pick_device(cfg.device)))
    critic = None
    await policy.start()
    try:
        failed: dict[str, int] = {}
        policy_fetch = Fetcher(policy, cache, policy.concurrency)
        critic_fetch = None
        if critic_spec is not None and critic_spec.target == "<policy>":
            critic_fetch = policy_fetch
        elif critic_spec is not None:
            critic = make_provider(critic_spec, device=str(pick_device(cfg.device)), api_key_env=cfg.api_key_env,
                                   concurrency=cfg.concurrency, style="chat")
            critic_fetch = Fetcher(critic, cache, cfg.concurrency)
            await (critic.start(Fetcher(critic, cache, 1)) if critic.kind == "openai" else critic.start())
            stats["critic_model"] = critic.describe()
        worker = Worker(cfg, constitution, _Ask(policy_fetch, failed, "policy"),
                        None if critic_fetch is None else _Ask(critic_fetch, failed, "critic"))
        _end_torn_line(out / JOURNAL)
        journal = open(out / JOURNAL, "a", encoding="utf-8")
        bar = progress(total=len(prompts), desc="rlaif", unit="prompt") if cfg.show_progress else None
        # Prompts in flight: enough to keep the engine's batch and the critic's connections full.
        sem = asyncio.Semaphore(cfg.prompts_in_flight or max(4, policy.concurrency // cfg.samples, cfg.concurrency // 2))

        async def one(prompt: dict) -> None:
            async with sem:
                rec = await worker(prompt)
            journal.write(json.dumps(rec, ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # a finished prompt survives a kill
            stats["prompts_this_run"] += 1
            if bar is not None:
                bar.update(1)

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            journal.close()
            if bar is not None:
                bar.close()
            stats["failed_requests"] = failed
            stats["requests"] = {"policy": vars(policy_fetch.counters).copy()}
            if critic_fetch is not None and critic_fetch is not policy_fetch:
                stats["requests"]["critic"] = vars(critic_fetch.counters).copy()
    finally:
        await policy.close()
        if critic is not None:
            await critic.close()


def summarize(records: list[dict], constitution: Constitution, settings: dict, stats: dict) -> dict:
    """summary.json: what was sampled, how it scored, which pairs were made and what was skipped."""
    samples = [s for r in records for s in r["samples"]]
    revised = [s for s in samples if s.get("revision") is not None]
    pairs = [p for r in records for p in r["pairs"]]

    def rate(rows, key: str, name: str) -> float | None:
        return round(sum(name not in s[key] for s in rows) / len(rows), 4) if rows else None

    def mean(xs) -> float | None:
        xs = list(xs)
        return round(sum(xs) / len(xs), 4) if xs else None

    checked = [p.name for p in constitution.checked]
    comparisons = [c for r in records for c in r["comparisons"]]
    return {
        "constitution": constitution.describe(), "settings": settings,
        "prompts": len(records), "prompts_this_run": stats.get("prompts_this_run", 0),
        "samples": len(samples), "revised": len(revised),
        "compliance": {  # the programmatic view (checked principles), whatever the critic
            "samples": mean(float(not s["failed"]) for s in samples),
            "revisions": mean(float(not s["revised_failed"]) for s in revised),
            "score_samples": mean(s["score"] for s in samples),
            "score_revisions": mean(s["revised_score"] for s in revised),
            "per_principle": {name: {"samples": rate(samples, "failed", name),
                                     "revisions": rate(revised, "revised_failed", name)} for name in checked},
        },
        "pairs": {"total": len(pairs), "revision": sum(p["kind"] == "revision" for p in pairs),
                  "best_vs_worst": sum(p["kind"] == "best_vs_worst" for p in pairs),
                  "compliant_vs_rest": sum(p["kind"] == "compliant_vs_rest" for p in pairs)},
        "labels": {"comparisons": len(comparisons), "unparseable": sum(r["unparseable"] for r in records)},
        "skipped": {
            "unparseable_labels": sum(r["unparseable"] for r in records),
            "prompts_without_pair": sum(1 for r in records if not r["pairs"]),
            "failed_requests": stats.get("failed_requests", {}),
        },
        "requests": stats.get("requests", {}), "critic_model": stats.get("critic_model"),
        "wall_s": stats.get("wall_s"),
    }


def run_rlaif(cfg: RLAIFConfig, run_dir: str | Path) -> dict:
    """Sample, critique, revise, label; write RUN/rlaif/pairs.jsonl and summary.json; return the summary."""
    cfg.check()
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    constitution = load_constitution(cfg.constitution)
    critic_spec = _critic_spec(cfg)
    if critic_spec is None and not constitution.checked:
        raise UsageError(f"{constitution.where} has no programmatically checked principle, so the 'checks' critic "
                         "has nothing to go on; pass --critic policy or a served model")
    prompts = load_prompts(cfg.prompts, cfg.limit)
    policy_ckpt = _resolve_policy(cfg, run_dir)
    out = run_dir / "rlaif"
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, constitution, policy_ckpt, critic_spec)
    _check_settings(out, settings, cfg.force)
    done = _read_journal(out / JOURNAL)
    todo = [p for p in prompts if p["id"] not in done]
    if done:
        log.info("rlaif: %d of %d prompts already done (%s); %d to go", len(prompts) - len(todo), len(prompts),
                 out / JOURNAL, len(todo))
    stats: dict = {"prompts_this_run": 0}
    cache = _open_cache(cfg, out)
    try:
        if todo:
            asyncio.run(_run(cfg, out, constitution, todo, policy_ckpt, critic_spec, cache, stats))
    finally:
        cache.close()
    stats["wall_s"] = round(time.perf_counter() - t0, 2)
    done = _read_journal(out / JOURNAL)
    records = [done[p["id"]] for p in prompts if p["id"] in done]
    pairs = [p for r in records for p in r["pairs"]]
    atomic_write_text(out / PAIRS, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    summary = summarize(records, constitution, settings, stats)
    summary["pairs_file"] = str(out / PAIRS)
    atomic_write_json(out / SUMMARY, summary)
    return summary


def train_on_pairs(kind: str, pairs: str | Path, run_dir: str | Path, *, config: str | None = None,
                   flags: Mapping | None = None, sets: list[str] | None = None, resume: bool = False,
                   force: bool = False):
    """DPO (kind "dpo") or the reward model ("rm") on the pairs file, into RUN/dpo or RUN/rm."""
    if kind == "dpo":
        from muse.posttrain.dpo import dpo_loop as make_loop
        from muse.posttrain.dpo import load_dpo_config as load_config
    elif kind == "rm":
        from muse.posttrain.rm import load_rm_config as load_config
        from muse.posttrain.rm import rm_loop as make_loop
    else:
        raise UsageError(f"--train must be dpo or rm, got {kind!r}")
    cfg = load_config(config, {**(flags or {}), "data": (str(pairs),)}, sets or [])
    return make_loop(cfg, run_dir, resume=resume, force=force)


__all__ = ["RLAIFConfig", "Worker", "load_prompts", "run_rlaif", "summarize", "train_on_pairs"]
