"""`muse speedrun` end to end on the real embedded corpus, shrunk to a few steps."""

import json

import pytest

from muse.cli.main import main

TINY = ["--depth", "1", "--max-steps", "4", "--device", "cpu", "--set", "seq_len=32", "--set", "batch_size=2",
        "--set", "eval_batches=1", "--set", "model.d_model=64", "--set", "model.n_head=2", "--max-tokens", "8",
        "--sft-steps", "0", "--eval-limit", "2"]


@pytest.mark.slow
def test_speedrun_writes_a_report_and_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "sr"
    assert main(["speedrun", "--out", str(out), *TINY, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    report = (out / "report.md").read_text()
    assert "unigram baseline" in report and "![loss curve](base/loss.png)" in report
    assert (out / "base" / "loss.png").exists()
    assert first["steps"] == 4 and first["unigram_bpb"] > 2 and first["val_bpb"] > 0
    assert report.count("```") == 8  # three samples and how to serve it
    assert "## Evaluation" in report and "| which_play | acc |" in report  # muse eval of the final model
    assert "| quote_completion | 1000 |" in report  # its contamination check
    assert json.loads((out / "eval" / "results.json").read_text())["settings"]["limit"] == 2
    curl = first["serve"][-1]
    assert curl.startswith("curl ") and "Authorization: Bearer $KEY" in curl and curl in report
    assert json.loads(curl.split(" -d '")[1].rstrip("'"))["model"] == "sr"   # the name `muse serve` gives it
    mtime = (out / "base" / "latest").resolve().stat().st_mtime
    assert main(["speedrun", "--out", str(out), *TINY, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (out / "base" / "latest").resolve().stat().st_mtime == mtime  # not retrained
    assert second["val_bpb"] == first["val_bpb"]
