"""Rollouts (muse.posttrain.rollout): the engine on the live policy, shared or as a synced copy.

The contract GRPO relies on: the logprobs a rollout returns are those a training forward computes for the
same tokens (after an optimizer step too: no stale weights, no stale prefix cache), seeded groups do not
depend on their batch mates, the model's mode is left alone, bad input is refused before anything runs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from muse.common.errors import ConfigError, UsageError
from muse.infer.kv_blocks import cdiv
from muse.model import ModelConfig, build_model
from muse.posttrain.rollout import Completion, Rollouts, group_seed, needs_copy

V, EOS = 101, 0
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64,
                                   init_std=0.1))


def prompts(seed=0, lengths=(5, 17, 22)):
    rng = random.Random(seed)
    return [[rng.randrange(1, V) for _ in range(n)] for n in lengths]


def make(model, **kw):
    args = dict(max_prompt_tokens=24, max_new_tokens=12, max_sequences=16, eos_ids=[EOS], block_size=4)
    return Rollouts(model, **(args | kw))


def teacher_forced(model, prompt: list[int], c: Completion) -> list[float]:
    """A plain training forward over prompt + completion (fp32, log_softmax): the logprob of each token."""
    seq = prompt + c.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).float()[0], -1)
    return [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(c.token_ids)]


def max_logprob_error(model, ps, groups) -> float:
    return max(abs(a - b) for p, g in zip(ps, groups) for c in g
               for a, b in zip(c.logprobs, teacher_forced(model, p, c)))


def optimizer_step(model, opt, seed):
    rng = random.Random(seed)
    x = torch.tensor([[rng.randrange(V) for _ in range(33)]])
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tokens(groups):
    return [[c.token_ids for c in g] for g in groups]


def test_logprobs_equal_a_training_forward_after_an_optimizer_step_and_stale_cache_is_caught():
    model = tiny()
    model.train()
    ps = prompts()
    roll = make(model)
    assert not roll.copy_weights and roll.engine_model is model  # one process: the module itself
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sample = dict(n=4, temperature=0.9, top_k=50, top_p=0.95, seeds=[1, 2, 3])

    first = roll.generate(ps, **sample)
    assert [len(g) for g in first] == [4, 4, 4]
    for c in (c for g in first for c in g):
        assert len(c.logprobs) == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == EOS)  # the stop token is kept
        assert c.finish_reason == "stop" or len(c.token_ids) == 12
    # raw logprobs (temperature / top-k / top-p change the sampling, not the reported logprob)
    assert max_logprob_error(model, ps, first) < 1e-4

    optimizer_step(model, opt, seed=10)
    roll.weights_changed()
    fresh = roll.generate(ps, **sample)
    assert max_logprob_error(model, ps, fresh) < 1e-4

    # The failure mode the check exists for: a step without weights_changed() leaves the previous
    # rollout's K/V in the prefix cache; the same prompts read them and the logprobs go stale.
    hits_before = roll.engine.scheduler.stats().prefix_cache_hit_tokens
    optimizer_step(model, opt, seed=11)
    stale = roll.generate(ps, **sample)
    assert roll.engine.scheduler.stats().prefix_cache_hit_tokens > hits_before
    assert max_logprob_error(model, ps, stale) > 1e-3
    assert model.training


def test_seeded_groups_do_not_depend_on_their_batch_mates():
    model = tiny()
    a, x, y = prompts(1, (9, 20, 3))
    alone = make(model).generate([a], n=4, seeds=[7])[0]
    # other prompts around it, and a pool of 3 sequences: the 12 samples run in waves
    crowded = make(model, max_sequences=3).generate([x, a, y], n=4, seeds=[1, 7, 2])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in crowded]
    assert max(abs(p - q) for ca, cc in zip(alone, crowded) for p, q in zip(ca.logprobs, cc.logprobs)) < 1e-5
    assert len({tuple(c.token_ids) for c in alone}) > 1  # the samples of a group differ
    other = make(model).generate([a], n=4, seeds=[8])[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in alone]  # the seed matters
    # Seeds 7 and 8 on the same prompt share no sample (raw seed + k would share 3 of the 4).
    twice = make(model).generate([a, a], n=4, seeds=[7, 8])
    assert tokens(twice) == [[c.token_ids for c in alone], [c.token_ids for c in other]]
    assert not {tuple(c.token_ids) for c in alone} & {tuple(c.token_ids) for c in other}
    assert group_seed(7) != group_seed(8) and 0 <= group_seed(-1) < 1 << 62


def test_modes_are_restored_and_the_pool_follows_max_sequences():
    model = tiny()
    model.train()
    model.layers["1"].eval()  # a mixed state comes back module by module
    modes = [m.training for m in model.modules()]
    roll = make(model, max_sequences=5, max_prompt_tokens=24, max_new_tokens=9, block_size=4)
    assert [m.training for m in model.modules()] == modes  # building the engine (Engine() calls eval())
    roll.generate(prompts(), n=2, seeds=[0, 1, 2])
    assert [m.training for m in model.modules()] == modes
    model.eval()
    roll.generate(prompts(), n=2)
    assert not any(m.training for m in model.modules())

    per_seq = cdiv(24 + 9, 4)
    assert roll.num_blocks == roll.engine.num_blocks == 5 * per_seq
    assert roll.engine.runner.pool.k.shape[2] == roll.engine.runner.pool.num_blocks == 5 * per_seq
    assert make(model, max_sequences=11, max_prompt_tokens=24, max_new_tokens=9).engine.num_blocks == 11 * per_seq


def test_bad_input_is_refused_before_anything_runs():
    model = tiny()
    roll = make(model)
    with pytest.raises(UsageError, match="prompt 1 has 25 tokens, more than max_prompt_tokens"):
        roll.generate([[1, 2], [3] * 25], n=2)
    with pytest.raises(UsageError, match="n .* must be an integer >= 1"):
        roll.generate([[1, 2]], n=0)
    with pytest.raises(UsageError, match="prompt 0 must be a list of token ids"):
        roll.generate(["hello"], n=1)
    with pytest.raises(UsageError, match="prompt 0 is empty"):
        roll.generate([[]], n=1)
    with pytest.raises(UsageError, match="prompt 1 has token id 101, outside the vocabulary"):
        roll.generate([[1], [2, 101]], n=1)
    with pytest.raises(UsageError, match="stop_ids has token id -1"):
        roll.generate([[1]], n=1, stop_ids=[-1])
    with pytest.raises(UsageError, match="2 seeds for 1 prompts"):
        roll.generate([[1]], n=1, seeds=[1, 2])
    with pytest.raises(UsageError, match="temperature"):
        roll.generate([[1]], n=1, temperature=-1)
    assert not roll.engine.has_unfinished_requests()
    assert len(roll.generate([[1, 2, 3]], n=2)[0]) == 2  # still serves
    assert roll.generate([], n=2) == []
    with pytest.raises(ConfigError, match="longer than the model's max_seq_len"):
        make(model, max_prompt_tokens=60, max_new_tokens=5)
    with pytest.raises(ConfigError, match="max_sequences must be a positive integer"):
        make(model, max_sequences=0)
    with pytest.raises(ConfigError, match="eos_ids has token id 101, outside the vocabulary"):
        make(model, eos_ids=[101])


def test_the_synced_copy_gives_what_the_shared_module_gives():
    model = tiny()
    model.train()
    ps = prompts(2)
    sample = dict(n=3, temperature=1.0, seeds=[4, 5, 6])
    shared, copy = make(model), make(model, copy_weights=True)
    assert copy.copy_weights and copy.engine_model is not model
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), copy.engine_model.parameters()))
    assert tokens(shared.generate(ps, **sample)) == tokens(copy.generate(ps, **sample))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer_step(model, opt, seed=3)
    stale_copy = tokens(copy.generate(ps, **sample)), max_logprob_error(model, ps, copy.generate(ps, **sample))
    shared.weights_changed()
    copy.weights_changed()  # copies the new weights in
    a, b = shared.generate(ps, **sample), copy.generate(ps, **sample)
    assert tokens(a) == tokens(b)
    assert max(abs(p - q) for ga, gb in zip(a, b) for ca, cb in zip(ga, gb)
               for p, q in zip(ca.logprobs, cb.logprobs)) < 1e-5
    assert max_logprob_error(model, ps, b) < 1e-4
    assert stale_copy[1] > 1e-3  # before weights_changed() the copy held the old weights
    assert model.training and copy.stats.sync_seconds > 0 and copy.stats.generated_tokens > 0


def test_checkpointed_blocks_are_shared_compiled_blocks_get_the_copy_path():
    from muse.distributed.parallelize import apply_ac, apply_compile

    model = tiny()
    reference = make(model).generate(prompts(3), n=2, seeds=[1, 2, 3])
    apply_ac(model)  # activation checkpointing wraps the blocks; the engine runs through the wrappers
    roll = make(model)
    assert not roll.copy_weights
    assert tokens(roll.generate(prompts(3), n=2, seeds=[1, 2, 3])) == tokens(reference)
    apply_compile(model)  # wraps the blocks (parameter names gain _orig_mod.); compiles nothing yet
    assert needs_copy(model, torch.device("cpu")) == "torch.compile'd blocks"
    roll = make(model)
    assert roll.copy_weights
    assert tokens(roll.generate(prompts(3), n=2, seeds=[1, 2, 3])) == tokens(reference)
    with pytest.raises(ConfigError, match="cannot share this module"):
        make(model, copy_weights=False)


FSDP_SCRIPT = textwrap.dedent("""
    import torch
    from muse.distributed.mesh import shutdown, single_rank_mesh
    from muse.distributed.parallelize import apply_fsdp
    from muse.model import ModelConfig, build_model
    from muse.posttrain.rollout import Rollouts

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64, init_std=0.1)
    plain = build_model(cfg)
    ps = [[5, 6, 7, 8, 9], [1] * 11]
    kw = dict(max_prompt_tokens=16, max_new_tokens=8, max_sequences=8, block_size=4)
    want = Rollouts(plain, **kw).generate(ps, n=2, seeds=[1, 2])
    model = build_model(cfg)
    model.load_state_dict(plain.state_dict())
    apply_fsdp(model, single_rank_mesh("cpu")["dp"])
    roll = Rollouts(model, **kw)
    got = roll.generate(ps, n=2, seeds=[1, 2])
    assert roll.copy_weights, "FSDP parameters must take the copy path"
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])).backward()
    opt.step()
    roll.weights_changed()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    assert all(torch.equal(full[k], v) for k, v in roll.engine_model.state_dict().items())
    shutdown()
    print("OK")
""")


@pytest.mark.slow
def test_an_fsdp2_module_takes_the_copy_path(tmp_path):
    """FSDP2 over a process group of one, in a child process (a process group is global state)."""
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
