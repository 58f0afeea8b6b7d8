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
- A second form with an N x D interaction, L = E + A / N^alpha + B / (N^gamma D^beta): the data term's
  size depends on the model's (gamma = 0 is the separable form). With gamma < 0 a bigger model gains more
  from more tokens, which the separable form cannot say. It is the same log-sum-exp, one term
  b - beta log D - gamma log N, so it is fitted by the same code, from a grid with a gamma axis. The
  disagreement between the two forms is one measure of model-form error (muse.scaling.interval). (Kaplan
  et al.'s (A / N^alpha + B / D^beta)^gamma was tried first: with E added, E and gamma trade off so
  closely that L-BFGS stalled short of a noise-free truth.)
- A prediction interval adds the run-to-run scatter to the parameter uncertainty: each bootstrap fit's
  prediction is multiplied by a residual of the full fit drawn at random, so an interval covers a new
  run's loss, not only the mean curve. It says nothing of the form's own error (muse.scaling.interval).

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
FORMS = ("chinchilla", "coupled")  # E + A/N^a + B/D^b, and E + A/N^a + B/(N^g D^b)
# The grid of starts (Chinchilla's, coarsened): every combination is scored, the best few are optimised.
GRID = {"e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0), "gamma": (-0.5, 0.0, 0.5)}  # gamma: the coupled form only


# ---------------------------------------------------------------- approach 3: L(N, D)

@dataclass
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the summed Huber loss at the optimum
    gamma: float | None = None  # the coupled form's exponent of N in the data term; None: the separable form

    @property
    def form(self) -> str:
        return "chinchilla" if self.gamma is None else "coupled"

    def loss(self, n, d):
        """Predicted loss at N params, D tokens (scalars or arrays)."""
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a wild bootstrap refit -> inf, not noise
            if self.gamma is None:
                return self.E + self.A / n**self.alpha + self.B / d**self.beta
            return self.E + self.A / n**self.alpha + self.B / (n**self.gamma * d**self.beta)

    def optimal_split(self, c6: float) -> tuple[float, float]:
        """Compute-optimal (N, D) under C = 6 N D for `c6` = C / 6 (Chinchilla eq. 4); continuous sizes."""
        a, b = self.alpha, self.beta
        if self.gamma is not None:
            raise UsageError("the coupled form has no closed-form compute-optimal split; use the chinchilla fit")
        if a <= 0 or b <= 0:
            raise UsageError(f"the fit has alpha {a:.3g}, beta {b:.3g}: no compute-optimal split exists; "
                             "the ladder needs budgets and sizes that bracket the optimum")
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * c6 ** (b / (a + b))
        return n, c6 / n

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*PARAM_NAMES, "objective")} | (
            {} if self.gamma is None else {"gamma": self.gamma})


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: torch.Tensor, logn: torch.Tensor, logd: torch.Tensor, logl: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Summed Huber loss of log L - LSE(a - alpha log N, b - beta log D, e), one value per problem.

    theta: (P, 5) rows of (a, b, e, alpha, beta), or (P, 6) with gamma last (the coupled form, whose data
    term is b - beta log D - gamma log N); logn, logd, logl: (P, n) or (1, n) (shared data)."""
    if theta.shape[-1] == 6:
        a, b, e, al, be, ga = (t[:, None] for t in theta.unbind(-1))
        terms = torch.stack(torch.broadcast_tensors(a - al * logn, b - be * logd - ga * logn, e), dim=0)
        return _huber(torch.logsumexp(terms, dim=0) - logl, delta).sum(-1)
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


def _grid(form: str = "chinchilla") -> torch.Tensor:
    keys = ("a", "b", "e", "alpha", "beta") + (("gamma",) if form == "coupled" else ())
    return torch.tensor(list(itertools.product(*(GRID[k] for k in keys))), dtype=torch.float64)


def _logs(n, d, loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if np.any(~np.isfinite(loss)) or np.any(loss <= 0) or np.any(n <= 0) or np.any(d <= 0):
        raise UsageError("losses, sizes and token counts must be positive and finite to fit L(N, D)")
    return tuple(torch.from_numpy(np.log(x)) for x in (n, d, loss))


def _best_grid_starts(logn, logd, logl, count: int, delta: float, form: str = "chinchilla") -> torch.Tensor:
    """(R, count, k): the `count` best grid points for each of the R data sets (rows of logn ...)."""
    grid = _grid(form)
    with torch.no_grad():
        scores = torch.stack([_objective(grid, ln[None], ld[None], ll[None], delta)
                              for ln, ld, ll in zip(logn, logd, logl)])  # (R, G)
    return grid[torch.argsort(scores, dim=1)[:, :count]]


def _fit_many(logn, logd, logl, starts: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit R data sets (R, n) from starts (R, S, k) at once; returns each data set's best (theta, value)."""
    R, S, k = starts.shape
    rep = lambda t: t.repeat_interleave(S, dim=0)  # noqa: E731 - (R, n) -> (R*S, n)
    ln, ld, ll = rep(logn), rep(logd), rep(logl)
    fn = lambda th: _objective(th, ln, ld, ll, delta)  # noqa: E731
    theta = lbfgs_batched(fn, starts.reshape(R * S, k))
    with torch.no_grad():
        values = fn(theta).reshape(R, S)
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
    best = values.argmin(dim=1)
    return theta.reshape(R, S, k)[torch.arange(R), best], values[torch.arange(R), best]


def _to_fit(theta, value) -> ParametricFit:
    a, b, e, al, be, *ga = (float(v) for v in theta)
    return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, objective=float(value),
                         gamma=ga[0] if ga else None)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise UsageError(f"unknown L(N, D) form {form!r}; choose one of {', '.join(FORMS)}")


def fit_parametric(n, d, loss, *, delta: float = HUBER_DELTA, starts: int = 8, form: str = "chinchilla",
                   separable: ParametricFit | None = None) -> ParametricFit:
    """L(N, D) by Huber-on-log-residuals, L-BFGS from the `starts` best points of the grid; the best end wins.

    The coupled form also starts from the separable fit of the same data (`separable`, fitted here when not
    given) with gamma = 0: the forms are nested, so the coupled fit is never worse. (Measured: on a
    noise-free coupled law its best grid starts all stalled at a Huber loss of 8e-3, while the separable
    fit's start reached 1e-12.)"""
    _check_form(form)
    k = 5 if form == "chinchilla" else 6
    if len(np.asarray(loss)) < k:
        raise UsageError(f"the {form} L(N, D) fit has {k} parameters and needs at least {k} finished runs, got {len(loss)}")
    logn, logd, logl = (t[None] for t in _logs(n, d, loss))
    grid_starts = _best_grid_starts(logn, logd, logl, starts, delta, form)
    if form == "coupled":
        separable = separable or fit_parametric(n, d, loss, delta=delta, starts=starts)
        nested = torch.cat([theta_of(separable), torch.zeros(1, dtype=torch.float64)])
        grid_starts = torch.cat([nested[None, None], grid_starts], dim=1)
    theta, value = _fit_many(logn, logd, logl, grid_starts, delta)
    if not math.isfinite(float(value[0])):
        raise UsageError("the L(N, D) fit did not converge from any start; check the runs' losses")
    return _to_fit(theta[0], value[0])


def theta_of(fit: ParametricFit) -> torch.Tensor:
    row = [math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta]
    return torch.tensor(row + ([] if fit.gamma is None else [fit.gamma]), dtype=torch.float64)


def bootstrap_parametric(n, d, loss, fit: ParametricFit, *, resamples: int = 200, seed: int = 0,
                         groups=None, delta: float = HUBER_DELTA) -> list[ParametricFit]:
    """Refits on `resamples` resamplings of the runs (with replacement, within each of `groups`, e.g. the
    budget of each run, so every resample keeps every budget); resamples with fewer distinct runs than the
    form has parameters are drawn again. Each refit, of the full fit's form, starts from the full fit and
    from its own 2 best grid points."""
    logn, logd, logl = _logs(n, d, loss)
    k = len(theta_of(fit))
    rng = np.random.default_rng(seed)
    groups = np.zeros(len(logl), dtype=int) if groups is None else np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rows = []
    while len(rows) < resamples:
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        if len(np.unique(idx)) >= k:
            rows.append(idx)
    idx = torch.from_numpy(np.stack(rows))
    ln, ld, ll = logn[idx], logd[idx], logl[idx]
    starts = torch.cat([theta_of(fit).expand(len(rows), 1, k), _best_grid_starts(ln, ld, ll, 2, delta, fit.form)], dim=1)
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
    """Each parameter's interval over the bootstrap fits (gamma too for the coupled form)."""
    names = PARAM_NAMES if not fits or fits[0].gamma is None else (*PARAM_NAMES, "gamma")
    return {k: list(interval([getattr(f, k) for f in fits], level)) for k in names}


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
