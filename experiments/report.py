"""The report of a sweep: a reader of finished run directories (nothing is run).

    python experiments/report.py results/compare-quick            # table.md, table.json, curves.png
    python experiments/report.py results/pretrain-budget-quick    # summary.json, table.md, budget.png
    python experiments/report.py results/memory-mid               # summary.json, table.md, curves.png

experiments/sweep.py calls `write(out)` when a multirun ends. It reads <out>/sweep.json (the command, the
planned jobs, the evaluations), the job records <out>/jobs/*.json (arm, seed, budget, window, env, identity,
wall seconds; one per run, written by the jobs) and every run dir's config.json, done.json and
<out_name>.json (evaluate.py). The report covers every planned or recorded job, finds its run dir inside
`out` (a moved out dir reports its own runs) and takes its state from the run dir, not from the record
(report_jobs: done, missing, failed, running, interrupted, non-finite; Status lists those not done). The
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
from errors import UserError
from experiments import stats

# Arms in table order (others follow alphabetically); their colours in the plots.
ARM_ORDER = ("ad", "ad_3w", "ad_10w", "scratch", "rollout", "rollout_gated", "rollout_gated_carry",
             "rollout_gated_kept", "rollout_gated_kept_carry", "rollout_gated_rmt",
             "rollout_gated_bptt1", "rollout_gated_bptt10", "rollout_gated_nl20", "aux_recon", "pretrained_ft",
             "pretrained_frozen")
COLORS = {"ad": "tab:gray", "ad_3w": "tab:purple", "ad_10w": "black", "scratch": "tab:blue",
          "rollout": "tab:cyan", "rollout_gated": "tab:olive", "rollout_gated_carry": "olivedrab",
          "rollout_gated_kept": "crimson", "rollout_gated_kept_carry": "firebrick", "rollout_gated_rmt": "tab:pink",
          "rollout_gated_bptt1": "gold", "rollout_gated_bptt10": "darkgoldenrod", "rollout_gated_nl20": "teal",
          "aux_recon": "tab:orange", "pretrained_ft": "tab:green", "pretrained_frozen": "tab:red"}
SCALES = {"quick": "small scale", "mid": "CPU research scale", "full": "DICP scale"}


class ReportError(UserError, RuntimeError):
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


# ---------------------------------------------------------------------------------------------------------
# The jobs a report covers: the planned ones (sweep.json) and the recorded ones, each with its run dir in
# this out dir and a status read from that run dir (the records are not trusted for it)
# ---------------------------------------------------------------------------------------------------------
DONE = "done"


def run_dir_of(out: Path, rec: dict) -> Path:
    """A job's run dir: <out>/runs/<name> (an out dir moved or copied elsewhere reports its own runs, not
    those at the recorded absolute path), else the recorded path when only that exists (records copied
    from the folder the runs live in, as results/memory-quick's)."""
    recorded = Path(rec.get("run_dir") or "")
    mine = Path(out) / "runs" / recorded.name
    return recorded if not mine.exists() and recorded.is_absolute() and recorded.exists() else mine


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
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


def run_status(out: Path, rec: dict, evals) -> str:
    """done, or why a run is not in the table: running (its job holds its lock), failed, interrupted (a
    record left 'running' or 'interrupted' by a killed job), missing (not trained or not evaluated yet),
    non-finite (a NaN / inf in done.json or an evaluation's test summary). The run dir decides; the record
    only says why it is unfinished."""
    rd = Path(rec["run_dir"])
    done = read_json(rd / "done.json")
    evs = [read_json(rd / f"{e}.json") for e in evals]
    if done is None or any(ev is None for ev in evs):
        state = "missing"
    elif not _finite(done) or not all(_finite(_split_summary(rd, e)[1]) for e in evals):
        state = "non-finite"
    else:
        state = DONE
    if _held(Path(out) / "jobs" / rd.name):
        return "running"
    if rec.get("status") == "failed":
        return "failed"
    if rec.get("status") in ("running", "interrupted") and state == "missing":
        return "interrupted"
    return state


def _arm_file(arm: str) -> dict:
    return _read_yaml(ROOT / "experiments" / "conf" / "arm" / f"{arm}.yaml")


def _read_yaml(path: Path) -> dict:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, ImportError):
        return {}


# What a report function already keeps apart; the other run-identity dimensions are added to the arm name
# when the jobs differ in them, so runs of another budget, window, env or sweep config never share a cell.
SEPARATES = {"compare": (), "memory": ("env", "window"), "pretrain-budget": ("budget",)}


def report_jobs(out: Path, name: str, info: dict) -> list[dict]:
    """The job records plus a record for every planned job that has none (sweep.json's `planned`), each
    with its run dir resolved in this out dir (run_dir_of) and its `run_status`; train jobs of more than one
    run identity get their arm qualified (SEPARATES)."""
    out = Path(out)
    recs = [dict(r) for r in load_jobs(out)]
    have = {Path(r.get("run_dir", "")).name for r in recs}
    ident = (info.get("identity") or {}).get("hash")
    for j in info.get("planned") or []:
        if j["run"] not in have:
            arm = _arm_file(j["arm"])
            recs.append({"kind": "train", "sweep": info.get("sweep"), "arm": j["arm"], "seed": j["seed"],
                         "label": arm.get("label", j["arm"]), "encoder": arm.get("encoder"), "budget": j["budget"],
                         "window": j["window"], "env": j["env"], "experiment": info.get("experiment"),
                         "run_dir": str(out / "runs" / j["run"]), "status": "planned", "identity": ident})
    evals = info.get("evals") or ["eval"]
    for r in recs:
        r["run_dir"] = str(run_dir_of(out, r))
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
    return {"complete": not bad, "missing": bad, "run_status": {n: status[n] for n in bad}}


def status_line(rep: dict) -> str:
    if rep["complete"]:
        return "complete"
    st = rep.get("run_status") or {}
    return "INCOMPLETE: " + ", ".join(f"{n} ({st[n]})" if n in st else n for n in rep["missing"])


def _arm_rank(arm: str) -> tuple:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def _mean_std(vals: list) -> tuple:
    """(mean, sample sd, n) over the finite values (stats.describe)."""
    d = stats.describe(vals)
    return d["mean"], d["sd"], d["n"]


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def sweep_commands(info: dict) -> str:
    """Every sweep command that wrote into this out dir (sweep.json `commands`, oldest first), joined by ' ; '
    (one out dir may be filled by several sweeps of the same configuration: other arms or seeds)."""
    cmds = info.get("commands") or ([info["command"]] if info.get("command") else [])
    return " ; ".join(cmds) or "?"


def machine() -> str:
    """What measured: host, cores and torch (a report's provenance line)."""
    import platform

    try:
        import torch

        tv = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover -- the project depends on torch
        tv = "no torch"
    return f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.machine()}, {tv}"


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
    missing = [Path(r["run_dir"]).name for r in tj if not results[r["arm"]]["per_seed"][str(r["seed"])]["complete"]]
    ref = COMPARE_REFERENCE if COMPARE_REFERENCE in results else None
    paired = {} if ref is None else {
        arm: {k: stats.paired({s: p["metrics"][k] for s, p in results[arm]["per_seed"].items()},
                              {s: p["metrics"][k] for s, p in results[ref]["per_seed"].items()},
                              COMPARE_METRICS[k][1]) for k in COMPARE_PAIRED}
        for arm in arms if arm != ref}
    tc = next((c for c in cfgs.values() if c), {})
    budgets = {arm: f"{c.get('max_steps')} optimizer steps x batch {c.get('batch_size')}, lr {c.get('lr')}"
               for arm, c in cfgs.items() if c}
    budget = (f"{next(iter(budgets.values()))} (every arm)" if len(set(budgets.values())) <= 1 else
              "; ".join(f"`{arm}`: {b}" for arm, b in budgets.items()))
    pc, pretrain_runs = _stage1(jobs)
    if pc:
        budget += f"; stage 1: {pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}"

    def first(key):  # a per-run fact that is the same for every run (None if no run got that far)
        return next((p[key] for res in results.values() for p in res["per_seed"].values() if p.get(key)), None)

    tail = first("long_tail_episodes")
    devices = {p.get("eval_device") for res in results.values() for p in res["per_seed"].values()}
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    rep = {
        "format_version": 1, "date": _now(), "command": sweep_commands(info), "cwd": info.get("cwd"),
        "experiment": experiment,
        "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment} on {device_label(devices)}",
        "arms": arms, "seeds": seeds, "budget": budget,
        "dataset": dataset_info(tc.get("data_path")),
        "eval": {**_eval_settings(tj, "eval"), "last_k": first("eval_last_k"),
                 "n_test_goals": first("n_test_goals"), "optimal_mean": first("optimal_mean")},
        "long_eval": {**_eval_settings(tj, "eval_long"), "last_k": first("long_last_k"),
                      "tail_episodes": f"{tail[0]}-{tail[1]}" if tail else "–"},
        "metrics": {k: {"label": lab, "better": b} for k, (lab, b, _) in COMPARE_METRICS.items()},
        **status_fields(tj, missing),
        "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
        "results": results, "runs": runs, "pretrain_runs": pretrain_runs,
        "paired_vs": ref, "paired": paired, "machine": machine(),
        "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
        "timings_s": timings(jobs, out),
    }
    atomic_write_text(out / "table.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", compare_markdown(rep))
    compare_plot(out / "curves.png", rep)
    return rep


def _cell(mu, sd, n, n_seeds, fmt) -> str:
    """'mean ± sd (n=k)': n always shown (n_seeds planned: a short n is a missing or unfinished seed)."""
    return stats.fmt_describe({"mean": mu, "sd": sd, "n": n}, fmt)


def compare_markdown(rep: dict) -> str:
    arms, res = rep["arms"], rep["results"]
    lines = [f"# Does pretraining help? CompressedAD comparison ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}", f"- **Machine:** {rep.get('machine', '?')}",
             f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']['path']}` ({rep['dataset'].get('summary', '')})",
             f"- **Budget:** {rep['budget']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample std over training seeds; "
              "a cell marked (n=k) averages only the k seeds whose runs finished)"),
             f"- **Status:** {status_line(rep)}",
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
    if rep.get("paired"):
        keys = COMPARE_PAIRED
        lines += ["", (f"**Paired differences** (arm − `{rep['paired_vs']}`, same seed and data; mean [95 % "
                       "t-interval]; a difference is one only when its interval excludes 0):"), "",
                  "| arm | " + " | ".join(f"{COMPARE_METRICS[k][0]} ({COMPARE_METRICS[k][1]} is better)"
                                         for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, pk in rep["paired"].items():
            lines.append(f"| `{arm}` | " + " | ".join(stats.fmt_paired(pk[k], COMPARE_METRICS[k][2])
                                                     for k in keys) + " |")
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
    "return_last5_norm": ("held-out return / optimal, last 5 episodes", "higher", ".3f"),
    "episodes_to_0.8": ("episodes to 0.8 of optimal (5-ep. mean)", "lower", ".1f"),
    "return_last5_norm_val": ("val: return / optimal, last 5 episodes", "higher", ".3f"),
    "tf_loss_val": ("val: action NLL, same positions", "lower", ".3f"),
}
BUDGET_PAIRED = ("heldout_loss_same_position", "return_last5_norm", "return_last5_norm_val", "tf_loss_val")


def run_numbers(run_dir: Path) -> dict:
    done = read_json(run_dir / "done.json") or {}
    ev, s = _split_summary(run_dir, "eval")
    val = ((ev.get("splits") or {}).get("val") or {}).get("summary") or {}
    return {"heldout_loss_same_position": done.get("tf_loss_test"), "return_last5": s.get("last_k_mean"),
            "return_last5_norm": s.get("last_k_normalized"), "return_last5_norm_val": val.get("last_k_normalized"),
            "tf_loss_val": done.get("tf_loss_val"), "compute": done.get("compute"),
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
            missing += [Path(r["run_dir"]).name for r in mine if not per_seed[str(r["seed"])]["complete"]]
    first = next((p for r in rows for p in r["per_seed"].values() if p["complete"]), {})
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    tc = (read_json(Path(tj[0]["run_dir"]) / "config.json") or {}) if tj else {}
    devices = {p.get("device") for r in rows for p in r["per_seed"].values()}
    rep = {
        "format_version": 1, "date": _now(), "command": sweep_commands(info), "experiment": experiment,
        "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment} on {device_label(devices)}",
        "arms": arms, "seeds": seeds, "budgets": budgets, "dataset": str(tc.get("data_path")),
        "stage1": (f"{pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}, "
                   + ", ".join(f"{k} {pc[k]}" for k in STAGE1_MODEL_KEYS if pc.get(k) is not None)
                   if pc else "none"),
        "eval": (f"{first.get('n_episodes')} episodes, last {first.get('last_k')}, mean optimal return "
                 f"{_fmt(first.get('optimal_mean'), '.2f')}"),
        "stage1_cost_per_step_vs_stage2": ratio, "machine": machine(),
        **status_fields(tj, missing),
        "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
        "rows": rows, "overrides": next((r.get("overrides") for r in tj if r.get("overrides")), {}),
        "timings_s": wall,
    }
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", budget_markdown(rep))
    budget_plot(out / "budget.png", rep)
    return rep


def verdict(rep: dict) -> list[str]:
    """One sentence per budget and arm vs scratch: each metric's paired difference (same seed) with its 95 %
    t-interval and the verdict that interval gives (stats.paired)."""
    rows = {(r["arm"], r["stage2_steps"]): r for r in rep["rows"]}
    out = []
    for n in rep["budgets"]:
        ref = rows.get(("scratch", n))
        for arm in (x for x in rep["arms"] if x != "scratch"):
            row = rows.get((arm, n))
            if ref is None or row is None:
                continue
            parts = []
            for key in BUDGET_PAIRED:
                label, better, fmt = BUDGET_METRICS[key]
                p = stats.paired({s: q[key] for s, q in row["per_seed"].items()},
                                 {s: q[key] for s, q in ref["per_seed"].items()}, better)
                if p["n"]:
                    parts.append(f"{label.split(' (')[0]} {stats.fmt_paired(p, fmt)}")
            if parts:
                out.append(f"- {n} stage-2 steps, `{arm}` vs `scratch`: " + "; ".join(parts))
    return out


def budget_markdown(rep: dict) -> str:
    lines = [f"# Does pretraining help? The budget curve ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}", f"- **Machine:** {rep.get('machine', '?')}",
             f"- **Date:** {rep['date']}", f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']}`", f"- **Stage 1:** {rep['stage1']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (mean ± sample std over seeds; (n=k): only k "
              f"seeds have the number, e.g. reached 0.8 of optimal)"),
             (f"- **Compute:** stage-2-step equivalents; one stage-1 step costs "
              f"{_fmt(rep['stage1_cost_per_step_vs_stage2'], '.2f')} stage-2 steps (measured wall time per "
              f"step, median over this sweep's runs)"),
             f"- **Status:** {status_line(rep)}", "",
             "| arm | stage-2 steps | stage-1 steps | compute | " + " | ".join(
                 f"{lab} ({b} is better)" for lab, b, _ in BUDGET_METRICS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(BUDGET_METRICS)]
    for r in rep["rows"]:
        cells = [_cell(r[k], r[f"{k}_std"], r[f"{k}_n"], len(rep["seeds"]), fmt)
                 for k, (_, _, fmt) in BUDGET_METRICS.items()]
        lines.append(f"| `{r['arm']}` | {r['stage2_steps']} | {r['stage1_steps']} | "
                     f"{_fmt(r['compute_stage2_step_equiv'], '.0f')} | " + " | ".join(cells) + " |")
    lines += ["", ("**What the data says** (arm − scratch at the same budget, same seed; mean [95 % t-interval]; "
                   "a difference is one only when its interval excludes 0):"), ""] + (
        verdict(rep) or ["- no complete pair yet"])
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
    val = ((ev.get("splits") or {}).get("val") or {}).get("summary") or {}
    su = {}
    if test.get("returns") is not None:  # eval.json files written before the summary had these fields
        from metrics import search_and_use

        su = search_and_use(test["returns"], test["optimal"])
    comp = done.get("compute") or {}
    lps = comp.get("labels_per_step")
    gr = (done.get("goal_readout") or {}).get("test") or {}
    return {"episodes_to_first_goal": su.get("episodes_to_first_goal"), "found_goal_frac": su.get("found_goal_frac"),
            "return_after_found": su.get("return_after_found_normalized"), "tf_loss_test": done.get("tf_loss_test"),
            "tf_loss_val": done.get("tf_loss_val"),
            "return_last5_norm": s.get("last_k_normalized"), "return_last5_norm_long": sl.get("last_k_normalized"),
            "return_last5_norm_val": val.get("last_k_normalized"),
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
            "complete": bool(done) and bool(s), "data_path": cfg.get("data_path"), "run_dir": str(run_dir)}


def memory(out: Path, jobs: list[dict], info: dict) -> dict:
    tj = _train_jobs(jobs)
    groups: dict = {}
    for r in tj:
        groups.setdefault((r.get("env") or "", r.get("window") or 0, r["arm"]), []).append(r)
    rows, missing = [], []
    for (env, w, arm), mine in groups.items():
        per_seed = {str(r["seed"]): memory_numbers(Path(r["run_dir"])) for r in mine}
        first = next((p for p in per_seed.values() if p["complete"]), next(iter(per_seed.values())))
        row = {"env": first["env"] or env, "sweep_window": w, "arm": arm, "window": first["window"],
               "keep_recent": first["keep_recent"],
               "seeds": [int(s) for s, p in per_seed.items() if p["complete"]]}
        row["stats"] = {k: stats.describe(p[k] for p in per_seed.values())
                        for k in [c[0] for c in MEMORY_COLUMNS] + [c[0] for c in COMPUTE_COLUMNS]}
        # all − k1 within each run (paired by construction); lower is better: the history beyond the last
        # segment helps
        gap = stats.interval(p["probe_gap"] for p in per_seed.values())
        row["memory_probe"] = None if not gap["n"] else {
            "k1": stats.describe(p["probe_k1"] for p in per_seed.values()),
            "all": stats.describe(p["probe_all"] for p in per_seed.values()),
            "all_minus_k1": {**gap, "verdict": stats.verdict(gap["lo"], gap["hi"], better="lower")}}
        row["goal_readout"] = {}
        for name, a, b in GOAL_READOUT_GAPS:
            gi = stats.interval(p[a] - p[b] for p in per_seed.values() if p[a] is not None and p[b] is not None)
            if gi["n"]:
                row["goal_readout"][name] = {**gi, "verdict": stats.verdict(gi["lo"], gi["hi"], "higher")}
        row["steps"] = first["steps"]
        row["device"] = device_label({first["device"]}) if first["device"] else None
        row["label"] = mine[0].get("label")
        row["per_seed"] = per_seed
        rows.append(row)
        missing += [Path(p["run_dir"]).name for p in per_seed.values() if not p["complete"]]
    better = {k: b for k, _, _, b in MEMORY_COLUMNS}
    for row in rows:  # paired differences to the reference arm of the same env and sweep window
        ref = next((r for r in rows if r["arm"] == MEMORY_REFERENCE and r["env"] == row["env"]
                    and r["sweep_window"] == row["sweep_window"]), None)
        row["paired_vs"] = None if ref is None or ref is row else MEMORY_REFERENCE
        row["paired"] = {} if row["paired_vs"] is None else {
            k: stats.paired({s: p[k] for s, p in row["per_seed"].items()},
                            {s: p[k] for s, p in ref["per_seed"].items()}, better[k]) for k in MEMORY_PAIRED}
    experiment = info.get("experiment") or (tj[0]["experiment"] if tj else "?")
    data = {r["env"]: dataset_info(next(p["data_path"] for p in r["per_seed"].values())) for r in rows}
    for env, d in data.items():
        d["source_search_use_test"] = source_search_use(d["path"]) if d.get("n_steps") else None
    rep = {"format_version": 2, "date": _now(), "command": sweep_commands(info), "experiment": experiment,
           "scale": f"{SCALES.get(experiment, 'custom scale')}: experiment={experiment}",
           "machine": machine(), "seeds": sorted({r["seed"] for r in tj}), "datasets": data,
           **status_fields(tj, missing),
           "failed_jobs": [Path(r["run_dir"]).name for r in tj if r.get("status") == "failed"],
           "rows": rows, "timings_s": timings(jobs, out)}
    atomic_write_text(out / "summary.json", json.dumps(rep, indent=1, default=str))
    atomic_write_text(out / "table.md", memory_markdown(rep))
    memory_plot(out / "curves.png", rep)
    return rep


def window_label(row: dict) -> str:
    """The raw window a row's decoder sees: AD's context, CompressedAD's seg_len, with the kept part."""
    keep = row.get("keep_recent") or 0
    return f"{row['window']} (keeps {keep})" if keep else str(row["window"])


def memory_markdown(rep: dict) -> str:
    lines = [f"# Memory table ({rep['experiment']})", "", f"- **Scale:** {rep['scale']}",
             f"- **Machine:** {rep.get('machine', '?')}", f"- **Date:** {rep['date']}",
             f"- **Command:** `{rep['command']}`",
             f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample sd (n = seeds))",
             f"- **Status:** {status_line(rep)}", "",
             "Test goals unless marked val (validation goals: where designs are chosen).", "",
             "| env | arm | window | " + " | ".join(f"{h} ({b} is better)" for _, h, _, b in MEMORY_COLUMNS)
             + " | memory probe all − k1 (nats, 95 % CI) |",
             "|---|---|---|" + "---|" * (len(MEMORY_COLUMNS) + 1)]
    for r in rep["rows"]:
        cells = [stats.fmt_describe(r["stats"][k], fmt) for k, _, fmt, _ in MEMORY_COLUMNS]
        mp = r["memory_probe"]
        probe = "–" if mp is None else stats.fmt_paired(mp["all_minus_k1"], ".4f")
        lines.append(f"| {r['env']} | `{r['arm']}` | {window_label(r)} | " + " | ".join(cells) + f" | {probe} |")
    for env, d in rep["datasets"].items():
        su = d.get("source_search_use_test")
        if su and su.get("episodes_to_first_goal") is not None:
            have = {"episodes_to_first_goal": su["episodes_to_first_goal"], "found_goal_frac": su["found_goal_frac"],
                    "return_after_found": su["return_after_found_normalized"]}
            cells = [_fmt(have[k], fmt) if k in have else "–" for k, _, fmt, _ in MEMORY_COLUMNS]
            lines.append(f"| {env} | source (its own histories) | – | " + " | ".join(cells) + " | – |")
    if any(r.get("goal_readout") for r in rep["rows"]):
        lines += ["", ("**What the memory holds** (goal_readout.py, test goals: accuracy of a linear readout of "
                       "the goal cell from the latents, after the first find minus the constant guess and minus "
                       "the readout before the find, within each run; mean [95 % t-interval over seeds]):"), "",
                  "| env | arm | window | after − constant | after − before |", "|---|---|---|---|---|"]
        for r in (r for r in rep["rows"] if r.get("goal_readout")):
            g = r["goal_readout"]
            lines.append(f"| {r['env']} | `{r['arm']}` | {window_label(r)} | "
                         + " | ".join(stats.fmt_paired(g[n], ".3f") if n in g else "–"
                                      for n, _, _ in GOAL_READOUT_GAPS) + " |")
    lines += ["", "**What each arm paid** (mean over seeds; training: this process's steps, from done.json):", "",
              "| env | arm | window | steps | " + " | ".join(h for _, h, _ in COMPUTE_COLUMNS) + " | device |",
              "|---|---|---|---|" + "---|" * (len(COMPUTE_COLUMNS) + 1)]
    for r in rep["rows"]:
        cells = [_fmt(r["stats"][k]["mean"], fmt) for k, _, fmt in COMPUTE_COLUMNS]
        lines.append(f"| {r['env']} | `{r['arm']}` | {window_label(r)} | {r['steps']} | " + " | ".join(cells)
                     + f" | {r['device']} |")
    heads = {k: (h, fmt, b) for k, h, fmt, b in MEMORY_COLUMNS}
    paired_rows = [r for r in rep["rows"] if r.get("paired")]
    if paired_rows:
        lines += ["", (f"**Paired differences** (arm − `{MEMORY_REFERENCE}` with the same window, same seed and "
                       "data; mean [95 % t-interval]; the verdict is read off the interval: a difference is "
                       "one only when its interval excludes 0):"), "",
                  "| env | arm | window | " + " | ".join(f"{heads[k][0]} ({heads[k][2]} is better)"
                                                       for k in MEMORY_PAIRED) + " |",
                  "|---|---|---|" + "---|" * len(MEMORY_PAIRED)]
        for r in paired_rows:
            lines.append(f"| {r['env']} | `{r['arm']}` | {window_label(r)} | "
                         + " | ".join(stats.fmt_paired(r["paired"][k], heads[k][1]) for k in MEMORY_PAIRED) + " |")
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


def memory_plot(path: Path, rep: dict) -> None:
    envs = sorted({r["env"] for r in rep["rows"]}) or ["-"]
    fig, axes = _figure((6.5 * len(envs), 4.6), 1, len(envs))
    for ax, env in zip(axes[0], envs):
        opt = None
        for r in (r for r in rep["rows"] if r["env"] == env):
            curves = [p["curve"] for p in r["per_seed"].values() if p.get("curve")]
            if curves:
                _curve_band(ax, curves, COLORS.get(r["arm"], "tab:brown"), f"{r['arm']} (window {window_label(r)})")
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
