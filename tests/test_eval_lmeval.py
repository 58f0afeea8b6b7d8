"""Parity with lm-evaluation-harness: one multiple-choice task written in both formats (a Muse JSONL task and
an lm-eval YAML over a local JSONL), `muse eval` on a checkpoint and lm-eval's `hf` backend on `muse export`'s
directory give the same accuracy and per-choice log-likelihoods within 1e-4. Nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest

# Read by huggingface_hub / datasets when they are imported: no network, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from muse.cli.main import main  # noqa: E402
from muse.eval import run_eval  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

WORDS = ["king", "queen", "lord", "lady", "love", "night", "day", "sword", "crown", "heart"]

YAML = """task: muse_parity_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def rows():
    out = []
    for i in range(12):
        a, b, c = WORDS[i % 10], WORDS[(i + 3) % 10], WORDS[(i + 7) % 10]
        out.append({"id": f"p{i}", "context": f"the {a} and the {b} speak of the",
                    "choices": [c, f"{a} {b}", "fair night"], "gold": i % 3})
    return out


def test_muse_eval_matches_lm_eval_hf(tiny_checkpoint, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (pip install -e '.[dev]')")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    hf_dir = tmp_path / "hf"
    assert main(["export", str(tiny_checkpoint), "--out", str(hf_dir)]) == 0
    data = tmp_path / "mc_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "muse_parity_mc.yaml").write_text(YAML.format(data=data))
    task_file = tmp_path / "muse_parity_mc.jsonl"
    task_file.write_text(json.dumps({"task": {"name": "muse_parity_mc", "kind": "multiple_choice"}}) + "\n"
                         + "".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32,add_bos_token=True,device=cpu",
        tasks=["muse_parity_mc"], task_manager=TaskManager(include_path=str(tmp_path / "yaml")),
        log_samples=True, batch_size=8)
    ours = run_eval([f"m={tiny_checkpoint}"], [str(task_file)], cache=False, device="cpu", show_progress=False)

    samples = sorted(theirs["samples"]["muse_parity_mc"], key=lambda s: s["doc_id"])
    records = ours.records[("m", "muse_parity_mc")]
    assert len(samples) == len(records) == 12
    for s, r in zip(samples, records):
        their_ll = [resp[0][0] for resp in s["resps"]]
        assert r["logliks"] == pytest.approx(their_ll, abs=1e-4)
    for metric in ("acc", "acc_norm"):
        assert ours.metric("muse_parity_mc", "m", metric) == pytest.approx(
            theirs["results"]["muse_parity_mc"][f"{metric},none"], abs=1e-9)
