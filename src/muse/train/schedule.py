"""Learning-rate schedules as pure functions of the step: multipliers on each param group's base lr.

`lr_multiplier(step, cfg)` returns a float that the trainer hands to
`MuseOptimizer.set_lr_multiplier(m)` before every update (each group's lr = its `initial_lr` * m). Being
a pure function of (step, config), a resumed run needs no scheduler state: the step number is enough.

Conventions (docs/optim.md draws them):
- `step` is the 0-indexed number of the update about to be taken; a run takes updates 0 .. total-1.
- Warmup (W = warmup_steps): step s < W gets (s + 1) / W, so the first update is already non-zero and
  update W-1 is at the full lr.
- The decaying schedules reach `final_lr_frac` at step == total_steps, one past the last update, so
  that with final_lr_frac = 0 no update is wasted at lr 0 (the convention of nanochat and
  modded-nanogpt). Steps past the end clamp to that final value.
- cosine: 1 at step W, cosine down to final_lr_frac at step T.
- wsd (warmup-stable-decay): 1 until the last `decay_frac * T` steps (rounded), then linear down to
  final_lr_frac at T. The decay never starts before warmup ends.
- constant: 1 after warmup, forever (final_lr_frac is ignored).

Also `muon_momentum(step)`: the recipe's momentum warmup for Muon (0.85 -> 0.95 over 300 steps).

This module knows nothing about optimizers, models or time; it is arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from muse.common.errors import ConfigError, closest

SCHEDULE_KINDS = ("cosine", "wsd", "constant")


@dataclass
class ScheduleConfig:
    """How the lr multiplier moves over a run of `total_steps` updates."""

    kind: str = "wsd"
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_frac: float = 0.0  # cosine and wsd end at base_lr * final_lr_frac
    decay_frac: float = 0.2  # wsd: the last 20% of the steps decay linearly (nanochat's warmdown_ratio)

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(
                f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}."
                + closest(self.kind, SCHEDULE_KINDS)
            )
        if self.total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {self.total_steps}; train for at least one step.")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"warmup_steps must be between 0 and total_steps ({self.total_steps}), got "
                f"{self.warmup_steps}; lower the warmup or train longer."
            )
        if not 0.0 <= self.final_lr_frac <= 1.0:
            raise ConfigError(f"final_lr_frac must be in [0, 1], got {self.final_lr_frac}.")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ConfigError(f"decay_frac must be in [0, 1], got {self.decay_frac}.")

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the linear decay (never inside the warmup)."""
        decay_steps = round(self.decay_frac * self.total_steps)
        return max(self.warmup_steps, self.total_steps - decay_steps)


def lr_multiplier(step: int, cfg: ScheduleConfig) -> float:
    """The factor on every group's base lr for the update numbered `step` (0-indexed)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    W, T, f = cfg.warmup_steps, cfg.total_steps, cfg.final_lr_frac
    if step < W:
        return (step + 1) / W
    if cfg.kind == "constant":
        return 1.0
    if step >= T:  # past the end (or W == T, nothing left to decay): clamp at the final value
        return f
    if cfg.kind == "cosine":
        progress = (step - W) / (T - W)  # 0 at the end of warmup, -> 1 at step T
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    start = cfg.decay_start
    if step < start:
        return 1.0
    progress = (step - start) / (T - start)  # T > step >= start, so the denominator is >= 1
    return 1.0 - (1.0 - f) * progress


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Muon momentum for `step`: linear from `start` to `end` over `warmup_steps`, then `end`.

    The modded-nanogpt / nanochat recipe: a lower momentum early lets the first, large gradients wash out
    of the buffer faster. Apply it with `MuseOptimizer.set_muon_momentum(muon_momentum(step))`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    frac = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end
