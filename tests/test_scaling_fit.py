"""muse.scaling.fit and .analysis: the fits recover a known law from noisy synthetic runs, within their
bootstrap intervals; the batched L-BFGS matches torch.optim.LBFGS; bad ladders are refused clearly."""

import math

import numpy as np
import pytest
import torch

from muse.common.errors import UsageError
from muse.scaling import analysis
from muse.scaling import fit as F

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
