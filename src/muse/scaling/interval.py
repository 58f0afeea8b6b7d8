"""The ladder's prediction interval, with the error of the law's form in it, and its coverage on backtests.

`fit.prediction_interval` resamples runs: it says how well the ladder pins the separable law down and how
far a run scatters around it, but it takes the form E + A / N^alpha + B / D^beta as true. An extrapolation
also pays for the form being wrong, and nothing inside one fit can measure that. Three things can, from
the ladder's own runs, before the verify run is seen:

1. A competing form. The coupled form E + A / N^alpha + B / (N^gamma D^beta) (muse.scaling.fit) fits the
   same runs with an N x D interaction; its own bootstrap prediction interval at the predicted run says
   where the loss would be if that form were the true one.
2. Backtests. For every budget C_k after the first two, both forms are fitted on the budgets below it and
   predict its runs, an extrapolation of ln(C_k / C_(k-1)). Their errors (the separable fit's, the one the
   prediction uses), scaled linearly to the prediction's own distance ln(C / C_max) (never scaled down),
   give a band around the prediction: as wrong as the law was one step out, per unit of distance.
3. Each size's own data curve (added after the first ladder with this interval missed its verify run; see
   docs/scaling.md). Where the predicted size has runs at two or more budgets, a pure power law in D through
   them (Kaplan et al. 2020's L(D) = (D_c / D)^alpha_D, one per size: least squares of ln L on ln D), carried
   to the predicted D. It has no floor and no shared exponents, the opposite assumptions of the separable
   form; on the measured ladder the two bracketed the three backtest runs it could predict, and the verify
   run. This part was chosen after seeing that miss, so its record there is not an out-of-sample test.

The stated interval is the union of the separable form's bootstrap interval, the coupled form's, the
backtest band and the per-size prediction (a point). It is never narrower than the bootstrap interval
(`parts["chinchilla"]`), and its coverage is measured: every backtest fold builds the same interval from
its own budgets (with the band of the folds before it) and counts the held-out runs inside it, next to the
count for the bootstrap interval alone. With three budgets there is one fold and no band inside it: a
check, not a calibration; do not read a percentage off four runs.

Deterministic for the same runs (fixed seeds). What it does not know: how runs are trained or stored, or
which run is predicted (muse.scaling.analysis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from muse.common.errors import UsageError
from muse.scaling import fit as F

MIN_FIT_BUDGETS = 2  # one budget's runs lie on one line in (log N, log D): the two terms cannot be told apart


@dataclass
class FormFit:
    """One form fitted to a set of runs: the fit, its bootstrap refits and its log residuals."""

    fit: F.ParametricFit
    boots: list[F.ParametricFit]
    residuals: np.ndarray

    def point(self, n: float, d: float) -> float:
        return float(self.fit.loss(n, d))

    def interval(self, n: float, d: float, level: float, seed: int = 0) -> tuple[float, float]:
        return F.prediction_interval(self.fit, self.boots, n, d, self.residuals, level=level, seed=seed)


def _arrays(rows: list[dict]):
    n = np.array([r["params"] for r in rows], dtype=np.float64)
    d = np.array([r["tokens"] for r in rows], dtype=np.float64)
    loss = np.array([r["val_loss"] for r in rows], dtype=np.float64)
    budgets = sorted({r["budget"] for r in rows})
    return n, d, loss, [budgets.index(r["budget"]) for r in rows]


def fit_forms(rows: list[dict], *, resamples: int, seed: int, notes: list[str] | None = None) -> dict[str, FormFit]:
    """Both forms on `rows` (finished runs) with their bootstraps; the coupled form only where it can be
    fitted (6 runs, 2 budgets), else a note. Raises UsageError if even the separable fit cannot be made."""
    n, d, loss, groups = _arrays(rows)
    chin = F.fit_parametric(n, d, loss)
    forms = {"chinchilla": FormFit(chin, F.bootstrap_parametric(n, d, loss, chin, resamples=resamples, seed=seed,
                                                                 groups=groups), F.log_residuals(chin, n, d, loss))}
    if len(rows) < 6 or len(set(groups)) < MIN_FIT_BUDGETS:
        if notes is not None:
            notes.append(f"the coupled L(N, D) form needs 6 runs over {MIN_FIT_BUDGETS} budgets, got {len(rows)} "
                         f"over {len(set(groups))}: the interval has no competing-form part")
        return forms
    coupled = F.fit_parametric(n, d, loss, form="coupled", separable=chin)
    forms["coupled"] = FormFit(coupled, F.bootstrap_parametric(n, d, loss, coupled, resamples=resamples, seed=seed,
                                                               groups=groups), F.log_residuals(coupled, n, d, loss))
    return forms


def band(folds: list[dict], budget: float, c_max: float) -> float:
    """The backtest band at `budget` for a fit whose largest budget is `c_max`: the largest |log error| of
    any backtest run, scaled by (distance of this prediction) / (distance of its fold), at least 1x.
    0 when there are no backtests."""
    m = 0.0
    distance = math.log(budget / c_max)
    for fold in folds:
        scale = max(distance / fold["distance"], 1.0)
        for run in fold["runs"]:
            m = max(m, abs(run["error"]) * scale)
    return m


def per_size(rows: list[dict], n: float, d: float) -> float | None:
    """The pure power law in D through the runs of size `n` (ln L on ln D, least squares), at `d`; None
    unless they span two token counts or more."""
    mine = [r for r in rows if r["params"] == n]
    x = np.log([r["tokens"] for r in mine])
    if len(np.unique(x)) < 2:
        return None
    slope, icpt = np.polyfit(x, np.log([r["val_loss"] for r in mine]), 1)
    return float(math.exp(icpt + slope * math.log(d)))


def stated_interval(forms: dict[str, FormFit], n: float, d: float, m: float, level: float,
                    rows: list[dict] | None = None) -> tuple[list[float], dict]:
    """([lo, hi], parts): the union of each form's bootstrap prediction interval, the backtest band (the
    separable prediction times exp(+-m)) and the per-size power law of `rows` at (n, d)."""
    parts = {name: list(f.interval(n, d, level)) for name, f in forms.items()}
    if m > 0:
        point = forms["chinchilla"].point(n, d)
        parts["backtest"] = [point * math.exp(-m), point * math.exp(m)]
    own = per_size(rows, n, d) if rows else None
    if own is not None:
        parts["per_size"] = [own, own]
    finite = [p for p in parts.values() if all(math.isfinite(x) for x in p)]
    if not finite:
        return [float("nan"), float("nan")], parts
    return [min(p[0] for p in finite), max(p[1] for p in finite)], parts


def backtests(ok: list[dict], *, resamples: int, seed: int, level: float) -> list[dict]:
    """Leave-the-future-out folds: for each budget C_k with MIN_FIT_BUDGETS budgets below it, fit on those,
    predict C_k's runs. Each fold (JSON-able) holds every held-out run's actual and predicted losses, the
    separable fit's log error, and whether the bootstrap interval and the stated interval (built as for a
    real prediction, with the band of the earlier folds) cover it."""
    budgets = sorted({r["budget"] for r in ok})
    folds: list[dict] = []
    for k in range(MIN_FIT_BUDGETS, len(budgets)):
        train = [r for r in ok if r["budget"] < budgets[k]]
        held = [r for r in ok if r["budget"] == budgets[k]]
        try:
            forms = fit_forms(train, resamples=resamples, seed=seed + k)
        except UsageError:  # too few runs below this budget: no fold here
            continue
        m = band(folds, budgets[k], budgets[k - 1])
        runs = []
        for r in held:
            boot = forms["chinchilla"].interval(r["params"], r["tokens"], level)
            stated, parts = stated_interval(forms, r["params"], r["tokens"], m, level, train)
            point = forms["chinchilla"].point(r["params"], r["tokens"])
            runs.append({"name": r["name"], "actual": r["val_loss"], "predicted": point,
                         **({"coupled": forms["coupled"].point(r["params"], r["tokens"])} if "coupled" in forms else {}),
                         **({"per_size": parts["per_size"][0]} if "per_size" in parts else {}),
                         "error": math.log(r["val_loss"] / point),
                         "inside_bootstrap": bool(boot[0] <= r["val_loss"] <= boot[1]),
                         "inside_stated": bool(stated[0] <= r["val_loss"] <= stated[1])})
        folds.append({"fit_budgets": budgets[:k], "budget": budgets[k], "distance": math.log(budgets[k] / budgets[k - 1]),
                      "band": m, "runs": runs})
    return folds


def coverage(folds: list[dict]) -> dict:
    runs = [r for f in folds for r in f["runs"]]
    return {"runs": len(runs), "folds": len(folds),
            "inside_bootstrap": sum(r["inside_bootstrap"] for r in runs),
            "inside_stated": sum(r["inside_stated"] for r in runs),
            "max_abs_error": max((abs(r["error"]) for r in runs), default=0.0)}
