"""Preference data and DPO on a tiny model: losses vs hand-computed references, learning, exact resume, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from muse.cli.main import main
from muse.common.errors import ConfigError, DataError
from muse.posttrain.dpo import DPO, load_dpo_config, preference_loss, reply_logps
from muse.posttrain.preference import (
    Pair,
    build_preference_data,
    lm_batch,
    parse_data_arg,
    read_preference_jsonl,
    render_reply,
    split_pairs,
)
from muse.tokenizer import END_ID, EOT_ID, render_chat
from muse.train.metrics import read_metrics
from muse.train.objective import MicroBatch

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the king queen lord lady love night day sword heart fair speak hear come go".split()  # no "crown"
TINY = ["--batch-tokens", "512", "--set", "log_every=1", "--device", "cpu"]


def write_prefs(path: Path, n: int = 120, seed: int = 0, word: str = "crown") -> Path:
    """Pairs whose chosen reply contains `word` and whose rejected reply does not; random prompts."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            good, bad = rng.choices(WORDS, k=rng.randint(2, 5)), rng.choices(WORDS, k=rng.randint(2, 5))
            good.insert(rng.randrange(len(good) + 1), word)
            f.write(json.dumps({"prompt": prompt, "chosen": " ".join(good), "rejected": " ".join(bad)}) + "\n")
    return path


@pytest.fixture
def pref_run(save_tiny_checkpoint, tmp_path):
    """A copy of a run whose base stage holds a tiny llama, and a preference file."""
    run = tmp_path / "run"
    shutil.copytree(save_tiny_checkpoint("prefs"), run)
    return run, write_prefs(tmp_path / "prefs.jsonl")


# --- the losses against hand-computed references ---------------------------------------------------------

TOY = dict(policy_c=[-3.0, -7.5, -1.25], policy_r=[-4.0, -6.0, -9.0], ref_c=[-3.5, -7.0, -2.0],
           ref_r=[-3.5, -6.5, -8.0], len_c=[3, 5, 2], len_r=[4, 3, 6])


def _toy():
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in TOY.items()}


def _logsig(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_dpo_loss_and_implicit_rewards_equal_the_formula():
    beta = 0.3
    loss, rc, rr = preference_loss("dpo", beta, **{k: v for k, v in _toy().items() if not k.startswith("len")})
    for i in range(3):
        want_c = beta * (TOY["policy_c"][i] - TOY["ref_c"][i])
        want_r = beta * (TOY["policy_r"][i] - TOY["ref_r"][i])
        assert abs(float(rc[i]) - want_c) < 1e-6 and abs(float(rr[i]) - want_r) < 1e-6
        assert abs(float(loss[i]) - -_logsig(want_c - want_r)) < 1e-6


def test_ipo_and_simpo_losses_equal_their_formulas():
    beta, gamma = 0.5, 0.7
    t = _toy()
    loss, rc, rr = preference_loss("ipo", beta, t["policy_c"], t["policy_r"], t["ref_c"], t["ref_r"])
    for i in range(3):
        h = (TOY["policy_c"][i] - TOY["ref_c"][i]) - (TOY["policy_r"][i] - TOY["ref_r"][i])
        assert abs(float(loss[i]) - (h - 1 / (2 * beta)) ** 2) < 1e-6
    loss, rc, rr = preference_loss("simpo", 2.0, t["policy_c"], t["policy_r"], len_c=t["len_c"], len_r=t["len_r"],
                                   gamma=gamma)
    for i in range(3):
        want_c, want_r = 2.0 * TOY["policy_c"][i] / TOY["len_c"][i], 2.0 * TOY["policy_r"][i] / TOY["len_r"][i]
        assert abs(float(rc[i]) - want_c) < 1e-6 and abs(float(rr[i]) - want_r) < 1e-6
        assert abs(float(loss[i]) - -_logsig(want_c - want_r - gamma)) < 1e-6


def test_the_nll_term_equals_rpo_formula_for_every_loss():
    """RPO (Pang et al. 2024): each pair's loss + nll_weight * the chosen reply's NLL per token; rewards unchanged."""
    t, w = _toy(), 0.7
    for kind, beta in (("dpo", 0.3), ("ipo", 0.5), ("simpo", 2.0)):
        base, rc0, rr0 = preference_loss(kind, beta, **t)
        loss, rc, rr = preference_loss(kind, beta, **t, nll_weight=w)
        assert torch.equal(rc, rc0) and torch.equal(rr, rr0)
        for i in range(3):
            want = float(base[i]) + w * (-TOY["policy_c"][i] / TOY["len_c"][i])
            assert abs(float(loss[i]) - want) < 1e-6, (kind, i)
    # by hand for the first dpo pair: r_c = 0.3 * 0.5, r_r = 0.3 * -0.5; NLL per token 3.0 / 3
    loss, _, _ = preference_loss("dpo", 0.3, **t, nll_weight=w)
    assert abs(float(loss[0]) - (math.log1p(math.exp(-0.3)) + 0.7 * 1.0)) < 1e-6


def _objective(run: Path, prefs: Path, **flags) -> DPO:
    cfg = load_dpo_config(None, {"data": (str(prefs),), "device": "cpu", "batch_tokens": 512, **flags})
    return DPO(cfg, run)


def _setup(obj: DPO, tmp_path: Path):
    from muse.common.device import dtype_policy
    from muse.distributed.parallelize import ParallelConfig
    from muse.train.objective import LoopContext

    ctx = LoopContext(device=torch.device("cpu"), mesh=None, dp_rank=0, dp_size=1,
                      policy=dtype_policy(torch.device("cpu"), "float32"), parallel=ParallelConfig(), run_dir=tmp_path)
    return obj.setup(ctx, resuming=False)


def _hand_logp(model, ids, mask) -> float:
    """Sum of log p(reply tokens) of one unpadded row, position by position."""
    with torch.no_grad():
        return _hand_logp_(model, ids, mask)


def _hand_logp_(model, ids, mask) -> float:
    ids_t = torch.tensor(ids, dtype=torch.long)[None]
    logp = torch.log_softmax(model(ids_t[:, :-1]).double(), -1)[0]
    return sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)) if mask[i])


def test_the_objective_on_a_toy_batch_matches_the_hand_computed_loss(pref_run, tmp_path):
    run, prefs = pref_run
    obj = _objective(run, prefs, loss="dpo", beta=0.5)
    policy = _setup(obj, tmp_path)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = obj.data.train[0].rows[:4]
    x, y, n, tokens = lm_batch(rows)  # what next_batch hands the loss
    with torch.no_grad():
        total = obj.loss(policy, MicroBatch(inputs=(x, y), loss_units=n, tokens=tokens))
        _, chosen, rejected = obj._pair_losses(policy, x, y)
    want = 0.0
    for i, r in enumerate(rows):  # float64 sums of float32 log-probs: 1e-6 per pair is float32's resolution here
        pc, pr = _hand_logp(policy, *r.chosen), _hand_logp(policy, *r.rejected)
        qc, qr = _hand_logp(obj.ref, *r.chosen), _hand_logp(obj.ref, *r.rejected)
        assert abs(float(chosen[i]) - 0.5 * (pc - qc)) < 1e-5 and abs(float(rejected[i]) - 0.5 * (pr - qr)) < 1e-5
        want += -_logsig(0.5 * (pc - qc) - 0.5 * (pr - qr))
    assert abs(float(total) - want) < 1e-5
    metrics = obj.step_metrics()
    assert set(metrics) == {"chosen_reward", "rejected_reward", "margin", "accuracy"}


def test_the_objective_with_nll_weight_adds_the_chosen_nll_per_token(pref_run, tmp_path):
    run, prefs = pref_run
    obj = _objective(run, prefs, loss="dpo", beta=0.5, nll_weight=0.25)
    policy = _setup(obj, tmp_path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = obj.data.train[0].rows[:4]
    x, y, n, tokens = lm_batch(rows)
    with torch.no_grad():
        total = obj.loss(policy, MicroBatch(inputs=(x, y), loss_units=n, tokens=tokens))
    want = 0.0
    for r in rows:
        pc, pr = _hand_logp(policy, *r.chosen), _hand_logp(policy, *r.rejected)
        qc, qr = _hand_logp(obj.ref, *r.chosen), _hand_logp(obj.ref, *r.rejected)
        reply_tokens = int(r.chosen[1][1:].sum())  # the targets: reply tokens and its <|end|>
        want += -_logsig(0.5 * (pc - qc) - 0.5 * (pr - qr)) + 0.25 * (-pc / reply_tokens)
    assert abs(float(total) - want) < 1e-5
    with pytest.raises(ConfigError, match="nll_weight must be >= 0"):
        load_dpo_config(None, {"data": (str(prefs),), "nll_weight": -1.0})


def test_policy_equal_to_reference_gives_log_2(pref_run, tmp_path):
    run, prefs = pref_run
    obj = _objective(run, prefs)
    policy = _setup(obj, tmp_path)
    x, y, n, _ = lm_batch(obj.data.train[0].rows[:8])
    with torch.no_grad():
        losses, rc, rr = obj._pair_losses(policy, x, y)
        logp, counts = reply_logps(policy, x, y)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert float(rc.abs().max()) < 1e-6 and float(rr.abs().max()) < 1e-6
    assert (counts > 1).all() and (logp < 0).all()


@pytest.fixture
def ptx_run(tiny_run_with_model, tmp_path):
    """A run with prepared plays-like text (RUN/data) and a tiny base model of its tokenizer, and preferences."""
    run, _ = tiny_run_with_model("dpo_ptx", "base", 1)
    return run, write_prefs(tmp_path / "prefs.jsonl")


@pytest.mark.parametrize("mixture", ["", "spelling", "default"])
def test_the_ptx_term_adds_the_anchor_nll_per_target_token(ptx_run, tmp_path, mixture):
    """Per pair: + ptx_weight x the anchor rows' NLL per target token, by hand; the anchor is the run's text by
    default, or a mixture file read as muse sft reads it (a task's replies only count, plus the text share)."""
    run, prefs = ptx_run
    flags = {"ptx_weight": 0.5, "ptx_tokens": 1024}
    if mixture == "default":  # muse sft's default mixture, by name
        flags["ptx_mixture"] = "default"
    elif mixture:
        mix = tmp_path / "mix.toml"
        mix.write_text(f'[[source]]\ntask = "{mixture}"\n', encoding="utf-8")
        flags["ptx_mixture"] = str(mix)
    obj = _objective(run, prefs, loss="dpo", beta=0.5, **flags)
    policy = _setup(obj, tmp_path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batches = [obj.next_batch() for _ in range(6)]
    for batch in batches:
        x, y, tx, ty, targets = batch.inputs
        assert targets == int((ty != -1).sum()) > 0 and tx.shape[1] <= obj.seq_len
        with torch.no_grad():
            total = obj.loss(policy, batch)
            pair_losses, _, _ = obj._pair_losses(policy, x, y)
            logp = torch.log_softmax(policy(tx).double(), -1)
        keep = ty != -1
        nll = -logp.gather(-1, ty.clamp(min=0)[..., None])[..., 0][keep].mean()
        assert abs(float(total) - (float(pair_losses.sum()) + 0.5 * batch.loss_units * float(nll))) < 1e-4
    names = {s.name for s in obj.anchor.sources}
    assert names == {"text"} if not mixture else ("text" in names and len(names) == (9 if mixture == "default" else 2))
    masked = [bool((b.inputs[3] == -1).any()) for b in batches]  # a chat row trains on its replies only
    assert any(masked) if mixture else not any(masked)
    metrics = obj.step_metrics()
    assert {"ptx_loss", "chosen_reward", "accuracy"} <= metrics.keys() and 0 < metrics["ptx_loss"] < 20
    policy.eval()
    with torch.no_grad():
        evals = obj.evaluate(policy)
    assert 0 < evals["val_bpb"] < 20 and "val_accuracy" in evals  # both mixtures read the plays (text share)


def test_ptx_settings_are_checked_with_one_line_errors(pref_run, ptx_run, capsys, tmp_path):
    run, prefs = pref_run  # no RUN/data
    assert main(["dpo", str(run), "--data", str(prefs), "--ptx-weight", "1", *TINY, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # after the data's INFO line: one line
    assert err.startswith("muse dpo: error: ") and "holds no shards made with the policy's tokenizer" in err, err
    with pytest.raises(ConfigError, match="give ptx_weight > 0 as well"):
        load_dpo_config(None, {"data": (str(prefs),), "ptx_mixture": "mix.toml"})
    with pytest.raises(ConfigError, match="ptx_weight must be >= 0"):
        load_dpo_config(None, {"data": (str(prefs),), "ptx_weight": -0.5})
    with pytest.raises(ConfigError, match="ptx_tokens and eval_batches must be positive"):
        load_dpo_config(None, {"data": (str(prefs),), "ptx_weight": 1.0, "ptx_tokens": 0})
    with pytest.raises(ConfigError, match=r"ptx_text_share must be in \[0, 1\)"):
        load_dpo_config(None, {"data": (str(prefs),), "ptx_weight": 1.0, "ptx_text_share": 1.0})
    run, prefs = ptx_run
    with pytest.raises(ConfigError, match="cannot hold one row of 256 tokens"):
        _objective(run, prefs, ptx_weight=1.0, ptx_tokens=100)
    plain = _objective(run, prefs).state_dict()  # a checkpoint's state from a run without the anchor
    anchored = _objective(run, prefs, ptx_weight=1.0)
    with pytest.raises(ConfigError, match="trained without ptx_weight; resume with the same settings"):
        anchored.load_state_dict(plain)
    (tmp_path / "bad.toml").write_text('[[source]]\ntask = "spelling"\nflavour = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'flavour'"):
        _objective(run, prefs, ptx_weight=1.0, ptx_mixture=str(tmp_path / "bad.toml"))


# --- preference data --------------------------------------------------------------------------------


def test_rows_render_through_the_chat_renderer_with_the_reply_masked(tiny_tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"},
            {"role": "assistant", "content": "the queen"}, {"role": "user", "content": "and the lord"}]
    ids, mask, cut = render_reply(tiny_tok, msgs, "fair lady", 200)
    full, _ = render_chat(tiny_tok, msgs + [{"role": "assistant", "content": "fair lady"}])
    assert ids.tolist() == full and not cut
    assert [int(t) for t, m in zip(ids, mask) if m] == tiny_tok.encode("fair lady") + [END_ID]  # not "the queen"
    short, smask, cut = render_reply(tiny_tok, msgs, "fair lady", 12)  # the prompt is cut from the left
    assert cut and len(short) == 12 and short[0] == EOT_ID and short[-len(tiny_tok.encode("fair lady")) - 1:].tolist() \
        == tiny_tok.encode("fair lady") + [END_ID]
    assert render_reply(tiny_tok, msgs, "the king " * 20, 12) is None  # the reply alone does not fit


def test_chat_form_weights_margins_and_the_prompt_hash_split(tmp_path, tiny_tok):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant",
                 "content": "go"}, "rejected": "come", "margin": 2, "critique": "kept for people"}) + "\n\n")
    assert read_preference_jsonl(f) == [Pair(1, ({"role": "user", "content": "hi"},), "go", "come", 2.0)]
    assert parse_data_arg("a.jsonl*2.5") == ("a.jsonl", 2.5) and parse_data_arg("a.jsonl") == ("a.jsonl", None)
    a, b = write_prefs(tmp_path / "a.jsonl", 40), write_prefs(tmp_path / "b.jsonl", 20, seed=1)
    data = build_preference_data([str(a), f"{b}*3"], tiny_tok, max_len=129, val_fraction=0.25)
    train_a, train_b = (len(s) for s in data.train)
    assert data.weights == [train_a, 3.0 * train_b]
    assert set(data.val) == {"a", "b"} and 0 < len(data.val["a"]) < 20
    pairs = [Pair(i, ({"role": "user", "content": f"q{i % 10}"},), "x", "y") for i in range(60)]
    train, val = split_pairs(pairs, 0.3, 100, "k")  # every pair of one prompt lands on the same side
    prompt = lambda p: p.messages[0]["content"]  # noqa: E731
    assert {prompt(p) for p in train}.isdisjoint({prompt(p) for p in val}) and val


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}\n', ":1: 'chosen' and 'rejected' are identical"),
    ("prompt,chosen,rejected\na,b,c\n", ":1: not valid JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', ":2: missing field 'rejected'"),
    ('{"messages": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}\n', ":1: message 0 has role 'wizard'"),
    ('{"prompt": "a", "chosen": {"role": "user", "content": "b"}, "rejected": "c"}\n', ":1: 'chosen' has role 'user'"),
    ('{"chosen": "b", "rejected": "c"}\n', ":1: give exactly one of 'prompt'"),
    ("", "holds no preference pairs (it is empty)"),
])
@pytest.mark.parametrize("verb", ["dpo", "rm"])
def test_bad_preference_files_are_one_line_errors(pref_run, capsys, content, needle, verb):
    run, _ = pref_run
    bad = run.parent / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    assert main([verb, str(run), "--data", str(bad), *TINY, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and needle in err, err


def test_no_data_and_bad_settings_are_one_line_errors(pref_run, capsys):
    run, prefs = pref_run
    assert main(["dpo", str(run), *TINY]) == 2
    assert "no preference data: pass --data" in capsys.readouterr().err
    assert main(["dpo", str(run), "--data", str(prefs), "--loss", "simpo", "--ref", str(run), *TINY]) == 2
    assert "simpo has no reference model" in capsys.readouterr().err
    with pytest.raises(DataError, match="weight after"):
        parse_data_arg("a.jsonl*-1")


# --- training: learning, exact resume ---------------------------------------------------------------


def test_dpo_raises_held_out_preference_accuracy_and_margin(pref_run, capsys):
    run, prefs = pref_run
    assert main(["dpo", str(run), "--data", str(prefs), *TINY, "--max-steps", "12", "--eval-every", "12",
                 "--set", "optim.matrix_lr=0.01", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The policy starts equal to the reference: every held-out margin is 0 and none counts as right.
    assert out["checkpoint"].endswith("dpo/step_000012") and out["pairs_per_s"] > 0
    assert out["val_accuracy"] >= 0.9 and out["val_margin"] > 1.0, out
    assert out["val_loss"] < math.log(2) - 0.2
    rows = [r for r in read_metrics(run / "dpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["pairs_per_s"] > 0 and {"chosen_reward", "margin", "accuracy"} <= rows[-1].keys()
    meta = json.loads((run / "dpo" / "step_000012" / "meta.json").read_text())
    assert meta["init_from"] == "base/step_000001"
    from muse.checkpoint import latest_stage

    assert latest_stage(run) == "dpo"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MUSE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return env


def _cmd(run: Path, prefs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muse", "dpo", str(run), "--data", str(prefs), *TINY, "--eval-every", "4", *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "dpo" / "metrics.jsonl") if "loss" in r}


@pytest.mark.timeout(600)  # ~20 s on an idle 2-core machine; three processes start, so allow for a busy one
def test_dpo_resume_after_sigkill_is_bit_identical(ptx_run, tmp_path):
    run, prefs = ptx_run  # with the ptx anchor: its stream resumes too
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    steps = ["--max-steps", "12", "--save-every", "3", "--ptx-weight", "0.5", "--set", "ptx_tokens=512"]
    subprocess.run(_cmd(ref, prefs, *steps), check=True, env=_env(), capture_output=True)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 13))
    proc = subprocess.Popen(_cmd(run, prefs, *steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if max(_losses(run), default=0) >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "DPO finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(_losses(run))
    assert 4 <= killed_at < 12
    res = subprocess.run(_cmd(run, prefs, *steps, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = _losses(run)
    assert sorted(got) == list(range(1, 13))
    for step in range(killed_at // 3 * 3 + 1, 13):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    val = lambda r: [(m["val_margin"], m["val_bpb"]) for m in read_metrics(r / "dpo" / "metrics.jsonl") if "val_margin" in m]  # noqa: E731
    assert val(run)[-1] == val(ref)[-1]
    ptx = lambda r: {m["step"]: m["ptx_loss"] for m in read_metrics(r / "dpo" / "metrics.jsonl") if "ptx_loss" in m}  # noqa: E731
    assert ptx(run)[12] == ptx(ref)[12]
