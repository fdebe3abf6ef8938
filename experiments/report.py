"""The report of a sweep: a reader of finished run directories (nothing is run).

    python experiments/report.py results/pretrain-budget-quick    # summary.json, table.md, budget.png
    python experiments/report.py results/memory-mid               # summary.json, table.md, curves.png

experiments/sweep.py calls `write(out)` when a multirun ends. The record's `sweep` picks the report in REPORTS
(docs/design.md §2, §7): adding an experiment is adding one there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write_text, os_error_reason
from errors import UserError
from experiments import plots, runs, stats
from experiments.runs import load_jobs, read_json, window_label
from experiments.stage1 import stage1_diagnostics, stage1_markdown
from experiments.stats import md_table


class ReportError(UserError, RuntimeError):
    """Nothing to report from the given folder; one line."""


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _header(rep: dict, title: str, *lines: str) -> list[str]:
    st, carried = rep.get("run_status") or {}, rep.get("carried") or []
    status = "complete" if rep["complete"] else "INCOMPLETE: " + ", ".join(
        f"{n} ({st[n]})" if n in st else n for n in rep["missing"])
    return [f"# {title} ({rep['experiment']})", "", f"- **Scale:** {rep['scale']}",
            f"- **Machine:** {rep.get('machine', '?')}", f"- **Date:** {rep['date']}",
            f"- **Command:** `{rep['command']}`", *lines, f"- **Status:** {status}",
            *[(f"- **Carried:** {len(carried)} runs reported from this file's previous per-seed numbers (their "
               f"run dirs are gone): {', '.join(carried)}")][:bool(carried)], ""]


# compare: does pretraining help? (table.md, table.json, curves.png)
COMPARE_METRICS = {  # metric key -> (label in table.md, "lower" | "higher" is better, format)
    **{f"train_loss_action_{int(f * 100)}": (f"train action loss @ {int(f * 100)}% of steps", "lower", ".3f")
       for f in runs.TRAIN_FRACS},
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
COMPARE_REFERENCE = "scratch"  # every arm is compared with stage 2 from scratch, seed by seed
COMPARE_PAIRED = ("heldout_loss_same_position", "return_last5_normalized", "long_return_tail_normalized")


def compare(tj: list[dict], jobs: list[dict], info: dict) -> dict:
    df = runs.run_table(tj, runs.compare_run)
    arms = sorted({r["arm"] for r in tj}, key=runs.arm_rank)
    d = runs.describe(df, "arm", COMPARE_METRICS)
    results, cfgs = {}, {}
    for arm in arms:
        g = df[df["arm"] == arm]
        cfgs[arm] = next((r["config"] for r in g["rec"] if r["config"]), {})
        mc = cfgs[arm].get("model") or {}
        results[arm] = {"label": g["job"].iloc[0]["label"],
                        "memory": (f"window {mc.get('context_len')} steps" if mc.get("name") == "ad" else
                                   f"window {mc.get('seg_len')} steps + {mc.get('n_latent')} latents"),
                        **{f: {k: d.loc[arm, k][s] for k in COMPARE_METRICS}
                           for f, s in (("mean", "mean"), ("std", "sd"), ("n", "n"))},
                        "per_seed": dict(zip(g["seed"], g["run"]))}
    ref = COMPARE_REFERENCE if COMPARE_REFERENCE in results else None
    paired = {} if ref is None else {
        arm: stats.paired_records({s: p["metrics"] for s, p in results[arm]["per_seed"].items()},
                                  {s: p["metrics"] for s, p in results[ref]["per_seed"].items()},
                                  {k: COMPARE_METRICS[k][1] for k in COMPARE_PAIRED}) for arm in arms if arm != ref}
    budgets = {arm: f"{c.get('max_steps')} optimizer steps x batch {c.get('batch_size')}, lr {c.get('lr')}"
               for arm, c in cfgs.items() if c}
    budget = (f"{next(iter(budgets.values()), 'no run')} (every arm)" if len(set(budgets.values())) <= 1 else
              "; ".join(f"`{arm}`: {b}" for arm, b in budgets.items()))
    pc, pretrain_runs = runs.stage1(jobs)
    if pc:
        budget += f"; stage 1: {pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}"

    def first(key):  # a per-run fact that is the same for every run (None if no run got that far)
        return next((p[key] for a in arms for p in results[a]["per_seed"].values() if p.get(key)), None)

    def settings(name):  # an evaluation's settings, from the first run that has that evaluation
        c = next((r[name]["config"] for r in df["rec"] if r[name]), None)
        return {"n_episodes": c and c["n_episodes"], "seeds_per_goal": c and c["seeds_per_goal"]}

    tail = first("long_tail_episodes")
    devices = {p.get("eval_device") for p in df["run"]}
    return {"format_version": 1, **runs.provenance(tj, info, df, devices),
            "cwd": info.get("cwd"), "arms": arms, "seeds": sorted({r["seed"] for r in tj}), "budget": budget,
            "dataset": runs.dataset_info(next((c for c in cfgs.values() if c), {}).get("data_path")),
            "eval": {**settings("eval"), "last_k": first("eval_last_k"), "n_test_goals": first("n_test_goals"),
                     "optimal_mean": first("optimal_mean")},
            "long_eval": {**settings("eval_long"), "last_k": first("long_last_k"),
                          "tail_episodes": f"{tail[0]}-{tail[1]}" if tail else "–"},
            "metrics": {k: {"label": lab, "better": b} for k, (lab, b, _) in COMPARE_METRICS.items()},
            "results": results,
            "runs": {f"{a}-seed{r['seed']}": r["run_dir"] for a in arms for r in tj if r["arm"] == a},
            "pretrain_runs": pretrain_runs, "paired_vs": ref, "paired": paired,
            "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
            "timings_s": runs.timings(jobs), **stage1_diagnostics(jobs)}


def compare_markdown(rep: dict) -> str:
    arms, res = rep["arms"], rep["results"]
    rows = [{"metric": "memory", **{f"`{arm}`": res[arm]["memory"] for arm in arms}}]
    for k, (label, better, fmt) in COMPARE_METRICS.items():
        kk = rep["long_eval" if k.startswith("long_") else "eval"].get("last_k")
        if kk:  # evaluate.py clips last_k to n_episodes
            label = label.replace("last 5", f"last {kk}").replace("last-5", f"last-{kk}")
        means = {arm: res[arm]["mean"][k] for arm in arms}
        valid = [v for v in means.values() if v is not None]
        best = (min(valid) if better == "lower" else max(valid)) if len(valid) > 1 else None
        cells = {arm: stats.fmt_describe({"mean": means[arm], "sd": res[arm]["std"][k], "n": res[arm]["n"][k]}, fmt)
                 for arm in arms}
        rows.append({"metric": f"{label} ({better} is better)",
                     **{f"`{a}`": f"**{c}**" if best is not None and means[a] == best else c
                        for a, c in cells.items()}})
    lines = _header(rep, "Does pretraining help? CompressedAD comparison",
                    f"- **Dataset:** `{rep['dataset']['path']}` ({rep['dataset'].get('summary', '')})",
                    f"- **Budget:** {rep['budget']}",
                    (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample std over training "
                     "seeds; a cell marked (n=k) averages only the k seeds whose runs finished)")) + [md_table(rows)]
    if rep.get("paired"):
        lines += ["", (f"**Paired differences** (arm − `{rep['paired_vs']}`, same seed and data; mean [95 % "
                       "t-interval]; a difference is one only when its interval excludes 0):"), "",
                  md_table([{"arm": f"`{arm}`", **{f"{COMPARE_METRICS[k][0]} ({COMPARE_METRICS[k][1]} is better)":
                                                   stats.fmt_paired(pk[k], COMPARE_METRICS[k][2]) for k in pk}}
                            for arm, pk in rep["paired"].items()])]
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
               "Curves: curves.png."), ""] + stage1_markdown(rep)
    return "\n".join(lines)


# pretrain-budget: the budget curve (summary.json, table.md, budget.png)
BUDGET_METRICS = {
    "heldout_loss_same_position": ("held-out action NLL, same positions (tf_loss_test)", "lower", ".3f"),
    "return_last5": ("held-out return, last 5 episodes", "higher", ".2f"),
    "return_last5_norm": ("held-out return / optimal, last 5 episodes", "higher", ".3f"),
    "episodes_to_0.8": ("episodes to 0.8 of optimal (5-ep. mean)", "lower", ".1f"),
    "return_last5_norm_val": ("val: return / optimal, last 5 episodes", "higher", ".3f"),
    "tf_loss_val": ("val: action NLL, same positions", "lower", ".3f"),
}
BUDGET_PAIRED = ("heldout_loss_same_position", "return_last5_norm", "return_last5_norm_val", "tf_loss_val")


def pretrain_budget(tj: list[dict], jobs: list[dict], info: dict) -> dict:
    arms = sorted({r["arm"] for r in tj}, key=runs.arm_rank)
    df = runs.run_table([r for r in tj if r.get("budget")], runs.budget_run)
    pc, _ = runs.stage1(jobs)
    ratio = runs.step_cost_ratio(jobs)
    d = runs.describe(df, ["budget", "arm"], BUDGET_METRICS)
    rows = []
    for n, arm in sorted(((int(n), a) for n, a in d.index), key=lambda na: (na[0], runs.arm_rank(na[1]))):
        g = df[(df["budget"] == n) & (df["arm"] == arm)]
        s1 = int(pc["pretrain_steps"]) if g["job"].iloc[0].get("encoder") and pc else 0  # from this seed's encoder
        rows.append({"arm": arm, "stage2_steps": int(n), "stage1_steps": s1,
                     "seeds": [int(s) for s, p in zip(g["seed"], g["run"]) if p["complete"]],
                     **{f"{k}{x}": d.loc[(n, arm), k][s] for k in BUDGET_METRICS
                        for x, s in (("", "mean"), ("_std", "sd"), ("_n", "n"))},
                     "compute_stage2_step_equiv": (n + s1 * ratio) if ratio else None,
                     "per_seed": dict(zip(g["seed"], g["run"]))})
    first = next((p for r in rows for p in r["per_seed"].values() if p["complete"]), {})
    tc = (read_json(Path(tj[0]["run_dir"]) / "config.json") or {}) if tj else {}
    devices = {p.get("device") for r in rows for p in r["per_seed"].values()}
    return {"format_version": 1, **runs.provenance(tj, info, df, devices),
            "arms": arms, "seeds": sorted({r["seed"] for r in tj}),
            "budgets": sorted({r["stage2_steps"] for r in rows}),
            "dataset": runs.checkout_path(tc.get("data_path")),
            "stage1": (f"{pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}, "
                       + ", ".join(f"{k} {pc[k]}" for k in runs.STAGE1_MODEL_KEYS if pc.get(k) is not None)
                       if pc else "none"),
            "eval": (f"{first.get('n_episodes')} episodes, last {first.get('last_k')}, mean optimal return "
                     f"{_fmt(first.get('optimal_mean'), '.2f')}"),
            "stage1_cost_per_step_vs_stage2": ratio, "rows": rows,
            "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
            "timings_s": runs.timings(jobs), **stage1_diagnostics(jobs)}


def verdict(rep: dict) -> list[str]:
    """One sentence per budget and arm vs scratch: each metric's paired difference (same seed) with its 95 %
    t-interval and the verdict that interval gives (stats.paired)."""
    rows = {(r["arm"], r["stage2_steps"]): r for r in rep["rows"]}
    out = []
    for n in rep["budgets"]:
        for arm in (x for x in rep["arms"] if x != "scratch" and ("scratch", n) in rows and (x, n) in rows):
            p = stats.paired_records(rows[(arm, n)]["per_seed"], rows[("scratch", n)]["per_seed"],
                                     {k: BUDGET_METRICS[k][1] for k in BUDGET_PAIRED})
            parts = [f"{BUDGET_METRICS[k][0].split(' (')[0]} {stats.fmt_paired(p[k], BUDGET_METRICS[k][2])}"
                     for k in BUDGET_PAIRED if p[k]["n"]]
            if parts:
                out.append(f"- {n} stage-2 steps, `{arm}` vs `scratch`: " + "; ".join(parts))
    return out


def budget_markdown(rep: dict) -> str:
    table = md_table([{"arm": f"`{r['arm']}`", "stage-2 steps": str(r["stage2_steps"]),
                       "stage-1 steps": str(r["stage1_steps"]),
                       "compute": _fmt(r["compute_stage2_step_equiv"], ".0f"),
                       **{f"{lab} ({b} is better)": stats.fmt_describe(
                           {"mean": r[k], "sd": r[f"{k}_std"], "n": r[f"{k}_n"]}, fmt)
                          for k, (lab, b, fmt) in BUDGET_METRICS.items()}} for r in rep["rows"]])
    lines = _header(rep, "Does pretraining help? The budget curve", f"- **Dataset:** `{rep['dataset']}`",
                    f"- **Stage 1:** {rep['stage1']}",
                    (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over seeds; (n=k): only "
                     "k seeds have the number, e.g. reached 0.8 of optimal)"),
                    (f"- **Compute:** stage-2-step equivalents; one stage-1 step costs "
                     f"{_fmt(rep['stage1_cost_per_step_vs_stage2'], '.2f')} stage-2 steps (measured wall time per training "
                     "step, median over this sweep's runs)"))
    lines += [table, "", ("**What the data says** (arm − scratch at the same budget, same seed; mean [95 % "
                          "t-interval]; a difference is one only when its interval excludes 0):"), ""]
    lines += (verdict(rep) or ["- no complete pair yet"]) + [
        "", ("Held-out action NLL: train.py's `tf_loss_test` (teacher-forced over every step of every test-goal "
             "history, each model with its rollout schedule). Returns: evaluate.py on the held-out goals, "
             f"{rep['eval']}. Per-seed numbers and run dirs: summary.json. Plot: budget.png."), ""] + stage1_markdown(rep)
    return "\n".join(lines)


# memory: AD window w / 3w vs CompressedAD window w (summary.json, table.md, curves.png)
MEMORY_COLUMNS = (  # row key -> (table header, format, "higher" | "lower" is better); test goals unless "val"
    ("return_last5_norm", "return / optimal, last 5 of the eval", ".3f", "higher"),
    ("return_first_norm", "return / optimal, episode 1", ".3f", "higher"),
    ("episodes_to_0.8", "episodes to 0.8 of optimal", ".1f", "lower"),
    ("return_last5_norm_long", "long rollout: return / optimal, last 5", ".3f", "higher"),
    ("episodes_to_0.8_long", "long rollout: episodes to 0.8", ".1f", "lower"),
    ("found_goal_frac", "streams that found the goal", ".2f", "higher"),
    ("episodes_to_first_goal", "episodes to first goal", ".1f", "lower"),
    ("return_after_found", "return after found / optimal", ".3f", "higher"),
    ("tf_loss_test", "test NLL (same position)", ".4f", "lower"),
    ("return_last5_norm_val", "val: return / optimal, last 5", ".3f", "higher"),
    ("tf_loss_val", "val NLL (same position)", ".4f", "lower"),
    ("goal_acc_after", "goal readout acc., after find", ".3f", "higher"),
    ("goal_acc_before", "goal readout acc., before find", ".3f", "higher"),
    ("goal_acc_const", "constant guess acc., after find", ".3f", "higher"),
    ("door_acc_after", "door readout acc., after opened (Key-to-Door)", ".3f", "higher"),
    ("key_found_last_k", "key found, last 5 (Key-to-Door)", ".2f", "higher"),
    ("door_found_last_k", "door opened, last 5 (Key-to-Door)", ".2f", "higher"),
)
# What the memory holds (goal_readout.py, test goals): the readout after the find minus a reference, within
# each run, with the t-interval over seeds.
GOAL_READOUT_GAPS = (("after_minus_constant", "goal_acc_after", "goal_acc_const", "after − constant"),
                     ("after_minus_before", "goal_acc_after", "goal_acc_before", "after − before"),
                     # Key-to-Door's second cell (the first above is its key): found when the door first paid
                     ("door_after_minus_constant", "door_acc_after", "door_acc_const", "door: after − constant"),
                     ("door_after_minus_before", "door_acc_after", "door_acc_before", "door: after − before"))
# The paired comparisons of the memory table: each arm minus the group's reference arm, same seed.
MEMORY_PAIRED = ("return_last5_norm", "return_after_found", "episodes_to_first_goal", "tf_loss_test",
                 "return_last5_norm_val", "tf_loss_val")
MEMORY_REFERENCE = "ad"  # AD with the same raw window: the arm every memory must beat
# The second bar: AD with 3x the window (issue 22's moonshot: a memory that matches it at a fraction of its
# rollout cost); each arm's paired differences to it, on these metrics, go to row["paired_3w"].
MEMORY_REFERENCE_3W = "ad_3w"
MEMORY_PAIRED_3W = ("return_last5_norm", "episodes_to_0.8", "return_last5_norm_long", "return_after_found",
                    "return_last5_norm_val", "tf_loss_test")
COMPUTE_COLUMNS = (  # what each arm paid (done.json's compute, this process's training steps)
    ("labels_per_step", "labels / step", ".0f"),
    ("train_wall_s", "training wall (s)", ".0f"),
    ("labels_total", "labels trained (M)", ".2f"),
    ("rollout_ms_per_step", "rollout ms / step", ".2f"),
)


def memory(tj: list[dict], jobs: list[dict], info: dict) -> dict:
    df = runs.run_table(tj, runs.memory_run)
    by = ["sweep_env", "sweep_window", "arm"]
    d = runs.describe(df, by, [c[0] for c in MEMORY_COLUMNS + COMPUTE_COLUMNS])
    rows = []
    for (env, w, arm), g in df.groupby(by, sort=False):
        per_seed = dict(zip(g["seed"], g["run"]))
        first = next((p for p in per_seed.values() if p["complete"]), g["run"].iloc[0])
        # all − k1 within each run (paired by construction); lower is better: the history beyond the last
        # segment helps
        gap = stats.interval(p["probe_gap"] for p in per_seed.values())
        gaps = {name: stats.interval(p[a] - p[b] for p in per_seed.values() if p[a] is not None and p[b] is not None)
                for name, a, b, _ in GOAL_READOUT_GAPS}
        rows.append({"env": first["env"] or env, "sweep_window": int(w), "arm": arm, "window": first["window"],
                     "keep_recent": first["keep_recent"],
                     "seeds": [int(s) for s, p in per_seed.items() if p["complete"]],
                     "stats": d.loc[(env, w, arm)].to_dict(), "memory_probe": None if not gap["n"] else {
                         "k1": stats.describe(p["probe_k1"] for p in per_seed.values()),
                         "all": stats.describe(p["probe_all"] for p in per_seed.values()),
                         "all_minus_k1": {**gap, "verdict": stats.verdict(gap["lo"], gap["hi"], better="lower")}},
                     "goal_readout": {n: {**gi, "verdict": stats.verdict(gi["lo"], gi["hi"], "higher")}
                                      for n, gi in gaps.items() if gi["n"]},
                     "steps": first["steps"],
                     "device": runs.device_label({first["device"]}) if first["device"] else None,
                     "label": g["job"].iloc[0].get("label"), "per_seed": per_seed})
    better = {k: b for k, _, _, b in MEMORY_COLUMNS}
    def ref_row(row, arm):  # the reference arm's row of the same env and sweep window
        return next((r for r in rows if r["arm"] == arm and r["env"] == row["env"]
                     and r["sweep_window"] == row["sweep_window"] and r is not row), None)

    for row in rows:  # paired differences to the reference arms
        ref, ref3 = ref_row(row, MEMORY_REFERENCE), ref_row(row, MEMORY_REFERENCE_3W)
        row["paired_vs"] = None if ref is None else MEMORY_REFERENCE
        row["paired"] = {} if ref is None else stats.paired_records(
            row["per_seed"], ref["per_seed"], {k: better[k] for k in MEMORY_PAIRED})
        row["paired_3w"] = {} if ref3 is None or row["arm"] == MEMORY_REFERENCE else stats.paired_records(
            row["per_seed"], ref3["per_seed"], {k: better[k] for k in MEMORY_PAIRED_3W})
        # an arm file's `pair_with`: the arms it differs from in one design choice each (e.g. the kept window;
        # carried vs exactly refolded memory)
        pw = runs.arm_file(row["arm"]).get("pair_with") or []
        others = [o for o in (ref_row(row, a) for a in ([pw] if isinstance(pw, str) else pw)) if o is not None]
        row["paired_with"] = [{"vs": o["arm"], **stats.paired_records(
            row["per_seed"], o["per_seed"], {k: better[k] for k in MEMORY_PAIRED})} for o in others]
    data = {r["env"]: runs.dataset_info(next(p["data_path"] for p in r["per_seed"].values())) for r in rows}
    for d_ in data.values():
        d_["source_search_use_test"] = runs.source_search_use(d_["path"]) if d_.get("n_steps") else None
    prov = runs.provenance(tj, info, df)
    redone = sorted({p["remeasured"]["command"] for r in rows for p in r["per_seed"].values() if p.get("remeasured")})
    prov["command"] = " ; ".join([prov["command"]] + redone)  # the end-of-run measurements redone since too
    return {"format_version": 2, **{k: prov.pop(k) for k in ("date", "command", "experiment", "scale", "machine")},
            "seeds": sorted({r["seed"] for r in tj}), "datasets": data, **prov, "rows": rows,
            "timings_s": runs.timings(jobs)}


def memory_paired_table(rows: list[dict], field: str) -> str:
    """The rows' paired differences stored in row[field] (paired, paired_3w, or paired_with: a list of pairs,
    each with its "vs" arm), one table row per pair with at least one complete seed; "" when none has.
    report.md and the docs blocks (docs_tables.py) both render these tables."""
    metrics = MEMORY_PAIRED_3W if field == "paired_3w" else MEMORY_PAIRED
    heads = {k: (h, fmt, b) for k, h, fmt, b in MEMORY_COLUMNS}
    pairs = [(r, p) for r in rows for p in (r.get(field) if isinstance(r.get(field), list) else [r.get(field) or {}])
             if any(v["n"] for k, v in p.items() if k != "vs")]
    return md_table([{"env": r["env"], "arm": f"`{r['arm']}`", "window": window_label(r),
                      **({"− arm": f"`{p['vs']}`"} if "vs" in p else {}),
                      **{f"{heads[k][0]} ({heads[k][2]} is better)": stats.fmt_paired(p[k], heads[k][1])
                         for k in metrics}} for r, p in pairs]) if pairs else ""


def memory_markdown(rep: dict) -> str:
    def ident(r):
        return {"env": r["env"], "arm": f"`{r['arm']}`", "window": window_label(r)}

    cols = [c for c in MEMORY_COLUMNS if any((r["stats"].get(c[0]) or {}).get("n") for r in rep["rows"])]  # no run: out
    main = [{**ident(r), **{f"{h} ({b} is better)": stats.fmt_describe(r["stats"][k], fmt) for k, h, fmt, b in cols},
             "memory probe all − k1 (nats, 95 % CI)": "–" if r["memory_probe"] is None
             else stats.fmt_paired(r["memory_probe"]["all_minus_k1"], ".4f")} for r in rep["rows"]]
    for env, d in rep["datasets"].items():
        su = d.get("source_search_use_test")
        if su and su.get("episodes_to_first_goal") is not None:
            have = {**su, "return_after_found": su["return_after_found_normalized"]}
            main.append(dict(zip(main[0], [env, "source (its own histories)", "–"]
                                 + [_fmt(have.get(k), fmt) for k, _, fmt, _ in cols] + ["–"])))
    lines = _header(rep, "Memory table",
                    f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample sd (n = seeds))")
    lines += ["Test goals unless marked val (validation goals: where designs are chosen).", "", md_table(main)]
    if any(r.get("goal_readout") for r in rep["rows"]):
        heads = [(n, h) for n, _, _, h in GOAL_READOUT_GAPS
                 if any(n in (r.get("goal_readout") or {}) for r in rep["rows"])]
        door = ("; on Key-to-Door the first cell is the key, found by an episode's first reward, and the door is "
                "found by its second") if any(n.startswith("door") for n, _ in heads) else ""
        lines += ["", ("**What the memory holds** (goal_readout.py, test goals: accuracy of a linear readout of "
                       "the goal cell from the latents, after the first find minus the constant guess and minus "
                       f"the readout before the find, within each run{door}; mean [95 % t-interval over seeds]):"), "",
                  md_table([{**ident(r), **{h: stats.fmt_paired(r["goal_readout"][n], ".3f")
                                            if n in r["goal_readout"] else "–" for n, h in heads}}
                            for r in rep["rows"] if r.get("goal_readout")])]
    lines += ["", ("**What each arm paid** (mean over the seeds that have the figure; training wall: all of a run's "
                   "steps, resumes included — a run resumed before that was recorded has none; from done.json):"), "",
              md_table([{**ident(r), "steps": str(r["steps"]),
                         **{h: _fmt(r["stats"][k]["mean"], fmt) for k, h, fmt in COMPUTE_COLUMNS},
                         "device": str(r["device"])} for r in rep["rows"]])]
    for field, head in (
            ("paired", (f"**Paired differences** (arm − `{MEMORY_REFERENCE}` with the same window, same seed and "
                        "data; mean [95 % t-interval]; the verdict is read off the interval: a difference is one "
                        "only when its interval excludes 0):")),
            ("paired_3w", (f"**Paired differences to AD with 3x the window** (arm − `{MEMORY_REFERENCE_3W}`, same "
                           "seed and data; mean [95 % t-interval]):")),
            ("paired_with", ("**Paired differences to the arm each one changes** (an arm file's `pair_with`: arm − "
                             "that arm, same seed and data; mean [95 % t-interval]):"))):
        table = memory_paired_table(rep["rows"], field)
        lines += ["", head, "", table] if table else []
    lines += ["", ("Returns: evaluate.py on the held-out goals with frozen weights, sampled actions (`eval.json`; "
                   "the long rollout: `eval_long.json`), divided by the goals' mean optimal return. Episodes to "
                   "0.8: first episode whose 5-episode mean reaches 0.8 of optimal (n counts the seeds that got "
                   "there). Memory probe: same-position held-out NLL with the latents rebuilt from the whole "
                   "history minus the same with the last compressed segment only (k1), per run, with the t-interval "
                   "over seeds (negative: the memory holds something beyond its last segment); AD has none. "
                   "Search vs use (metrics.search_and_use, test goals): the fraction of rollout streams that ever "
                   "found the goal, the first episode with a positive return, and the mean return / optimal of every "
                   "episode after it; the source row scores the dataset's own test-goal histories. NLL: train.py's "
                   "final same-position loss (done.json). Rollout ms/step: wall time per lockstep rollout step of "
                   "the longest eval. Per-seed numbers: summary.json. Curves: curves.png."), ""]
    return "\n".join(lines)


REPORTS = {  # sweep name -> (its report, the record it writes, table.md's markdown, the plot and its file)
    "compare": (compare, "table.json", compare_markdown, plots.compare_plot, "curves.png"),
    "pretrain-budget": (pretrain_budget, "summary.json", budget_markdown, lambda path, rep: plots.budget_plot(
        path, rep, {k: v[0] for k, v in BUDGET_METRICS.items()}), "budget.png"),
    "memory": (memory, "summary.json", memory_markdown, plots.memory_plot, "curves.png")}


# The reports whose per-seed records hold every number they read from a run dir: a finished run whose run dir
# and kept record are gone (a sweep filled before records/ existed, on a machine since returned) is reported
# from the previous record's per-seed numbers and listed as carried. The others also read stage-1 runs or
# TensorBoard files, which their records do not hold: they refuse rather than report less than their record.
CARRIES = {"memory"}


def write(out: Path) -> dict:
    """Write the report of the sweep in `out` from its planned jobs, job records and run dirs (runs.report_jobs),
    after keeping each finished run's record in <out>/records (runs.keep_record); returns the report dict. A
    disk that cannot take the report files is a ReportError line."""
    out = Path(out)
    info = read_json(out / "sweep.json") or {}
    recorded = load_jobs(out)
    names = ({info.get("sweep")} | {r.get("sweep") for r in recorded if r.get("kind") == "train"}) - {None}
    if len(names) != 1:
        what = "runs of several sweeps: " + ", ".join(sorted(names)) if names else "no sweep runs (no jobs/*.json)"
        raise ReportError(f"{out}: {what}")
    name = names.pop()
    if name not in REPORTS:
        raise ReportError(f"{out}: no report for sweep {name!r} (known: {', '.join(REPORTS)})")
    report, record, markdown, plot, png = REPORTS[name]
    try:
        for r in recorded:
            runs.keep_record(out, Path(r.get("run_dir") or "").name)
        jobs = runs.report_jobs(out, name, info, read_json(out / record))
        gone = sorted(Path(r["run_dir"]).name for r in jobs if r.get("carried"))
        if gone and name not in CARRIES:
            raise ReportError(f"{out}: {len(gone)} finished runs have neither a run dir nor a kept record "
                              f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}); {out / record} holds "
                              "their numbers and is left as it is: restore their run dirs (runs/<name>) to re-report")
        rep = report(runs.train_jobs(jobs), jobs, info)
        atomic_write_text(out / record, json.dumps(rep, indent=1, default=str))
        atomic_write_text(out / "table.md", markdown(rep))
        plot(out / png, rep)
    except OSError as e:
        raise ReportError(f"cannot write the report into {out} ({os_error_reason(e)}: {e.filename or ''}): free "
                          f"space or fix the permissions, then run python experiments/report.py {out}") from None
    rep["sweep"] = name
    return rep


def render(rep: dict) -> str:
    return REPORTS[rep["sweep"]][2](rep)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the sweep's output folder (its `out`, e.g. results/memory-mid)")
    a = p.parse_args(argv)
    try:
        rep = write(Path(a.out))
    except ReportError as e:
        p.exit(2, f"error: {e}\n")
    print(render(rep))
    return rep


if __name__ == "__main__":
    main()
