"""muse.eval: the harness that runs tasks (muse.tasks) on models and reports, side by side.

    from muse.eval import run_eval
    results = run_eval(["runs/x", "B=openai:http://localhost:8000/v1@speedrun"], "all", limit=100,
                       out_dir="runs/x/eval")
    results.data["results"]["arithmetic_2digit"]["x"]["metrics"]["score"]     # {"value", "stderr"}
    print(results_table(results.data))                                        # the Markdown table

providers.py (the request ops, the Provider interface, --model specs), local.py (a checkpoint through the
paged engine), remote.py (an OpenAI-compatible endpoint over HTTP), cache.py (the SQLite response cache),
runner.py (plans, runs and scores), sampling.py (--samples: seeds, pass@k), report.py (results.json,
report.md, charts, samples), gate.py (the release gate). docs/eval.md is the user's guide. This package knows no server and no CLI.
"""

from muse.eval.cache import NoCache, ResponseCache, default_cache_path
from muse.eval.gate import Gate, check_gate, load_gate
from muse.eval.providers import ModelSpec, Provider, ProviderFailed, SampleFailed, parse_model_spec
from muse.eval.report import contamination_table, results_table, write_report
from muse.eval.runner import EvalOptions, EvalResults, evaluate, make_provider, run_eval

__all__ = [
    "EvalOptions", "EvalResults", "Gate", "ModelSpec", "NoCache", "Provider", "ProviderFailed", "ResponseCache",
    "SampleFailed", "check_gate", "contamination_table", "default_cache_path", "evaluate", "load_gate", "make_provider",
    "parse_model_spec", "results_table", "run_eval", "write_report",
]
