"""From a ladder's results to its fits, a prediction for a bigger budget, and the check of that prediction.

`fit_ladder(rows)` takes `ladder.collect`'s rows (status 'ok' ones are fitted; diverged and excluded
ones are named in `notes`) and returns a JSON-able dict: per budget the IsoFLOP parabola and its
vertex, the power laws N_opt(C) and D_opt(C) with bootstrap intervals on their exponents, and the
parametric L(N, D) with bootstrap intervals on every parameter, the coupled form beside it, and the
backtests (muse.scaling.interval). `predict(fits, candidates)` picks the size the parametric fit says
is best at a budget among the runs that budget allows (each a whole depth, within one epoch) and gives
its loss with the stated 95% interval: the bootstrap's, widened by model-form error (interval.py).
`verdict(prediction, loss)` compares a verified run with it.

Everything is deterministic for the same rows (fixed bootstrap seeds), so the same runs give the same
ladder.json however they were scheduled. What it does not know: training or files (muse.scaling.ladder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from muse.common.errors import UsageError
from muse.scaling import fit as F
from muse.scaling import interval as IV

LEVEL = 0.95


@dataclass
class Fits:
    """The fitted objects behind the JSON (kept for prediction and plots)."""

    isoflop: list[F.IsoFlopFit]
    n_opt: F.PowerLaw | None
    d_opt: F.PowerLaw | None
    n_opt_boot: list[F.PowerLaw]
    d_opt_boot: list[F.PowerLaw]
    data: dict
    forms: dict[str, IV.FormFit]  # "chinchilla" (the separable L(N, D) fit) and "coupled" where fitted
    folds: list[dict]  # the backtests (JSON-able, also in data)
    rows: list[dict]  # the runs fitted (for the per-size part of the interval)

    @property
    def parametric(self) -> F.ParametricFit:
        return self.forms["chinchilla"].fit

    @property
    def boots(self) -> list[F.ParametricFit]:
        return self.forms["chinchilla"].boots

    @property
    def residuals(self) -> np.ndarray:
        return self.forms["chinchilla"].residuals

    @property
    def c_max(self) -> float:
        """The largest budget fitted."""
        return max(r["budget"] for r in self.rows)


def _d_at(budget: float, n_star: float, runs: list[dict]) -> float:
    """Tokens of a continuous size n_star at `budget`: C / flops_per_token(n_star), interpolated in log-log
    between the budget's runs (the per-token count has an attention term besides 6N)."""
    ns = np.log([r["params"] for r in runs])
    fpt = np.log([r["flops_per_token"] for r in runs])
    order = np.argsort(ns)
    slope = np.polyfit(ns, fpt, 1)[0] if len(runs) > 1 else 1.0
    x = math.log(n_star)
    lo, hi = ns[order[0]], ns[order[-1]]
    if lo <= x <= hi:
        f = np.interp(x, ns[order], fpt[order])
    else:  # outside the runs: extend along the fitted slope
        edge = order[0] if x < lo else order[-1]
        f = fpt[edge] + slope * (x - ns[edge])
    return budget / math.exp(f)


def _isoflops(ok: list[dict], notes: list[str]) -> tuple[list[F.IsoFlopFit], list[tuple[float, float]]]:
    """The parabola of each budget with >= 3 usable runs, and its (N*, D*)."""
    fits, opt = [], []
    for budget in sorted({r["budget"] for r in ok}):
        runs = [r for r in ok if r["budget"] == budget]
        if len(runs) < 3:
            notes.append(f"budget {budget:.3g}: {len(runs)} usable run(s) left, no parabola (needs 3)")
            continue
        try:
            iso = F.fit_isoflop(budget, [r["params"] for r in runs], [r["val_loss"] for r in runs])
        except UsageError as e:
            notes.append(str(e))
            continue
        if not iso.inside:
            notes.append(f"budget {budget:.3g}: the parabola's minimum (N = {iso.n_opt:.3g}) lies outside the sizes "
                         "trained; it is an extrapolation: add sizes on that side")
        fits.append(iso)
        opt.append((iso.n_opt, _d_at(budget, iso.n_opt, runs)))
    return fits, opt


def _isoflop_bootstrap(ok: list[dict], resamples: int, seed: int) -> tuple[list[F.PowerLaw], list[F.PowerLaw]]:
    """Power laws refitted on resamplings of each budget's runs (with replacement)."""
    rng = np.random.default_rng(seed)
    by_budget = {b: [r for r in ok if r["budget"] == b] for b in sorted({r["budget"] for r in ok})}
    by_budget = {b: rs for b, rs in by_budget.items() if len(rs) >= 3}
    n_boot, d_boot = [], []
    for _ in range(resamples):
        points = []
        for b, rs in by_budget.items():
            pick = [rs[i] for i in rng.choice(len(rs), size=len(rs), replace=True)]
            try:
                iso = F.fit_isoflop(b, [r["params"] for r in pick], [r["val_loss"] for r in pick])
            except UsageError:  # too few distinct sizes, or not convex: this resample says nothing
                continue
            points.append((b, iso.n_opt, _d_at(b, iso.n_opt, rs)))
        if len({p[0] for p in points}) >= 2:
            c, n, d = zip(*points)
            n_boot.append(F.fit_power_law(c, n))
            d_boot.append(F.fit_power_law(c, d))
    return n_boot, d_boot


def fit_ladder(rows: list[dict], *, resamples: int = 200, seed: int = 0) -> tuple[dict, Fits]:
    """(the JSON of every fit, the fitted objects). Refuses when too few runs finished to fit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead (6x measured)
    try:
        return _fit_ladder(rows, resamples, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_ladder(rows: list[dict], resamples: int, seed: int) -> tuple[dict, Fits]:
    ok = [r for r in rows if r["status"] == "ok" and not r.get("verify")]
    notes = [f"{r['name']}: {r['status']}: {r['reason']}" for r in rows
             if r["status"] in ("diverged", "excluded") and not r.get("verify")]
    if len(ok) < 5:
        raise UsageError(f"only {len(ok)} ladder run(s) finished; the L(N, D) fit needs at least 5 "
                         "(train the ladder first, or give more budgets and --sizes)")
    forms = IV.fit_forms(ok, resamples=resamples, seed=seed, notes=notes)
    par, boots, residuals = forms["chinchilla"].fit, forms["chinchilla"].boots, forms["chinchilla"].residuals
    folds = IV.backtests(ok, resamples=resamples, seed=seed, level=LEVEL)
    if not folds:
        notes.append(f"no backtest: it needs a budget above {IV.MIN_FIT_BUDGETS} fitted ones; the interval has no "
                     "backtest band and its coverage is unmeasured")

    isoflop, opt = _isoflops(ok, notes)
    n_law = d_law = None
    n_boot, d_boot = [], []
    if len(isoflop) >= 2:
        cs = [i.budget for i in isoflop]
        n_law = F.fit_power_law(cs, [o[0] for o in opt])
        d_law = F.fit_power_law(cs, [o[1] for o in opt])
        n_boot, d_boot = _isoflop_bootstrap(ok, resamples, seed)
    else:
        notes.append(f"{len(isoflop)} IsoFLOP parabola(s): the power laws N_opt(C), D_opt(C) need 2")

    data = {
        "parametric": {
            **{k: getattr(par, k) for k in F.PARAM_NAMES},
            "intervals": F.parameter_intervals(boots, LEVEL),
            "huber_delta": F.HUBER_DELTA, "objective": par.objective, "runs": len(ok), "resamples": len(boots),
            "residual_rms": float(np.sqrt(np.mean(residuals ** 2))),
            "a_opt": par.beta / (par.alpha + par.beta), "b_opt": par.alpha / (par.alpha + par.beta),
        },
        "coupled": _form_json(forms.get("coupled")),
        "backtests": folds,
        "coverage": IV.coverage(folds),
        "isoflop": [{**i.as_dict(), "d_opt": o[1]} for i, o in zip(isoflop, opt)],
        "n_opt": _law_json(n_law, n_boot),
        "d_opt": _law_json(d_law, d_boot),
        "level": LEVEL,
        "notes": notes,
    }
    return data, Fits(isoflop=isoflop, n_opt=n_law, d_opt=d_law, n_opt_boot=n_boot, d_opt_boot=d_boot, data=data,
                      forms=forms, folds=folds, rows=ok)


def _form_json(form: IV.FormFit | None) -> dict | None:
    if form is None:
        return None
    return {**form.fit.as_dict(), "intervals": F.parameter_intervals(form.boots, LEVEL),
            "resamples": len(form.boots), "residual_rms": float(np.sqrt(np.mean(form.residuals ** 2)))}


def _law_json(law: F.PowerLaw | None, boot: list[F.PowerLaw]) -> dict | None:
    if law is None:
        return None
    return {**law.as_dict(), "exponent_interval": list(F.interval([b.exponent for b in boot], LEVEL)),
            "resamples": len(boot)}


def predict(fits: Fits, budget: float, candidates: list[dict]) -> dict:
    """The compute-optimal run at `budget` by the parametric fit, among `candidates` (RunSpec dicts of
    every depth at that budget; excluded ones, e.g. beyond one epoch, are not chosen but are named)."""
    par = fits.parametric
    usable = [c for c in candidates if not c["excluded"]]
    if not usable:
        raise UsageError(f"no depth can spend {budget:.3g} FLOPs within the rules (--min-steps, one epoch of data); "
                         "predict a smaller budget or prepare more data")
    pred = lambda c: float(par.loss(c["params"], c["tokens"]))  # noqa: E731
    best = min(usable, key=pred)
    best_any = min(candidates, key=pred)
    try:  # a fit with alpha or beta <= 0 has no compute-optimal split; the best allowed depth still stands
        n_star, d_star = par.optimal_split(budget / 6.0)
        optimum = {"params": n_star, "tokens": d_star}
    except UsageError:
        optimum = None
    band = IV.band(fits.folds, budget, fits.c_max)
    stated, parts = IV.stated_interval(fits.forms, best["params"], best["tokens"], band, LEVEL, fits.rows)
    mean_lo, mean_hi = F.interval([float(b.loss(best["params"], best["tokens"])) for b in fits.boots], LEVEL)
    out = {
        "budget": budget, "name": best["name"], "depth": best["depth"], "params": best["params"],
        "tokens": best["tokens"], "flops": best["flops"], "steps": best["steps"],
        "loss": pred(best), "interval": stated, "interval_parts": parts, "backtest_band": band,
        "fit_interval": [mean_lo, mean_hi],
        "coupled_loss": fits.forms["coupled"].point(best["params"], best["tokens"]) if "coupled" in fits.forms else None,
        "per_size_loss": parts["per_size"][0] if "per_size" in parts else None,
        "continuous_optimum": optimum,  # None where the fit has none (alpha or beta <= 0)
        "isoflop_n_opt": float(fits.n_opt(budget)) if fits.n_opt else None,
        "isoflop_d_opt": float(fits.d_opt(budget)) if fits.d_opt else None,
        "note": "",
    }
    if fits.n_opt_boot:
        out["isoflop_n_opt_interval"] = list(F.interval([float(b(budget)) for b in fits.n_opt_boot], LEVEL))
    if best_any is not best:
        out["note"] = (f"depth {best_any['depth']} would be better by the fit ({pred(best_any):.4f}) but is excluded "
                       f"({best_any['excluded']}); depth {best['depth']} is the best allowed")
    return out


def verdict(prediction: dict, loss: float) -> dict:
    lo, hi = prediction["interval"]
    return {"actual": loss, "predicted": prediction["loss"], "error": (loss - prediction["loss"]) / prediction["loss"],
            "inside_interval": bool(lo <= loss <= hi)}
