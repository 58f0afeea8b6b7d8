"""LR multipliers at their defining points, edge cases, and properties over random configs."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.common.errors import ConfigError
from muse.train.schedule import ScheduleConfig, lr_multiplier, muon_momentum


def m(step, **kw):
    return lr_multiplier(step, ScheduleConfig(**kw))


def test_cosine_key_points():
    kw = dict(kind="cosine", warmup_steps=10, total_steps=110, final_lr_frac=0.1)
    assert m(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert m(4, **kw) == pytest.approx(0.5)
    assert m(9, **kw) == 1.0 and m(10, **kw) == 1.0
    assert m(60, **kw) == pytest.approx(0.55)  # halfway: final + (1 - final) / 2
    assert m(109, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert m(110, **kw) == pytest.approx(0.1) and m(10_000, **kw) == pytest.approx(0.1)
    values = [m(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after warmup


def test_wsd_key_points():
    kw = dict(kind="wsd", warmup_steps=5, total_steps=100, decay_frac=0.2)
    assert [m(s, **kw) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(m(s, **kw) == 1.0 for s in range(5, 81))  # stable through the first decay step
    assert m(90, **kw) == pytest.approx(0.5)
    assert m(99, **kw) == pytest.approx(0.05)  # the last update still moves
    assert m(100, **kw) == 0.0 and m(500, **kw) == 0.0
    assert m(90, **kw, final_lr_frac=0.1) == pytest.approx(0.55)
    assert ScheduleConfig(**kw).decay_start == 80


def test_constant_ignores_final_and_the_end():
    kw = dict(kind="constant", warmup_steps=4, total_steps=10, final_lr_frac=0.3)
    assert [m(s, **kw) for s in (0, 3, 4, 9, 10, 99)] == pytest.approx([0.25, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_edge_cases(kind):
    # no warmup: the first update is at the full lr
    assert m(0, kind=kind, warmup_steps=0, total_steps=50) == 1.0
    # a one-step run: that step gets the full lr, with or without a one-step warmup
    assert m(0, kind=kind, total_steps=1) == 1.0
    assert m(0, kind=kind, warmup_steps=1, total_steps=1) == 1.0
    # warmup as long as the run: ramp to 1, then the final value past the end
    assert [m(s, kind=kind, warmup_steps=4, total_steps=4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1])
    end = 1.0 if kind == "constant" else 0.2
    assert m(4, kind=kind, warmup_steps=4, total_steps=4, final_lr_frac=0.2) == pytest.approx(end)


def test_wsd_decay_never_starts_inside_warmup():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=9, total_steps=10, decay_frac=0.5)
    assert cfg.decay_start == 9
    assert lr_multiplier(8, cfg) == 1.0 and lr_multiplier(9, cfg) == 1.0 and lr_multiplier(10, cfg) == 0.0
    no_decay = ScheduleConfig(kind="wsd", total_steps=10, decay_frac=0.0, final_lr_frac=0.5)
    assert [lr_multiplier(s, no_decay) for s in (0, 9, 10)] == [1.0, 1.0, 0.5]


def test_bad_configs_say_what_to_do():
    with pytest.raises(ConfigError, match="Did you mean: cosine"):
        ScheduleConfig(kind="cosin")
    with pytest.raises(ConfigError, match="lower the warmup"):
        ScheduleConfig(warmup_steps=11, total_steps=10)
    with pytest.raises(ConfigError, match="at least one step"):
        ScheduleConfig(total_steps=0)
    with pytest.raises(ConfigError, match="final_lr_frac"):
        ScheduleConfig(final_lr_frac=1.5)
    with pytest.raises(ConfigError, match="decay_frac"):
        ScheduleConfig(decay_frac=-0.1)
    with pytest.raises(ValueError):
        lr_multiplier(-1, ScheduleConfig())


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(0, warmup_steps=0) == 0.95


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["cosine", "wsd"]),
    total=st.integers(1, 400),
    warm_frac=st.floats(0, 1),
    final=st.floats(0, 1),
    decay=st.floats(0, 1),
)
def test_decaying_schedules_properties(kind, total, warm_frac, final, decay):
    cfg = ScheduleConfig(kind=kind, warmup_steps=int(warm_frac * total), total_steps=total,
                         final_lr_frac=final, decay_frac=decay)
    W = cfg.warmup_steps
    values = [lr_multiplier(s, cfg) for s in range(total + 3)]
    assert all(0 < v <= 1.0 for v in values[:W])
    assert all(a < b for a, b in zip(values[:W], values[1:W]))  # warmup rises
    if W:
        assert values[W - 1] == 1.0
    after = values[W:]
    assert all(final - 1e-12 <= v <= 1.0 for v in after)
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises after warmup
    assert values[total] == pytest.approx(final) and values[-1] == pytest.approx(final)
    if final < 0.999:  # (at final ~ 1 the gap is below float resolution)
        assert values[total - 1] > final  # the last update is never wasted at the final value
