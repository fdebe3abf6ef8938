"""The report of a sweep: a reader of finished run directories (nothing is run).

    python experiments/report.py results/compare-quick            # table.md, table.json, curves.png
    python experiments/report.py results/pretrain-budget-quick    # summary.json, table.md, budget.png
    python experiments/report.py results/memory-quick             # summary.json, table.md, curves.png

experiments/sweep.py calls `write(out)` when a multirun ends. It reads <out>/sweep.json (the command),
the job records <out>/jobs/*.json (arm, seed, budget, window, env, run dir, wall seconds; one per run,
written by the jobs) and every run dir's config.json, done.json and <out_name>.json (evaluate.py). The
experiment (the record's `sweep`) picks the report function: REPORTS[name](out, jobs, info) -> the
report dict, written by that function; adding an experiment is adding one here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write, atomic_write_text

# Arms in table order (others follow alphabetically); their colours in the plots.
ARM_ORDER = ("ad", "ad_3w", "ad_10w", "scratch", "rollout", "rollout_gated", "rollout_gated_rmt",
             "rollout_gated_bptt1", "rollout_gated_bptt10", "rollout_gated_nl20", "aux_recon", "pretrained_ft",
             "pretrained_frozen")
COLORS = {"ad": "tab:gray", "ad_3w": "tab:purple", "ad_10w": "black", "scratch": "tab:blue",
          "rollout": "tab:cyan", "rollout_gated": "tab:olive", "rollout_gated_rmt": "tab:pink",
          "rollout_gated_bptt1": "gold", "rollout_gated_bptt10": "darkgoldenrod", "rollout_gated_nl20": "teal",
          "aux_recon": "tab:orange", "pretrained_ft": "tab:green", "pretrained_frozen": "tab:red"}
SCALES = {"quick": "small scale", "full": "DICP scale"}


class ReportError(RuntimeError):
    """Nothing to report from the given folder; one line."""


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def load_jobs(out: Path) -> list[dict]:
    recs = [read_json(p) for p in sorted((Path(out) / "jobs").glob("*.json"))]
    return [r for r in recs if r]


def _arm_rank(arm: str) -> tuple:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def _mean_std(vals: list) -> tuple:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return mean, std, len(v)


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _split_summary(run_dir: Path, out_name: str) -> tuple[dict, dict]:
    """(eval json, its test-split summary) or ({}, {})."""
    ev = read_json(Path(run_dir) / f"{out_name}.json") or {}
    return ev, ((ev.get("splits") or {}).get("test") or {}).get("summary") or {}


def device_label(devices: set) -> str:
    devices = {d for d in devices if d}
    if any(str(d).startswith("cuda") for d in devices):
        try:
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001 -- only a label
            return "GPU"
    return f"a {os.cpu_count()}-core CPU"


def dataset_info(data_path: str | None) -> dict:
    meta = read_json(Path(data_path) / "meta.json") if data_path else None
    meta = meta or {}
    env = meta.get("env", {})
    ep_hist = meta["n_steps"] // env["horizon"] if meta.get("n_steps") and env.get("horizon") else None
    n_train = len(meta.get("split", {}).get("train_goals", []))
    return {"path": str(data_path), "n_stream": meta.get("n_stream"), "n_steps": meta.get("n_steps"),
            "episodes_per_history": ep_hist, "env": env.get("name"), "source_curve_test": meta.get("return_curve_test"),
            "summary": f"{env.get('name')}, {n_train} train goals x {meta.get('n_stream')} streams x "
                       f"{meta.get('n_steps')} steps"}


def timings(jobs: list[dict], out_dir: Path | None = None) -> dict:
    """{process name: wall seconds}, the names the sweep prints (train:<run>, eval:<run>, pretrain:seed<s>);
    the timings.json of the runner before the sweeps (same names, same run dirs) fills what the job records
    lack (runs it made that a sweep reused)."""
    out = dict(read_json(Path(out_dir) / "timings.json") or {}) if out_dir else {}
    for r in jobs:
        name = Path(r.get("run_dir", "")).name
        for stage, s in (r.get("wall_s") or {}).items():
            out[f"{stage}:seed{r['seed']}" if stage == "pretrain" else f"{stage}:{name}"] = s
    return out


def _train_jobs(jobs: list[dict]) -> list[dict]:
    return sorted((r for r in jobs if r.get("kind") == "train"),
                  key=lambda r: (r.get("env") or "", r.get("window") or 0, r.get("budget") or 0,
                                 _arm_rank(r["arm"]), r["seed"]))


# The stage-1 objective as a report names it (model keys of the stage-1 run's config; None = not in that run).
STAGE1_MODEL_KEYS = ("recon_loss", "recon_decoder", "recon_linear_readout", "recon_task_weight", "state_features",
                     "n_latent", "pretrain_slot_init")


def _stage1(jobs: list[dict]) -> tuple[dict | None, dict]:
    """(stage-1 budget {pretrain_steps, pretrain_batch_size, pretrain_lr} of a stage-1 run's config.json,
    {seed: run dir}) of the pretrain runs of this sweep. The budget keys are top level in config/pretrain.yaml
    (runs written before the per-stage configs kept them in the model group)."""
    runs = {str(r["seed"]): r["run_dir"] for r in jobs if r.get("kind") == "pretrain"}
    for rd in runs.values():
        cfg = read_json(Path(rd) / "config.json")
        if cfg:
            keys = ("pretrain_steps", "pretrain_batch_size", "pretrain_lr")
            model = cfg.get("model") or {}
            return {k: cfg.get(k, model.get(k)) for k in keys} | {k: model.get(k) for k in STAGE1_MODEL_KEYS}, runs
    return None, runs


# ---------------------------------------------------------------------------------------------------------
# compare: does pretraining help? (table.md, table.json, curves.png)
# ---------------------------------------------------------------------------------------------------------
TRAIN_FRACS = (0.25, 0.5, 1.0)  # train/loss_action is read at these fractions of max_steps
COMPARE_METRICS = {  # metric key -> (label in table.md, "lower" | "higher" is better, format)
    **{f"train_loss_action_{int(f * 100)}": (f"train action loss @ {int(f * 100)}% of steps", "lower", ".3f")
       for f in TRAIN_FRACS},
    "heldout_loss_same_position": ("held-out action loss, same positions (test histories, final)", "lower", ".3f"),
    "heldout_acc_same_position": ("held-out action accuracy, same positions", "higher", ".3f"),
    "return_first": ("held-out return, episode 1", "higher", ".2f"),
    "return_last5": ("held-out return, last 5 episodes", "higher", ".2f"),
    "return_last5_normalized": ("last-5 return / optimal", "higher", ".3f"),
    "reward_per_step": ("mean reward per step (whole rollout)", "higher", ".3f"),
    "long_return_last5": ("long rollout: return, last 5 episodes", "higher", ".2f"),
    "long_return_tail": ("long rollout: mean return, last 20% of episodes", "higher", ".2f"),
    "long_return_tail_normalized": ("long rollout: last-20% return / optimal", "higher", ".3f"),
    "long_reward_per_step": ("long rollout: mean reward per step", "higher", ".3f"),
}


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar tag across the run's event files (purged steps dropped)."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its per-file INFO lines, in Hydra's log too
    if not tb_dir.is_dir():
        return []
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    last = {}
    for e in acc.Scalars(tag):  # a resumed run may log a step twice: keep the newest
        last[int(e.step)] = float(e.value)
    return sorted(last.items())


def _nearest(series: list[tuple[int, float]], step: float) -> tuple:
    if not series:
        return None, None
    return min(series, key=lambda sv: (abs(sv[0] - step), sv[0]))


def run_metrics(run_dir: Path, max_steps: int | None) -> dict:
    """Per-run numbers of the comparison; absent ones (run or eval missing) are None."""
    m: dict = {k: None for k in COMPARE_METRICS}
    info: dict = {"run_dir": str(run_dir), "complete": False}
    loss = read_scalars(run_dir / "tb", "train/loss_action") if max_steps else []
    steps = {}
    for f in TRAIN_FRACS:
        st, v = _nearest(loss, f * (max_steps or 0))
        m[f"train_loss_action_{int(f * 100)}"] = v
        steps[f"{int(f * 100)}%"] = st
    info["train_loss_steps"] = steps
    done = read_json(run_dir / "done.json") or {}
    # teacher_forced.py: every step of every test-goal history, each model with its rollout schedule
    m["heldout_loss_same_position"] = done.get("tf_loss_test")
    m["heldout_acc_same_position"] = (done.get("heldout_test") or {}).get("acc")
    info["global_step"] = done.get("global_step")
    ev, s = _split_summary(run_dir, "eval")
    if s:
        m.update(return_first=s["first_episode"], return_last5=s["last_k_mean"],
                 return_last5_normalized=s["last_k_normalized"], reward_per_step=s.get("reward_per_step"))
        info.update(curve=s["curve"], optimal_mean=s["optimal_mean"], eval_last_k=s["last_k"],
                    n_test_goals=s["n_goals"], eval_device=ev.get("device"))
    _, s = _split_summary(run_dir, "eval_long")
    if s:
        c = s["curve"]
        lo = len(c) - max(1, len(c) // 5)  # the last 20% of the episodes (400..499 of 500)
        tail = sum(c[lo:]) / len(c[lo:])
        m.update(long_return_last5=s["last_k_mean"], long_return_tail=tail,
                 long_return_tail_normalized=tail / s["optimal_mean"] if s["optimal_mean"] > 0 else None,
                 long_reward_per_step=s.get("reward_per_step"))
        info.update(long_curve=c, long_tail_episodes=[lo + 1, len(c)], long_last_k=s["last_k"],
                    long_n_seeds_per_goal=s["n_seeds"])
    info["complete"] = all(v is not None for v in m.values())
    return {"metrics": m, **info}


def _eval_settings(jobs: list[dict], out_name: str) -> dict:
    for r in jobs:
        ev = read_json(Path(r["run_dir"]) / f"{out_name}.json")
        if ev:
            return {"n_episodes": ev["config"]["n_episodes"], "seeds_per_goal": ev["config"]["seeds_per_goal"]}
    return {"n_episodes": None, "seeds_per_goal": None}


def compare(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    arms = sorted({r["arm"] for r in tj}, key=_arm_rank)
    seeds = sorted({r["seed"] for r in tj})
    results, runs, cfgs = {}, {}, {}
    for arm in arms:
        per_seed = {}
        for r in (r for r in tj if r["arm"] == arm):
            cfg = read_json(Path(r["run_dir"]) / "config.json") or {}
            cfgs[arm] = cfgs.get(arm) or cfg
            per_seed[str(r["seed"])] = run_metrics(Path(r["run_dir"]), cfg.get("max_steps"))
            runs[f"{arm}-seed{r['seed']}"] = r["run_dir"]
        mean, std, n = {}, {}, {}
        for k in COMPARE_METRICS:
            mean[k], std[k], n[k] = _mean_std([p["metrics"][k] for p in per_seed.values()])
        mc = (cfgs[arm] or {}).get("model") or {}
        memory = (f"window {mc.get('context_len')} steps" if mc.get("name") == "ad" else
                  f"window {mc.get('seg_len')} steps + {mc.get('n_latent')} latents")
        label = next(r["label"] for r in tj if r["arm"] == arm)
        results[arm] = {"label": label, "memory": memory, "mean": mean, "std": std, "n": n, "per_seed": per_seed}
    missing = [f"{arm}-seed{s}" for arm in arms for s, p in results[arm]["per_seed"].items() if not p["complete"]]
    tc = next((c for c in cfgs.values() if c), {})
    budget = f"{tc.get('max_steps')} optimizer steps x batch {tc.get('batch_size')}, lr {tc.get('lr')} (every arm)"
    pc, pretrain_runs = _stage1(jobs)
    if pc:
        budget += f"; stage 1: {pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}"

    def first(key):  # a per-run fact that is the same for every run (None if no run got that far)
        return next((p[key] for res in results.values() for p in res["per_seed"].values() if p.get(key)), None)

    tail = first("long_tail_episodes")
    devices = {p.get("eval_device") for res in results.values() for p in res["per_seed"].values()}
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    rep = {
        "format_version": 1, "date": _now(), "command": info.get("command", "?"), "cwd": info.get("cwd"),
        "experiment": experiment,
        "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment} on {device_label(devices)}",
        "arms": arms, "seeds": seeds, "budget": budget,
        "dataset": dataset_info(tc.get("data_path")),
        "eval": {**_eval_settings(tj, "eval"), "last_k": first("eval_last_k"),
                 "n_test_goals": first("n_test_goals"), "optimal_mean": first("optimal_mean")},
        "long_eval": {**_eval_settings(tj, "eval_long"), "last_k": first("long_last_k"),
                      "tail_episodes": f"{tail[0]}-{tail[1]}" if tail else "–"},
        "metrics": {k: {"label": lab, "better": b} for k, (lab, b, _) in COMPARE_METRICS.items()},
        "complete": not missing, "missing": missing,
        "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
        "results": results, "runs": runs, "pretrain_runs": pretrain_runs,
        "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
        "timings_s": timings(jobs, out),
    }
    atomic_write_text(out / "table.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", compare_markdown(rep))
    compare_plot(out / "curves.png", rep)
    return rep


def _cell(mu, sd, n, n_seeds, fmt) -> str:
    c = _fmt(mu, fmt) + ("" if sd is None else f" ± {_fmt(sd, fmt)}")
    return c + (f" (n={n})" if mu is not None and n < n_seeds else "")


def compare_markdown(rep: dict) -> str:
    arms, res = rep["arms"], rep["results"]
    lines = [f"# Does pretraining help? CompressedAD comparison ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}", f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']['path']}` ({rep['dataset'].get('summary', '')})",
             f"- **Budget:** {rep['budget']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample std over training seeds; "
              "a cell marked (n=k) averages only the k seeds whose runs finished)"),
             f"- **Status:** {'complete' if rep['complete'] else 'INCOMPLETE: ' + ', '.join(rep['missing'])}",
             "", "| metric | " + " | ".join(f"`{arm}`" for arm in arms) + " |", "|---|" + "---|" * len(arms)]
    lines.append("| memory | " + " | ".join(res[arm]["memory"] for arm in arms) + " |")
    for k, (label, better, fmt) in COMPARE_METRICS.items():
        kk = rep["long_eval" if k.startswith("long_") else "eval"].get("last_k")
        if kk:  # evaluate.py clips last_k to n_episodes
            label = label.replace("last 5", f"last {kk}").replace("last-5", f"last-{kk}")
        means = {arm: res[arm]["mean"][k] for arm in arms}
        valid = [v for v in means.values() if v is not None]
        best = (min(valid) if better == "lower" else max(valid)) if len(valid) > 1 else None
        cells = []
        for arm in arms:
            c = _cell(means[arm], res[arm]["std"][k], res[arm]["n"][k], len(rep["seeds"]), fmt)
            cells.append(f"**{c}**" if best is not None and means[arm] == best else c)
        lines.append(f"| {label} ({better} is better) | " + " | ".join(cells) + " |")
    lt = rep["long_eval"]
    lines += ["", "Arms: " + "; ".join(f"`{arm}` = {res[arm]['label']}" for arm in arms) + ".", "",
              "How the numbers are made:",
              ("- Train action loss: `train/loss_action` from each run's TensorBoard at the logged step nearest "
               "to 25/50/100% of max_steps (per-seed steps in table.json). Held-out loss/accuracy: action "
               "prediction on the test goals' source histories at the end of training (done.json)."),
              (f"- Returns: in-context rollouts with frozen weights on the {rep['eval']['n_test_goals']} held-out "
               f"goals, {rep['eval']['seeds_per_goal']} rollouts per goal, sampled actions, "
               f"{rep['eval']['n_episodes']} episodes (evaluate.py, `eval.json` in each run dir). Mean optimal "
               f"return of the held-out goals: {_fmt(rep['eval'].get('optimal_mean'), '.2f')}."),
              (f"- Long rollout: {lt['n_episodes']} episodes, {lt['seeds_per_goal']} rollouts per held-out goal "
               f"(`eval_long.json`); 'last 20%' = episodes {lt['tail_episodes']}. The source's learning histories "
               f"are {rep['dataset'].get('episodes_per_history', '?')} episodes long and AD sees only its window."),
              ("- Bold: best mean of the row. Per-seed raw numbers, run dirs and routed overrides: table.json. "
               "Curves: curves.png."), ""]
    return "\n".join(lines)


def _curve_band(ax, curves: list, color: str, label: str, smooth_from: int | None = None) -> int:
    """Mean ± std over seeds of equal-length curves (a moving average when they reach smooth_from)."""
    import numpy as np

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


def _reference_lines(ax, src, n_episodes, opt, ep_hist=None) -> None:
    import numpy as np

    if src:  # what AD distils: the source algorithm learning the same held-out goals from scratch
        n_src = min(len(src), n_episodes or len(src))
        ax.plot(np.arange(1, n_src + 1), src[:n_src], color="k", linewidth=1, alpha=0.6, linestyle="-.",
                label="source algorithm (its histories)")
    if opt:
        ax.axhline(opt, color="k", linestyle="--", linewidth=1, label=f"optimal ({opt:.2f})")
    if ep_hist and n_episodes and ep_hist <= n_episodes:
        ax.axvline(ep_hist, color="k", linestyle=":", linewidth=1, label=f"source history length ({ep_hist} ep.)")


def _figure(size, rows: int, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path, title: str, dpi: int) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)


def compare_plot(path: Path, rep: dict) -> None:
    fig, axes = _figure((13, 4.6), 1, 2)
    opt = rep["eval"].get("optimal_mean")
    for ax, key, ev in ((axes[0, 0], "curve", rep["eval"]), (axes[0, 1], "long_curve", rep["long_eval"])):
        smooth = 1
        for arm in rep["arms"]:
            curves = [p[key] for p in rep["results"][arm]["per_seed"].values() if p.get(key)]
            if curves:
                smooth = _curve_band(ax, curves, COLORS.get(arm, "tab:brown"), arm,
                                     100 if key == "long_curve" else None)
        _reference_lines(ax, rep["dataset"].get("source_curve_test"), ev["n_episodes"], opt,
                         rep["dataset"].get("episodes_per_history") if key == "long_curve" else None)
        title = f"{'long rollout' if key == 'long_curve' else 'held-out goals'}, {ev['n_episodes']} episodes"
        _axes_labels(ax, title + (f" ({smooth}-episode moving average)" if smooth > 1 else ""))
    _save(fig, path, f"Does pretraining help? {rep['scale']}, {rep['date']}", 110)


def _axes_labels(ax, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("episode (in context, frozen weights)")
    ax.set_ylabel("mean return (± std over training seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


# ---------------------------------------------------------------------------------------------------------
# pretrain-budget: the budget curve (summary.json, table.md, budget.png)
# ---------------------------------------------------------------------------------------------------------
BUDGET_METRICS = {
    "heldout_loss_same_position": ("held-out action NLL, same positions (tf_loss_test)", "lower", ".3f"),
    "return_last5": ("held-out return, last 5 episodes", "higher", ".2f"),
    "episodes_to_0.8": ("episodes to 0.8 of optimal (5-ep. mean)", "lower", ".1f"),
}


def run_numbers(run_dir: Path) -> dict:
    done = read_json(run_dir / "done.json") or {}
    ev, s = _split_summary(run_dir, "eval")
    return {"heldout_loss_same_position": done.get("tf_loss_test"), "return_last5": s.get("last_k_mean"),
            "episodes_to_0.8": s.get("episodes_to_0.8"), "complete": bool(done) and bool(s),
            "optimal_mean": s.get("optimal_mean"), "n_episodes": s.get("n_episodes"),
            "last_k": s.get("last_k"), "device": ev.get("device"), "run_dir": str(run_dir)}


def step_cost_ratio(jobs: list[dict], wall: dict) -> float | None:
    """Stage-1 wall seconds per step / stage-2 wall seconds per step, medians over this sweep's runs
    (`wall`: timings())."""
    s1, s2 = [], []
    for r in jobs:
        key = "pretrain" if r.get("kind") == "pretrain" else "train"
        name = f"seed{r['seed']}" if key == "pretrain" else Path(r["run_dir"]).name
        t, done = wall.get(f"{key}:{name}"), read_json(Path(r["run_dir"]) / "done.json") or {}
        if t and done.get("global_step"):
            (s1 if key == "pretrain" else s2).append(t / done["global_step"])
    return statistics.median(s1) / statistics.median(s2) if s1 and s2 else None


def pretrain_budget(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    arms = sorted({r["arm"] for r in tj}, key=_arm_rank)
    seeds, budgets = sorted({r["seed"] for r in tj}), sorted({r["budget"] for r in tj if r.get("budget")})
    pc, _ = _stage1(jobs)
    wall = timings(jobs, out)
    ratio = step_cost_ratio(jobs, wall)
    rows, missing = [], []
    for n in budgets:
        for arm in arms:
            mine = [r for r in tj if r["arm"] == arm and r.get("budget") == n]
            if not mine:
                continue
            per_seed = {str(r["seed"]): run_numbers(Path(r["run_dir"])) for r in mine}
            pretrained = bool(mine[0].get("encoder"))  # the arm starts from this seed's stage-1 encoder
            row = {"arm": arm, "stage2_steps": n,
                   "stage1_steps": int(pc["pretrain_steps"]) if pretrained and pc else 0,
                   "seeds": [int(s) for s, p in per_seed.items() if p["complete"]]}
            for k in BUDGET_METRICS:
                row[k], row[f"{k}_std"], row[f"{k}_n"] = _mean_std([p[k] for p in per_seed.values()])
            row["compute_stage2_step_equiv"] = (n + row["stage1_steps"] * ratio) if ratio else None
            row["per_seed"] = per_seed
            rows.append(row)
            missing += [f"b{n}-{arm}-seed{s}" for s, p in per_seed.items() if not p["complete"]]
    first = next((p for r in rows for p in r["per_seed"].values() if p["complete"]), {})
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    tc = (read_json(Path(tj[0]["run_dir"]) / "config.json") or {}) if tj else {}
    devices = {p.get("device") for r in rows for p in r["per_seed"].values()}
    rep = {
        "format_version": 1, "date": _now(), "command": info.get("command", "?"), "experiment": experiment,
        "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment} on {device_label(devices)}",
        "arms": arms, "seeds": seeds, "budgets": budgets, "dataset": str(tc.get("data_path")),
        "stage1": (f"{pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}, "
                   + ", ".join(f"{k} {pc[k]}" for k in STAGE1_MODEL_KEYS if pc.get(k) is not None)
                   if pc else "none"),
        "eval": (f"{first.get('n_episodes')} episodes, last {first.get('last_k')}, mean optimal return "
                 f"{_fmt(first.get('optimal_mean'), '.2f')}"),
        "stage1_cost_per_step_vs_stage2": ratio,
        "complete": not missing, "missing": missing,
        "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
        "rows": rows, "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
        "timings_s": wall,
    }
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", budget_markdown(rep))
    budget_plot(out / "budget.png", rep)
    return rep


def _diff(rows: dict, arm: str, n: int, key: str):
    """(mean(arm) - mean(scratch), standard error of that difference) at budget n, or None."""
    x, y = rows.get((arm, n)), rows.get(("scratch", n))
    if not x or not y or x[key] is None or y[key] is None:
        return None
    se = math.sqrt(sum((r[f"{key}_std"] or 0.0) ** 2 / max(1, r[f"{key}_n"]) for r in (x, y)))
    return x[key] - y[key], se


def verdict(rep: dict) -> list[str]:
    """One plain sentence per budget and arm vs scratch: better / worse / within seed noise (|diff| <= 2 SE)."""
    rows = {(r["arm"], r["stage2_steps"]): r for r in rep["rows"]}
    out = []
    for n in rep["budgets"]:
        for arm in (x for x in rep["arms"] if x != "scratch"):
            parts = []
            for key, better in (("heldout_loss_same_position", "lower"), ("return_last5", "higher")):
                d = _diff(rows, arm, n, key)
                if d is None:
                    continue
                diff, se = d
                good = diff < 0 if better == "lower" else diff > 0
                word = ("within seed noise" if abs(diff) <= 2 * se or se == 0 and diff == 0
                        else "better" if good else "worse")
                parts.append(f"{BUDGET_METRICS[key][0].split(' (')[0]} {diff:+.3f} ± {se:.3f} ({word})")
            if parts:
                out.append(f"- {n} stage-2 steps, `{arm}` vs `scratch`: " + "; ".join(parts))
    return out


def budget_markdown(rep: dict) -> str:
    lines = [f"# Does pretraining help? The budget curve ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}", f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']}`", f"- **Stage 1:** {rep['stage1']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over seeds; (n=k): only k "
              f"seeds have the number, e.g. reached 0.8 of optimal)"),
             (f"- **Compute:** stage-2-step equivalents; one stage-1 step costs "
              f"{_fmt(rep['stage1_cost_per_step_vs_stage2'], '.2f')} stage-2 steps (measured wall time per "
              f"step, median over this sweep's runs)"),
             f"- **Status:** {'complete' if rep['complete'] else 'INCOMPLETE: ' + ', '.join(rep['missing'])}", "",
             "| arm | stage-2 steps | stage-1 steps | compute | " + " | ".join(
                 f"{lab} ({b} is better)" for lab, b, _ in BUDGET_METRICS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(BUDGET_METRICS)]
    for r in rep["rows"]:
        cells = [_cell(r[k], r[f"{k}_std"], r[f"{k}_n"], len(rep["seeds"]), fmt)
                 for k, (_, _, fmt) in BUDGET_METRICS.items()]
        lines.append(f"| `{r['arm']}` | {r['stage2_steps']} | {r['stage1_steps']} | "
                     f"{_fmt(r['compute_stage2_step_equiv'], '.0f')} | " + " | ".join(cells) + " |")
    lines += ["", ("**What the data says** (difference of means, ± standard error of the difference; 'within "
                   "seed noise' when |difference| ≤ 2 SE):"), ""] + (verdict(rep) or ["- no complete pair yet"])
    lines += ["", ("Held-out action NLL: train.py's `tf_loss_test` (teacher-forced over every step of every "
                   "test-goal history, each model with its rollout schedule). Returns: evaluate.py on the held-out "
                   f"goals, {rep['eval']}. Per-seed numbers and run dirs: summary.json. Plot: budget.png."), ""]
    return "\n".join(lines)


def budget_plot(path: Path, rep: dict) -> None:
    import numpy as np

    fig, axes = _figure((12, 8), 2, 2)
    for i, key in enumerate(("heldout_loss_same_position", "return_last5")):
        for j, xkey in enumerate(("stage2_steps", "compute_stage2_step_equiv")):
            ax = axes[i, j]
            for arm in rep["arms"]:
                pts = [(r[xkey], r[key], r[f"{key}_std"] or 0.0) for r in rep["rows"]
                       if r["arm"] == arm and r[xkey] is not None and r[key] is not None]
                if pts:
                    x, y, e = map(np.asarray, zip(*pts))
                    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=COLORS.get(arm, "tab:brown"), label=arm)
            ax.set_xscale("log")
            ax.set_xlabel("stage-2 steps" if j == 0 else "total compute (stage-2-step equivalents, incl. stage 1)")
            ax.set_ylabel(BUDGET_METRICS[key][0])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    _save(fig, path, f"Does pretraining help? {rep['scale']}, {rep['date']}", 100)


# ---------------------------------------------------------------------------------------------------------
# memory: AD window w / 3w vs CompressedAD window w (summary.json, table.md, curves.png)
# ---------------------------------------------------------------------------------------------------------
MEMORY_COLUMNS = (  # row key -> (table header, format)
    ("return_last5", "return, last 5 of the eval", ".2f"),
    ("episodes_to_0.8", "episodes to 0.8 of optimal", ".1f"),
    ("return_last5_long", "long rollout: return, last 5", ".2f"),
    ("episodes_to_0.8_long", "long rollout: episodes to 0.8", ".1f"),
    ("episodes_to_first_goal", "episodes to first goal", ".1f"),
    ("return_after_found", "return after found / optimal", ".2f"),
    ("tf_loss_test", "test NLL (same position)", ".4f"),
)


def source_search_use(data_path: str | None) -> dict | None:
    """The source algorithm's own search vs use (evaluate.search_and_use) on the test goals' histories of the
    dataset: the yardstick of the memory table's episodes-to-first-goal and return-after-found columns."""
    meta = read_json(Path(data_path) / "meta.json") if data_path else None
    if not meta:
        return None
    from collect import episode_returns
    from env import task_optimal_return
    from evaluate import search_and_use
    from histories import load_histories
    from transition import REWARD

    env = meta["env"]
    h = load_histories(data_path, env)
    idx = h.split_indices("test")
    if len(idx) == 0:
        return None
    ret = episode_returns(h.transitions(idx)[..., REWARD], int(env["horizon"]))
    opt = [task_optimal_return(env, g) for g in h.goals[idx]]
    return search_and_use(ret[:, None, :], opt)


def memory_numbers(run_dir: Path) -> dict:
    """One run's memory-table numbers. rollout_ms_per_step: wall ms per rollout step of the longest eval
    (all held-out goals x rollouts in lockstep, one model call each)."""
    cfg, done = read_json(run_dir / "config.json") or {}, read_json(run_dir / "done.json") or {}
    mc = cfg.get("model") or {}
    ev, s = _split_summary(run_dir, "eval")
    evl, sl = _split_summary(run_dir, "eval_long")
    timed, ts = (evl, sl) if sl else (ev, s)
    wall = ((timed.get("splits") or {}).get("test") or {}).get("wall_s")
    horizon = (timed.get("env") or {}).get("horizon")
    probe = (done.get("heldout_test") or {}).get("memory_probe") or {}
    test = (ev.get("splits") or {}).get("test") or {}
    su = {}
    if test.get("returns") is not None:  # eval.json files written before the summary had these fields
        from evaluate import search_and_use

        su = search_and_use(test["returns"], test["optimal"])
    return {"episodes_to_first_goal": su.get("episodes_to_first_goal"),
            "return_after_found": su.get("return_after_found_normalized"), "tf_loss_test": done.get("tf_loss_test"),
            "window": mc.get("context_len") if mc.get("name") == "ad" else mc.get("seg_len"),
            "env": (cfg.get("env") or {}).get("name"),
            "return_last5": s.get("last_k_mean"), "episodes_to_0.8": s.get("episodes_to_0.8"),
            "return_last5_long": sl.get("last_k_mean"), "episodes_to_0.8_long": sl.get("episodes_to_0.8"),
            "curve": s.get("curve"), "optimal_mean": s.get("optimal_mean"),
            "probe_k1": probe.get("k1"), "probe_all": probe.get("all"),
            "rollout_ms_per_step": (1000 * wall / (ts["n_episodes"] * horizon)
                                    if wall and horizon and ts.get("n_episodes") else None),
            "steps": done.get("global_step"), "device": ev.get("device"), "n_episodes": s.get("n_episodes"),
            "complete": bool(done) and bool(s), "data_path": cfg.get("data_path"), "run_dir": str(run_dir)}


def memory(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    groups: dict = {}
    for r in tj:
        groups.setdefault((r.get("env") or "", r.get("window") or 0, r["arm"]), []).append(r)
    rows, missing = [], []
    for (env, _w, arm), mine in groups.items():
        per_seed = {str(r["seed"]): memory_numbers(Path(r["run_dir"])) for r in mine}
        first = next((p for p in per_seed.values() if p["complete"]), next(iter(per_seed.values())))
        row = {"env": first["env"] or env, "arm": arm, "window": first["window"],
               "seeds": [int(s) for s, p in per_seed.items() if p["complete"]]}
        for k, _, _ in MEMORY_COLUMNS:
            row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_n"] = _mean_std([p[k] for p in per_seed.values()])
        k1, k1_sd, _ = _mean_std([p["probe_k1"] for p in per_seed.values()])
        al, al_sd, _ = _mean_std([p["probe_all"] for p in per_seed.values()])
        row["memory_probe"] = None if k1 is None else {"k1": k1, "all": al, "k1_std": k1_sd, "all_std": al_sd}
        row["rollout_ms_per_step"] = _mean_std([p["rollout_ms_per_step"] for p in per_seed.values()])[0]
        row["steps"] = first["steps"]
        row["device"] = device_label({first["device"]}) if first["device"] else None
        row["label"] = mine[0].get("label")
        row["per_seed"] = per_seed
        rows.append(row)
        missing += [Path(p["run_dir"]).name for p in per_seed.values() if not p["complete"]]
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    data = {r["env"]: dataset_info(next(p["data_path"] for p in r["per_seed"].values())) for r in rows}
    for env, d in data.items():
        d["source_search_use_test"] = source_search_use(d["path"]) if d.get("n_steps") else None
    rep = {"format_version": 1, "date": _now(), "command": info.get("command", "?"), "experiment": experiment,
           "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment}",
           "seeds": sorted({r["seed"] for r in tj}), "datasets": data, "complete": not missing, "missing": missing,
           "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
           "rows": rows, "timings_s": timings(jobs, out)}
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", memory_markdown(rep))
    memory_plot(out / "curves.png", rep)
    return rep


def memory_markdown(rep: dict) -> str:
    lines = [f"# Memory table ({rep['experiment']})", "", f"- **Scale:** {rep['scale']}",
             f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over training seeds)",
             f"- **Status:** {'complete' if rep['complete'] else 'INCOMPLETE: ' + ', '.join(rep['missing'])}", "",
             "| env | arm | window | " + " | ".join(h for _, h, _ in MEMORY_COLUMNS)
             + " | memory probe k1 / all (nats) | rollout ms/step | steps | device |",
             "|---|---|---|" + "---|" * (len(MEMORY_COLUMNS) + 4)]
    for r in rep["rows"]:
        cells = [_cell(r[f"{k}_mean"], r[f"{k}_std"], r[f"{k}_n"], len(rep["seeds"]), fmt)
                 for k, _, fmt in MEMORY_COLUMNS]
        mp = r["memory_probe"]
        probe = "–" if mp is None else f"{mp['k1']:.4f} / {mp['all']:.4f}"
        lines.append(f"| {r['env']} | `{r['arm']}` | {r['window']} | " + " | ".join(cells)
                     + f" | {probe} | {_fmt(r['rollout_ms_per_step'], '.2f')} | {r['steps']} | {r['device']} |")
    for env, d in rep["datasets"].items():
        su = d.get("source_search_use_test")
        if su and su.get("episodes_to_first_goal") is not None:
            have = {"episodes_to_first_goal": su["episodes_to_first_goal"],
                    "return_after_found": su["return_after_found_normalized"]}
            cells = [_fmt(have[k], fmt) if k in have else "–" for k, _, fmt in MEMORY_COLUMNS]
            lines.append(f"| {env} | source (its own histories) | – | " + " | ".join(cells) + " | – | – | – | – |")
    lines += ["", ("Returns: evaluate.py on the held-out goals with frozen weights, sampled actions (`eval.json`; "
                   "the long rollout: `eval_long.json`). Episodes to 0.8: first episode whose 5-episode mean "
                   "reaches 0.8 of optimal ((n=k): only k seeds got there). Memory probe: same-position held-out "
                   "NLL with the latents rebuilt from the last compressed segment only (k1) vs the whole history "
                   "(all), train.py's done.json; AD has none. Rollout ms/step: wall time per lockstep rollout "
                   "step of the longest eval. Episodes to first goal / return after found: search vs use "
                   "(evaluate.search_and_use) on the test goals: the first episode with a positive return, and the "
                   "mean return / optimal of every episode after it — how well the learner returns to a goal it "
                   "has seen; the source row scores the dataset's own test-goal histories. Test NLL: train.py's "
                   "final same-position loss (done.json). Per-seed numbers: summary.json. Curves: curves.png."), ""]
    return "\n".join(lines)


def memory_plot(path: Path, rep: dict) -> None:
    envs = sorted({r["env"] for r in rep["rows"]}) or ["-"]
    fig, axes = _figure((6.5 * len(envs), 4.6), 1, len(envs))
    for ax, env in zip(axes[0], envs):
        opt = None
        for r in (r for r in rep["rows"] if r["env"] == env):
            curves = [p["curve"] for p in r["per_seed"].values() if p.get("curve")]
            if curves:
                _curve_band(ax, curves, COLORS.get(r["arm"], "tab:brown"), f"{r['arm']} (window {r['window']})")
                opt = opt or next(p["optimal_mean"] for p in r["per_seed"].values() if p.get("curve"))
        n_ep = next((p["n_episodes"] for r in rep["rows"] for p in r["per_seed"].values() if p.get("n_episodes")), None)
        ds = rep["datasets"].get(env) or {}
        _reference_lines(ax, ds.get("source_curve_test"), n_ep, opt)
        _axes_labels(ax, f"{env}: held-out goals, {n_ep} episodes")
    _save(fig, path, f"Memory table, {rep['scale']}, {rep['date']}", 100)


# ---------------------------------------------------------------------------------------------------------
REPORTS = {"compare": compare, "pretrain-budget": pretrain_budget, "memory": memory}
RENDER = {"compare": compare_markdown, "pretrain-budget": budget_markdown, "memory": memory_markdown}


def sweep_name(out: Path, jobs: list[dict]) -> str:
    info = read_json(Path(out) / "sweep.json") or {}
    names = {info.get("sweep")} | {r.get("sweep") for r in jobs if r.get("kind") == "train"}
    names.discard(None)
    if len(names) != 1:
        what = "runs of several sweeps: " + ", ".join(sorted(names)) if names else "no sweep runs (no jobs/*.json)"
        raise ReportError(f"{out}: {what}")
    name = names.pop()
    if name not in REPORTS:
        raise ReportError(f"{out}: no report for sweep {name!r} (known: {', '.join(REPORTS)})")
    return name


def write(out: Path) -> dict:
    """Write the report of the sweep in `out` from its job records and run dirs; returns the report dict."""
    out = Path(out)
    jobs = load_jobs(out)
    name = sweep_name(out, jobs)
    rep = REPORTS[name](out, jobs, read_json(out / "sweep.json") or {})
    rep["sweep"] = name
    return rep


def render(out: Path, rep: dict) -> str:
    return RENDER[rep["sweep"]](rep)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the sweep's output folder (its `out`, e.g. results/compare-quick)")
    a = p.parse_args(argv)
    try:
        rep = write(Path(a.out))
    except ReportError as e:
        p.exit(2, f"error: {e}\n")
    print(render(Path(a.out), rep))
    return rep


if __name__ == "__main__":
    main()
