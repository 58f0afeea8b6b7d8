"""muse.scaling.fit and .analysis: the fits recover a known law from noisy synthetic runs, within their
bootstrap intervals; the batched L-BFGS matches torch.optim.LBFGS; bad ladders are refused clearly."""

import json
import math

import numpy as np
import pytest
import torch

from muse.common.errors import UsageError
from muse.scaling import analysis
from muse.scaling import fit as F
from muse.scaling import interval as IV

pytestmark = pytest.mark.usefixtures("one_thread")

TRUE = {"E": 1.7, "A": 400.0, "B": 1000.0, "alpha": 0.34, "beta": 0.28}
BUDGETS = (1e15, 4e15, 1.6e16)


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def synthetic_rows(noise=0.003, seed=0, sizes=6, budgets=BUDGETS):
    """Ladder rows (as ladder.collect makes them) from the known law times log-normal noise; C = 6 N D."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in budgets:
        for n in np.geomspace(1e5, 3e7, sizes) * (b / 1e15) ** 0.5:
            d = b / (6 * n)
            rows.append({"name": f"{b:.0e}-{n:.0f}", "budget": b, "params": int(n), "tokens": int(d), "flops": b,
                         "flops_per_token": 6.0 * int(n), "depth": 0, "verify": False, "status": "ok",
                         "val_loss": float(true_loss(int(n), int(d)) * math.exp(rng.normal(0, noise)))})
    return rows


@pytest.fixture(scope="module")
def fitted():
    rows = synthetic_rows()
    return rows, *analysis.fit_ladder(rows, resamples=200)


def test_parametric_fit_recovers_exponents_and_E_within_bootstrap_interval(fitted):
    _, data, _ = fitted
    p = data["parametric"]
    for k in ("E", "alpha", "beta"):
        lo, hi = p["intervals"][k]
        assert lo <= TRUE[k] <= hi, (k, TRUE[k], (lo, hi))
        assert hi - lo < 0.5 * TRUE[k], (k, lo, hi)  # an interval that says something
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.02 and abs(p["beta"] - TRUE["beta"]) < 0.02
    assert abs(p["E"] - TRUE["E"]) < 0.15
    assert p["residual_rms"] < 0.006  # about the noise put in (0.3%)
    assert p["runs"] == 18 and p["resamples"] == 200


def test_noise_free_fit_is_exact():
    rows = synthetic_rows(noise=0.0)
    fit = F.fit_parametric([r["params"] for r in rows], [r["tokens"] for r in rows], [r["val_loss"] for r in rows])
    for k, v in TRUE.items():
        assert getattr(fit, k) == pytest.approx(v, rel=2e-3), k


def test_isoflop_minima_and_power_laws_follow_the_law(fitted):
    _, data, fits = fitted
    a, b = TRUE["alpha"], TRUE["beta"]
    # Chinchilla eq. 4: N_opt ~ C^(beta / (alpha + beta)) and D_opt ~ C^(alpha / (alpha + beta))
    assert data["n_opt"]["exponent"] == pytest.approx(b / (a + b), abs=0.05)
    assert data["d_opt"]["exponent"] == pytest.approx(a / (a + b), abs=0.05)
    lo, hi = data["n_opt"]["exponent_interval"]
    assert lo <= b / (a + b) <= hi
    g = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b))
    for iso in data["isoflop"]:
        assert iso["inside"]
        assert iso["n_opt"] == pytest.approx(g * (iso["budget"] / 6) ** (b / (a + b)), rel=0.25)
        assert iso["n_opt"] * iso["d_opt"] * 6 == pytest.approx(iso["budget"], rel=1e-6)


def test_isoflop_vertex_of_an_exact_parabola():
    n = np.exp(np.array([10.0, 11.0, 12.0, 13.0]))
    loss = 0.5 * (np.log(n) - 11.4) ** 2 + 3.0
    iso = F.fit_isoflop(1e12, n, loss)
    assert math.log(iso.n_opt) == pytest.approx(11.4) and iso.loss_opt == pytest.approx(3.0) and iso.inside
    edge = F.fit_isoflop(1e12, n, 0.5 * (np.log(n) - 14.0) ** 2)
    assert not edge.inside


def test_prediction_at_4x_the_largest_budget_covers_the_truth(fitted):
    _, _, fits = fitted
    c = 4 * BUDGETS[-1]
    cands = []
    for i, n in enumerate(np.geomspace(1e5, 1e9, 40)):
        n = int(n)
        cands.append({"name": f"c{i}", "depth": i + 1, "params": n, "tokens": int(c / (6 * n)), "flops": c,
                      "steps": 100, "excluded": ""})
    pred = analysis.predict(fits, c, cands)
    truth = true_loss(pred["params"], pred["tokens"])
    lo, hi = pred["interval"]
    assert lo <= truth <= hi
    assert abs(pred["loss"] / truth - 1) < 0.01
    assert pred["interval"][0] <= pred["fit_interval"][0] <= pred["fit_interval"][1] <= pred["interval"][1]
    # excluded candidates are never chosen, and the better excluded one is named
    best = pred["name"]
    for cand in cands:
        cand["excluded"] = "beyond one epoch" if cand["name"] == best else ""
    other = analysis.predict(fits, c, cands)
    assert other["name"] != best and "beyond one epoch" in other["note"]
    v = analysis.verdict(pred, truth)
    assert v["inside_interval"] and v["error"] == pytest.approx(truth / pred["loss"] - 1)


def test_diverged_and_excluded_runs_are_left_out_and_named():
    rows = synthetic_rows(sizes=4, budgets=BUDGETS[:2])
    rows[1] = {**rows[1], "status": "diverged", "reason": "loss became nan at step 7", "val_loss": float("nan")}
    rows.append({**rows[0], "name": "late", "status": "excluded", "reason": "beyond one epoch: 9 tokens > 8"})
    data, _ = analysis.fit_ladder(rows, resamples=20)
    assert data["parametric"]["runs"] == 7
    notes = " | ".join(data["notes"])
    assert f"{rows[1]['name']}: diverged: loss became nan" in notes and "late: excluded: beyond one epoch" in notes


def test_too_few_runs_or_sizes_are_refused():
    rows = synthetic_rows(sizes=2, budgets=BUDGETS[:2])
    with pytest.raises(UsageError, match="needs at least 5"):
        analysis.fit_ladder(rows, resamples=10)
    with pytest.raises(UsageError, match="at least 3 sizes"):
        F.fit_isoflop(1e12, [1e6, 2e6], [3.0, 2.9])
    with pytest.raises(UsageError, match="not convex"):
        F.fit_isoflop(1e12, [1e6, 2e6, 4e6], [3.0, 3.5, 3.0])
    with pytest.raises(UsageError, match="at least 2 budgets"):
        F.fit_power_law([1e12, 1e12], [1e6, 2e6])
    rows = synthetic_rows(sizes=3, budgets=BUDGETS[:2])
    rows[0]["status"] = "diverged"
    rows[0]["reason"] = "loss became inf"
    data, _ = analysis.fit_ladder(rows, resamples=10)  # that budget keeps 2 sizes: no parabola, said so
    assert len(data["isoflop"]) == 1 and data["n_opt"] is None
    assert any("2 usable run(s) left" in n for n in data["notes"])


def test_batched_lbfgs_matches_torch_lbfgs():
    """The fast path (every start and bootstrap refit at once) against torch.optim.LBFGS, one problem at a time."""
    rows = synthetic_rows(noise=0.01, seed=3, sizes=4)
    logn, logd, logl = (torch.tensor(np.log([r[k] for r in rows]), dtype=torch.float64)[None]
                        for k in ("params", "tokens", "val_loss"))
    starts = F._best_grid_starts(logn, logd, logl, 3, F.HUBER_DELTA)[0]
    fn = lambda th: F._objective(th, logn, logd, logl, F.HUBER_DELTA)  # noqa: E731
    fast = fn(F.lbfgs_batched(fn, starts)).detach()
    for i, start in enumerate(starts):
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure(opt=opt, theta=theta):
            opt.zero_grad()
            v = fn(theta[None])[0]
            v.backward()
            return v

        opt.step(closure)
        ref = float(fn(theta.detach()[None])[0])
        assert float(fast[i]) <= ref * 1.01 + 1e-9, (i, float(fast[i]), ref)


# ---------------------------------------------------------------- the coupled form and the stated interval

COUPLED = {"E": 1.7, "A": 400.0, "B": 300.0, "alpha": 0.34, "beta": 0.28, "gamma": -0.02}


def law_rows(law, noise=0.003, seed=0, sizes=6, budgets=BUDGETS):
    """synthetic_rows for any law(n, d)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in budgets:
        for n in np.geomspace(1e5, 3e7, sizes) * (b / 1e15) ** 0.5:
            n, d = int(n), int(b / (6 * n))
            rows.append({"name": f"{b:.0e}-{n}", "budget": b, "params": n, "tokens": d, "flops": b,
                         "flops_per_token": 6.0 * n, "depth": 0, "verify": False, "status": "ok",
                         "val_loss": float(law(n, d) * math.exp(rng.normal(0, noise)))})
    return rows


def candidates(c):
    return [{"name": f"c{i}", "depth": i + 1, "params": int(n), "tokens": int(c / (6 * int(n))), "flops": c,
             "steps": 100, "excluded": ""} for i, n in enumerate(np.geomspace(1e5, 1e9, 40))]


def test_coupled_form_recovers_a_coupled_law_exactly():
    t = COUPLED
    rows = law_rows(lambda n, d: t["E"] + t["A"] / n ** t["alpha"] + t["B"] / (n ** t["gamma"] * d ** t["beta"]), noise=0.0)
    n, d, loss = ([r[k] for r in rows] for k in ("params", "tokens", "val_loss"))
    coupled = F.fit_parametric(n, d, loss, form="coupled")
    for k, v in t.items():
        assert getattr(coupled, k) == pytest.approx(v, rel=2e-3, abs=1e-4), k
    separable = F.fit_parametric(n, d, loss)
    assert coupled.objective < separable.objective / 1000  # nested: the separable start, then better
    assert separable.gamma is None and coupled.form == "coupled"
    with pytest.raises(UsageError, match="unknown L\\(N, D\\) form"):
        F.fit_parametric(n, d, loss, form="kaplan")
    with pytest.raises(UsageError, match="coupled L\\(N, D\\) fit has 6 parameters and needs at least 6"):
        F.fit_parametric(n[:5], d[:5], loss[:5], form="coupled")
    with pytest.raises(UsageError, match="no closed-form compute-optimal split"):
        coupled.optimal_split(1e15)


def test_stated_interval_on_a_known_law_covers_and_contains_the_bootstrap_one(fitted):
    _, data, fits = fitted
    assert data["coupled"]["intervals"]["gamma"][0] <= 0.0 <= data["coupled"]["intervals"]["gamma"][1]
    c = 4 * BUDGETS[-1]
    pred = analysis.predict(fits, c, candidates(c))
    lo, hi = pred["interval"]
    assert lo <= true_loss(pred["params"], pred["tokens"]) <= hi
    parts = pred["interval_parts"]
    assert set(parts) == {"chinchilla", "coupled", "backtest"} and pred["backtest_band"] > 0
    for plo, phi in parts.values():
        assert lo <= plo <= phi <= hi
    # a known, separable law: the form-error parts add little (the forms agree, the backtests err by the noise)
    assert hi - lo < 2.5 * (parts["chinchilla"][1] - parts["chinchilla"][0])


def test_form_error_widens_the_interval_for_a_misspecified_law():
    """Losses from Kaplan et al.'s joint law with an E (gamma 0.7: a bigger model gains more from more tokens),
    neither fitted form, on a ladder that trains the same 5 sizes at every budget (as `--sizes` does), with
    0.05% noise. The separable bootstrap interval misses the truth at 4x the largest budget, and 2 of the 5
    backtest runs; the form-error parts (coupled form, backtest band, each size's own power law) widen the
    stated interval to cover all of them."""
    law = lambda n, d: 1.7 + (400.0 / n ** 0.34 + 1000.0 / d ** 0.28) ** 0.7  # noqa: E731
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in np.geomspace(3e5, 1e7, 5)]
    rows = []
    for b in (1e15, 2e15, 4e15):
        for n in sizes:
            d = int(b / (6 * n))
            rows.append({"name": f"{b:.0e}-{n}", "budget": b, "params": n, "tokens": d, "flops": b,
                         "flops_per_token": 6.0 * n, "depth": 0, "verify": False, "status": "ok",
                         "val_loss": float(law(n, d) * math.exp(rng.normal(0, 0.0005)))})
    data, fits = analysis.fit_ladder(rows, resamples=60)
    c = 1.6e16
    pred = analysis.predict(fits, c, [{"name": f"c{i}", "depth": i + 1, "params": n, "tokens": int(c / (6 * n)),
                                       "flops": c, "steps": 100, "excluded": ""} for i, n in enumerate(sizes)])
    truth = law(pred["params"], pred["tokens"])
    boot = pred["interval_parts"]["chinchilla"]
    assert not boot[0] <= truth <= boot[1], (boot, truth)
    assert pred["interval"][0] <= truth <= pred["interval"][1], (pred["interval"], truth)
    assert pred["interval"][1] - pred["interval"][0] > 2 * (boot[1] - boot[0])
    assert {"coupled", "backtest", "per_size"} <= set(pred["interval_parts"])
    cov = data["coverage"]
    assert cov["runs"] == 5 and cov["inside_stated"] == 5 and cov["inside_bootstrap"] < 5


def test_backtest_band_scales_with_the_distance_and_never_shrinks():
    folds = [{"distance": math.log(2), "runs": [{"error": 0.01}, {"error": -0.02}]}]
    assert IV.band(folds, 4e12, 1e12) == pytest.approx(0.04)  # 4x out, fold 2x out: twice the largest error
    assert IV.band(folds, 2e12, 1e12) == pytest.approx(0.02)
    assert IV.band(folds, 1.5e12, 1e12) == pytest.approx(0.02)  # nearer than the fold: not scaled down
    assert IV.band([], 4e12, 1e12) == 0.0


def test_backtests_fit_on_the_smaller_budgets_and_count_coverage():
    rows = synthetic_rows(sizes=4, budgets=(1e15, 2e15, 4e15, 8e15))
    data, fits = analysis.fit_ladder(rows, resamples=30)
    folds = data["backtests"]
    assert [f["fit_budgets"] for f in folds] == [[1e15, 2e15], [1e15, 2e15, 4e15]]
    assert [f["budget"] for f in folds] == [4e15, 8e15]
    assert folds[0]["band"] == 0.0 and folds[1]["band"] > 0  # the second fold has the first to calibrate on
    assert [len(f["runs"]) for f in folds] == [4, 4]
    runs = [r for f in folds for r in f["runs"]]
    for r in runs:
        assert r["error"] == pytest.approx(math.log(r["actual"] / r["predicted"]))
        assert r["inside_stated"] or not r["inside_bootstrap"]  # the stated interval contains the bootstrap one
    cov = data["coverage"]
    assert cov == {"runs": 8, "folds": 2, "inside_bootstrap": sum(r["inside_bootstrap"] for r in runs),
                   "inside_stated": sum(r["inside_stated"] for r in runs),
                   "max_abs_error": max(abs(r["error"]) for r in runs)}
    assert fits.c_max == 8e15


def test_fit_ladder_is_deterministic_and_json_able():
    rows = synthetic_rows(sizes=4)
    a, _ = analysis.fit_ladder(rows, resamples=20)
    b, _ = analysis.fit_ladder(rows, resamples=20)
    assert json.dumps(a) == json.dumps(b)


def test_a_ladder_too_small_for_the_coupled_form_or_backtests_says_so():
    rows = synthetic_rows(sizes=3, budgets=BUDGETS[:2])[:5]  # 5 runs, 2 budgets: separable only, no fold
    data, fits = analysis.fit_ladder(rows, resamples=20)
    assert data["coupled"] is None and data["backtests"] == [] and data["coverage"]["runs"] == 0
    notes = " | ".join(data["notes"])
    assert "coupled L(N, D) form needs 6 runs" in notes and "no backtest" in notes
    c = 4 * BUDGETS[1]
    pred = analysis.predict(fits, c, candidates(c))
    assert set(pred["interval_parts"]) == {"chinchilla"} and pred["interval"] == pred["interval_parts"]["chinchilla"]
    assert pred["coupled_loss"] is None and pred["backtest_band"] == 0.0


def test_per_size_power_law_through_one_sizes_runs():
    rows = [{"params": 1000, "tokens": t, "val_loss": 9.0 * t ** -0.1} for t in (1e4, 2e4, 4e4)]
    rows.append({"params": 2000, "tokens": 1e4, "val_loss": 5.0})
    assert IV.per_size(rows, 1000, 1.6e5) == pytest.approx(9.0 * 1.6e5 ** -0.1)
    assert IV.per_size(rows, 2000, 1e5) is None  # one token count: no line
    assert IV.per_size(rows, 3000, 1e5) is None
    fits = analysis.fit_ladder(synthetic_rows(sizes=4), resamples=10)[1]
    stated, parts = IV.stated_interval(fits.forms, 1000, 1.6e5, 0.0, 0.95, rows)
    assert parts["per_size"] == [pytest.approx(9.0 * 1.6e5 ** -0.1)] * 2
    assert stated[0] <= parts["per_size"][0] <= stated[1]


def test_a_fit_without_a_compute_optimal_split_still_predicts_the_best_allowed_depth():
    import dataclasses

    fits = analysis.fit_ladder(synthetic_rows(sizes=4), resamples=10)[1]
    sep = fits.forms["chinchilla"]
    # alpha < 0 (a tiny ladder's fit can land there): bigger models look worse, no optimum exists
    fits.forms["chinchilla"] = IV.FormFit(dataclasses.replace(sep.fit, alpha=-0.05), sep.boots, sep.residuals)
    with pytest.raises(UsageError, match="no compute-optimal split"):
        fits.parametric.optimal_split(BUDGETS[-1] / 6)
    c = 4 * BUDGETS[-1]
    pred = analysis.predict(fits, c, candidates(c))
    assert pred["continuous_optimum"] is None
    assert pred["loss"] == pytest.approx(min(float(fits.parametric.loss(x["params"], x["tokens"])) for x in candidates(c)))
