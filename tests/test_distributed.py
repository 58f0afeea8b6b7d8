"""Multi-process training on CPU with gloo, 2 processes: the same losses as one process, sharded resume at
another world size, a failing rank that ends the job, and the sharded optimizer against the plain one.

Every run goes through the real launcher (`muse train --nproc 2`, torch's elastic agent) on a tiny model.
A single process with batch 8 is the reference; 2 processes read 4 (or 2 x 2 with accumulation) each,
so the global batch - and the set of windows in it - is the same (the loader gives rank r every
2nd window of one permutation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from muse.cli.main import main
from muse.train.metrics import read_metrics

# 6 steps, saved at 3 and 6: each step of a 2-process run is many small gloo collectives (seconds per step on
# a loaded 2-core machine, where the process start-ups are the rest), and 6 steps already show the losses
# matching step by step, 3 resumed steps, and learning (the loss falls by ~2.5 nats from step 1 to 6).
STEPS = 6
TINY = ["--depth", "2", "--seq-len", "32", "--set", "model.d_model=64", "--set", "model.n_head=2",
        "--set", "model.n_kv_head=2", "--set", "log_every=1", "--eval-every", str(STEPS), "--set", "eval_batches=2",
        "--device", "cpu", "--max-steps", str(STEPS), "--save-every", str(STEPS // 2), "--seed", "7",
        "--dtype", "float32"]  # REL below is an fp32 bound; `auto` is bf16 on CPUs with native bf16 matmul
ACCUMULATE = ["--batch-size", "2", "--total-batch-tokens", "256", "--set", "eval_batches=4"]
REL = 1e-5  # fp32, different reduction orders: the bound
TIMEOUT = 150  # seconds per command; a hang fails the test instead of stalling CI


def _env(**extra) -> dict:
    env = dict(os.environ, MUSE_NO_PROGRESS="1", OMP_NUM_THREADS="1", **extra)
    for key in ("MUSE_PROGRESS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(run: Path, *extra: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "muse", "train", str(run), *TINY, *extra]
    res = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return res


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "base" / "metrics.jsonl") if key in r}


def _assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= REL * abs(want[s]), f"step {s}: {got[s]!r} vs {want[s]!r}"


@pytest.fixture(scope="module")
def fresh_run(tiny_run_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")

    def make(name: str) -> Path:
        run = root / name
        shutil.copytree(tiny_run_template, run)
        return run

    return make


@pytest.fixture(scope="module")
def single(fresh_run) -> Path:
    run = fresh_run("single")
    _train(run, "--batch-size", "8")
    return run


@pytest.fixture(scope="module")
def fsdp(fresh_run) -> Path:
    run = fresh_run("fsdp")
    # 2 ranks x 2 sequences x 2 accumulated micro-batches = the single process's 8 sequences per step;
    # validation reads eval_batches x batch_size windows per rank: 4 x 2 x 2 = the reference's 2 x 8.
    _train(run, "--nproc", "2", *ACCUMULATE)
    return run


# --- the same loss as one process ----------------------------------------------------------------------


# One tensor-parallel run covers TP, sequence parallelism, activation checkpointing and a save without full
# weights (each a 2-process launch of its own before). TP without SP is checked against plain tensors by
# test_sharded_optimizers_match_single_device (tp=2, forward, backward and optimizer steps).
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name,flags", [
    ("fsdp", None),
    ("ddp", ["--parallel", "ddp", *ACCUMULATE]),
    ("tp", ["--tp", "2", "--batch-size", "8", "--set", "full_weights=false",
            "--set", "parallel.sequence_parallel=true", "--ac", "full"]),
])
def test_two_processes_match_one(name, flags, single, fsdp, fresh_run):
    if flags is None:
        run = fsdp
    else:
        run = fresh_run(name)
        _train(run, "--nproc", "2", *flags)
    want, got = _losses(single), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_close(got, want, range(1, STEPS + 1))
    _assert_close(_losses(run, "val_loss"), _losses(single, "val_loss"), [STEPS])
    assert got[STEPS] < got[1] - 1.0  # it learns (so matching is not trivially matching noise)
    if name == "tp":  # saved without full weights: sharded only, then consolidated into the usual format
        from muse.checkpoint import load
        from muse.common.errors import CheckpointError

        ckpt = run / "base" / f"step_{STEPS:06d}"
        assert not (ckpt / "model.safetensors").exists()
        with pytest.raises(CheckpointError, match="--consolidate"):
            load(run)
        assert main(["train", str(ckpt), "--consolidate"]) == 0  # one process, no process group
        model, _, meta = load(run)
        reference, _, _ = load(single)
        assert meta["step"] == STEPS and (run / "base" / "latest").resolve().name == ckpt.name
        for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


# --- sharded checkpoints -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fsdp_checkpoint_resumes_on_one_process(fsdp, fresh_run):
    from muse.checkpoint import load, verify_checkpoint

    mid = f"step_{STEPS // 2:06d}"
    ckpt = fsdp / "base" / mid
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "model.safetensors", "train_state.pt"} <= names
    verify_checkpoint(ckpt)  # the shards are in the manifest too
    model, _, meta = load(ckpt)  # full weights: the rest of muse reads it unchanged
    assert meta["sharded"] and meta["world_size"] == 2 and meta["n_params"] == sum(p.numel() for p in model.parameters())

    run = fresh_run("resumed")
    shutil.rmtree(run / "base", ignore_errors=True)
    shutil.copytree(fsdp / "base", run / "base", symlinks=True)
    shutil.rmtree(run / "base" / f"step_{STEPS:06d}")
    (run / "base" / "latest").unlink()
    (run / "base" / "latest").symlink_to(mid)
    _train(run, "--batch-size", "8", "--resume")  # one plain process, batch 8: the same global batch
    got, want = _losses(run), _losses(fsdp)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_close(got, want, range(STEPS // 2 + 1, STEPS + 1))
    _assert_close(_losses(run, "val_loss"), _losses(fsdp, "val_loss"), [STEPS])


# --- a failing rank ends the job -----------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_failing_rank_ends_the_job_with_one_clear_line(fresh_run):
    run = fresh_run("fault")
    res = _train(run, "--nproc", "2", "--batch-size", "4", check=False,
                 env=_env(MUSE_FAULT_AT_STEP="3", MUSE_FAULT_RANK="1"))
    assert res.returncode == 1, res.stderr[-3000:]  # the injected fault is a "bug": exit 1, not 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("muse train: error: rank 1 failed at step 3: InjectedFault"), res.stderr[-3000:]
    assert "other ranks were stopped" in last
    assert max(_losses(run), default=0) == 2  # rank 0 logged steps 1-2 and nothing after the failure
    assert not list((run / "base").glob("step_*"))


def test_bad_parallel_settings_fail_before_starting_processes(fresh_run, capsys, monkeypatch):
    from muse.distributed import launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("processes were started"))
    run = fresh_run("bad")
    for flags, needle in ((["--tp", "3"], "--tp 3 does not divide"),
                          (["--tp", "2", "--parallel", "ddp"], "use --parallel fsdp"),
                          (["--tp", "2", "--set", "model.n_kv_head=1"], "n_kv_head"),
                          (["--tp", "2", "--set", "model.qk_norm=true"], "QK-norm"),
                          (["--dp", "3"], "--dp 3 x --tp 1 = 3"),
                          (["--set", "parallel.mode=fsdb"], "Did you mean: fsdp")):
        assert main(["train", str(run), *TINY, "--nproc", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_worker_command_line_is_rebuilt_exactly():
    from muse.cli import train as train_cli
    from muse.distributed.launch import rebuild_argv

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    argv = ["runs/x", "--depth", "3", "--set", "a=1", "--set", "b='x y'", "--compile", "--nproc", "4", "--tp", "2",
            "--resume", "--ac", "full"]
    args = p.parse_args(argv)
    assert p.parse_args(rebuild_argv(train_cli.add_arguments, args)) == args


# --- the sharded optimizer against the single-device one -----------------------------------------------

WORKER = textwrap.dedent('''
    import torch, torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from muse.model import ModelConfig, build_model
    from muse.distributed.parallelize import ParallelConfig, parallelize
    from muse.distributed.checkpoint import shard_optimizer_state
    from muse.train.optim import OptimConfig, build_optimizer

    tdist.init_process_group("gloo")
    # heads, kv heads and d_ff split over tp=2; the 97 vocab rows split unevenly by FSDP (dim 0) over dp=2
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=48, n_head=6, n_kv_head=2, d_ff=96, max_seq_len=16)

    def full(t):
        return t.full_tensor() if type(t).__name__ == "DTensor" else t

    def check(dp, tp, opt_name):
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        ref, model = build_model(cfg), build_model(cfg)
        model.load_state_dict(ref.state_dict())
        model = parallelize(model, mesh, ParallelConfig(tp=tp))
        ocfg = OptimConfig(name=opt_name, grad_clip=0.05)  # a small clip so that clipping really scales
        ref_opt, opt = build_optimizer(ref, ocfg), build_optimizer(model, ocfg)
        for step in range(3):
            batch = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(step))
            x, y = batch[:, :-1], batch[:, 1:]
            ref(x, y).backward()
            ref_norm = ref_opt.clip_grad_norm_(0.05)
            ref_opt.step(); ref_opt.zero_grad()
            r = mesh.get_local_rank("dp")
            model(x.chunk(dp)[r], y.chunk(dp)[r]).backward()
            norm = opt.clip_grad_norm_(0.05)
            opt.step(); opt.zero_grad()
            assert abs(float(norm) - float(ref_norm)) <= 1e-5 * float(ref_norm), (dp, tp, float(norm), float(ref_norm))
            assert float(ref_norm) > 0.05  # clipping was active
        # fp32 in another reduction order (tensor-parallel partial sums): after 3 steps the embedding, which
        # Adam moves by ~lr per element whatever its gradient's size, differs by up to 1.2e-6 on a Zen 3
        # CPU (4.8e-7 with FSDP); a wrong shard or a missing reduction is off by orders of magnitude more
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert type(p).__name__ == "DTensor", n
            torch.testing.assert_close(full(p), q, rtol=1e-5, atol=5e-6, msg=f"{dp}x{tp} {opt_name} {n}")
        # A single-device optimizer state, cut into this layout, holds the same moments.
        fresh = build_optimizer(model, ocfg)
        fresh.load_state_dict(shard_optimizer_state(fresh, ref_opt.state_dict()))
        for o_new, o_ref in zip(fresh.optimizers, ref_opt.optimizers, strict=True):
            new_params = [p for g in o_new.param_groups for p in g["params"]]
            ref_params = [p for g in o_ref.param_groups for p in g["params"]]
            for p, q in zip(new_params, ref_params, strict=True):
                for key, value in o_ref.state[q].items():
                    torch.testing.assert_close(full(o_new.state[p][key]).float(), value.float(), msg=key)

    for dp, tp in ((2, 1), (1, 2)):
        for opt_name in ("muon", "adamw"):
            check(dp, tp, opt_name)
    rank = tdist.get_rank()
    tdist.destroy_process_group()
    # One marker file per rank: two ranks printing to one pipe can interleave their output.
    from pathlib import Path
    Path(__file__).with_name(f"ok.{rank}").write_text(str(tdist.is_initialized()))
''')


@pytest.mark.timeout(200)
def test_sharded_optimizers_match_single_device(tmp_path):
    """Muon (gathers each matrix for Newton-Schulz), AdamW and global-norm clipping on FSDP2 (dp=2) and
    tensor-parallel (tp=2) DTensors take the same steps as on plain tensors."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = _env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    assert [(tmp_path / f"ok.{r}").read_text() for r in (0, 1)] == ["False", "False"], res.stdout[-2000:]
