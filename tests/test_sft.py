"""SFT end to end on a tiny model: the loss mask, the mixture stream, exact resume, 2 processes vs 1, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from muse.cli.main import main
from muse.common.errors import ConfigError, DataError
from muse.data.chat import ConversationSource, MixtureStream, collate, read_chat_jsonl, render_row
from muse.posttrain.mixture import parse_mixture
from muse.tokenizer import END_ID, PAD_ID, ROLE_IDS
from muse.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()
TINY = ["--batch-tokens", "256", "--set", "log_every=1", "--eval-every", "5", "--set", "eval_rows=8",
        "--set", "eval_batches=2", "--device", "cpu",
        "--set", "dtype=float32"]  # fp32 bounds; `auto` is bf16 on CPUs with native bf16 matmul


def _chats(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 2)):
                msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_template(tiny_run_template, tmp_path_factory):
    """A prepared tiny run with a base checkpoint (2 layers, width 64, context 128) and a chat file."""
    from muse.checkpoint import save_checkpoint
    from muse.model import ModelConfig, build_model
    from muse.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("sft")
    run = root / "run"
    shutil.copytree(tiny_run_template, run)
    tok = Tokenizer.from_file(run / "data" / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2, n_kv_head=1,
                                    max_seq_len=128, init_std=0.1))
    save_checkpoint(run / "base", 1, model=model, tokenizer=tok)
    _chats(root / "chats.jsonl")
    return root


@pytest.fixture
def sft_run(sft_template, tmp_path):
    shutil.copytree(sft_template, tmp_path / "t")
    return tmp_path / "t" / "run", tmp_path / "t" / "chats.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_run_template):
    from muse.tokenizer import Tokenizer

    return Tokenizer.from_file(tiny_run_template / "data" / "tokenizer.json")


# --- the loss mask ------------------------------------------------------------------------------------

CONVO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is king"},
         {"role": "assistant", "content": "the king"}, {"role": "user", "content": "and the queen"},
         {"role": "assistant", "content": "fair lady"}]


def test_loss_mask_is_on_assistant_tokens_and_their_end_only(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]
    rows = [render_row(tok, c, 200)[:2] for c in (CONVO, short)]
    x, y, units, tokens = collate(rows)
    ids = rows[0][0].tolist()
    # the targets that count, by hand: each assistant content and its <|end|>, nothing else
    want = []
    for m in CONVO:
        if m["role"] == "assistant":
            want += tok.encode(m["content"]) + [END_ID]
    assert [int(t) for t in y[0] if t != -1] == want
    assert units == len(want) + len(tok.encode("go")) + 1
    assert tokens == sum(len(r[0]) - 1 for r in rows)
    for i, t in enumerate(y[0].tolist()):  # no system or user token, no role token is ever a target
        if t != -1:
            assert ids[i + 1] == t and t not in (ROLE_IDS["system"], ROLE_IDS["user"], ROLE_IDS["assistant"])
    n = len(rows[1][0]) - 1
    assert (x[1, n:] == PAD_ID).all() and (y[1, n:] == -1).all()  # padding: never a target
    assert int((y[1] != -1).sum()) == len(tok.encode("go")) + 1


def test_sft_loss_is_the_masked_sum_of_a_plain_cross_entropy(tok):
    from muse.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2, n_kv_head=1,
                                    max_seq_len=128))
    rows = [render_row(tok, c, 200)[:2] for c in (CONVO, CONVO[:3])]
    x, y, units, _ = collate(rows)
    got = model(x, y, reduction="sum")
    ref = 0.0
    for (ids, mask) in rows:  # one row at a time, unpadded, masked by hand
        ids_t = torch.tensor(ids, dtype=torch.long)[None]
        logp = torch.log_softmax(model(ids_t[:, :-1]).float(), -1)[0]
        for i in range(len(ids) - 1):
            if mask[i + 1]:
                ref = ref - logp[i, ids[i + 1]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert units == sum(int(m[1:].sum()) for _, m in rows)


def test_too_long_conversations_are_cut_or_dropped_with_one_warning(tok, caplog):
    long_user = [{"role": "user", "content": " ".join(["king"] * 200)}, {"role": "assistant", "content": "yes"}]
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["queen"] * 200)}]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]
    with caplog.at_level("WARNING", logger="muse.data"):
        src = ConversationSource.build("c", tok, [(1, long_user), (2, long_reply), (3, ok)], 64, "c.jsonl")
    assert len(src) == 2 and max(src.lengths) == 64  # the long reply is cut to 64 tokens, the long question dropped
    assert "2 of 3 conversations are longer than 64 tokens: 1 cut to fit, 1 dropped" in caplog.text
    with pytest.raises(DataError, match="c.jsonl: every conversation is longer"):
        ConversationSource.build("c", tok, [(1, long_user)], 64, "c.jsonl")


# --- bad input: one clear line naming the file and line --------------------------------------------


@pytest.mark.parametrize("content, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: the conversation has no assistant turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
     '{"messages": [{"role": "wizard", "content": "a"}]}\n', ":2: message 0 has role 'wizard'"),
    ("", "holds no conversations (it is empty)"),
    ("name,text\nking,queen\n", ":1: not valid JSON"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}\n', ":1: message 0 (user) has content"),
    ('[1, 2]\n', ":1: expected an object with a 'messages' list"),
    (b"\xff\xfe\x00bin", ":1: not UTF-8 text"),
])
def test_bad_chat_files_are_one_line_errors(sft_run, capsys, content, needle):
    run, _ = sft_run
    bad = run.parent / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["sft", str(run), "--data", str(bad), *TINY, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and needle in err, err


def test_read_chat_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 7}\n\n')
    assert read_chat_jsonl(f) == [(2, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])]


def test_mixture_file_errors_name_the_source():
    with pytest.raises(ConfigError, match="source 1: give exactly one of"):
        parse_mixture('[[source]]\nfile = "a.jsonl"\ntask = "spelling"\n', "m.toml")
    with pytest.raises(ConfigError, match="source 2: unknown key 'wieght'. Did you mean: weight"):
        parse_mixture('[[source]]\ntask = "spelling"\n[[source]]\ntask = "identity"\nwieght = 2\n', "m.toml")
    with pytest.raises(ConfigError, match="no \\[\\[source\\]\\] tables"):
        parse_mixture("", "m.toml")
    specs = parse_mixture('[[source]]\nfile = "a.jsonl"\nweight = 2\n[[source]]\ntext = "train"\n', "m.toml", Path("/d"))
    assert [(s.kind, s.target, s.name, s.weight) for s in specs] == [("file", "/d/a.jsonl", "a", 2.0),
                                                                       ("text", "train", "text", 1.0)]


# --- the stream: weights, rank-disjoint, resumable ----------------------------------------------------


def _source(name: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(4, 30))
        rows.append((rng.integers(16, 300, size=k).astype(np.int32), np.ones(k, dtype=np.uint8)))
    return ConversationSource(name, rows)


def _stream():
    return MixtureStream([_source("a", 50, 0), _source("b", 30, 1)], [3.0, 1.0], batch_tokens=96, seed=5)


def test_stream_weights_and_padding():
    s = _stream()
    picked = [src for _ in range(200) for src, _ in s.take().items]
    share = picked.count(0) / len(picked)
    assert 0.7 < share < 0.8  # weight 3 : 1
    for _ in range(20):
        rows = s.take().rows
        width = max(len(r[0]) for r in rows) - 1
        assert len(rows) * width <= 96


def test_two_ranks_read_disjoint_halves_of_what_one_process_reads():
    one = _stream()
    single = [one.take().items for _ in range(40)]
    r0, r1 = _stream(), _stream()
    both = []
    for _ in range(20):
        both += [r0.take(0, 2).items, r1.take(1, 2).items]
    assert both == single


def test_stream_resumes_exactly_from_its_state():
    s = _stream()
    for _ in range(13):
        s.take()
    state = json.loads(json.dumps(s.state_dict()))  # plain data
    want = [s.take().items for _ in range(30)]
    t = _stream()
    t.load_state_dict(state)
    assert [t.take().items for _ in range(30)] == want
    other = MixtureStream([_source("a", 50, 0)], [1.0], batch_tokens=96)
    with pytest.raises(DataError, match="differs from this one"):
        other.load_state_dict(state)


# --- the command: resume, processes, imported checkpoints ---------------------------------------------


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MUSE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return env


def _sft_cmd(run: Path, chats: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muse", "sft", str(run), "--data", str(chats), *TINY, *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "loss" in r}


def test_sft_writes_metrics_per_source_and_a_chat_checkpoint(sft_run, capsys):
    run, chats = sft_run
    assert main(["sft", str(run), "--data", str(chats), *TINY, "--max-steps", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 5 and out["checkpoint"].endswith("sft/step_000005")
    assert 0 < out["loss_tokens_per_s"] < out["tokens_per_s"]
    rows = [r for r in read_metrics(run / "sft" / "metrics.jsonl") if "loss" in r]
    assert rows and all(0 < r["loss_tokens_per_s"] <= r["tokens_per_s"] for r in rows)  # per log step too
    for key in ("val_loss", "val_loss_chats", "val_loss_text", "val_bpb"):
        assert key in out, key
    from muse.checkpoint import latest_stage

    assert latest_stage(run) == "sft"
    meta = json.loads((run / "sft" / "step_000005" / "meta.json").read_text())
    assert meta["init_from"] == "base/step_000001"


@pytest.mark.timeout(240)
def test_sft_resume_after_sigkill_is_bit_identical(sft_run, tmp_path):
    run, chats = sft_run
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    steps = ["--max-steps", "30", "--save-every", "5"]
    subprocess.run(_sft_cmd(ref, chats, *steps), check=True, env=_env(), capture_output=True)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 31))
    proc = subprocess.Popen(_sft_cmd(run, chats, *steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if max(_losses(run), default=0) >= 12:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "SFT finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(_losses(run))
    assert 12 <= killed_at < 30
    res = subprocess.run(_sft_cmd(run, chats, *steps, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = _losses(run)
    assert sorted(got) == list(range(1, 31))
    for step in range(killed_at // 5 * 5 + 1, 31):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    val = lambda r: [m["val_loss"] for m in read_metrics(r / "sft" / "metrics.jsonl") if "val_loss" in m]  # noqa: E731
    assert val(run) == val(ref)


@pytest.mark.timeout(240)
def test_two_processes_match_one(sft_run, tmp_path):
    run, chats = sft_run
    two = tmp_path / "two"
    shutil.copytree(run, two)
    steps = ["--max-steps", "4", "--micro-batches", "2", "--save-every", "4"]
    subprocess.run(_sft_cmd(run, chats, *steps), check=True, env=_env(), capture_output=True)
    res = subprocess.run(_sft_cmd(two, chats, *steps, "--nproc", "2", "--parallel", "ddp"), env=_env(),
                         capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = _losses(run), _losses(two)
    assert want.keys() == got.keys() == {1, 2, 3, 4}
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    vals = lambda r: [m["val_loss"] for m in read_metrics(r / "sft" / "metrics.jsonl") if "val_loss" in m]  # noqa: E731
    assert vals(two) == pytest.approx(vals(run), rel=1e-5)


def test_sft_from_an_imported_checkpoint(sft_run, tmp_path, capsys):
    """export -> import (a run with no data/) -> sft --data: no text share, the imported weights are the start."""
    run, chats = sft_run
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    capsys.readouterr()
    assert main(["sft", str(tmp_path / "imp"), "--data", str(chats), *TINY, "--max-steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and "val_bpb" not in out and "val_loss_chats" in out


def test_micro_batches_must_divide_over_processes(sft_run, capsys):
    run, chats = sft_run
    assert main(["sft", str(run), "--data", str(chats), *TINY, "--nproc", "2", "--micro-batches", "3"]) == 2
    assert "multiple of the 2 data-parallel" in capsys.readouterr().err


def test_a_seq_len_beyond_the_context_is_one_line(sft_run, capsys):
    run, chats = sft_run
    assert main(["sft", str(run), "--data", str(chats), *TINY, "--seq-len", "100000", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seq_len 100000 is beyond the model's context" in err and "--seq-len" in err
