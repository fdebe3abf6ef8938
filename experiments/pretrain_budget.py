"""Does pretraining help? The budget curve: stage 2 from scratch / from the stage-1 encoder fine-tuned /
frozen, at several stage-2 budgets, several seeds, against stage-2 steps and against total compute.

    python experiments/pretrain_budget.py                               # experiment=quick, 200/500/1200 steps
    python experiments/pretrain_budget.py --budgets 250 500 1000 2500 5000 --experiment full --accelerate
    python experiments/pretrain_budget.py --dry-run                     # print the plan, run nothing
    python experiments/pretrain_budget.py --report-only                 # rewrite the outputs from what exists

It is experiments/compare_pretraining.py's plan and job runner, once per budget (stage-2 runs
<out>/runs/b<steps>-<arm>-seed<s>, `train:max_steps=<steps>`), with one shared stage 1 per seed
(<out>/runs/pretrain-seed<s>): the same reuse / resume / routing of `key=value` and `stage:key=value`
overrides, the same refusal of run dirs made with other settings. Each stage-2 budget is its own run with
its own learning-rate schedule (not a checkpoint of a longer run).

Outputs in --out (default results/pretrain-budget-<experiment>):
    summary.json  rows {"arm", "stage2_steps", "stage1_steps", "seeds", "heldout_loss_same_position",
                  "return_last5", "episodes_to_0.8"} (means over seeds; *_std and per_seed beside them),
                  plus the command, date, scale and the compute model
    table.md      the same as a table, with a plain verdict per budget (pretrained vs scratch)
    budget.png    both metrics vs stage-2 steps and vs total compute including stage 1

Metrics: `heldout_loss_same_position` = train.py's done.json `tf_loss_test` (teacher-forced action NLL over
every step of every test-goal history, each model with its rollout schedule: the same positions for every
arm); `return_last5` / `episodes_to_0.8` = evaluate.py's eval.json `splits.test.summary` `last_k_mean` /
`episodes_to_0.8` (first episode whose 5-episode moving mean reaches 0.8 of optimal; null if never: the
mean is then over the seeds that got there, with the count beside it). Compute: stage-2-step equivalents,
stage 1 counted at its measured cost per step relative to stage 2's (from timings.json, this run's own
wall-clock per step, median over runs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/pretrain_budget.py` puts experiments/ first, not the repo
    sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write, atomic_write_text
from experiments import compare_pretraining as cp

ARMS = ("scratch", "pretrained_ft", "pretrained_frozen")
COLORS = {"scratch": "tab:blue", "pretrained_ft": "tab:green", "pretrained_frozen": "tab:red"}
# Stage-2 defaults the budget curve needs and a preset's cadence would waste CPU on: the periodic
# in-training rollouts and same-position losses (the final ones are the measurement: train.py scores the
# val and test histories at the end whatever heldout_every) and the train-goal rollouts of evaluate.py.
# Given before the user's overrides, so those still win.
DEFAULT_OVERRIDES = ["train:eval_every=0", "train:heldout_every=0", "evaluate:n_train_goals=0"]
# metric key -> (label, lower/higher is better, format)
METRICS = {
    "heldout_loss_same_position": ("held-out action NLL, same positions (tf_loss_test)", "lower", ".3f"),
    "return_last5": ("held-out return, last 5 episodes", "higher", ".2f"),
    "episodes_to_0.8": ("episodes to 0.8 of optimal (5-ep. mean)", "lower", ".1f"),
}


def parse_args(argv=None):
    import two_stage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="quick", help="Hydra preset config/experiment/<name>.yaml (default quick)")
    p.add_argument("--budgets", nargs="+", type=int, default=[200, 500, 1200],
                   help="stage-2 max_steps, one run per budget x arm x seed (default 200 500 1200)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                   help=f"arms (default all): {' '.join(ARMS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=1, help="processes at once (default 1)")
    p.add_argument("--out", default=None, help="results folder (default results/pretrain-budget-<experiment>)")
    two_stage.add_launch_args(p)
    p.add_argument("--force", action="store_true", help="redo every run instead of reusing finished ones")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the outputs from what exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, optionally stage:key=value")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    if min(a.budgets) < 1 or len(set(a.budgets)) != len(a.budgets):
        p.error("--budgets must be distinct positive step counts")
    if len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        p.error("--seeds must be distinct non-negative integers")
    a.budgets = sorted(a.budgets)
    a.arms = [arm for arm in ARMS if arm in a.arms]
    a.out = Path(a.out or ROOT / "results" / f"pretrain-budget-{a.experiment}").expanduser().resolve()
    # compare_pretraining.make_plan's knobs this script does not expose (no long rollouts, no aux arm).
    a.long_episodes, a.long_seeds_per_goal, a.aux_recon_weight = 1, 0, 0.0
    return a


def make_plans(a, routed: dict) -> tuple[list, list]:
    """(per-budget compare_pretraining Plans, the union of their jobs: the shared stage-1 jobs once)."""
    for o in routed["train"]:
        if cp._key(o).split(":", 1)[-1].lstrip("+~") == "max_steps":
            raise cp.CompareError(f"{o!r}: the stage-2 budget is --budgets, not max_steps")
    plans, jobs, seen = [], [], set()
    for n in a.budgets:
        r = {k: list(v) for k, v in routed.items()}
        r["train"].append(f"max_steps={n}")
        plan = cp.make_plan(a, r, tag=f"b{n}", pretrain_dir=a.out / "runs", long_eval=False)
        plans.append(plan)
        for job in plan.jobs:
            if job.name not in seen:
                seen.add(job.name)
                jobs.append(job)
    # Stage 1 first (every pretrained run waits on it), then budget by budget, smallest first, its
    # trainings then its evaluations: an interrupted curve has every seed of the small budgets complete
    # (the ones where a pretraining benefit would show) rather than trainings without evaluations.
    def rank(job):
        if job.stage == "pretrain":
            return (0, 0, 0)
        budget = int(job.name.split(":", 1)[1].split("-", 1)[0][1:])  # train:b300-scratch-seed0 -> 300
        return (1, budget, 0 if job.stage == "train" else 1)

    jobs.sort(key=rank)
    return plans, jobs


def run_numbers(run_dir: Path) -> dict:
    done = cp._read_json(run_dir / "done.json") or {}
    ev = cp._read_json(run_dir / "eval.json") or {}
    s = (ev.get("splits", {}).get("test") or {}).get("summary") or {}
    return {"heldout_loss_same_position": done.get("tf_loss_test"), "return_last5": s.get("last_k_mean"),
            "episodes_to_0.8": s.get("episodes_to_0.8"), "complete": bool(done) and bool(s),
            "optimal_mean": s.get("optimal_mean"), "n_episodes": s.get("n_episodes"),
            "last_k": s.get("last_k"), "run_dir": str(run_dir)}


def step_cost_ratio(timings: dict, plans: list, a) -> float | None:
    """Stage-1 wall seconds per step / stage-2 wall seconds per step, medians over this run's jobs."""
    s1, s2 = [], []
    for plan in plans:
        for s, rd in plan.pretrain_runs.items():
            t, done = timings.get(f"pretrain:seed{s}"), cp._read_json(rd / "done.json") or {}
            if t and done.get("global_step"):
                s1.append(t / done["global_step"])
        for (arm, s), rd in plan.runs.items():
            t = timings.get(f"train:{rd.name}")
            done = cp._read_json(rd / "done.json") or {}
            if t and done.get("global_step"):
                s2.append(t / done["global_step"])
    return statistics.median(s1) / statistics.median(s2) if s1 and s2 else None


def stage1_config(routed: dict, plan) -> dict:
    """The composed stage-1 config this curve's pretrained arms start from."""
    return cp._plain(cp.compose("pretrain", routed["pretrain"] + [f"data_path={plan.data_path}"]))


def summarize(a, plans: list, routed: dict, timings: dict) -> dict:
    stage1_steps = None
    if any(arm in cp.PRETRAINED_ARMS for arm in a.arms):
        stage1_steps = int(stage1_config(routed, plans[0])["pretrain_steps"])
    ratio = step_cost_ratio(timings, plans, a)
    rows = []
    for n, plan in zip(a.budgets, plans):
        for arm in a.arms:
            per_seed = {str(s): run_numbers(plan.runs[(arm, s)]) for s in a.seeds}
            row = {"arm": arm, "stage2_steps": n,
                   "stage1_steps": stage1_steps if arm in cp.PRETRAINED_ARMS else 0,
                   "seeds": [s for s in a.seeds if per_seed[str(s)]["complete"]]}
            for k in METRICS:
                mean, std, cnt = cp._mean_std([r[k] for r in per_seed.values()])
                row[k], row[f"{k}_std"], row[f"{k}_n"] = mean, std, cnt
            row["compute_stage2_step_equiv"] = (n + row["stage1_steps"] * ratio) if ratio else None
            row["per_seed"] = per_seed
            rows.append(row)
    return {"rows": rows, "stage1_cost_per_step_vs_stage2": ratio}


def _diff(rows: dict, arm: str, n: int, key: str):
    """(mean(arm) - mean(scratch), standard error of that difference) at budget n, or None."""
    x, y = rows.get((arm, n)), rows.get(("scratch", n))
    if not x or not y or x[key] is None or y[key] is None:
        return None
    se = math.sqrt(sum((r[f"{key}_std"] or 0.0) ** 2 / max(1, r[f"{key}_n"]) for r in (x, y)))
    return x[key] - y[key], se


def verdict(rep: dict) -> list[str]:
    """One plain sentence per budget and pretrained arm: better / worse / within seed noise (|diff| <= 2 SE)."""
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
                parts.append(f"{METRICS[key][0].split(' (')[0]} {diff:+.3f} ± {se:.3f} ({word})")
            if parts:
                out.append(f"- {n} stage-2 steps, `{arm}` vs `scratch`: " + "; ".join(parts))
    return out


def render_markdown(rep: dict) -> str:
    lines = [f"# Does pretraining help? The budget curve ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}", f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']}`", f"- **Stage 1:** {rep['stage1']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over seeds; (n=k): only k "
              f"seeds have the number, e.g. reached 0.8 of optimal)"),
             (f"- **Compute:** stage-2-step equivalents; one stage-1 step costs "
              f"{cp._fmt(rep['stage1_cost_per_step_vs_stage2'], '.2f')} stage-2 steps (measured wall time per "
              f"step, median over this run's jobs)"),
             f"- **Status:** {'complete' if rep['complete'] else 'INCOMPLETE: ' + ', '.join(rep['missing'])}", "",
             "| arm | stage-2 steps | stage-1 steps | compute | " + " | ".join(
                 f"{lab} ({b} is better)" for lab, b, _ in METRICS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for r in rep["rows"]:
        cells = []
        for k, (_, _, fmt) in METRICS.items():
            c = cp._fmt(r[k], fmt) + ("" if r[f"{k}_std"] is None else f" ± {cp._fmt(r[f'{k}_std'], fmt)}")
            if r[k] is not None and r[f"{k}_n"] < len(rep["seeds"]):
                c += f" (n={r[f'{k}_n']})"
            cells.append(c)
        lines.append(f"| `{r['arm']}` | {r['stage2_steps']} | {r['stage1_steps']} | "
                     f"{cp._fmt(r['compute_stage2_step_equiv'], '.0f')} | " + " | ".join(cells) + " |")
    lines += ["", ("**What the data says** (difference of means, ± standard error of the difference; 'within "
                   "seed noise' when |difference| ≤ 2 SE):"), ""] + (verdict(rep) or ["- no complete pair yet"])
    lines += ["", ("Held-out action NLL: train.py's `tf_loss_test` (teacher-forced over every step of every "
                   "test-goal history, each model with its rollout schedule). Returns: evaluate.py on the held-out "
                   f"goals, {rep['eval']}. Per-seed numbers and run dirs: summary.json. Plot: budget.png."), ""]
    return "\n".join(lines)


def plot(path: Path, rep: dict) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for i, key in enumerate(("heldout_loss_same_position", "return_last5")):
        for j, xkey in enumerate(("stage2_steps", "compute_stage2_step_equiv")):
            ax = axes[i, j]
            for arm in rep["arms"]:
                pts = [(r[xkey], r[key], r[f"{key}_std"] or 0.0) for r in rep["rows"]
                       if r["arm"] == arm and r[xkey] is not None and r[key] is not None]
                if pts:
                    x, y, e = map(np.asarray, zip(*pts))
                    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=COLORS[arm], label=arm)
            ax.set_xscale("log")
            ax.set_xlabel("stage-2 steps" if j == 0 else "total compute (stage-2-step equivalents, incl. stage 1)")
            ax.set_ylabel(METRICS[key][0])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"Does pretraining help? {rep['scale']}, {rep['date']}", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)


def write_report(a, plans: list, routed: dict, command_line: str, timings: dict, failed: list) -> dict:
    summ = summarize(a, plans, routed, timings)
    missing = [f"b{r['stage2_steps']}-{r['arm']}-seed{s}" for r in summ["rows"] for s in a.seeds
               if not r["per_seed"][str(s)]["complete"]]
    first = next((v for r in summ["rows"] for v in r["per_seed"].values() if v["complete"]), {})
    pc = stage1_config(routed, plans[0])
    dev = "GPU" if a.accelerate else "CPU"

    rep = {
        "format_version": 1,
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": command_line,
        "experiment": a.experiment,
        "scale": f"{cp.SCALES.get(a.experiment, 'custom scale')}: experiment={a.experiment}, "
                 f"{'accelerate launch' if a.accelerate else f'{os.cpu_count()}-core {dev}'}",
        "arms": a.arms, "seeds": a.seeds, "budgets": a.budgets,
        "dataset": str(plans[0].data_path),
        "stage1": f"{pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}, "
                  f"recon_loss {pc['model'].get('recon_loss')}, recon_decoder {pc['model'].get('recon_decoder', 'parallel')}",
        "eval": (f"{first.get('n_episodes')} episodes, last {first.get('last_k')}, mean optimal return "
                 f"{cp._fmt(first.get('optimal_mean'), '.2f')}"),
        "stage1_cost_per_step_vs_stage2": summ["stage1_cost_per_step_vs_stage2"],
        "complete": not missing, "missing": missing, "failed_jobs": failed,
        "rows": summ["rows"], "overrides": routed, "timings_s": timings,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(a.out / "table.md", render_markdown(rep))
    plot(a.out / "budget.png", rep)
    return rep


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    command_line = shlex.join(["python", "experiments/pretrain_budget.py", *argv])
    routed = cp.route_overrides([f"experiment={a.experiment}", *DEFAULT_OVERRIDES, *a.overrides])
    print(f"budget curve: arms {' '.join(a.arms)} | budgets {' '.join(map(str, a.budgets))} | seeds "
          f"{' '.join(map(str, a.seeds))} | experiment={a.experiment} | out {a.out}", flush=True)
    plans, jobs = make_plans(a, routed)
    collect = plans[0].collect
    done = cp.execute(a, collect, jobs)
    if done is None:
        return {"plans": plans, "jobs": jobs}
    timings, failed = done
    rep = write_report(a, plans, routed, command_line, timings, failed)
    print(f"\nwrote {a.out / 'summary.json'}, table.md, budget.png", flush=True)
    print(render_markdown(rep), flush=True)
    cp.exit_if_failed(failed)
    return rep


if __name__ == "__main__":
    try:
        main()
    except cp.CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (finished runs are reused)", file=sys.stderr)
        sys.exit(130)
