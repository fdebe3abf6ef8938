"""The report of a sweep: a reader of finished run directories (nothing is run).

    python experiments/report.py results/compare-quick            # table.md, table.json, curves.png
    python experiments/report.py results/pretrain-budget-quick    # summary.json, table.md, budget.png
    python experiments/report.py results/memory-mid               # summary.json, table.md, curves.png

experiments/sweep.py calls `write(out)` when a multirun ends. It reads <out>/sweep.json (the command, the
planned jobs, the evaluations), the job records <out>/jobs/*.json (arm, seed, budget, window, env, identity,
wall seconds) and every run dir's config.json, done.json and <eval>.json (evaluate.py). The report covers
every planned or recorded job, finds its run dir in <out>/runs (a moved out dir reports its own runs) and
takes its state from the run dir, not from the record (report_jobs: done, missing, failed, running,
interrupted, non-finite; Status lists those not done).

Every run is one row of a pandas table (run_table: the job's arm, seed, budget, env and window, and the
numbers `run_record` reads from its run dir, in the report's per-seed schema); a report groups that table
into mean ± sd (n) and paired differences to a reference arm with 95 % t-intervals (experiments/stats.py),
and renders markdown with one helper (md_table). Arm labels, table order and plot colours are declared in
the arm files (experiments/conf/arm/<arm>.yaml: label, order, color). The experiment (the record's `sweep`)
picks the report function: REPORTS[name](out, jobs, info) -> the report dict, written by that function.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd

from atomic_io import atomic_write_text
from errors import UserError
from experiments import plots, stats

SCALES = {"quick": "small scale", "mid": "CPU research scale", "full": "DICP scale"}
DONE = "done"


class ReportError(UserError, RuntimeError):
    """Nothing to report from the given folder; one line."""


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def load_jobs(out: Path) -> list[dict]:
    return [r for r in (read_json(p) for p in sorted((Path(out) / "jobs").glob("*.json"))) if r]


@functools.cache
def arm_file(arm: str) -> dict:
    """experiments/conf/arm/<arm>.yaml (label, order, color, the sweep's keys); {} for a name without a
    file (an arm qualified by report_jobs, such as b20-scratch, or one whose file is gone)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / "conf" / "arm" / f"{arm}.yaml"))
    except (OSError, ValueError):
        return {}


def arm_rank(arm: str) -> tuple:
    """Table order: the arm files' `order`, then the arms without one alphabetically."""
    order = arm_file(arm).get("order")
    return (order, "") if order is not None else (math.inf, arm)


def arm_color(arm: str) -> str:
    return arm_file(arm).get("color", "tab:brown")


# ---------------------------------------------------------------------------------------------------------
# The jobs a report covers: the planned ones (sweep.json) and the recorded ones, each with its run dir in
# this out dir and a status read from that run dir (the records are not trusted for it)
# ---------------------------------------------------------------------------------------------------------
def _held(path: Path) -> bool:
    """Whether a process holds the atomic_io.PathLock of `path` (a sweep job holds its record's while it runs)."""
    import fcntl

    from atomic_io import PathLock

    try:
        fd = os.open(PathLock(path).file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, (dict, list)):
        return all(_finite(v) for v in (x.values() if isinstance(x, dict) else x))
    return True


def _summary(ev: dict, split: str = "test") -> dict:
    """An evaluation's summary of one split ({} when absent)."""
    return ((ev.get("splits") or {}).get(split) or {}).get("summary") or {}


def run_status(out: Path, rec: dict, evals) -> str:
    """done, or why a run is not in the table: running (its job holds its lock), failed, interrupted (a
    record left 'running' or 'interrupted' by a killed job), missing (not trained or not evaluated yet),
    non-finite (a NaN / inf in done.json or an evaluation's test summary). The run dir decides; the record
    only says why it is unfinished."""
    rd = Path(rec["run_dir"])
    done, evs = read_json(rd / "done.json"), [read_json(rd / f"{e}.json") for e in evals]
    if done is None or any(ev is None for ev in evs):
        state = "missing"
    else:
        state = DONE if _finite(done) and all(_finite(_summary(ev)) for ev in evs) else "non-finite"
    if _held(Path(out) / "jobs" / rd.name):
        return "running"
    if rec.get("status") == "failed":
        return "failed"
    if rec.get("status") in ("running", "interrupted") and state == "missing":
        return "interrupted"
    return state


# What a report function already keeps apart; the other run-identity dimensions are added to the arm name
# when the jobs differ in them, so runs of another budget, window, env or sweep config never share a cell.
SEPARATES = {"compare": (), "memory": ("env", "window"), "pretrain-budget": ("budget",)}


def report_jobs(out: Path, name: str, info: dict) -> list[dict]:
    """The job records plus a record for every planned job that has none (sweep.json's `planned`), each
    with its run dir in this out dir (<out>/runs/<name>: a moved or copied out dir reports its own runs) and
    its `run_status`; train jobs of more than one run identity get their arm qualified (SEPARATES)."""
    out = Path(out)
    recs = [dict(r) for r in load_jobs(out)]
    have = {Path(r.get("run_dir", "")).name for r in recs}
    ident = (info.get("identity") or {}).get("hash")
    for j in info.get("planned") or []:
        if j["run"] not in have:
            arm = arm_file(j["arm"])
            recs.append({"kind": "train", "sweep": info.get("sweep"), "arm": j["arm"], "seed": j["seed"],
                         "label": arm.get("label", j["arm"]), "encoder": arm.get("encoder"), "budget": j["budget"],
                         "window": j["window"], "env": j["env"], "experiment": info.get("experiment"),
                         "run_dir": j["run"], "status": "planned", "identity": ident})
    evals = info.get("evals") or ["eval"]
    for r in recs:
        r["run_dir"] = str(out / "runs" / Path(r.get("run_dir") or "").name)
        if r.get("kind") == "train":
            r["run_status"] = run_status(out, r, evals)
    tj = [r for r in recs if r.get("kind") == "train"]
    dims = [d for d in ("env", "window", "budget", "identity")
            if d not in SEPARATES.get(name, ()) and len({r.get(d) for r in tj}) > 1]
    for r in tj if dims else ():
        tag = {"env": str(r["env"] or "preset-env"), "window": f"w{r['window']}", "budget": f"b{r['budget']}"}
        r["arm_name"] = r["arm"]
        r["arm"] = "-".join([tag[d] for d in dims if d in tag] + [r["arm"]]
                            + [f"id{str(r.get('identity'))[:6]}"] * ("identity" in dims))
    return recs


def status_fields(tj: list[dict], missing: list[str]) -> dict:
    """The report's complete / missing / run_status: every train job the report covers must be `done`
    (run_status) and have its numbers (`missing`, the table function's own finding)."""
    status = {Path(r["run_dir"]).name: r.get("run_status", DONE) for r in tj}
    for m in missing:
        status[m] = status.get(m) if status.get(m, DONE) != DONE else "missing"
    bad = sorted(n for n, st in status.items() if st != DONE)
    return {"complete": not bad, "missing": bad, "run_status": {n: status[n] for n in bad},
            "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"]}


def status_line(rep: dict) -> str:
    if rep["complete"]:
        return "complete"
    st = rep.get("run_status") or {}
    return "INCOMPLETE: " + ", ".join(f"{n} ({st[n]})" if n in st else n for n in rep["missing"])


# ---------------------------------------------------------------------------------------------------------
# Provenance, and the table of runs
# ---------------------------------------------------------------------------------------------------------
def sweep_commands(info: dict) -> str:
    """Every sweep command that wrote into this out dir (sweep.json `commands`, oldest first), joined by ' ; '
    (one out dir may be filled by several sweeps of the same configuration: other arms or seeds)."""
    cmds = info.get("commands") or ([info["command"]] if info.get("command") else [])
    return " ; ".join(cmds) or "?"


def machine() -> str:
    """What measured: host, cores and torch (a report's provenance line)."""
    import platform

    import torch

    return f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}"


def provenance(tj: list[dict], info: dict, missing: list[str], devices=None) -> dict:
    """The fields every report starts with: date, command, experiment, its scale (on which device), status."""
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    scale = f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment}"
    return {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "command": sweep_commands(info),
            "experiment": experiment, "scale": scale + (f" on {device_label(devices)}" if devices is not None else ""),
            "machine": machine(), **status_fields(tj, missing)}


def device_label(devices: set) -> str:
    if any(str(d).startswith("cuda") for d in devices if d):
        try:
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001 -- only a label
            return "GPU"
    return f"a {os.cpu_count()}-core CPU"


def dataset_info(data_path: str | None) -> dict:
    meta = (read_json(Path(data_path) / "meta.json") if data_path else None) or {}
    env = meta.get("env", {})
    ep_hist = meta["n_steps"] // env["horizon"] if meta.get("n_steps") and env.get("horizon") else None
    n_train = len(meta.get("split", {}).get("train_goals", []))
    return {"path": str(data_path), "n_stream": meta.get("n_stream"), "n_steps": meta.get("n_steps"),
            "episodes_per_history": ep_hist, "env": env.get("name"), "source_curve_test": meta.get("return_curve_test"),
            "summary": f"{env.get('name')}, {n_train} train goals x {meta.get('n_stream')} streams x "
                       f"{meta.get('n_steps')} steps"}


def timings(jobs: list[dict]) -> dict:
    """{process name: wall seconds} from the job records, the names the sweep prints (train:<run>,
    eval:<run>, pretrain:seed<s>)."""
    return {f"{stage}:seed{r['seed']}" if stage == "pretrain" else f"{stage}:{Path(r['run_dir']).name}": s
            for r in jobs for stage, s in (r.get("wall_s") or {}).items()}


def _train_jobs(jobs: list[dict]) -> list[dict]:
    return sorted((r for r in jobs if r.get("kind") == "train"),
                  key=lambda r: (r.get("env") or "", r.get("window") or 0, r.get("budget") or 0,
                                 arm_rank(r["arm"]), r["seed"]))


# The stage-1 objective as a report names it (model keys of the stage-1 run's config; None = not in that run).
STAGE1_MODEL_KEYS = ("recon_loss", "recon_decoder", "recon_linear_readout", "recon_task_weight", "state_features",
                     "n_latent", "pretrain_slot_init")


def _stage1(jobs: list[dict]) -> tuple[dict | None, dict]:
    """(stage-1 budget {pretrain_steps, pretrain_batch_size, pretrain_lr} and objective of a stage-1 run's
    config.json, {seed: run dir}) of the pretrain runs of this sweep."""
    runs = {str(r["seed"]): r["run_dir"] for r in jobs if r.get("kind") == "pretrain"}
    for rd in runs.values():
        cfg = read_json(Path(rd) / "config.json")
        if cfg:
            model = cfg.get("model") or {}
            return ({k: cfg.get(k) for k in ("pretrain_steps", "pretrain_batch_size", "pretrain_lr")}
                    | {k: model.get(k) for k in STAGE1_MODEL_KEYS}), runs
    return None, runs


def run_record(run_dir: Path) -> dict:
    """Every number a report reads from one run dir (None where a file or field is missing): done.json
    (train.py: the same-position NLLs, memory probe, goal readout, compute), the test and val summaries of
    eval.json and eval_long.json (evaluate.py). rollout_ms_per_step: wall ms per rollout step of the longest
    eval (all held-out goals x rollouts in lockstep, one model call each)."""
    cfg, done = read_json(run_dir / "config.json") or {}, read_json(run_dir / "done.json") or {}
    ev, evl = read_json(run_dir / "eval.json") or {}, read_json(run_dir / "eval_long.json") or {}
    mc, s, sl = cfg.get("model") or {}, _summary(ev), _summary(evl)
    timed, ts = (evl, sl) if sl else (ev, s)
    wall, horizon = ((timed.get("splits") or {}).get("test") or {}).get("wall_s"), (timed.get("env") or {}).get("horizon")
    probe = (done.get("heldout_test") or {}).get("memory_probe") or {}
    comp, gr = done.get("compute") or {}, (done.get("goal_readout") or {}).get("test") or {}
    lps = comp.get("labels_per_step")
    return {"episodes_to_first_goal": s.get("episodes_to_first_goal"), "found_goal_frac": s.get("found_goal_frac"),
            "return_after_found": s.get("return_after_found_normalized"), "tf_loss_test": done.get("tf_loss_test"),
            "tf_loss_val": done.get("tf_loss_val"), "return_last5_norm": s.get("last_k_normalized"),
            "return_last5_norm_long": sl.get("last_k_normalized"),
            "return_last5_norm_val": _summary(ev, "val").get("last_k_normalized"),
            "labels_per_step": lps, "train_wall_s": comp.get("train_wall_s"),
            "goal_acc_after": (gr.get("after_find") or {}).get("acc"),
            "goal_acc_before": (gr.get("before_find") or {}).get("acc"),
            "goal_acc_const": (gr.get("constant_after_find") or {}).get("acc"),
            "labels_total": lps * done["global_step"] / 1e6 if lps and done.get("global_step") else None,
            "window": mc.get("context_len") if mc.get("name") == "ad" else mc.get("seg_len"),
            "keep_recent": mc.get("keep_recent") or 0,  # kept raw window (CompressedAD folds seg_len - K)
            "env": (cfg.get("env") or {}).get("name"),
            "return_last5": s.get("last_k_mean"), "episodes_to_0.8": s.get("episodes_to_0.8"),
            "return_last5_long": sl.get("last_k_mean"), "episodes_to_0.8_long": sl.get("episodes_to_0.8"),
            "curve": s.get("curve"), "optimal_mean": s.get("optimal_mean"),
            "probe_k1": probe.get("k1"), "probe_all": probe.get("all"),
            "probe_gap": probe["all"] - probe["k1"] if probe.get("all") is not None and probe.get("k1") is not None
            else None,
            "rollout_ms_per_step": (1000 * wall / (ts["n_episodes"] * horizon)
                                    if wall and horizon and ts.get("n_episodes") else None),
            "steps": done.get("global_step"), "device": ev.get("device"), "n_episodes": s.get("n_episodes"),
            "complete": bool(done) and bool(s), "data_path": cfg.get("data_path"), "run_dir": str(run_dir),
            # whole files and summaries, for the report that reads more of them (compare)
            "config": cfg, "done": done, "eval": ev, "eval_long": evl}


def run_table(tj: list[dict], project) -> pd.DataFrame:
    """The table of runs: one row per train job (in the jobs' order, _train_jobs) with the job's arm, seed
    (a string: the records' per-seed key), budget, env and sweep window, `rec` (its run_record) and `run`
    (project(rec): the report's per-seed schema), whose numbers (those under "metrics" if it has them) are
    also columns."""
    rows = []
    for r in tj:
        rec = run_record(Path(r["run_dir"]))
        p = project(rec)
        rows.append({**p.get("metrics", p), "arm": r["arm"], "seed": str(r["seed"]), "budget": r.get("budget"),
                     "sweep_env": r.get("env") or "", "sweep_window": r.get("window") or 0, "job": r, "rec": rec,
                     "run": p})
    return pd.DataFrame(rows, columns=None if rows else ["arm", "seed", "budget", "sweep_env", "sweep_window"])


def describe(df: pd.DataFrame, by, keys) -> pd.DataFrame:
    """stats.describe ({mean, sd, n}) of each column in `keys` per group of `by`, groups in first-seen order."""
    return df.groupby(by, sort=False)[list(keys)].agg(stats.describe) if len(df) else pd.DataFrame()


def md_table(rows: list[dict]) -> str:
    """A markdown table of rows {header: cell} (cells already formatted: tabulate must not re-parse them)."""
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "(no rows)"


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _header(rep: dict, title: str, *lines: str) -> list[str]:
    return [f"# {title} ({rep['experiment']})", "", f"- **Scale:** {rep['scale']}",
            f"- **Machine:** {rep.get('machine', '?')}", f"- **Date:** {rep['date']}",
            f"- **Command:** `{rep['command']}`", *lines, f"- **Status:** {status_line(rep)}", ""]


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
COMPARE_REFERENCE = "scratch"  # every arm is compared with stage 2 from scratch, seed by seed
COMPARE_PAIRED = ("heldout_loss_same_position", "return_last5_normalized", "long_return_tail_normalized")


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
    return sorted({int(e.step): float(e.value) for e in acc.Scalars(tag)}.items())  # a resumed step: the newest


def compare_run(rec: dict) -> dict:
    """A run's compare numbers (table.json's per-seed schema); absent ones (run or eval missing) are None.
    Train losses: train/loss_action at the logged step nearest to each of TRAIN_FRACS of max_steps."""
    max_steps, s, sl = rec["config"].get("max_steps"), _summary(rec["eval"]), _summary(rec["eval_long"])
    loss = read_scalars(Path(rec["run_dir"]) / "tb", "train/loss_action") if max_steps else []
    near = {f"{int(f * 100)}%": min(loss, key=lambda sv, f=f: (abs(sv[0] - f * max_steps), sv[0])) if loss
            else (None, None) for f in TRAIN_FRACS}
    c = sl.get("curve") or []
    lo = len(c) - max(1, len(c) // 5)  # the long rollout's last 20% of episodes (400..499 of 500)
    tail = sum(c[lo:]) / len(c[lo:]) if c else None
    m = {**{f"train_loss_action_{k[:-1]}": v for k, (_, v) in near.items()},
         "heldout_loss_same_position": rec["tf_loss_test"], "heldout_acc_same_position": rec["done"].get(
             "heldout_test", {}).get("acc"), "return_first": s.get("first_episode"),
         "return_last5": s.get("last_k_mean"), "return_last5_normalized": s.get("last_k_normalized"),
         "reward_per_step": s.get("reward_per_step"), "long_return_last5": sl.get("last_k_mean"),
         "long_return_tail": tail, "long_return_tail_normalized": tail / sl["optimal_mean"]
         if c and sl["optimal_mean"] > 0 else None, "long_reward_per_step": sl.get("reward_per_step")}
    out = {"metrics": m, "run_dir": rec["run_dir"], "complete": all(v is not None for v in m.values()),
           "train_loss_steps": {k: st for k, (st, _) in near.items()}, "global_step": rec["steps"]}
    if s:
        out.update(curve=s["curve"], optimal_mean=s["optimal_mean"], eval_last_k=s["last_k"],
                   n_test_goals=s["n_goals"], eval_device=rec["device"])
    if sl:
        out.update(long_curve=c, long_tail_episodes=[lo + 1, len(c)], long_last_k=sl["last_k"],
                   long_n_seeds_per_goal=sl["n_seeds"])
    return out


def compare(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    df = run_table(tj, compare_run)
    arms = sorted({r["arm"] for r in tj}, key=arm_rank)
    d = describe(df, "arm", COMPARE_METRICS)
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
    runs = list(df["run"]) if len(df) else []
    missing = [Path(r["run_dir"]).name for r in runs if not r["complete"]]
    ref = COMPARE_REFERENCE if COMPARE_REFERENCE in results else None
    paired = {} if ref is None else {
        arm: stats.paired_records({s: p["metrics"] for s, p in results[arm]["per_seed"].items()},
                                  {s: p["metrics"] for s, p in results[ref]["per_seed"].items()},
                                  {k: COMPARE_METRICS[k][1] for k in COMPARE_PAIRED}) for arm in arms if arm != ref}
    budgets = {arm: f"{c.get('max_steps')} optimizer steps x batch {c.get('batch_size')}, lr {c.get('lr')}"
               for arm, c in cfgs.items() if c}
    budget = (f"{next(iter(budgets.values()))} (every arm)" if len(set(budgets.values())) <= 1 else
              "; ".join(f"`{arm}`: {b}" for arm, b in budgets.items()))
    pc, pretrain_runs = _stage1(jobs)
    if pc:
        budget += f"; stage 1: {pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}"

    def first(key):  # a per-run fact that is the same for every run (None if no run got that far)
        return next((p[key] for a in arms for p in results[a]["per_seed"].values() if p.get(key)), None)

    def settings(name):  # an evaluation's settings, from the first run that has that evaluation
        c = next((r[name]["config"] for r in (df["rec"] if len(df) else []) if r[name]), None)
        return {"n_episodes": c and c["n_episodes"], "seeds_per_goal": c and c["seeds_per_goal"]}

    tail = first("long_tail_episodes")
    rep = {"format_version": 1, **provenance(tj, info, missing, {p.get("eval_device") for p in runs}),
           "cwd": info.get("cwd"), "arms": arms, "seeds": sorted({r["seed"] for r in tj}), "budget": budget,
           "dataset": dataset_info(next((c for c in cfgs.values() if c), {}).get("data_path")),
           "eval": {**settings("eval"), "last_k": first("eval_last_k"), "n_test_goals": first("n_test_goals"),
                    "optimal_mean": first("optimal_mean")},
           "long_eval": {**settings("eval_long"), "last_k": first("long_last_k"),
                         "tail_episodes": f"{tail[0]}-{tail[1]}" if tail else "–"},
           "metrics": {k: {"label": lab, "better": b} for k, (lab, b, _) in COMPARE_METRICS.items()},
           "results": results, "runs": {f"{a}-seed{r['seed']}": r["run_dir"] for a in arms for r in tj if r["arm"] == a},
           "pretrain_runs": pretrain_runs, "paired_vs": ref, "paired": paired,
           "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}), "timings_s": timings(jobs)}
    atomic_write_text(out / "table.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", compare_markdown(rep))
    plots.compare_plot(out / "curves.png", rep, arm_color)
    return rep


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
                     **{f"`{a}`": f"**{c}**" if best is not None and means[a] == best else c for a, c in cells.items()}})
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
               "Curves: curves.png."), ""]
    return "\n".join(lines)
# ---------------------------------------------------------------------------------------------------------
# pretrain-budget: the budget curve (summary.json, table.md, budget.png)
# ---------------------------------------------------------------------------------------------------------
BUDGET_METRICS = {
    "heldout_loss_same_position": ("held-out action NLL, same positions (tf_loss_test)", "lower", ".3f"),
    "return_last5": ("held-out return, last 5 episodes", "higher", ".2f"),
    "return_last5_norm": ("held-out return / optimal, last 5 episodes", "higher", ".3f"),
    "episodes_to_0.8": ("episodes to 0.8 of optimal (5-ep. mean)", "lower", ".1f"),
    "return_last5_norm_val": ("val: return / optimal, last 5 episodes", "higher", ".3f"),
    "tf_loss_val": ("val: action NLL, same positions", "lower", ".3f"),
}
BUDGET_PAIRED = ("heldout_loss_same_position", "return_last5_norm", "return_last5_norm_val", "tf_loss_val")


def budget_run(rec: dict) -> dict:
    """A run's budget-curve numbers (summary.json's per-seed schema)."""
    return {"heldout_loss_same_position": rec["tf_loss_test"],
            **{k: rec[k] for k in ("return_last5", "return_last5_norm", "return_last5_norm_val", "tf_loss_val")},
            "compute": rec["done"].get("compute"), "episodes_to_0.8": rec["episodes_to_0.8"],
            "complete": rec["complete"], "optimal_mean": rec["optimal_mean"], "n_episodes": rec["n_episodes"],
            "last_k": _summary(rec["eval"]).get("last_k"), "device": rec["device"], "run_dir": rec["run_dir"]}


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
    arms = sorted({r["arm"] for r in tj}, key=arm_rank)
    df = run_table([r for r in tj if r.get("budget")], budget_run)
    pc, _ = _stage1(jobs)
    wall = timings(jobs)
    ratio = step_cost_ratio(jobs, wall)
    d = describe(df, ["budget", "arm"], BUDGET_METRICS)
    rows = []
    for n, arm in sorted(((int(n), a) for n, a in d.index), key=lambda na: (na[0], arm_rank(na[1]))):
        g = df[(df["budget"] == n) & (df["arm"] == arm)]
        s1 = int(pc["pretrain_steps"]) if g["job"].iloc[0].get("encoder") and pc else 0  # from this seed's encoder
        rows.append({"arm": arm, "stage2_steps": int(n), "stage1_steps": s1,
                     "seeds": [int(s) for s, p in zip(g["seed"], g["run"]) if p["complete"]],
                     **{f"{k}{x}": d.loc[(n, arm), k][s] for k in BUDGET_METRICS
                        for x, s in (("", "mean"), ("_std", "sd"), ("_n", "n"))},
                     "compute_stage2_step_equiv": (n + s1 * ratio) if ratio else None,
                     "per_seed": dict(zip(g["seed"], g["run"]))})
    missing = [Path(p["run_dir"]).name for p in (df["run"] if len(df) else []) if not p["complete"]]
    first = next((p for r in rows for p in r["per_seed"].values() if p["complete"]), {})
    tc = (read_json(Path(tj[0]["run_dir"]) / "config.json") or {}) if tj else {}
    rep = {"format_version": 1, **provenance(tj, info, missing, {p.get("device") for r in rows
                                                                 for p in r["per_seed"].values()}),
           "arms": arms, "seeds": sorted({r["seed"] for r in tj}), "budgets": sorted({r["stage2_steps"] for r in rows}),
           "dataset": str(tc.get("data_path")),
           "stage1": (f"{pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}, "
                      + ", ".join(f"{k} {pc[k]}" for k in STAGE1_MODEL_KEYS if pc.get(k) is not None)
                      if pc else "none"),
           "eval": (f"{first.get('n_episodes')} episodes, last {first.get('last_k')}, mean optimal return "
                    f"{_fmt(first.get('optimal_mean'), '.2f')}"),
           "stage1_cost_per_step_vs_stage2": ratio, "rows": rows,
           "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}), "timings_s": wall}
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", budget_markdown(rep))
    plots.budget_plot(out / "budget.png", rep, arm_color, {k: v[0] for k, v in BUDGET_METRICS.items()})
    return rep


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
                       "stage-1 steps": str(r["stage1_steps"]), "compute": _fmt(r["compute_stage2_step_equiv"], ".0f"),
                       **{f"{lab} ({b} is better)": stats.fmt_describe(
                           {"mean": r[k], "sd": r[f"{k}_std"], "n": r[f"{k}_n"]}, fmt)
                          for k, (lab, b, fmt) in BUDGET_METRICS.items()}} for r in rep["rows"]])
    lines = _header(rep, "Does pretraining help? The budget curve", f"- **Dataset:** `{rep['dataset']}`",
                    f"- **Stage 1:** {rep['stage1']}",
                    (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over seeds; (n=k): only "
                     "k seeds have the number, e.g. reached 0.8 of optimal)"),
                    (f"- **Compute:** stage-2-step equivalents; one stage-1 step costs "
                     f"{_fmt(rep['stage1_cost_per_step_vs_stage2'], '.2f')} stage-2 steps (measured wall time per "
                     "step, median over this sweep's runs)"))
    lines += [table, "", ("**What the data says** (arm − scratch at the same budget, same seed; mean [95 % "
                          "t-interval]; a difference is one only when its interval excludes 0):"), ""]
    lines += (verdict(rep) or ["- no complete pair yet"]) + [
        "", ("Held-out action NLL: train.py's `tf_loss_test` (teacher-forced over every step of every test-goal "
             "history, each model with its rollout schedule). Returns: evaluate.py on the held-out goals, "
             f"{rep['eval']}. Per-seed numbers and run dirs: summary.json. Plot: budget.png."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# memory: AD window w / 3w vs CompressedAD window w (summary.json, table.md, curves.png)
# ---------------------------------------------------------------------------------------------------------
MEMORY_COLUMNS = (  # row key -> (table header, format, "higher" | "lower" is better); test goals unless "val"
    ("return_last5_norm", "return / optimal, last 5 of the eval", ".3f", "higher"),
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
)
# What the memory holds (goal_readout.py, test goals): the readout after the find minus a reference, within
# each run, with the t-interval over seeds.
GOAL_READOUT_GAPS = (("after_minus_constant", "goal_acc_after", "goal_acc_const"),
                     ("after_minus_before", "goal_acc_after", "goal_acc_before"))
# The paired comparisons of the memory table: each arm minus the group's reference arm, same seed.
MEMORY_PAIRED = ("return_last5_norm", "return_after_found", "episodes_to_first_goal", "tf_loss_test",
                 "return_last5_norm_val", "tf_loss_val")
MEMORY_REFERENCE = "ad"  # AD with the same raw window: the arm every memory must beat
COMPUTE_COLUMNS = (  # what each arm paid (done.json's compute, this process's training steps)
    ("labels_per_step", "labels / step", ".0f"),
    ("train_wall_s", "training wall (s)", ".0f"),
    ("labels_total", "labels trained (M)", ".2f"),
    ("rollout_ms_per_step", "rollout ms / step", ".2f"),
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


def memory(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    df = run_table(tj, lambda rec: {k: v for k, v in rec.items() if k not in ("config", "done", "eval", "eval_long")})
    by = ["sweep_env", "sweep_window", "arm"]
    d = describe(df, by, [c[0] for c in MEMORY_COLUMNS + COMPUTE_COLUMNS])
    rows = []
    for (env, w, arm), g in (df.groupby(by, sort=False) if len(df) else ()):
        per_seed = dict(zip(g["seed"], g["run"]))
        first = next((p for p in per_seed.values() if p["complete"]), g["run"].iloc[0])
        # all − k1 within each run (paired by construction); lower is better: the history beyond the last
        # segment helps
        gap = stats.interval(p["probe_gap"] for p in per_seed.values())
        gaps = {name: stats.interval(p[a] - p[b] for p in per_seed.values() if p[a] is not None and p[b] is not None)
                for name, a, b in GOAL_READOUT_GAPS}
        rows.append({"env": first["env"] or env, "sweep_window": int(w), "arm": arm, "window": first["window"],
                     "keep_recent": first["keep_recent"], "seeds": [int(s) for s, p in per_seed.items() if p["complete"]],
                     "stats": d.loc[(env, w, arm)].to_dict(), "memory_probe": None if not gap["n"] else {
                         "k1": stats.describe(p["probe_k1"] for p in per_seed.values()),
                         "all": stats.describe(p["probe_all"] for p in per_seed.values()),
                         "all_minus_k1": {**gap, "verdict": stats.verdict(gap["lo"], gap["hi"], better="lower")}},
                     "goal_readout": {n: {**gi, "verdict": stats.verdict(gi["lo"], gi["hi"], "higher")}
                                      for n, gi in gaps.items() if gi["n"]},
                     "steps": first["steps"], "device": device_label({first["device"]}) if first["device"] else None,
                     "label": g["job"].iloc[0].get("label"), "per_seed": per_seed})
    better = {k: b for k, _, _, b in MEMORY_COLUMNS}
    for row in rows:  # paired differences to the reference arm of the same env and sweep window
        ref = next((r for r in rows if r["arm"] == MEMORY_REFERENCE and r["env"] == row["env"]
                    and r["sweep_window"] == row["sweep_window"]), None)
        row["paired_vs"] = None if ref is None or ref is row else MEMORY_REFERENCE
        row["paired"] = {} if row["paired_vs"] is None else stats.paired_records(
            row["per_seed"], ref["per_seed"], {k: better[k] for k in MEMORY_PAIRED})
    data = {r["env"]: dataset_info(next(p["data_path"] for p in r["per_seed"].values())) for r in rows}
    for d_ in data.values():
        d_["source_search_use_test"] = source_search_use(d_["path"]) if d_.get("n_steps") else None
    missing = [Path(p["run_dir"]).name for p in (df["run"] if len(df) else []) if not p["complete"]]
    prov = provenance(tj, info, missing)
    rep = {"format_version": 2, **{k: prov.pop(k) for k in ("date", "command", "experiment", "scale", "machine")},
           "seeds": sorted({r["seed"] for r in tj}), "datasets": data, **prov, "rows": rows, "timings_s": timings(jobs)}
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", memory_markdown(rep))
    plots.memory_plot(out / "curves.png", rep, arm_color, window_label)
    return rep


def window_label(row: dict) -> str:
    """The raw window a row's decoder sees: AD's context, CompressedAD's seg_len, with the kept part."""
    keep = row.get("keep_recent") or 0
    return f"{row['window']} (keeps {keep})" if keep else str(row["window"])


def memory_markdown(rep: dict) -> str:
    def ident(r):
        return {"env": r["env"], "arm": f"`{r['arm']}`", "window": window_label(r)}

    main = [{**ident(r), **{f"{h} ({b} is better)": stats.fmt_describe(r["stats"][k], fmt)
                            for k, h, fmt, b in MEMORY_COLUMNS},
             "memory probe all − k1 (nats, 95 % CI)": "–" if r["memory_probe"] is None
             else stats.fmt_paired(r["memory_probe"]["all_minus_k1"], ".4f")} for r in rep["rows"]]
    for env, d in rep["datasets"].items():
        su = d.get("source_search_use_test")
        if su and su.get("episodes_to_first_goal") is not None:
            have = {"episodes_to_first_goal": su["episodes_to_first_goal"], "found_goal_frac": su["found_goal_frac"],
                    "return_after_found": su["return_after_found_normalized"]}
            main.append(dict(zip(main[0], [env, "source (its own histories)", "–"]
                                 + [_fmt(have.get(k), fmt) for k, _, fmt, _ in MEMORY_COLUMNS] + ["–"])))
    lines = _header(rep, "Memory table",
                    f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample sd (n = seeds))")
    lines += ["Test goals unless marked val (validation goals: where designs are chosen).", "", md_table(main)]
    if any(r.get("goal_readout") for r in rep["rows"]):
        lines += ["", ("**What the memory holds** (goal_readout.py, test goals: accuracy of a linear readout of "
                       "the goal cell from the latents, after the first find minus the constant guess and minus "
                       "the readout before the find, within each run; mean [95 % t-interval over seeds]):"), "",
                  md_table([{**ident(r), **{h: stats.fmt_paired(r["goal_readout"][n], ".3f")
                                            if n in r["goal_readout"] else "–" for (n, _, _), h in
                                            zip(GOAL_READOUT_GAPS, ("after − constant", "after − before"))}}
                            for r in rep["rows"] if r.get("goal_readout")])]
    lines += ["", "**What each arm paid** (mean over seeds; training: this process's steps, from done.json):", "",
              md_table([{**ident(r), "steps": str(r["steps"]),
                         **{h: _fmt(r["stats"][k]["mean"], fmt) for k, h, fmt in COMPUTE_COLUMNS},
                         "device": str(r["device"])} for r in rep["rows"]])]
    heads = {k: (h, fmt, b) for k, h, fmt, b in MEMORY_COLUMNS}
    if any(r.get("paired") for r in rep["rows"]):
        lines += ["", (f"**Paired differences** (arm − `{MEMORY_REFERENCE}` with the same window, same seed and "
                       "data; mean [95 % t-interval]; the verdict is read off the interval: a difference is "
                       "one only when its interval excludes 0):"), "",
                  md_table([{**ident(r), **{f"{heads[k][0]} ({heads[k][2]} is better)":
                                            stats.fmt_paired(r["paired"][k], heads[k][1]) for k in MEMORY_PAIRED}}
                            for r in rep["rows"] if r.get("paired")])]
    lines += ["", ("Returns: evaluate.py on the held-out goals with frozen weights, sampled actions (`eval.json`; "
                   "the long rollout: `eval_long.json`), divided by the goals' mean optimal return. Episodes to "
                   "0.8: first episode whose 5-episode mean reaches 0.8 of optimal (n counts the seeds that got "
                   "there). Memory probe: same-position held-out NLL with the latents rebuilt from the whole "
                   "history minus the same with the last compressed segment only (k1), per run, with the t-interval "
                   "over seeds (negative: the memory holds something beyond its last segment); AD has none. "
                   "Search vs use (evaluate.search_and_use, test goals): the fraction of rollout streams that ever "
                   "found the goal, the first episode with a positive return, and the mean return / optimal of every "
                   "episode after it; the source row scores the dataset's own test-goal histories. NLL: train.py's "
                   "final same-position loss (done.json). Rollout ms/step: wall time per lockstep rollout step of "
                   "the longest eval. Per-seed numbers: summary.json. Curves: curves.png."), ""]
    return "\n".join(lines)


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
    """Write the report of the sweep in `out` from its planned jobs, job records and run dirs (report_jobs);
    returns the report dict. A disk that cannot take the report files is a ReportError line."""
    from atomic_io import os_error_reason

    out = Path(out)
    info = read_json(out / "sweep.json") or {}
    name = sweep_name(out, load_jobs(out))
    try:
        rep = REPORTS[name](out, report_jobs(out, name, info), info)
    except OSError as e:
        raise ReportError(f"cannot write the report into {out} ({os_error_reason(e)}: {e.filename or ''}): free "
                          f"space or fix the permissions, then run python experiments/report.py {out}") from None
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
