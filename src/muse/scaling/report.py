"""The ladder's pictures and report.md: IsoFLOP curves, the loss-vs-compute envelope, N_opt(C), prediction vs actual.

`write_report(ladder_dir, ladder, fits)` draws four PNGs (matplotlib, Agg backend, written atomically)
and RUN/ladder/report.md with the runs table, the fits with their intervals, the backtests and the
prediction with how its interval was made. It reads only the ladder.json dict and the fitted objects;
it knows nothing of training.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from muse.common.paths import atomic_write_bytes, atomic_write_text
from muse.scaling.analysis import Fits
from muse.scaling.ladder import format_flops

PLOTS = {"isoflop": "isoflop.png", "envelope": "envelope.png", "n_opt": "n_opt.png", "prediction": "prediction.png"}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    return plt, fig, ax


def _finish(plt, fig, ax, out: Path, *, xlabel: str, ylabel: str, title: str, grid: str = "major") -> None:
    """Labels, title, grid and legend as every plot here has them; then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which=grid)
    ax.legend(fontsize=8)
    _save(plt, fig, out)


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.85) for i in range(n)]


def plot_isoflop(ladder: dict, fits: Fits, out: Path) -> None:
    """Loss against N per budget, its parabola and minimum; the parametric fit's curve dashed."""
    plt, fig, ax = _figure()
    ok = [r for r in ladder["runs"] if r["status"] == "ok" and not r["verify"]]
    budgets = sorted({r["budget"] for r in ok})
    iso = {i.budget: i for i in fits.isoflop}
    for color, b in zip(_colors(len(budgets)), budgets):
        runs = sorted((r for r in ok if r["budget"] == b), key=lambda r: r["params"])
        n = np.array([r["params"] for r in runs], dtype=float)
        ax.plot(n, [r["val_loss"] for r in runs], "o", color=color, label=f"C = {format_flops(b)}")
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
        d = np.array([b / r["flops_per_token"] for r in runs])  # tokens per size at this budget
        line = np.polyfit(np.log(n), np.log(d), 1) if len(n) > 1 else (-1.0, math.log(d[0] * n[0]))  # D ~ C / N
        ax.plot(grid, fits.parametric.loss(grid, np.exp(np.polyval(line, np.log(grid)))),
                "--", lw=0.8, color=color, alpha=0.7)
        if b in iso:
            c2, c1, c0 = iso[b].coef
            x = np.log(grid)
            ax.plot(grid, c2 * x * x + c1 * x + c0, "-", lw=1, color=color)
            ax.plot([iso[b].n_opt], [iso[b].loss_opt], "*", ms=12, color=color, mec="k")
    for r in ladder["runs"]:
        if r["status"] == "diverged":
            ax.annotate(f"{r['name']} diverged", (r["params"], ax.get_ylim()[1]), fontsize=7, color="red")
    ax.set_xscale("log")
    _finish(plt, fig, ax, out, xlabel="N: parameters (non-embedding + head)", ylabel="final val loss (nats/token)",
            title="IsoFLOP profiles: parabola in log N (solid), L(N, D) fit (dashed), minima (*)")


def plot_envelope(ladder: dict, fits: Fits, out: Path) -> None:
    """Every run's loss against its compute; the best per budget (the envelope); the prediction."""
    plt, fig, ax = _figure()
    ok = [r for r in ladder["runs"] if r["status"] == "ok" and not r["verify"]]
    ax.plot([r["flops"] for r in ok], [r["val_loss"] for r in ok], "o", color="0.6", ms=4, label="ladder runs")
    budgets = sorted({r["budget"] for r in ok})
    best = [min((r for r in ok if r["budget"] == b), key=lambda r: r["val_loss"]) for b in budgets]
    ax.plot([r["flops"] for r in best], [r["val_loss"] for r in best], "o-", color="C0", label="best per budget")
    _prediction_marks(ax, ladder)
    ax.set_xscale("log")
    _finish(plt, fig, ax, out, xlabel="C: training FLOPs (6N + 12 L d T per token)", ylabel="final val loss (nats/token)",
            title="loss vs compute")


def _prediction_marks(ax, ladder: dict) -> None:
    pred = ladder.get("prediction")
    if not pred:
        return
    lo, hi = pred["interval"]
    ax.errorbar([pred["flops"]], [pred["loss"]], yerr=_bar(pred["loss"], lo, hi), fmt="s",
                color="C3", capsize=4, label=f"predicted, depth {pred['depth']} (95% interval)")
    ver = ladder.get("verify")
    if ver:
        ax.plot([pred["flops"]], [ver["actual"]], "x", color="k", ms=10, mew=2,
                label=f"actual ({ver['error']:+.2%})")


def _bar(center: float, lo: float, hi: float) -> list[list[float]]:
    """matplotlib's (minus, plus) error lengths, never negative."""
    return [[max(center - lo, 0.0)], [max(hi - center, 0.0)]]


def plot_n_opt(ladder: dict, fits: Fits, out: Path) -> None:
    """The IsoFLOP minima against compute and the power law through them, with the parametric optimum."""
    plt, fig, ax = _figure()
    iso = ladder["fits"]["isoflop"]
    if iso:
        ax.plot([i["budget"] for i in iso], [i["n_opt"] for i in iso], "*", ms=12, color="C0", label="IsoFLOP minima")
    budgets = [i["budget"] for i in iso] or sorted({r["budget"] for r in ladder["runs"]})
    pred = ladder.get("prediction")
    c_max = max(budgets + ([pred["budget"]] if pred else []))
    grid = np.geomspace(min(budgets) / 1.5, c_max * 1.5, 50)
    if fits.n_opt is not None:
        law = ladder["fits"]["n_opt"]
        ax.plot(grid, fits.n_opt(grid), "-", color="C0", label=f"N_opt ~ C^{law['exponent']:.2f}")
    a, b = fits.parametric.alpha, fits.parametric.beta
    if a > 0 and b > 0:
        ax.plot(grid, [fits.parametric.optimal_split(c / 6)[0] for c in grid], "--", color="C1",
                label=f"L(N, D) fit: N_opt ~ C^{b / (a + b):.2f}")
    if pred:
        ax.plot([pred["budget"]], [pred["params"]], "s", color="C3", label=f"predicted run (depth {pred['depth']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(plt, fig, ax, out, xlabel="C: training FLOPs", ylabel="N_opt: parameters",
            title="compute-optimal size", grid="both")


def plot_prediction(ladder: dict, fits: Fits, out: Path) -> None:
    """Fitted vs actual loss for every run, and the predicted run with its interval (and its actual)."""
    plt, fig, ax = _figure()
    ok = [r for r in ladder["runs"] if r["status"] == "ok" and not r["verify"]]
    fitted = [float(fits.parametric.loss(r["params"], r["tokens"])) for r in ok]
    ax.plot(fitted, [r["val_loss"] for r in ok], "o", color="0.5", ms=4, label="ladder runs (fitted)")
    pred, ver = ladder.get("prediction"), ladder.get("verify")
    values = fitted + [r["val_loss"] for r in ok]
    if pred:
        lo, hi = pred["interval"]
        actual = ver["actual"] if ver else pred["loss"]
        # the interval belongs to the prediction: a horizontal bar; the run is inside it if the bar crosses y = x
        ax.errorbar([pred["loss"]], [actual], xerr=_bar(pred["loss"], lo, hi), fmt="s" if ver else "D", color="C3",
                    capsize=4, label=("verified run: actual vs predicted" if ver else "prediction") + " (95% interval)")
        values += [lo, hi, actual]
    lim = [min(values) * 0.98, max(values) * 1.02]
    ax.plot(lim, lim, "-", color="k", lw=0.6)
    ax.fill_between(lim, [v * 0.97 for v in lim], [v * 1.03 for v in lim], color="C2", alpha=0.12, label="within 3%")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    _finish(plt, fig, ax, out, xlabel="predicted val loss (L(N, D) fit)", ylabel="actual val loss",
            title="prediction vs actual")


def _fmt_iv(iv) -> str:
    return f"[{iv[0]:.4g}, {iv[1]:.4g}]"


def _coupled_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    iv = c["intervals"]
    return [f"Coupled form L = E + A / N^alpha + B / (N^gamma D^beta) (the N x D interaction; gamma = 0 is the fit above): "
            f"E {c['E']:.4g}, A {c['A']:.4g}, B {c['B']:.4g}, alpha {c['alpha']:.3f}, beta {c['beta']:.3f}, "
            f"**gamma {c['gamma']:+.3f}** (95% {_fmt_iv(iv['gamma'])}), residual rms {c['residual_rms']:.2%}.", ""]


def _backtest_lines(fits: dict) -> list[str]:
    folds = fits.get("backtests") or []
    if not folds:
        return ["Backtests: none (they need a budget above two fitted ones).", ""]
    cov = fits["coverage"]
    lines = ["Backtests (fit on the smaller budgets, predict the next; error = ln(actual / separable prediction)):", "",
             "| fitted on | run | actual | separable | coupled | per size | error | in bootstrap 95% | in stated 95% |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for f in folds:
        fitted = ", ".join(format_flops(b) for b in f["fit_budgets"])
        for r in f["runs"]:
            coupled = f"{r['coupled']:.4f}" if "coupled" in r else "-"
            own = f"{r['per_size']:.4f}" if "per_size" in r else "-"
            lines.append(f"| {fitted} | {r['name']} | {r['actual']:.4f} | {r['predicted']:.4f} | {coupled} | {own} | "
                         f"{r['error']:+.2%} | {'yes' if r['inside_bootstrap'] else 'no'} | "
                         f"{'yes' if r['inside_stated'] else 'no'} |")
    lines += ["", f"Coverage on backtests: the stated interval held {cov['inside_stated']} of {cov['runs']} held-out runs, "
              f"the bootstrap interval alone {cov['inside_bootstrap']} ({cov['folds']} fold(s); largest |error| "
              f"{cov['max_abs_error']:.2%}).", ""]
    return lines


def _interval_lines(pred: dict) -> list[str]:
    """How the stated interval was made: its parts, each a line."""
    parts = pred.get("interval_parts") or {}
    names = {"chinchilla": "separable fit: bootstrap over runs x a residual drawn at random (parameter noise and scatter)",
             "coupled": "coupled form, the same way (model-form error: the N x D interaction)",
             "backtest": f"backtest band: the separable prediction x exp(+-{pred.get('backtest_band', 0.0):.2%}), the "
                         "largest backtest error scaled to this distance (model-form error, measured)",
             "per_size": "this size's own runs: a pure power law in D (no floor, no shared exponents) carried to "
                         "this D (model-form error: the opposite assumptions)"}
    lines = ["The stated interval is the union of:", ""]
    lines += [f"- {_fmt_iv(v)}: {names.get(k, k)}" for k, v in parts.items()]
    if pred.get("coupled_loss") is not None:
        lines += [f"- (the coupled form's own prediction: {pred['coupled_loss']:.4f})"]
    return lines


def write_report(ladder_dir: Path, ladder: dict, fits: Fits, *, wall: dict | None = None) -> Path:
    """The four PNGs and report.md in `ladder_dir` (RUN/ladder); returns report.md's path."""
    for name, fn in (("isoflop", plot_isoflop), ("envelope", plot_envelope), ("n_opt", plot_n_opt),
                     ("prediction", plot_prediction)):
        fn(ladder, fits, ladder_dir / PLOTS[name])
    s, p = ladder["settings"], ladder["fits"]["parametric"]
    lines = ["# Scaling ladder", "",
             f"{len([r for r in ladder['runs'] if r['status'] == 'ok' and not r['verify']])} runs on "
             f"{ladder['data']['train_tokens']:,} train tokens (vocab {ladder['data']['vocab_size']:,}); "
             f"seq {s['seq_len']}, batch {s['batch_size']} sequences, FLOPs per token = {s['flop_count']}; "
             f"every run's learning rates from the depth rule and its schedule scaled to its length.", "",
             "| run | depth | N | D (tokens) | D/N | C (FLOPs) | steps | val loss | fit | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ladder["runs"]:
        fitted = float(fits.parametric.loss(r["params"], r["tokens"]))
        loss = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {r['name']} | {r['depth']} | {r['params']:,} | {r['tokens']:,} | {r['tokens'] / r['params']:.2f} | "
                     f"{format_flops(r['flops'])} | {r['steps']} | {loss} | {fitted:.4f} | {status} |")
    iv = p["intervals"]
    lines += ["", "## Fits", "",
              f"L(N, D) = E + A / N^alpha + B / D^beta (Huber delta {p['huber_delta']} on log residuals, L-BFGS from "
              f"the best grid starts; 95% intervals from {p['resamples']} bootstrap refits over runs; "
              f"residual rms {p['residual_rms']:.2%}):", "",
              "| | fit | 95% interval |", "|---|---:|---|"]
    for k in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {k} | {p[k]:.4g} | {_fmt_iv(iv[k])} |")
    lines += ["", f"Compute-optimal split implied by the fit: N_opt ~ C^{p['a_opt']:.3f}, D_opt ~ C^{p['b_opt']:.3f}.", ""]
    lines += _coupled_lines(ladder["fits"].get("coupled")) + _backtest_lines(ladder["fits"])
    if ladder["fits"]["isoflop"]:
        lines += ["IsoFLOP minima (parabola in ln N per budget):", "", "| budget | N_opt | D_opt | min loss | inside the sizes |",
                  "|---:|---:|---:|---:|---|"]
        for i in ladder["fits"]["isoflop"]:
            lines.append(f"| {format_flops(i['budget'])} | {i['n_opt']:,.0f} | {i['d_opt']:,.0f} | {i['loss_opt']:.4f} | "
                         f"{'yes' if i['inside'] else 'no (extrapolated)'} |")
        lines.append("")
    for key, label in (("n_opt", "N_opt(C)"), ("d_opt", "D_opt(C)")):
        law = ladder["fits"][key]
        if law:
            lines.append(f"- {label} = {law['k']:.4g} C^{law['exponent']:.3f} (exponent 95% interval "
                         f"{_fmt_iv(law['exponent_interval'])}, {law['resamples']} resamples)")
    lines += [f"- note: {n}" for n in ladder["fits"]["notes"]]
    lines += ["", "![IsoFLOP profiles](isoflop.png) ![loss vs compute](envelope.png)", "",
              "![N_opt(C)](n_opt.png) ![prediction vs actual](prediction.png)", ""]
    pred = ladder.get("prediction")
    if pred:
        lines += ["## Prediction", "",
                  f"At C = {format_flops(pred['budget'])}: depth {pred['depth']} (N = {pred['params']:,}, "
                  f"D = {pred['tokens']:,} tokens, {pred['steps']} steps), predicted val loss **{pred['loss']:.4f}**, "
                  f"95% interval **{_fmt_iv(pred['interval'])}** (the mean curve alone: {_fmt_iv(pred['fit_interval'])}).",
                  "", *_interval_lines(pred), "",
                  (f"Continuous optimum of the fit: N = {pred['continuous_optimum']['params']:,.0f}, "
                   f"D = {pred['continuous_optimum']['tokens']:,.0f}" if pred["continuous_optimum"]
                   else "The fit has no continuous optimum (alpha or beta <= 0): the sizes do not bracket it")
                  + (f"; IsoFLOP power law: N_opt = {pred['isoflop_n_opt']:,.0f}" if pred.get("isoflop_n_opt") else "")
                  + ".", ""]
        if pred["note"]:
            lines += [f"Note: {pred['note']}.", ""]
        ver = ladder.get("verify")
        if ver:
            lines += ["| | val loss |", "|---|---:|", f"| predicted | {ver['predicted']:.4f} |",
                      f"| actual ({pred['name']}) | {ver['actual']:.4f} |", f"| error | {ver['error']:+.2%} |",
                      f"| inside the 95% interval | {'yes' if ver['inside_interval'] else 'no'} |", ""]
    if wall:
        total = sum(wall.values())
        lines += [f"Training time, summed over runs (inside `muse train`): {total:.0f} s.", ""]
    lines += ["Rebuild: rerun the same `muse ladder` command (finished runs are kept). Data: ladder.json.", ""]
    out = ladder_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
