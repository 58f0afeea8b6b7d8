"""Benchmark `muse eval`: the built-in suite, multiple choice against lm-evaluation-harness and against
`muse serve`, all on one machine in one run.

    python bench/eval.py --run runs/speedrun [--limit 100] [--mc-limit 200] [--threads 2] [--skip lm-eval,serve]

1. suite       `run_eval(run, "all", limit)`, no cache: wall time per task and in total (model load included).
2. mc          quote_completion (--mc-limit questions) on the local provider, twice: prefix reuse on
               (prompt logprobs from the continuation on, so the question's context may come from the
               prefix cache; needs the engine's `prompt_logprobs_start`) and off (every prompt logprob).
3. lm-eval     the same questions, written as a local JSONL + task YAML (the full few-shot contexts
               muse builds), scored by lm-eval's `hf` backend on `muse export`'s directory
               (add_bos_token=True, float32, batch size 32): simple_evaluate's wall time, model load
               included, like (2). The accuracies of both are printed next to each other.
4. serve       `python -m muse serve RUN` as a subprocess (engine in its own process), the same task over
               HTTP at --concurrency 32: wall time against (2).

Prints one JSON object and a Markdown table. Nothing is downloaded; HF_*_OFFLINE are set.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MUSE_NO_PROGRESS", "1")

MC_TASK = "quote_completion"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_suite(run: str, limit: int) -> dict:
    from muse.eval import run_eval

    res, wall = _timed(lambda: run_eval([f"m={run}"], "all", limit=limit, cache=False, device="cpu",
                                        show_progress=False))
    per_task = {t: {"time_s": r["m"].get("time_s"), "status": r["m"]["status"],
                    "value": (r["m"].get("metrics", {}).get(res.data["tasks"][t]["primary"]) or {}).get("value")}
                for t, r in res.data["results"].items()}
    return {"wall_s": round(wall, 2), "tasks": per_task}


def _mc_task_file(tmp: Path, limit: int) -> tuple[Path, Path, list[dict]]:
    """The first `limit` quote_completion questions, contexts as muse builds them, in both formats."""
    import muse.tasks as tasks

    task = tasks.get(MC_TASK)
    rows = []
    for s in task.samples("test")[:limit]:
        pairs = tasks.multiple_choice_requests(task, s, tasks.fewshot_examples(task, s))
        rows.append({"id": s.id, "context": pairs[0][0], "choices": list(s.choices), "gold": s.gold})
    muse_file = tmp / "mc_muse.jsonl"
    muse_file.write_text(json.dumps({"task": {"name": "mc_bench", "kind": "multiple_choice"}}) + "\n"
                         + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = tmp / "mc_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp / "yaml").mkdir(exist_ok=True)
    (tmp / "yaml" / "mc_bench.yaml").write_text(
        f"task: mc_bench\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    return muse_file, tmp / "yaml", rows


def bench_mc_local(run: str, task_file: Path, prefix_reuse: bool) -> dict:
    import asyncio

    import muse.tasks as tasks
    from muse.eval import EvalOptions, ModelSpec, evaluate
    from muse.eval.local import MuseProvider

    def go():
        provider = MuseProvider(ModelSpec("m", "muse", run), device="cpu", prefix_reuse=prefix_reuse)
        return asyncio.run(evaluate([provider], [tasks.get(str(task_file))], opts=EvalOptions(show_progress=False)))

    res, wall = _timed(go)
    r = res.data["results"]["mc_bench"]["m"]
    return {"wall_s": round(wall, 2), "task_s": r["time_s"], "acc": r["metrics"]["acc"]["value"],
            "prefix_reuse": res.data["models"]["m"]["prefix_reuse"]}


def bench_lm_eval(run: str, yaml_dir: Path, tmp: Path) -> dict:
    from muse.cli.main import main

    hf = tmp / "hf"
    if not hf.exists():
        assert main(["export", run, "--out", str(hf)]) == 0
    import lm_eval
    from lm_eval.tasks import TaskManager

    res, wall = _timed(lambda: lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},dtype=float32,add_bos_token=True,device=cpu", tasks=["mc_bench"],
        task_manager=TaskManager(include_path=str(yaml_dir)), batch_size=32))
    return {"wall_s": round(wall, 2), "acc": res["results"]["mc_bench"]["acc,none"]}


def bench_serve(run: str, task_file: Path, tmp: Path, concurrency: int) -> dict:
    import httpx

    from muse.cli.main import main as muse_main
    from muse.eval import run_eval

    db = tmp / "serve.sqlite3"
    key_out = subprocess.run([sys.executable, "-m", "muse", "keys", "create", "--partner", "bench", "--db", str(db)],
                             capture_output=True, text=True, check=True).stdout.strip()
    del muse_main
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "muse", "serve", run, "--db", str(db), "--port", str(port),
                             "--device", "cpu", "--name", "m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("muse serve did not start: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        os.environ["BENCH_EVAL_KEY"] = key_out
        res, wall = _timed(lambda: run_eval([f"s=openai:{url}/v1@m"], [str(task_file)], cache=False,
                                            api_key_env="BENCH_EVAL_KEY", concurrency=concurrency,
                                            show_progress=False))
        r = res.data["results"]["mc_bench"]["s"]
        if r["status"] != "ok":
            raise RuntimeError(f"served eval failed: {r}")
        return {"wall_s": round(wall, 2), "task_s": r["time_s"], "acc": r["metrics"]["acc"]["value"],
                "concurrency": concurrency}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory (the speedrun's)")
    p.add_argument("--limit", type=int, default=100, help="samples per task in the suite (default 100)")
    p.add_argument("--mc-limit", type=int, default=200, help="questions in the multiple-choice comparison")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: suite, mc, lm-eval, serve")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {"run": args.run, "threads": args.threads, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        task_file, yaml_dir, _ = _mc_task_file(tmp, args.mc_limit)
        if "suite" not in skip:
            out["suite"] = bench_suite(args.run, args.limit)
        if "mc" not in skip:
            out["mc_prefix_reuse"] = bench_mc_local(args.run, task_file, True)
            out["mc_no_reuse"] = bench_mc_local(args.run, task_file, False)
        if "lm-eval" not in skip:
            out["lm_eval_hf"] = bench_lm_eval(args.run, yaml_dir, tmp)
        if "serve" not in skip:
            out["serve"] = bench_serve(args.run, task_file, tmp, args.concurrency)
    print(json.dumps(out, indent=2))
    rows = [("muse eval, local, prefix reuse", out.get("mc_prefix_reuse")), ("muse eval, local, no reuse",
            out.get("mc_no_reuse")), ("lm-eval hf", out.get("lm_eval_hf")),
            (f"muse eval -> muse serve (c={args.concurrency})", out.get("serve"))]
    # task s: the task alone (the model loaded, the server up); wall s: the local providers' includes loading
    print(f"\n| {MC_TASK}, {args.mc_limit} questions | task s | wall s (load included) | acc |\n|---|---|---|---|")
    for name, r in rows:
        if r:
            task_s = f"{r['task_s']:.2f}" if r.get("task_s") is not None else "-"
            print(f"| {name} | {task_s} | {r['wall_s']:.2f} | {r['acc']:.3f} |")


if __name__ == "__main__":
    main()
