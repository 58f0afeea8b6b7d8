"""muse.checkpoint: round trips, atomicity, corruption reports, rotation, resolution, RNG and train state."""

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import muse.checkpoint.checkpoint as ckmod
from muse.checkpoint import (
    capture_rng_state,
    describe_difference,
    latest_good,
    list_checkpoints,
    load,
    load_model_state,
    load_train_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from muse.checkpoint.manifest import build_manifest
from muse.common.errors import CheckpointError, TokenizerError
from muse.model import ModelConfig, build_model
from muse.tokenizer import train_bpe

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a checkpoint is a directory with a manifest",
    "muse trains small language models on made-up sentences",
    "every file is written atomically and hashed",
] * 8


@pytest.fixture(scope="module")
def tok():
    return train_bpe(SENTENCES, vocab_size=300)


def tiny_config(arch="llama", **kw):
    return ModelConfig(arch=arch, vocab_size=320, n_layer=2, d_model=64, n_head=4, max_seq_len=32, **kw)


def tiny_model(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **kw))


def save(stage, step, tok, model=None, **kw):
    model = model if model is not None else tiny_model(seed=step)
    return save_checkpoint(stage, step, model=model, tokenizer=tok, **kw)


def idx():
    return torch.arange(24).reshape(2, 12) % 300


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True), ("gpt2", False)])
def test_round_trip_gives_identical_logits(tmp_path, tok, arch, tied):
    model = tiny_model(arch, tie_embeddings=tied).eval()
    ckpt = save_checkpoint(tmp_path / "run" / "base", 500, model=model, tokenizer=tok, meta={"val_loss": 3.25})
    assert ckpt == tmp_path / "run" / "base" / "step_000500"
    loaded, tok2, meta = load(tmp_path / "run")
    assert not loaded.training
    assert loaded.config.tie_embeddings is tied
    assert (loaded.output is None) is tied  # still tied: one matrix, not two copies
    with torch.no_grad():
        assert torch.equal(model(idx()), loaded(idx()))
    assert tok2.to_str() == tok.to_str()
    assert meta["step"] == 500 and meta["stage"] == "base" and meta["val_loss"] == 3.25
    assert meta["path"] == str(ckpt) and meta["config"] == model.config.to_dict()
    assert meta["dtype"] == "float32" and meta["n_params"] == sum(p.numel() for p in model.parameters())


def test_dtype_is_kept_or_converted(tmp_path, tok):
    model = tiny_model().to(torch.bfloat16)
    save(tmp_path / "base", 1, tok, model=model)
    loaded, _, _ = load(tmp_path / "base")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    as_fp32, _, _ = load(tmp_path / "base", dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.tok_embeddings.weight, model.tok_embeddings.weight.float())


def test_shared_storage_is_saved_once_and_re_aliased(tmp_path, tok):
    # A module whose head literally shares the embedding Parameter (as HF-style tying does):
    # safetensors refuses shared storage, so the second name must become an alias.
    model = tiny_model(tie_embeddings=False).eval()
    model.output.weight = model.tok_embeddings.weight
    ckpt = save(tmp_path / "base", 3, tok, model=model)
    state = load_model_state(ckpt)
    assert state["output.weight"] is state["tok_embeddings.weight"]
    with open(ckpt / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "output.weight" not in header and "tok_embeddings.weight" in header
    loaded, _, _ = load(ckpt)
    with torch.no_grad():
        assert torch.equal(model(idx()), loaded(idx()))


def test_wrapper_prefixes_are_stripped(tmp_path, tok):
    model = tiny_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "base", 7, model_state=state, model_config=model.config, tokenizer=tok)
    assert set(load_model_state(ckpt)) == set(model.state_dict())


def test_model_config_may_be_a_dict_and_tokenizer_a_path(tmp_path, tok):
    tok.save(tmp_path / "data" / "tokenizer.json")
    model = tiny_model()
    ckpt = save_checkpoint(tmp_path / "base", 2, model_state=model.state_dict(),
                           model_config=model.config.to_dict(), tokenizer=tmp_path / "data")
    assert json.loads((ckpt / "config.json").read_text()) == {"format_version": 1, "model": model.config.to_dict()}
    assert load(ckpt)[1].vocab_size == tok.vocab_size


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, tok):
    model = build_model(ModelConfig(vocab_size=64, n_layer=1, d_model=64, n_head=4, max_seq_len=32))
    with pytest.raises(TokenizerError, match="vocab_size"):
        save(tmp_path / "base", 1, tok, model=model)
    assert list_checkpoints(tmp_path / "base") == []


def test_manifest_lists_sha256_of_every_other_file(tmp_path, tok):
    ckpt = save(tmp_path / "base", 10, tok, train_state={"step": 10})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    names = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names == {
        "model.safetensors", "config.json", "tokenizer.json", "train_state.pt", "meta.json"}
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --- atomicity -------------------------------------------------------------------------------------


def _hidden(stage):
    return sorted(p.name for p in stage.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where", ["save_file", "build_manifest", "torch_save"])
def test_failed_save_leaves_old_state(tmp_path, tok, monkeypatch, where):
    stage = tmp_path / "base"
    save(stage, 100, tok)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    if where == "torch_save":
        monkeypatch.setattr(ckmod.torch, "save", boom)
    else:
        monkeypatch.setattr(ckmod, where, boom)
    with pytest.raises(OSError, match="simulated"):
        save(stage, 200, tok, train_state={"step": 200})
    assert [p.name for p in list_checkpoints(stage)] == ["step_000100"]
    assert os.readlink(stage / "latest") == "step_000100"
    assert _hidden(stage) == []
    # And a failed re-save of an existing step keeps the old directory whole.
    with pytest.raises(OSError, match="simulated"):
        save(stage, 100, tok, train_state={"step": 100})
    verify_checkpoint(stage / "step_000100")
    assert _hidden(stage) == []


def test_resaving_a_step_replaces_it(tmp_path, tok):
    stage = tmp_path / "base"
    save(stage, 100, tok, meta={"note": "first"})
    save(stage, 100, tok, meta={"note": "second"})
    _, _, meta = load(stage)
    assert meta["note"] == "second"
    assert [p.name for p in list_checkpoints(stage)] == ["step_000100"] and _hidden(stage) == []


def test_stale_leftovers_of_a_killed_save_are_removed(tmp_path, tok):
    stage = tmp_path / "base"
    save(stage, 100, tok)
    (stage / ".step_000200.tmp-abc123").mkdir()
    (stage / ".step_000200.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    os.symlink("step_000100", stage / ".latest.tmp-999")
    (stage / ".keep").write_text("not ours")
    save(stage, 200, tok)
    assert _hidden(stage) == [".keep"]


# --- corruption ------------------------------------------------------------------------------------


@pytest.fixture
def two_ckpts(tmp_path, tok):
    stage = tmp_path / "run" / "base"
    save(stage, 100, tok)
    bad = save(stage, 200, tok)
    return stage, bad


def test_flipped_byte_names_the_last_good(two_ckpts):
    stage, bad = two_ckpts
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    verify_checkpoint(bad, fast=True)  # sizes agree: only the hash sees it
    for attempt in (lambda: verify_checkpoint(bad), lambda: resolve_checkpoint(stage.parent),
                    lambda: load(stage)):
        with pytest.raises(CheckpointError) as e:
            attempt()
        msg = str(e.value)
        assert "model.safetensors: sha256 mismatch" in msg
        assert f"the last good checkpoint is {stage / 'step_000100'}" in msg
    assert latest_good(stage) == stage / "step_000100"


def test_truncated_file_names_the_last_good(two_ckpts):
    stage, bad = two_ckpts
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(100)
    for fast in (True, False):
        with pytest.raises(CheckpointError, match=r"model.safetensors: 100 bytes, expected .*step_000100"):
            verify_checkpoint(bad, fast=fast)
    with pytest.raises(CheckpointError, match="step_000100"):
        load_model_state(bad)


def test_missing_manifest_is_an_incomplete_save(two_ckpts):
    stage, bad = two_ckpts
    (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete \(no manifest.json.*last good checkpoint is .*step_000100"):
        resolve_checkpoint(bad)
    with pytest.raises(CheckpointError, match="incomplete"):
        load(stage)


def test_missing_file_and_no_good_checkpoint(tmp_path, tok):
    stage = tmp_path / "base"
    only = save(stage, 100, tok)
    (only / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing.*no good checkpoint beside it"):
        load(stage)
    assert latest_good(stage) is None


def test_dangling_latest_names_the_last_good(two_ckpts):
    stage, bad = two_ckpts
    shutil.rmtree(bad)
    with pytest.raises(CheckpointError, match="latest points to it but it does not exist.*step_000100"):
        resolve_checkpoint(stage)


def test_newer_format_and_mismatched_weights_are_refused(tmp_path, tok):
    ckpt = save(tmp_path / "base", 1, tok)

    def rewrite_config(fn):
        cfg = json.loads((ckpt / "config.json").read_text())
        fn(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
        (ckpt / "manifest.json").write_text(json.dumps(build_manifest(ckpt, 1)))

    rewrite_config(lambda c: c.update(format_version=2))
    with pytest.raises(CheckpointError, match="newer muse"):
        load(ckpt)
    rewrite_config(lambda c: (c.update(format_version=1), c["model"].update(n_layer=3)))
    with pytest.raises(CheckpointError, match="does not fit its config.json"):
        load(ckpt)
    rewrite_config(lambda c: c["model"].update(n_layer=2, n_experts=4))
    with pytest.raises(CheckpointError, match="n_experts"):
        load(ckpt)


# --- rotation --------------------------------------------------------------------------------------


def test_rotation_keeps_last_k_and_milestones(tmp_path, tok):
    stage = tmp_path / "base"
    model = tiny_model()
    for step in range(100, 800, 100):
        save(stage, step, tok, model=model, keep_last=2, milestone_every=300)
    assert [p.name for p in list_checkpoints(stage)] == ["step_000300", "step_000600", "step_000700"]
    assert os.readlink(stage / "latest") == "step_000700"
    assert _hidden(stage) == []


def test_rotation_never_deletes_latest(tmp_path, tok):
    stage = tmp_path / "base"
    model = tiny_model()
    for step in (100, 200, 300):
        save(stage, step, tok, model=model, keep_last=2)
    save(stage, 50, tok, model=model, keep_last=2)  # e.g. a run restarted from an earlier step
    assert [p.name for p in list_checkpoints(stage)] == ["step_000050", "step_000200", "step_000300"]
    assert resolve_checkpoint(stage) == stage / "step_000050"


# --- resolution ------------------------------------------------------------------------------------


def test_resolve_from_run_stage_checkpoint_and_latest(tmp_path, tok):
    run = tmp_path / "run"
    model = tiny_model()
    save(run / "base", 100, tok, model=model)
    newest = save(run / "base", 200, tok, model=model)
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(run / "base") == newest
    assert resolve_checkpoint(run / "base" / "step_000100") == run / "base" / "step_000100"
    assert resolve_checkpoint(run / "base" / "latest") == newest
    assert resolve_checkpoint(run, stages=("sft", "base")) == newest  # no sft yet: base
    sft = save(run / "sft", 30, tok, model=model)
    assert resolve_checkpoint(run, stages=("sft", "base")) == sft
    assert resolve_checkpoint(run) == newest
    (run / "base" / "latest").unlink()  # no link (copied without symlinks): the newest step
    assert resolve_checkpoint(run / "base") == newest


def test_resolve_reports_nothing_found(tmp_path):
    (tmp_path / "run" / "data").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*run \(looked in base/\); run `muse train"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"looked in sft/, base/"):
        resolve_checkpoint(tmp_path / "run", stages=("sft", "base"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


# --- RNG and train state ---------------------------------------------------------------------------


def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist())


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in the states
    state = capture_rng_state()
    expected = _draw()
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert _draw() != expected
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


def test_train_state_round_trips_with_weights_only(tmp_path, tok):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(idx(), idx()).backward()
    opt.step()
    train_state = {"step": 5, "optimizers": [opt.state_dict()], "schedule": {"warmup": 10, "lr": 1e-3},
                   "loader": {"shard": 0, "pos": 1234}, "rng": capture_rng_state(), "tokens": 2**40}
    ckpt = save(tmp_path / "base", 5, tok, model=model, train_state=train_state)
    direct = torch.load(ckpt / "train_state.pt", weights_only=True)
    loaded = load_train_state(ckpt)
    assert loaded["loader"] == {"shard": 0, "pos": 1234} and direct["tokens"] == 2**40
    opt2 = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizers"][0])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("bad", [np.zeros(3), np.float64(1.0), {1, 2}, object()])
def test_train_state_that_weights_only_cannot_read_is_refused(tmp_path, tok, bad):
    with pytest.raises(TypeError, match=r"train_state\['loader'\]\['x'\].*weights_only"):
        save(tmp_path / "base", 5, tok, train_state={"loader": {"x": bad}})
    assert not (tmp_path / "base" / "step_000005").exists()


def test_load_train_state_without_one(tmp_path, tok):
    ckpt = save(tmp_path / "base", 5, tok)
    with pytest.raises(CheckpointError, match="no train_state.pt.*not resumed"):
        load_train_state(ckpt)


def test_describe_difference():
    saved = tiny_config().to_dict()
    assert describe_difference(saved, dict(saved)) == ""
    new = {**saved, "n_layer": 4, "d_model": 128}
    new.pop("qk_norm")
    text = describe_difference(saved, new)
    assert text.splitlines() == [
        "n_layer: 2 in the checkpoint, 4 now",
        "d_model: 64 in the checkpoint, 128 now",
        "qk_norm: False in the checkpoint, absent now",
    ]
