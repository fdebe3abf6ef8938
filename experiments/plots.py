"""The plots of the sweep reports (experiments/report.py): return curves over seeds and the budget curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atomic_io import atomic_write
from experiments.runs import arm_color, window_label


def _figure(size, rows: int, cols: int):
    from matplotlib.figure import Figure  # no pyplot: savefig picks the Agg canvas for a png itself

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path, title: str, dpi: int) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)


def _curve_band(ax, curves: list, color: str, label: str, smooth_from: int | None = None) -> int:
    """Mean ± std over seeds of equal-length curves (a moving average when they reach smooth_from)."""
    n = min(map(len, curves))
    c = np.asarray([cv[:n] for cv in curves])
    mean, std = c.mean(0), (c.std(0, ddof=1) if len(c) > 1 else np.zeros(n))
    smooth = 10 if smooth_from and n >= smooth_from else 1
    if smooth > 1:  # 500 noisy points: a 10-episode moving average reads better
        k = np.ones(smooth) / smooth
        mean, std = np.convolve(mean, k, "valid"), np.convolve(std, k, "valid")
    x = np.arange(1, len(mean) + 1) + (smooth - 1)
    ax.plot(x, mean, color=color, label=f"{label} ({len(c)} seeds)")
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    return smooth


def _curve_axes(ax, title: str, src, n_episodes, opt, ep_hist=None) -> None:
    """The reference lines (the source algorithm's own curve, the optimum, the source history length) and
    the labels of a return-curve panel."""
    if src:  # what AD distils: the source algorithm learning the same held-out goals from scratch
        n_src = min(len(src), n_episodes or len(src))
        ax.plot(np.arange(1, n_src + 1), src[:n_src], color="k", linewidth=1, alpha=0.6, linestyle="-.",
                label="source algorithm (its histories)")
    if opt:
        ax.axhline(opt, color="k", linestyle="--", linewidth=1, label=f"optimal ({opt:.2f})")
    if ep_hist and n_episodes and ep_hist <= n_episodes:
        ax.axvline(ep_hist, color="k", linestyle=":", linewidth=1, label=f"source history length ({ep_hist} ep.)")
    ax.set_title(title, fontsize=10)
    ax.set(xlabel="episode (in context, frozen weights)", ylabel="mean return (± std over training seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def compare_plot(path: Path, rep: dict) -> None:
    fig, axes = _figure((13, 4.6), 1, 2)
    for ax, key, ev in ((axes[0, 0], "curve", rep["eval"]), (axes[0, 1], "long_curve", rep["long_eval"])):
        smooth = 1
        for arm in rep["arms"]:
            curves = [p[key] for p in rep["results"][arm]["per_seed"].values() if p.get(key)]
            if curves:
                smooth = _curve_band(ax, curves, arm_color(arm), arm, 100 if key == "long_curve" else None)
        title = f"{'long rollout' if key == 'long_curve' else 'held-out goals'}, {ev['n_episodes']} episodes"
        _curve_axes(ax, title + (f" ({smooth}-episode moving average)" if smooth > 1 else ""),
                    rep["dataset"].get("source_curve_test"), ev["n_episodes"], rep["eval"].get("optimal_mean"),
                    rep["dataset"].get("episodes_per_history") if key == "long_curve" else None)
    _save(fig, path, f"Does pretraining help? {rep['scale']}, {rep['date']}", 110)


def budget_plot(path: Path, rep: dict, ylabels: dict) -> None:
    """Test NLL and return against stage-2 steps and against total compute, one line per arm."""
    fig, axes = _figure((12, 8), 2, 2)
    for i, key in enumerate(("heldout_loss_same_position", "return_last5")):
        for j, xkey in enumerate(("stage2_steps", "compute_stage2_step_equiv")):
            ax = axes[i, j]
            for arm in rep["arms"]:
                pts = [(r[xkey], r[key], r[f"{key}_std"] or 0.0) for r in rep["rows"]
                       if r["arm"] == arm and r[xkey] is not None and r[key] is not None]
                if pts:
                    x, y, e = map(np.asarray, zip(*pts))
                    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=arm_color(arm), label=arm)
            ax.set(xscale="log", ylabel=ylabels[key],
                   xlabel="stage-2 steps" if j == 0 else "total compute (stage-2-step equivalents, incl. stage 1)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    _save(fig, path, f"Does pretraining help? {rep['scale']}, {rep['date']}", 100)


def memory_plot(path: Path, rep: dict) -> None:
    """One panel per env: each row's test-goal return curve over seeds, labelled with its window."""
    envs = sorted({r["env"] for r in rep["rows"]}) or ["-"]
    fig, axes = _figure((6.5 * len(envs), 4.6), 1, len(envs))
    for ax, env in zip(axes[0], envs):
        opt = None
        for r in (r for r in rep["rows"] if r["env"] == env):
            curves = [p["curve"] for p in r["per_seed"].values() if p.get("curve")]
            if curves:
                _curve_band(ax, curves, arm_color(r["arm"]), f"{r['arm']} (window {window_label(r)})")
                opt = opt or next(p["optimal_mean"] for p in r["per_seed"].values() if p.get("curve"))
        n_ep = next((p["n_episodes"] for r in rep["rows"] for p in r["per_seed"].values() if p.get("n_episodes")), None)
        _curve_axes(ax, f"{env}: held-out goals, {n_ep} episodes",
                    (rep["datasets"].get(env) or {}).get("source_curve_test"), n_ep, opt)
    _save(fig, path, f"Memory table, {rep['scale']}, {rep['date']}", 100)
