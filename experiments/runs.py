"""The runs of a sweep's out dir as one table (experiments/report.py groups it into its reports): the jobs a
report covers (report_jobs: sweep.json's planned ones and the records <out>/jobs/*.json), the state of each
run dir <out>/runs/<name> (run_status: the run dir decides, not the record), the numbers every report reads
from it (run_record) and a report's provenance. Arms: arm_file (their files, docs/design.md §10.17).

A finished run's RECORD_FILES are kept in <out>/records/<name> (keep_record), which is committed with the job
records while runs/ (checkpoints, TensorBoard) is not: a sweep filled over several machines or sessions reports
every finished run, from its run dir while it has one and from its kept record after.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import json
import logging
import math
import os
import platform
import statistics
from pathlib import Path

import pandas as pd

from atomic_io import PathLock, atomic_write_text
from experiments import stats
from rundir import read_json

SCALES = {"quick": "small scale", "mid": "CPU research scale", "full": "DICP scale"}
DONE = "done"
TRAIN_FRACS = (0.25, 0.5, 1.0)  # compare: train/loss_action is read at these fractions of max_steps
WHOLE = ("config", "done", "eval", "eval_long")  # run_record's whole files (the reports keep numbers only)
# Every file of a run dir a report reads (run_record; stage1 and step_cost_ratio for stage-1 runs)
RECORD_FILES = tuple(f"{w}.json" for w in WHOLE)


def load_jobs(out: Path) -> list[dict]:
    return [r for r in (read_json(p) for p in sorted((Path(out) / "jobs").glob("*.json"))) if r]


@functools.cache
def arm_file(arm: str) -> dict:
    """experiments/conf/arm/<arm>.yaml (label, order, color, the sweep's keys); {} for a name without a
    file (an arm qualified by report_jobs, such as b20-scratch, or one whose file is gone)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "conf" / "arm" / f"{arm}.yaml"))
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
def keep_record(out: Path, name: str) -> None:
    """Copy finished run <name>'s RECORD_FILES from <out>/runs/<name> to <out>/records/<name>, without the
    indentation (an eval.json is ~100 kB indented, ~45 kB not); each is written atomically when its content
    changed, and a file the run dir no longer has is removed there too. A run dir without done.json is not
    finished: nothing is kept."""
    src, dst = Path(out) / "runs" / name, Path(out) / "records" / name
    if not (src / "done.json").is_file():
        return
    for f in RECORD_FILES:
        data = read_json(src / f)
        if data is None:
            (dst / f).unlink(missing_ok=True)
        elif read_json(dst / f) != data:
            atomic_write_text(dst / f, json.dumps(data, separators=(",", ":")))


def run_dir_of(out: Path, name: str) -> Path:
    """Where a report reads run <name>: its run dir while there is one, else its kept record if there is one."""
    rd, kept = Path(out) / "runs" / name, Path(out) / "records" / name
    return kept if not rd.is_dir() and kept.is_dir() else rd


def carried_runs(previous: dict) -> dict[str, dict]:
    """{run name: its per-seed record} of every complete run in a report's previous record (any `per_seed`
    mapping whose entries name their run dir), for runs whose run dir and kept record are both gone."""
    found = {}

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "per_seed" and isinstance(v, dict):
                    found.update({Path(p["run_dir"]).name: p for p in v.values()
                                  if isinstance(p, dict) and p.get("run_dir") and p.get("complete")})
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(previous)
    return found


def _held(path: Path) -> bool:
    """Whether a process holds the atomic_io.PathLock of `path` (a sweep job holds its record's while it runs);
    read-only: a report may read an out dir it cannot write."""
    try:
        with open(PathLock(path).file) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when f closes
    except OSError as e:  # BlockingIOError: held; no lock file (or an unreadable one): not held
        return isinstance(e, BlockingIOError)
    return False


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, (dict, list)):
        return all(_finite(v) for v in (x.values() if isinstance(x, dict) else x))
    return True


def split_summary(ev: dict, split: str = "test") -> dict:
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
        state = DONE if _finite(done) and all(_finite(split_summary(ev)) for ev in evs) else "non-finite"
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


def report_jobs(out: Path, name: str, info: dict, previous: dict | None = None) -> list[dict]:
    """The job records plus a record for every planned job that has none (sweep.json's `planned`), each
    with its run dir in this out dir (run_dir_of: <out>/runs/<name> or its kept record; a moved or copied out
    dir reports its own runs) and its `run_status`; train jobs of more than one run identity get their arm
    qualified (SEPARATES). A job recorded done whose run dir and kept record are both gone, but whose
    per-seed record the report's `previous` record holds, gets it as `carried` and the status done."""
    out = Path(out)
    carried = carried_runs(previous or {})
    recs = [dict(r) for r in load_jobs(out)]
    have = {Path(r.get("run_dir", "")).name for r in recs}
    ident = (info.get("identity") or {}).get("hash")
    for j in info.get("planned") or []:
        if j["run"] not in have:  # j: its arm, seed, budget, window, env and run name
            arm = arm_file(j["arm"])
            recs.append({**j, "kind": "train", "sweep": info.get("sweep"), "label": arm.get("label", j["arm"]),
                         "encoder": arm.get("encoder"), "experiment": info.get("experiment"), "run_dir": j["run"],
                         "status": "planned", "identity": ident})
    evals = info.get("evals") or ["eval"]
    aliases = (info.get("identity") or {}).get("aliases") or []  # one configuration recorded under a later hash
    for r in recs:
        r["run_dir"] = str(run_dir_of(out, Path(r.get("run_dir") or "").name))
        if r.get("identity") in aliases:
            r["identity"] = ident
        if r.get("kind") == "train":
            r["run_status"] = run_status(out, r, evals)
            rd = Path(r["run_dir"])
            if r["run_status"] != DONE and r.get("status") == DONE and not rd.is_dir() and rd.name in carried:
                r["carried"], r["run_status"] = carried[rd.name], DONE
    tj = [r for r in recs if r.get("kind") == "train"]
    dims = [d for d in ("env", "window", "budget", "identity")
            if d not in SEPARATES.get(name, ()) and len({r.get(d) for r in tj}) > 1]
    for r in tj if dims else ():
        tag = {"env": str(r["env"] or "preset-env"), "window": f"w{r['window']}", "budget": f"b{r['budget']}"}
        r["arm_name"] = r["arm"]
        r["arm"] = "-".join([tag[d] for d in dims if d in tag] + [r["arm"]]
                            + [f"id{str(r.get('identity'))[:6]}"] * ("identity" in dims))
    return recs


def train_jobs(jobs: list[dict]) -> list[dict]:
    """The train jobs in table order: env, window, budget, arm (arm_rank), seed."""
    return sorted((r for r in jobs if r.get("kind") == "train"),
                  key=lambda r: (r.get("env") or "", r.get("window") or 0, r.get("budget") or 0,
                                 arm_rank(r["arm"]), r["seed"]))


# ---------------------------------------------------------------------------------------------------------
# A report's provenance: its commands, machine, dataset, timings and stage-1 settings
# ---------------------------------------------------------------------------------------------------------
def sweep_commands(info: dict) -> str:
    """Every sweep command that wrote into this out dir (sweep.json `commands`, oldest first), joined by ' ; '
    (one out dir may be filled by several sweeps of the same configuration: other arms or seeds)."""
    return " ; ".join(info.get("commands") or [info.get("command") or "?"])


def provenance(tj: list[dict], info: dict, df: pd.DataFrame, devices=None) -> dict:
    """The fields every report starts with: date, command, experiment, its scale (on which device), the machine
    that measured, and its status: complete when every train job the report covers is `done` (run_status) and
    has its numbers (the table of runs `df`: its projection's `complete`)."""
    import torch

    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    scale = f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment}"
    if devices is not None:
        scale += f" on {device_label(devices)}"
    status = {Path(r["run_dir"]).name: r.get("run_status", DONE) for r in tj}
    for name in (Path(p["run_dir"]).name for p in df["run"] if not p["complete"]):
        if status.get(name, DONE) == DONE:
            status[name] = "missing"
    bad = sorted(n for n, st in status.items() if st != DONE)
    return {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "command": sweep_commands(info),
            "experiment": experiment, "scale": scale, "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, "
            f"{platform.machine()}, torch {torch.__version__}", "complete": not bad, "missing": bad,
            "run_status": {n: status[n] for n in bad},
            # runs reported from the previous record's per-seed numbers (their run dirs and kept records gone)
            "carried": sorted(Path(r["run_dir"]).name for r in tj if r.get("carried")),
            "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"]}


def device_label(devices: set) -> str:
    if any(str(d).startswith("cuda") for d in devices if d):
        try:
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001 -- only a label
            return "GPU"
    return f"a {os.cpu_count()}-core CPU"


def checkout_path(path: str | None) -> str:
    """`path` as a reader of the committed report can follow it: relative to the git checkout (or worktree, whose
    .git is a file) it lies in, e.g. data/darkroom-quick-seed0 for a sweep run from /work/<any checkout>; a path in
    no checkout stays as it is. The report's fingerprint, not its path, identifies the data."""
    if not path:
        return str(path)
    p = Path(path)
    for parent in p.parents:
        if (parent / ".git").exists():
            return str(p.relative_to(parent))
    return str(p)


def dataset_info(data_path: str | None) -> dict:
    meta = (read_json(Path(data_path) / "meta.json") if data_path else None) or {}
    env = meta.get("env", {})
    ep_hist = meta["n_steps"] // env["horizon"] if meta.get("n_steps") and env.get("horizon") else None
    n_train = len(meta.get("split", {}).get("train_goals", []))
    return {"path": checkout_path(data_path), "n_stream": meta.get("n_stream"), "n_steps": meta.get("n_steps"),
            "episodes_per_history": ep_hist, "env": env.get("name"), "source_curve_test": meta.get("return_curve_test"),
            "summary": f"{env.get('name')}, {n_train} train goals x {meta.get('n_stream')} streams x "
                       f"{meta.get('n_steps')} steps"}


def timings(jobs: list[dict]) -> dict:
    """{process name: wall seconds} from the job records, the names the sweep prints (train:<run>,
    eval:<run>, pretrain:seed<s>)."""
    return {f"{stage}:seed{r['seed']}" if stage == "pretrain" else f"{stage}:{Path(r['run_dir']).name}": s
            for r in jobs for stage, s in (r.get("wall_s") or {}).items()}


# The stage-1 objective as a report names it (model keys of the stage-1 run's config; None = not in that run).
STAGE1_MODEL_KEYS = ("recon_loss", "recon_decoder", "recon_linear_readout", "recon_task_weight", "state_features",
                     "n_latent", "pretrain_slot_init")


def stage1(jobs: list[dict]) -> tuple[dict | None, dict]:
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


def step_cost_ratio(jobs: list[dict]) -> float | None:
    """Stage-1 wall seconds per training step / stage-2 wall seconds per training step, medians over this
    sweep's runs; each run's rate is over the steps its last process trained (done.json compute), so a resumed
    run's rate is as right as an uninterrupted one's."""
    s1, s2 = [], []
    for r in jobs:
        comp = (read_json(Path(r["run_dir"]) / "done.json") or {}).get("compute") or {}
        if comp.get("train_wall_s") and comp.get("steps_trained"):
            (s1 if r.get("kind") == "pretrain" else s2).append(comp["train_wall_s"] / comp["steps_trained"])
    return statistics.median(s1) / statistics.median(s2) if s1 and s2 else None


# ---------------------------------------------------------------------------------------------------------
# The table of runs: one row per job, the numbers of its run dir in the report's per-seed schema
# ---------------------------------------------------------------------------------------------------------
def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar tag across the run's event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its per-file INFO lines, in Hydra's log too
    if not tb_dir.is_dir():
        return []
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return sorted({int(e.step): float(e.value) for e in acc.Scalars(tag)}.items())  # a resumed step: the newest


def run_record(run_dir: Path) -> dict:
    """Every number a report reads from one run dir (None where a file or field is missing): done.json
    (train.py: the same-position NLLs, memory probe, goal readout, compute), the test and val summaries of
    eval.json and eval_long.json (evaluate.py). rollout_ms_per_step: wall ms per rollout step of the longest
    eval (all held-out goals x rollouts in lockstep, one model call each)."""
    cfg, done = read_json(run_dir / "config.json") or {}, read_json(run_dir / "done.json") or {}
    ev, evl = read_json(run_dir / "eval.json") or {}, read_json(run_dir / "eval_long.json") or {}
    mc, s, sl = cfg.get("model") or {}, split_summary(ev), split_summary(evl)
    timed, ts = (evl, sl) if sl else (ev, s)
    wall = ((timed.get("splits") or {}).get("test") or {}).get("wall_s")
    horizon = (timed.get("env") or {}).get("horizon")
    probe = (done.get("heldout_test") or {}).get("memory_probe") or {}
    comp, gro = done.get("compute") or {}, done.get("goal_readout") or {}
    # the first cell's readout (Darkroom's goal, Key-to-Door's key) and Key-to-Door's door (goal_readout.py)
    gr, door = gro.get("test") or {}, (gro.get("door") or {}).get("test") or {}
    lps = comp.get("labels_per_step")
    return {"episodes_to_first_goal": s.get("episodes_to_first_goal"), "found_goal_frac": s.get("found_goal_frac"),
            "return_after_found": s.get("return_after_found_normalized"), "tf_loss_test": done.get("tf_loss_test"),
            "tf_loss_val": done.get("tf_loss_val"), "return_last5_norm": s.get("last_k_normalized"),
            "return_first_norm": s.get("first_episode_normalized"),  # in-context improvement: last 5 vs episode 1
            "key_found_last_k": s.get("key_found_last_k"), "door_found_last_k": s.get("door_found_last_k"),
            "return_last5_norm_long": sl.get("last_k_normalized"),
            "return_last5_norm_val": split_summary(ev, "val").get("last_k_normalized"),
            "labels_per_step": lps, "train_wall_s": run_train_wall_s(done),
            **{f"{cell}_acc_{k}": (rd.get(f) or {}).get("acc") for cell, rd in (("goal", gr), ("door", door))
               for k, f in (("after", "after_find"), ("before", "before_find"), ("const", "constant_after_find"))},
            "remeasured": done.get("remeasured"),  # {date, command, machine, fields}: remeasure.py
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
            "config": cfg, "done": done, "eval": ev, "eval_long": evl}


def run_train_wall_s(done: dict) -> float | None:
    """The training wall seconds of all of a run's steps: done.json's run_train_wall_s (summed over the processes
    that trained them), or its last process's train_wall_s when that process trained every step; None for a run
    resumed from a checkpoint that predates the sum (its last process's seconds would undercount it)."""
    comp = done.get("compute") or {}
    if comp.get("run_train_wall_s") is not None:
        return comp["run_train_wall_s"]
    return comp.get("train_wall_s") if not done.get("resumed_from_step") else None


def run_table(tj: list[dict], project) -> pd.DataFrame:
    """The table of runs: one row per train job (in the jobs' order, train_jobs) with the job's arm, seed
    (a string: the records' per-seed key), budget, env and sweep window, `rec` (its run_record) and `run`
    (project(rec): the report's per-seed schema), whose numbers (those under "metrics" if it has them) are
    also columns."""
    rows = []
    for r in tj:
        rec = run_record(Path(r["run_dir"]))
        p = r.get("carried") or project(rec)  # a carried run: its per-seed record, as the previous report kept it
        rows.append({**p.get("metrics", p), "arm": r["arm"], "seed": str(r["seed"]), "budget": r.get("budget"),
                     "sweep_env": r.get("env") or "", "sweep_window": r.get("window") or 0, "job": r, "rec": rec,
                     "run": p})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["arm", "seed", "budget", "sweep_env",
                                                                  "sweep_window", "job", "rec", "run"])


def describe(df: pd.DataFrame, by, keys) -> pd.DataFrame:
    """stats.describe ({mean, sd, n}) of each column in `keys` per group of `by`, groups in first-seen order."""
    return df.groupby(by, sort=False)[list(keys)].agg(stats.describe) if len(df) else pd.DataFrame()


def compare_run(rec: dict) -> dict:
    """A run's compare numbers (table.json's per-seed schema); absent ones (run or eval missing) are None.
    Train losses: train/loss_action at the logged step nearest to each of TRAIN_FRACS of max_steps."""
    max_steps, s, sl = rec["config"].get("max_steps"), split_summary(rec["eval"]), split_summary(rec["eval_long"])
    loss = read_scalars(Path(rec["run_dir"]) / "tb", "train/loss_action") if max_steps else []
    near = {f"{int(f * 100)}%": min(loss, key=lambda sv, f=f: (abs(sv[0] - f * max_steps), sv[0])) if loss
            else (None, None) for f in TRAIN_FRACS}
    c = sl.get("curve") or []
    lo = len(c) - max(1, len(c) // 5)  # the long rollout's last 20% of episodes (400..499 of 500)
    tail = sum(c[lo:]) / len(c[lo:]) if c else None
    m = {**{f"train_loss_action_{k[:-1]}": v for k, (_, v) in near.items()},
         "heldout_loss_same_position": rec["tf_loss_test"], "heldout_acc_same_position": (rec["done"].get(
             "heldout_test") or {}).get("acc"), "return_first": s.get("first_episode"),
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


def budget_run(rec: dict) -> dict:
    """A run's budget-curve numbers (summary.json's per-seed schema)."""
    return {"heldout_loss_same_position": rec["tf_loss_test"],
            **{k: rec[k] for k in ("return_last5", "return_last5_norm", "return_last5_norm_val", "tf_loss_val")},
            "compute": rec["done"].get("compute"), "episodes_to_0.8": rec["episodes_to_0.8"],
            "complete": rec["complete"], "optimal_mean": rec["optimal_mean"], "n_episodes": rec["n_episodes"],
            "last_k": split_summary(rec["eval"]).get("last_k"), "device": rec["device"], "run_dir": rec["run_dir"]}


def memory_run(rec: dict) -> dict:
    """A run's memory-table numbers (summary.json's per-seed schema): the record without the whole files."""
    return {k: v for k, v in rec.items() if k not in WHOLE}


def window_label(row: dict) -> str:
    """The raw window a row's decoder sees: AD's context, CompressedAD's seg_len, with the kept part."""
    keep = row.get("keep_recent") or 0
    if row.get("window") is None:  # no run of the arm got far enough to record its config
        return "–"
    return f"{row['window']} (keeps {keep})" if keep else str(row["window"])


def source_search_use(data_path: str | None) -> dict | None:
    """The source algorithm's own search vs use (metrics.search_and_use) on the test goals' histories of the
    dataset: the yardstick of the memory table's episodes-to-first-goal and return-after-found columns."""
    meta = read_json(Path(data_path) / "meta.json") if data_path else None
    if not meta:
        return None
    from collect import episode_returns
    from env import task_optimal_return
    from histories import load_histories
    from metrics import search_and_use
    from transition import REWARD

    env = meta["env"]
    h = load_histories(data_path, env)
    idx = h.split_indices("test")
    if len(idx) == 0:
        return None
    ret = episode_returns(h.transitions(idx)[..., REWARD], int(env["horizon"]))
    opt = [task_optimal_return(env, g) for g in h.goals[idx]]
    return search_and_use(ret[:, None, :], opt)
