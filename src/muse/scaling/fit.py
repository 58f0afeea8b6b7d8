"""Scaling-law fits over a ladder's runs: IsoFLOP parabolas, power laws, and the parametric L(N, D).

Each point is one finished run: N (parameters that cost FLOPs per token, `muse.model.flops`), D (tokens
trained), C (FLOPs spent, the project's own count per token times D) and its final val loss.

- Approach 2 of Chinchilla (Hoffmann et al. 2022, sec. 3.2): per budget, a parabola of the loss in
  log N; its vertex is that budget's optimal size. Power laws N_opt = k C^a and D_opt = k C^b through
  the vertices (least squares in log-log).
- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla and Epoch AI's replication
  (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt") do: the Huber loss (delta 1e-3)
  of the log-loss residuals, the prediction written as a log-sum-exp of (a - alpha log N, b - beta log D,
  e) with A = exp(a) ..., minimised by L-BFGS from the best starts of a grid. Epoch AI found the
  original paper's intervals far too narrow because its optimiser stopped early; here L-BFGS runs to
  its tolerance and the intervals come from a bootstrap over runs (resample runs with replacement,
  refit, take percentiles).
- A prediction interval adds the run-to-run scatter to the parameter uncertainty: each bootstrap fit's
  prediction is multiplied by a residual of the full fit drawn at random, so an interval covers a new
  run's loss, not only the mean curve.

numpy and torch only. What it does not know: how runs are trained or stored (muse.scaling.ladder).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from muse.common.errors import UsageError

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
# The grid of starts (Chinchilla's, coarsened): every combination is scored, the best few are optimised.
GRID = {"e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}


# ---------------------------------------------------------------- approach 3: L(N, D)

@dataclass
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the summed Huber loss at the optimum

    def loss(self, n, d):
        """Predicted loss at N params, D tokens (scalars or arrays)."""
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a wild bootstrap refit -> inf, not noise
            return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal_split(self, c6: float) -> tuple[float, float]:
        """Compute-optimal (N, D) under C = 6 N D for `c6` = C / 6 (Chinchilla eq. 4); continuous sizes."""
        a, b = self.alpha, self.beta
        if a <= 0 or b <= 0:
            raise UsageError(f"the fit has alpha {a:.3g}, beta {b:.3g}: no compute-optimal split exists; "
                             "the ladder needs budgets and sizes that bracket the optimum")
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * c6 ** (b / (a + b))
        return n, c6 / n

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*PARAM_NAMES, "objective")}


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: torch.Tensor, logn: torch.Tensor, logd: torch.Tensor, logl: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Summed Huber loss of log L - LSE(a - alpha log N, b - beta log D, e), one value per problem.

    theta: (P, 5) rows of (a, b, e, alpha, beta); logn, logd, logl: (P, n) or (1, n) (shared data)."""
    a, b, e, al, be = (t[:, None] for t in theta.unbind(-1))
    terms = torch.stack(torch.broadcast_tensors(a - al * logn, b - be * logd, e), dim=0)
    return _huber(torch.logsumexp(terms, dim=0) - logl, delta).sum(-1)


def lbfgs_batched(fn, x0: torch.Tensor, *, max_iter: int = 400, history: int = 10, tol: float = 1e-12) -> torch.Tensor:
    """Minimise P independent problems at once: `fn(x)` maps (P, k) -> (P,) values, problem p depending on
    row p only. L-BFGS (two-loop recursion, Nocedal & Wright alg. 7.4) with a backtracking Armijo line
    search, every step taken per problem; a problem stops when its value changes by less than `tol`
    (relative). tests/test_scaling_fit.py checks it against torch.optim.LBFGS, the slow reference: one
    L-BFGS call per problem costs ~0.5 s of Python, and a bootstrap needs hundreds of them."""

    def value_grad(x):
        x = x.detach().requires_grad_(True)
        v = fn(x)
        (g,) = torch.autograd.grad(v.sum(), x)
        return v.detach(), g

    x = x0.detach().clone()
    P, k = x.shape
    S = torch.zeros(history, P, k, dtype=x.dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(history, P, dtype=x.dtype)
    gamma = torch.ones(P, dtype=x.dtype)
    fx, g = value_grad(x)
    active = torch.isfinite(fx)
    for it in range(max_iter):
        q = g.clone()
        alphas = []
        for j in range(min(it, history)):  # newest pair first
            i = (it - 1 - j) % history
            a = rho[i] * (S[i] * q).sum(-1)
            q -= a[:, None] * Y[i]
            alphas.append((i, a))
        r = gamma[:, None] * q
        for i, a in reversed(alphas):
            b = rho[i] * (Y[i] * r).sum(-1)
            r += S[i] * (a - b)[:, None]
        d = -r
        slope = (g * d).sum(-1)
        bad = ~(slope < 0)  # not a descent direction: fall back to steepest descent
        d[bad] = -g[bad]
        slope[bad] = -(g[bad] ** 2).sum(-1)
        t = torch.ones(P, dtype=x.dtype)
        if it == 0:  # first step: no curvature yet, keep it short
            t = torch.clamp(1.0 / g.abs().sum(-1).clamp_min(1e-12), max=1.0)
        accepted = torch.zeros(P, dtype=torch.bool)
        fn_new = fx.clone()
        for _ in range(40):
            trial = ~accepted & active
            if not trial.any():
                break
            with torch.no_grad():
                f_try = fn(x + t[:, None] * d)
            ok = trial & torch.isfinite(f_try) & (f_try <= fx + 1e-4 * t * slope)
            fn_new[ok] = f_try[ok]
            accepted |= ok
            t = torch.where(trial & ~ok, t * 0.5, t)
        t = torch.where(accepted, t, torch.zeros_like(t))
        x_new = x + t[:, None] * d
        f_new, g_new = value_grad(x_new)
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(-1)
        good = accepted & (sy > 1e-14)
        i = it % history
        S[i] = torch.where(good[:, None], s, torch.zeros_like(s))
        Y[i] = torch.where(good[:, None], y, torch.zeros_like(y))
        rho[i] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        gamma = torch.where(good, sy / (y * y).sum(-1).clamp_min(1e-30), gamma)
        done = ~accepted | ((fx - f_new).abs() <= tol * (1.0 + fx.abs()))
        x, fx, g = torch.where(active[:, None], x_new, x), torch.where(active, f_new, fx), torch.where(active[:, None], g_new, g)
        active &= ~done
        if not active.any():
            break
    return x


def _grid() -> torch.Tensor:
    rows = list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"]))
    return torch.tensor(rows, dtype=torch.float64)


def _logs(n, d, loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if np.any(~np.isfinite(loss)) or np.any(loss <= 0) or np.any(n <= 0) or np.any(d <= 0):
        raise UsageError("losses, sizes and token counts must be positive and finite to fit L(N, D)")
    return tuple(torch.from_numpy(np.log(x)) for x in (n, d, loss))


def _best_grid_starts(logn, logd, logl, count: int, delta: float) -> torch.Tensor:
    """(R, count, 5): the `count` best grid points for each of the R data sets (rows of logn ...)."""
    grid = _grid()
    with torch.no_grad():
        scores = torch.stack([_objective(grid, ln[None], ld[None], ll[None], delta)
                              for ln, ld, ll in zip(logn, logd, logl)])  # (R, G)
    return grid[torch.argsort(scores, dim=1)[:, :count]]


def _fit_many(logn, logd, logl, starts: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit R data sets (R, n) from starts (R, S, 5) at once; returns each data set's best (theta, value)."""
    R, S, _ = starts.shape
    rep = lambda t: t.repeat_interleave(S, dim=0)  # noqa: E731 - (R, n) -> (R*S, n)
    ln, ld, ll = rep(logn), rep(logd), rep(logl)
    fn = lambda th: _objective(th, ln, ld, ll, delta)  # noqa: E731
    theta = lbfgs_batched(fn, starts.reshape(R * S, 5))
    with torch.no_grad():
        values = fn(theta).reshape(R, S)
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
    best = values.argmin(dim=1)
    return theta.reshape(R, S, 5)[torch.arange(R), best], values[torch.arange(R), best]


def _to_fit(theta, value) -> ParametricFit:
    a, b, e, al, be = (float(v) for v in theta)
    return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, objective=float(value))


def fit_parametric(n, d, loss, *, delta: float = HUBER_DELTA, starts: int = 8) -> ParametricFit:
    """L(N, D) by Huber-on-log-residuals, L-BFGS from the `starts` best points of the grid; the best end wins."""
    if len(np.asarray(loss)) < 5:
        raise UsageError(f"the parametric fit has 5 parameters and needs at least 5 finished runs, got {len(loss)}")
    logn, logd, logl = (t[None] for t in _logs(n, d, loss))
    theta, value = _fit_many(logn, logd, logl, _best_grid_starts(logn, logd, logl, starts, delta), delta)
    if not math.isfinite(float(value[0])):
        raise UsageError("the L(N, D) fit did not converge from any start; check the runs' losses")
    return _to_fit(theta[0], value[0])


def theta_of(fit: ParametricFit) -> torch.Tensor:
    return torch.tensor([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta], dtype=torch.float64)


def bootstrap_parametric(n, d, loss, fit: ParametricFit, *, resamples: int = 200, seed: int = 0,
                         groups=None, delta: float = HUBER_DELTA) -> list[ParametricFit]:
    """Refits on `resamples` resamplings of the runs (with replacement, within each of `groups`, e.g. the
    budget of each run, so every resample keeps every budget); resamples with fewer than 5 distinct runs
    are drawn again. Each refit starts from the full fit and from its own 2 best grid points."""
    logn, logd, logl = _logs(n, d, loss)
    rng = np.random.default_rng(seed)
    groups = np.zeros(len(logl), dtype=int) if groups is None else np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rows = []
    while len(rows) < resamples:
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        if len(np.unique(idx)) >= 5:
            rows.append(idx)
    idx = torch.from_numpy(np.stack(rows))
    ln, ld, ll = logn[idx], logd[idx], logl[idx]
    starts = torch.cat([theta_of(fit).expand(len(rows), 1, 5), _best_grid_starts(ln, ld, ll, 2, delta)], dim=1)
    theta, values = _fit_many(ln, ld, ll, starts, delta)
    return [_to_fit(t, v) for t, v in zip(theta, values) if math.isfinite(float(v))]


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of `values` (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def parameter_intervals(fits: list[ParametricFit], level: float = 0.95) -> dict[str, list[float]]:
    return {k: list(interval([getattr(f, k) for f in fits], level)) for k in PARAM_NAMES}


def prediction_interval(fit: ParametricFit, fits: list[ParametricFit], n: float, d: float, residuals,
                        *, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Interval for a new run's loss at (n, d): each bootstrap fit's prediction times exp(a residual of the
    full fit in log space, drawn at random), so run-to-run scatter counts as well as the fit's uncertainty."""
    rng = np.random.default_rng(seed)
    res = np.asarray(residuals, dtype=np.float64)
    preds = np.array([float(f.loss(n, d)) for f in fits])
    draws = preds * np.exp(rng.choice(res, size=len(preds))) if len(res) else preds
    return interval(draws, level)


def log_residuals(fit: ParametricFit, n, d, loss) -> np.ndarray:
    return np.log(np.asarray(loss, dtype=np.float64)) - np.log(fit.loss(n, d))


# ---------------------------------------------------------------- approach 2: IsoFLOP profiles

@dataclass
class IsoFlopFit:
    budget: float
    coef: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0, x = ln N
    n_opt: float
    loss_opt: float
    inside: bool  # the vertex lies between the smallest and largest size trained

    def as_dict(self) -> dict:
        return {"budget": self.budget, "coef": list(self.coef), "n_opt": self.n_opt, "loss_opt": self.loss_opt,
                "inside": self.inside}


def fit_isoflop(budget: float, n, loss) -> IsoFlopFit:
    """The parabola in ln N through one budget's runs and its vertex (the optimal size at this budget)."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(np.unique(n)) < 3:
        raise UsageError(f"budget {budget:.3g}: a parabola needs at least 3 sizes, got {len(np.unique(n))}")
    x = np.log(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        raise UsageError(f"budget {budget:.3g}: the losses over sizes are not convex (no minimum); add smaller "
                         "and larger sizes around the best one (--sizes)")
    xv = -c1 / (2 * c2)
    return IsoFlopFit(budget=float(budget), coef=(float(c2), float(c1), float(c0)), n_opt=float(math.exp(xv)),
                      loss_opt=float(c0 - c1 * c1 / (4 * c2)), inside=bool(x.min() <= xv <= x.max()))


@dataclass
class PowerLaw:
    """y = k * x^exponent, fitted in log-log."""

    k: float
    exponent: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=np.float64) ** self.exponent

    def as_dict(self) -> dict:
        return {"k": self.k, "exponent": self.exponent}


def fit_power_law(x, y) -> PowerLaw:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 2:
        raise UsageError(f"a power law needs at least 2 budgets, got {len(np.unique(x))}")
    slope, icpt = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(k=float(math.exp(icpt)), exponent=float(slope))
