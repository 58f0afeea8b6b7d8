"""GRPO's goal (issue #14): from an SFT checkpoint, GRPO on one task vs two controls at equal wall time.

    .venv/bin/python bench/grpo.py --sft RUN/sft/step_000400 --data RUN/data --task arithmetic_2digit \
        --minutes 20 --threads 2

In a scratch directory OUT (default /tmp/grpo_goal; its run dirs link RUN's data/, nothing is written next
to the SFT checkpoint), with `--threads` torch threads:

0. baseline: the SFT checkpoint's pass@1 on the task's test split (first --limit items), zero-shot chat,
   greedy (muse.posttrain.taskscore, the scorer of bench/posttrain.py), with a bootstrap SE.
1. grpo: `muse grpo`'s loop (muse.posttrain.grpo) on the task's train split for --minutes (max_time_s),
   no in-run evaluation (every second goes to training); OUT/grpo_run/grpo/.
2. sft (control A): SFT continued from the same checkpoint for --minutes on a mixture of that task's train
   split only (text_share 0); OUT/sft_run/sft/.
3. rs (control B, rejection sampling): --rs-group replies per train prompt sampled from the SFT policy by
   the paged engine (muse.posttrain.rollout.Rollouts) at --temperature, graded by the task's grader, the
   correct ones written as a chat JSONL file (OUT/rs_run/correct.jsonl) and SFT on that file; sampling
   runs for --rs-sample-share of --minutes and SFT for the rest, so the arm's total is --minutes.
Each arm's checkpoint is then scored on the same test items as the baseline. `--arms` picks the arms
(default baseline and the three, in that order); each arm's numbers go to OUT/<arm>.json as it finishes,
so arms can run in separate invocations; `--report` prints the JSON summary and the markdown table from
those files. Two more arms, not in the default: `headroom` (greedy pass@1 of the SFT checkpoint beside
the pass rate and pass@k of k samples at --temperature, on --headroom-limit test items: what sampling
finds that greedy misses, which is what GRPO can learn from) and `eval` (`muse eval` on every checkpoint).

Prompts SFT has not seen: with --train-skip N, GRPO and control B take their prompts from the task's train
split from item N on, for an SFT checkpoint trained on items [0, N) only (--sft-mixture names its mixture,
and control A continues on it). RL on the prompts SFT learned the answers of sharpens what is memorised;
on new prompts the verifier is new information (BENCHMARKS.md 10).

The schedule: every arm trains with the same lr shape (--schedule, default wsd with --decay-frac 0.5 of
the arm decaying to 0; BENCHMARKS.md 9: the decay is where SFT learns its facts). By default the shape is
fitted to the arm's wall time (`train_sized`: before each step the schedule's horizon becomes the steps
the budget holds at the rate so far), because a run that max_time_s cuts never reaches its decay;
--grpo-steps / --sft-steps / --rs-sft-steps fix an arm's steps instead (sweeps at a fixed step count).

Greedy and sampled: pass@1 is greedy (what `muse eval` gives by default). With --score-samples k every
checkpoint is also scored the way the RL literature and GRPO's own validation log score it: the mean grade of
k replies per item at --score-temperature (default: GRPO's --temperature), beside pass@k; item i's replies
are seeded alike in every arm, so the paired differences compare like with like. GRPO is known to sharpen
(its sampled pass rate rises toward what greedy decoding already says), so the two can disagree: report both.

Gains are reported in points and in standard errors of the difference: unpaired sqrt(se_a^2 + se_b^2)
(as bench/posttrain.py) and paired (bootstrap SE of the per-item differences: same items both sides).
GRPO's rollout vs update seconds per step are the means of grpo/metrics.jsonl's rollout_s / update_s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("grpo", "sft", "rs")


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def setup_run(out: Path, name: str, data: Path) -> Path:
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        os.symlink(data.resolve(), run / "data")
    return run


def score(ckpt: Path, task: str, limit: int, stages: tuple[str, ...] | None = None, *, samples: int = 0,
          temperature: float = 1.0, seed: int = 0) -> dict:
    """pass@1 (greedy, zero-shot chat) with per-item scores, by muse.posttrain.taskscore; with samples = k > 0 also
    the sampled pass@1 (mean grade of k replies at `temperature`) and pass@k under "sampled" (sampled_score)."""
    from muse.checkpoint import load
    from muse.posttrain.taskscore import score_tasks

    t0 = time.perf_counter()
    model, tok, meta = load(ckpt, stages=stages)
    res, outs = score_tasks(model, tok, [task], limit=limit, with_outputs=True)
    s = res[task]
    out = {"checkpoint": str(meta["path"]), "pass1": s.score, "se": s.se, "n": s.n,
           "items": [o[2] for o in outs[task]], "score_s": round(time.perf_counter() - t0, 1)}
    if samples:
        out["sampled"] = sampled_score(model, tok, task, limit, samples, temperature, seed)
    return out


def sampled_score(model, tok, task_name: str, limit: int, k: int, temperature: float, seed: int) -> dict:
    """The sampled pass@1 of the RL literature (mean grade of k replies per item at `temperature`: what GRPO's
    own validation logs, muse.posttrain.grpo `evaluate`) and pass@k, on the first `limit` test items, with
    per-item pass rates for paired comparisons. Item i's replies use seed `seed + i` whatever the checkpoint
    (common random numbers across arms)."""
    import muse.tasks as tasks_lib
    from muse.posttrain.taskscore import bootstrap_se
    from muse.tokenizer import render_prompt

    t0 = time.perf_counter()
    task = tasks_lib.get(task_name)
    samples = task.samples("test")[:limit]
    chunk = 32
    rollouts, room = task_rollouts(model, task, chunk, k)
    rates, anys = [], []
    for start in range(0, len(samples), chunk):
        batch = samples[start:start + chunk]
        ids = [render_prompt(tok, tasks_lib.build_messages(task, s)) for s in batch]
        fits = [i for i, x in enumerate(ids) if len(x) <= room]  # a prompt that does not fit scores 0
        graded = graded_replies(rollouts, tok, task, [batch[i] for i in fits], [ids[i] for i in fits], k, temperature,
                                [seed + start + i for i in fits])
        by_index = dict(zip(fits, graded))
        for i in range(len(batch)):
            right = [float(ok) for _, ok in by_index.get(i, [(None, False)] * k)]
            rates.append(sum(right) / k)
            anys.append(float(max(right) > 0))
    n = len(rates)
    return {"pass1": sum(rates) / n, "se": bootstrap_se(rates), "n": n, "k": k, "temperature": temperature,
            f"pass@{k}": sum(anys) / n, f"pass@{k}_se": bootstrap_se(anys), "items": rates, "any": anys,
            "s": round(time.perf_counter() - t0, 1)}


def muse_eval(out: Path, args) -> dict:
    """pass@1 of the baseline and of every finished arm by `muse eval --style chat`'s run_eval, zero-shot
    (the task with fewshot k=0: `muse eval` itself asks the task's k shots), greedy, no response cache; with
    --score-samples k also `muse eval --samples k --temperature T`'s sampled pass@1 and pass@k."""
    import dataclasses

    import muse.tasks as tasks_lib
    from muse.eval.runner import run_eval

    task = tasks_lib.get(args.task)
    task0 = dataclasses.replace(task, fewshot=dataclasses.replace(task.fewshot, k=0))
    ckpts = {"baseline": (str(args.sft), None)}
    for arm in ARMS:
        f = out / f"{arm}.json"
        if f.exists():
            ckpts[arm] = (json.loads(f.read_text())["score"]["checkpoint"], None)
    res = {}
    for name, (path, stage) in ckpts.items():
        t0 = time.perf_counter()
        r = run_eval([path], [task0], limit=args.limit, style="chat", cache=False, show_progress=False, stage=stage)
        row = next(iter(r.data["results"][task.name].values()))
        metric = r.data["tasks"][task.name]["primary"]
        m = row["metrics"][metric]
        res[name] = {"checkpoint": path, "metric": metric, "value": m["value"], "stderr": m["stderr"],
                     "n": row.get("n", row.get("samples")), "s": round(time.perf_counter() - t0, 1)}
        print(f"muse eval {name}: {m['value']:.3f} +- {m['stderr']:.3f}", file=sys.stderr, flush=True)
        if args.score_samples:
            k, temp = args.score_samples, args.score_temperature or args.temperature
            r = run_eval([path], [task0], limit=args.limit, style="chat", cache=False, show_progress=False,
                         stage=stage, samples=k, temperature=temp)
            ms = next(iter(r.data["results"][task.name].values()))["metrics"]
            res[name]["sampled"] = {"k": k, "temperature": temp, **{x: ms[x] for x in (metric, f"pass@{k}") if x in ms}}
            print(f"muse eval {name}, {k} samples at T {temp}: {ms[metric]['value']:.3f} +- {ms[metric]['stderr']:.3f}",
                  file=sys.stderr, flush=True)
    return res


def common_flags(minutes: float) -> dict:
    return {"max_time_s": minutes * 60, "eval_every": 0, "save_every": 0, "log_every": 1, "device": "cpu",
            "plot": False, "tensorboard": False}


def lr_sets(prefix_lrs: dict, args) -> list[str]:
    """The arm's rates (`prefix_lrs`) and the one schedule shape every arm uses (--schedule, --decay-frac)."""
    return [f"optim.{k}={v}" for k, v in prefix_lrs.items()] + [
        f"schedule.kind={args.schedule}", "schedule.warmup_steps=0", f"schedule.decay_frac={args.decay_frac}",
        "schedule.final_lr_frac=0"]


def train_sized(loop, budget_s: float, steps: int):
    """Run `loop` (a TrainLoop) for `steps` optimizer steps when steps > 0 (its own schedule over them), else
    for budget_s of wall time with the schedule's shape laid over the time instead of the steps: at each
    step's first micro-batch (after the loop has set the step's lr) the lr multiplier becomes the shape's
    value at the share of the budget used so far, so that a wsd or cosine decay ends when the time does
    (max_time_s alone cuts a step-sized run before it ever decays). Monotone in time, whatever the rate."""
    if steps > 0:
        return loop.train()
    from muse.train.schedule import ScheduleConfig, lr_multiplier

    fine = 1_000_000
    objective, inner = loop.objective, loop.objective.next_batch
    t0: list[float] = []

    def next_batch():
        now = time.perf_counter()
        if not t0:
            t0.append(now)
        shape = ScheduleConfig(**{**loop.schedule.__dict__, "total_steps": fine})
        used = min((now - t0[0]) / budget_s, 1.0)
        loop.optimizer.set_lr_multiplier(lr_multiplier(min(round(used * fine), fine - 1), shape))
        return inner()

    objective.next_batch = next_batch
    try:
        return loop.train()
    finally:
        objective.next_batch = inner


def run_grpo(args, out: Path) -> dict:
    from muse.posttrain.grpo import grpo_loop, load_grpo_config

    run = setup_run(out, "grpo_run", Path(args.data))
    flags = {**common_flags(args.minutes), "tasks": (args.task,), "init_from": str(args.sft),
             "eval_prompts": 0, "max_steps": args.grpo_steps or 100_000, "group_size": args.group_size,
             "prompts_per_step": args.prompts_per_step, "temperature": args.temperature, "seed": args.seed,
             "train_skip": args.train_skip}
    sets = lr_sets(dict(matrix_lr=args.grpo_matrix_lr, embedding_lr=args.grpo_matrix_lr * 10,
                        head_lr=args.grpo_matrix_lr / 5, scalar_lr=args.grpo_matrix_lr * 2), args) + args.grpo_set
    cfg = load_grpo_config(None, flags, sets)
    t0 = time.perf_counter()
    res = train_sized(grpo_loop(cfg, run, force=True), args.minutes * 60, args.grpo_steps)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "rollout_s" in r]
    ro = sum(r["rollout_s"] for r in rows) / max(len(rows), 1)
    up = sum(r["update_s"] for r in rows) / max(len(rows), 1)
    info = {"steps": res.steps, "train_wall_s": round(wall, 1), "rollout_s_per_step": round(ro, 3),
            "update_s_per_step": round(up, 3), "rollout_share": round(ro / max(ro + up, 1e-9), 3),
            "pass_rate_first10": _mean([r.get("pass_rate") for r in rows[:10]]),
            "pass_rate_last10": _mean([r.get("pass_rate") for r in rows[-10:]]),
            "response_len_last10": _mean([r.get("response_len") for r in rows[-10:]]),
            "settings": {"group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
                         "temperature": cfg.temperature, "optim": _lrs(cfg), "schedule": _schedule(cfg, args.grpo_steps),
                         "updates_per_batch": cfg.updates_per_batch, "kl_coef": cfg.kl_coef,
                         "scale_rewards": cfg.scale_rewards, "drop_equal_groups": cfg.drop_equal_groups,
                         "train_skip": cfg.train_skip,
                         "max_new_tokens": res_max_new(cfg, args)}}
    return {**info, "ckpt": [str(run), "grpo"]}


def res_max_new(cfg, args) -> int:
    import muse.tasks as tasks_lib

    return cfg.max_new_tokens or tasks_lib.get(args.task).generation.max_tokens


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def _schedule(cfg, steps: int) -> str:
    shape = cfg.schedule.kind if cfg.schedule.kind == "constant" else f"{cfg.schedule.kind} (decay {cfg.schedule.decay_frac})"
    return f"{shape} over {steps} steps" if steps else f"{shape} fitted to the time"


def _lrs(cfg) -> dict:
    return {k: getattr(cfg.optim, k) for k in ("matrix_lr", "embedding_lr", "head_lr", "scalar_lr")}


def run_sft(args, run: Path, minutes: float, mixture: Path, steps: int) -> dict:
    from muse.posttrain.sft import load_sft_config, sft_loop

    flags = {**common_flags(minutes), "max_steps": steps or 100_000, "text_share": 0.0,
             "batch_tokens": args.batch_tokens, "seed": args.seed}
    sets = [f"init_from={json.dumps(str(args.sft))}", f"mixture={json.dumps(str(mixture))}"]
    sets += lr_sets(dict(matrix_lr=args.sft_matrix_lr, embedding_lr=args.sft_matrix_lr * 10,
                         head_lr=args.sft_matrix_lr / 5, scalar_lr=args.sft_matrix_lr * 2), args) + args.sft_set
    cfg = load_sft_config(None, flags, sets)
    t0 = time.perf_counter()
    res = train_sized(sft_loop(cfg, run, force=True), minutes * 60, steps)
    return {"steps": res.steps, "train_wall_s": round(time.perf_counter() - t0, 1), "tokens": res.tokens,
            "settings": {"optim": _lrs(cfg), "schedule": _schedule(cfg, steps), "batch_tokens": cfg.batch_tokens,
                         "text_share": cfg.text_share}, "ckpt": [str(run), "sft"]}


def run_control_sft(args, out: Path) -> dict:
    run = setup_run(out, "sft_run", Path(args.data))
    if args.sft_mixture:  # the SFT checkpoint's own data: continued, not new
        mixture = Path(args.sft_mixture).resolve()
    else:
        mixture = run / "mixture.toml"
        mixture.write_text(f'[[source]]\ntask = "{args.task}"\n')
    info = run_sft(args, run, args.minutes, mixture, args.sft_steps)
    info["settings"]["mixture"] = str(mixture)
    info["final_val"] = final_val(run / "sft" / "metrics.jsonl")
    return info


def final_val(metrics: Path) -> dict:
    """The last evaluation's validation losses of a run's metrics.jsonl (the loop evaluates at its end):
    control A's says whether more SFT still lowers the loss that "trained until its val loss stopped
    improving" is about."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    vals = [r for r in rows if any(k.startswith("val_loss") for k in r)]
    return {k: v for k, v in vals[-1].items() if k.startswith("val_loss") or k == "step"} if vals else {}


def task_rollouts(model, task, prompts: int, k: int):
    """(a Rollouts engine on `model` for `task`'s replies, `prompts` x `k` at once, the prompt room in tokens)."""
    from muse.posttrain.rollout import Rollouts
    from muse.tokenizer import END_ID, EOT_ID

    max_new = task.generation.max_tokens
    room = model.config.max_seq_len - max_new
    return Rollouts(model, max_prompt_tokens=room, max_new_tokens=max_new, max_sequences=prompts * k,
                    eos_ids=(END_ID, EOT_ID)), room


def graded_replies(rollouts, tok, task, samples, ids, k: int, temperature: float, seeds) -> list[list[tuple[str, bool]]]:
    """k sampled replies to each prompt `ids[i]` (the chat prompt of `samples[i]`), each as (text, right by the
    task's grader; a grader that raises counts as wrong); the prefix cache is reset after the batch."""
    import torch

    import muse.tasks as tasks_lib
    from muse.tokenizer.text import TextStream

    with torch.no_grad():
        groups = rollouts.generate(ids, n=k, temperature=temperature, seeds=seeds)
    rollouts.engine.reset_prefix_cache()
    out = []
    for sample, group in zip(samples, groups):
        replies = []
        for c in group:
            stream = TextStream(tok, stop=task.generation.chat_stop)
            text = stream.push(c.token_ids) + stream.finish()
            try:
                ok = tasks_lib.grade_sample(task, sample, text).score >= 1.0
            except Exception:
                ok = False
            replies.append((text, ok))
        out.append(replies)
    return out


def run_rs(args, out: Path) -> dict:
    """Sample --rs-group replies per train prompt for a share of the budget, keep the right ones, SFT on them."""
    import muse.tasks as tasks_lib
    from muse.checkpoint import load
    from muse.common.errors import DataError
    from muse.tokenizer import render_prompt

    run = setup_run(out, "rs_run", Path(args.data))
    t_start = time.perf_counter()
    sample_budget = args.minutes * 60 * args.rs_sample_share
    task = tasks_lib.get(args.task)
    model, tok, _ = load(args.sft)
    train = list(task.samples("train"))[args.train_skip:]  # GRPO's prompts
    if not train:
        raise DataError(f"--train-skip {args.train_skip} leaves no train prompt of {args.task} to sample; lower it")
    random.Random(args.seed).shuffle(train)
    chunk = args.prompts_per_step
    rollouts, room = task_rollouts(model, task, chunk, args.rs_group)
    kept, asked, sampled, right, pos = [], 0, 0, 0, 0
    while time.perf_counter() - t_start < sample_budget and pos < len(train):
        batch = train[pos:pos + chunk]
        pos += len(batch)
        msgs = [tasks_lib.build_messages(task, s) for s in batch]
        ids = [render_prompt(tok, m) for m in msgs]
        keep = [i for i, x in enumerate(ids) if len(x) <= room]
        replies = graded_replies(rollouts, tok, task, [batch[i] for i in keep], [ids[i] for i in keep], args.rs_group,
                                 args.temperature, [args.seed * 1_000_003 + pos + i for i in keep])
        for i, group in zip(keep, replies):
            asked += 1
            seen = set()
            for text, ok in group:
                sampled += 1
                right += ok
                if ok and (text not in seen or not args.rs_dedupe):
                    seen.add(text)
                    kept.append({"messages": msgs[i] + [{"role": "assistant", "content": text}]})
    sample_s = time.perf_counter() - t_start
    if not kept:
        raise DataError(f"rejection sampling: none of the {sampled} replies to {asked} train prompts was right, so "
                        "control B has nothing to train on; raise --rs-sample-share or --rs-group")
    data = run / "correct.jsonl"
    data.write_text("".join(json.dumps(k) + "\n" for k in kept))
    mixture = run / "mixture.toml"
    mixture.write_text(f'[[source]]\nfile = "{data}"\n')
    del rollouts, model
    left = args.minutes - (time.perf_counter() - t_start) / 60
    info = run_sft(args, run, max(left, 0.1), mixture, args.rs_sft_steps)
    info.update(sample_s=round(sample_s, 1), prompts_sampled=asked, replies_sampled=sampled,
                sample_pass_rate=round(right / max(sampled, 1), 4), kept=len(kept),
                arm_wall_s=round(time.perf_counter() - t_start, 1))
    info["settings"].update(rs_group=args.rs_group, temperature=args.temperature, sample_share=args.rs_sample_share,
                            dedupe=args.rs_dedupe)
    return info


def headroom(args) -> dict:
    """What sampling can find that greedy decoding misses, on the first --headroom-limit test items: greedy
    pass@1 (taskscore) beside the mean pass rate and pass@k of k = --headroom-k samples at --temperature.
    GRPO learns from the right samples of a group; a greedy score it can lift needs pass@k well above it."""
    t0 = time.perf_counter()
    r = score(Path(args.sft), args.task, args.headroom_limit, samples=args.headroom_k, temperature=args.temperature,
              seed=args.seed)
    sm, k = r["sampled"], args.headroom_k
    return {"greedy_pass1": r["pass1"], "greedy_se": r["se"], "n": sm["n"], "k": k,
            "temperature": args.temperature, "sampled_pass1": sm["pass1"], "sampled_se": sm["se"],
            f"pass@{k}": sm[f"pass@{k}"], f"pass@{k}_se": sm[f"pass@{k}_se"],
            # the items greedy gets wrong that some sample gets right: what RL can hope to turn
            "greedy_wrong_sample_right": sum(1 for g, a in zip(r["items"], sm["any"]) if g < 1 and a > 0) / sm["n"],
            "s": round(time.perf_counter() - t0, 1)}


def report(args, out: Path) -> int:
    from muse.posttrain.taskscore import bootstrap_se

    base_file = out / "baseline.json"
    if not base_file.exists():
        print("error: no baseline.json yet; run --arms baseline first", file=sys.stderr)
        return 2
    base = json.loads(base_file.read_text())
    summary = {"task": args.task, "sft": str(args.sft), "scorer": "muse.posttrain.taskscore (greedy, zero-shot chat)",
               "baseline": {k: v for k, v in base.items() if k != "items"}, "arms": {}}
    lines = ["| arm | pass@1 (n) | gain (pts) | gain / SE (unpaired) | gain / SE (paired) | wall s | steps | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| SFT checkpoint | {base['pass1']:.1%} +- {base['se']:.1%} ({base['n']}) | | | | | | "
                 f"{Path(base['checkpoint']).name} |")
    sampled = []
    if "sampled" in base:
        b = base["sampled"]
        k = b["k"]
        summary["baseline"]["sampled"] = {x: y for x, y in b.items() if x not in ("items", "any")}
        sampled = [f"| arm | sampled pass@1 (k={k}, T={b['temperature']}) | gain (pts) | gain / SE (paired) | "
                   f"pass@{k} | gain (pts) |", "|---|---:|---:|---:|---:|---:|",
                   f"| SFT checkpoint | {b['pass1']:.1%} +- {b['se']:.1%} ({b['n']}) | | | {b[f'pass@{k}']:.1%} | |"]
    for arm in ARMS:
        f = out / f"{arm}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        s = r["score"]
        gain = s["pass1"] - base["pass1"]
        se_u = math.sqrt(s["se"] ** 2 + base["se"] ** 2)
        diffs = [a - b for a, b in zip(s["items"], base["items"])]
        se_p = bootstrap_se(diffs)
        row = {k: v for k, v in r.items() if k != "score"}
        row.update(pass1=round(s["pass1"], 4), se=round(s["se"], 4), n=s["n"], gain_pts=round(100 * gain, 1),
                   gain_in_se=round(gain / se_u, 2) if se_u else None,
                   gain_in_se_paired=round(gain / se_p, 2) if se_p else None)
        summary["arms"][arm] = row
        wall = r.get("arm_wall_s", r.get("train_wall_s"))
        notes = _notes(arm, r)
        name = {"grpo": "GRPO", "sft": "A: SFT continued", "rs": "B: rejection sampling"}[arm]
        lines.append(f"| {name} | {s['pass1']:.1%} +- {s['se']:.1%} ({s['n']}) | {100 * gain:+.1f} | "
                     f"{row['gain_in_se']} | {row['gain_in_se_paired']} | {wall} | {r['steps']} | {notes} |")
        if sampled and "sampled" in s:
            a, b = s["sampled"], base["sampled"]
            k = b["k"]
            g = a["pass1"] - b["pass1"]
            se = bootstrap_se([x - y for x, y in zip(a["items"], b["items"])])
            gk = a[f"pass@{k}"] - b[f"pass@{k}"]
            row["sampled"] = {x: y for x, y in a.items() if x not in ("items", "any")}
            row["sampled"].update(gain_pts=round(100 * g, 1), gain_in_se_paired=round(g / se, 2) if se else None,
                                  pass_at_k_gain_pts=round(100 * gk, 1))
            sampled.append(f"| {name} | {a['pass1']:.1%} +- {a['se']:.1%} ({a['n']}) | {100 * g:+.1f} | "
                           f"{row['sampled']['gain_in_se_paired']} | {a[f'pass@{k}']:.1%} | {100 * gk:+.1f} |")
    if (out / "eval.json").exists():
        summary["muse_eval"] = json.loads((out / "eval.json").read_text())
    print(json.dumps(summary, indent=1))
    print("\n".join(lines))
    if sampled:
        print()
        print("\n".join(sampled))
    return 0


def _notes(arm: str, r: dict) -> str:
    if arm == "grpo":
        return (f"rollout {r['rollout_s_per_step']}s + update {r['update_s_per_step']}s per step "
                f"(rollout share {r['rollout_share']:.0%})")
    if arm == "rs":
        return (f"sampled {r['sample_s']}s: {r['prompts_sampled']} prompts x {r['settings']['rs_group']}, "
                f"{r['sample_pass_rate']:.0%} right, kept {r['kept']}")
    return "continued SFT, task only"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="/tmp/muse_bench_posttrain/sft/step_000350", help="the SFT checkpoint")
    p.add_argument("--data", default="/tmp/muse_bench_posttrain/data", help="the run's data/ (tokenizer match)")
    p.add_argument("--out", default="/tmp/grpo_goal")
    p.add_argument("--task", default="letter_count")
    p.add_argument("--arms", default="baseline,grpo,sft,rs",
                   help="comma-separated: baseline, grpo, sft, rs, eval (muse eval on all), headroom (greedy vs sampled)")
    p.add_argument("--report", action="store_true", help="only print the summary of OUT/*.json")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of each arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=1000, help="test items scored")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grpo-matrix-lr", type=float, default=0.002,
                   help="GRPO's Muon lr; embedding x10, head /5, scalars x2 (the defaults' ratios)")
    p.add_argument("--sft-matrix-lr", type=float, default=0.002, help="the controls' Muon lr, same ratios")
    p.add_argument("--batch-tokens", type=int, default=4096, help="the controls' padded tokens per micro-batch")
    p.add_argument("--rs-group", type=int, default=8, help="samples per train prompt (control B)")
    p.add_argument("--headroom-limit", type=int, default=300, help="test items of the headroom arm")
    p.add_argument("--headroom-k", type=int, default=8, help="samples per item of the headroom arm")
    p.add_argument("--score-samples", type=int, default=0,
                   help="also score every checkpoint by the sampled pass@1 and pass@k of this many replies per test "
                        "item (0: greedy only)")
    p.add_argument("--score-temperature", type=float, default=0.0,
                   help="the sampled score's temperature (default: --temperature, GRPO's)")
    p.add_argument("--rs-sample-share", type=float, default=0.3, help="share of the budget spent sampling (control B)")
    p.add_argument("--rs-dedupe", action=argparse.BooleanOptionalAction, default=False,
                   help="keep identical correct replies of a prompt once")
    p.add_argument("--train-skip", type=int, default=0,
                   help="GRPO and control B take their prompts from the task's train split from this item on "
                        "(the items before it: the SFT checkpoint's data)")
    p.add_argument("--sft-mixture", default="",
                   help="control A continues on this mixture TOML (the SFT checkpoint's own); default: the task's train split")
    p.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE", help="extra GRPO config")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE", help="extra SFT config (A and B)")
    p.add_argument("--schedule", choices=("wsd", "cosine", "constant"), default="wsd",
                   help="every arm's lr schedule shape (wsd: constant, then a linear decay to 0)")
    p.add_argument("--decay-frac", type=float, default=0.5, help="wsd: the share of the arm that decays")
    p.add_argument("--grpo-steps", type=int, default=0,
                   help="GRPO steps (the schedule over them; --minutes still caps); 0 = fit the schedule to --minutes")
    p.add_argument("--sft-steps", type=int, default=0, help="control A's steps; 0 = fit to --minutes")
    p.add_argument("--rs-sft-steps", type=int, default=0, help="control B's SFT steps; 0 = fit to what is left")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args, out)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MUSE_NO_PROGRESS", "1")
    from muse.common.errors import MuseError

    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ("baseline", *ARMS, "eval", "headroom")]
    if bad:
        print(f"error: --arms: unknown arm '{bad[0]}' (baseline, grpo, sft, rs, eval, headroom)", file=sys.stderr)
        return 2
    try:
        for arm in arms:
            t0, load0 = time.perf_counter(), load_avg()
            if arm == "eval":
                (out / "eval.json").write_text(json.dumps(muse_eval(out, args), indent=1))
                continue
            if arm == "headroom":
                h = headroom(args)
                (out / "headroom.json").write_text(json.dumps(h, indent=1))
                print(f"headroom: {json.dumps(h)}", file=sys.stderr, flush=True)
                continue
            sampling = dict(samples=args.score_samples, temperature=args.score_temperature or args.temperature,
                            seed=args.seed)
            if arm == "baseline":
                r = score(Path(args.sft), args.task, args.limit, **sampling)
            else:
                r = {"grpo": run_grpo, "sft": run_control_sft, "rs": run_rs}[arm](args, out)
                run_dir, stage = r.pop("ckpt")
                r["score"] = score(Path(run_dir), args.task, args.limit, (stage,), **sampling)
            r.update(load_start=load0, load_end=load_avg(), total_s=round(time.perf_counter() - t0, 1),
                     threads=torch.get_num_threads(), minutes=args.minutes)
            (out / f"{arm}.json").write_text(json.dumps(r))
            print(f"{arm}: done in {r['total_s']}s: pass@1 "
                  f"{(r.get('score') or r)['pass1']:.3f}", file=sys.stderr, flush=True)
    except MuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(args, out) if (out / "baseline.json").exists() else 0


if __name__ == "__main__":
    sys.exit(main())
