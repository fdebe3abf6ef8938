"""Does pretraining help? Random init vs + reconstruction loss vs + stage-1 pretraining, measured.

    python experiments/compare_pretraining.py                          # experiment=quick, 5 arms x seeds 0 1 2
    python experiments/compare_pretraining.py --jobs 2                 # 2 single-thread processes at a time
    python experiments/compare_pretraining.py --arms scratch pretrained_ft --seeds 0 1 train:lr=1e-4
    python experiments/compare_pretraining.py --experiment full --accelerate   # GPU, DICP scale
    python experiments/compare_pretraining.py --dry-run                # print the plan, run nothing
    python experiments/compare_pretraining.py --report-only            # rewrite the table from what exists

Arms (same dataset, same training budget, same seeds; only the encoder's start / extra loss differ):
    ad                 AD baseline (model=ad_dr): the same decoder, a sliding window, no compression
    scratch            CompressedAD from random init
    aux_recon          scratch + the stage-1 reconstruction loss as an auxiliary term (--aux-recon-weight)
    pretrained_ft      CompressedAD from the stage-1 encoder, fine-tuned
    pretrained_frozen  CompressedAD from the stage-1 encoder, frozen
Stage 1 runs once per seed (<out>/runs/pretrain-seed<s>) and feeds both pretrained arms of that seed.

Every run is its own process (train.py / pretrain_encoder.py / evaluate.py, optionally under
`accelerate launch`), up to --jobs at a time, each logging to <out>/logs/<job>.log. A run whose run dir
has done.json (and the same config) is reused; one with checkpoints but no done.json is resumed
(resume=true); an evaluation whose json matches the finished model and the wanted settings is reused. So
an interrupted comparison picks up where it stopped: run the same command again.

Each trained run is evaluated twice with frozen weights on the held-out goals: `eval` (the preset's
n_episodes) and `eval_long` (--long-episodes, default 500, --long-seeds-per-goal 2 rollouts per held-out
goal: far past AD's window and past the length of the source's learning histories). The outputs in --out (default results/compare-<experiment>):
    table.md     the comparison table (mean ± std over seeds), the scale, date and command
    table.json   the same plus per-seed raw numbers, run dirs, the dataset and the routed overrides
    curves.png   held-out in-context learning curves of every arm (mean ± std over seeds), and the long ones

Free overrides `key=value` go to every stage whose config has that key (as in two_stage.py):
`model.d_model=32` reaches pretrain and train, `n_episodes=...` only evaluate. Prefix one with a stage
to target it alone: `train:lr=1e-4`, `pretrain:pretrain_lr=5e-4`, `evaluate:seeds_per_goal=2`,
`collect:source.n_stream=10`. The runner itself sets seed, run_dir, data_path (and resume/overwrite).
A run dir or dataset made with other settings than the command asks for is refused (--force redoes runs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/compare_pretraining.py` puts experiments/ first, not the repo
    sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write, atomic_write_text

STAGES = ("collect", "pretrain", "train", "evaluate")
ARMS = {
    "ad": "AD (sliding window)",
    "scratch": "CompressedAD, random init",
    "aux_recon": "CompressedAD + recon. loss",
    "pretrained_ft": "CompressedAD + pretrained enc. (fine-tuned)",
    "pretrained_frozen": "CompressedAD + pretrained enc. (frozen)",
}
PRETRAINED_ARMS = ("pretrained_ft", "pretrained_frozen")
# Keys the runner sets per run; a free override of them would silently be overridden, so refuse it.
RESERVED = {"seed", "run_dir", "run_name", "resume", "resume_from", "overwrite", "out_name",
            "model.pretrained_encoder_path", "model.freeze_encoder", "pretrained_encoder_path", "freeze_encoder"}
# The evaluate.py settings an eval json must have been produced with to be reused.
EVAL_KEYS = ("n_episodes", "seeds_per_goal", "n_train_goals", "splits", "last_k", "sample", "seed", "env_from_run",
             "use_cache")
TRAIN_FRACS = (0.25, 0.5, 1.0)  # train/loss_action is read at these fractions of max_steps
SCALES = {"quick": "small scale", "full": "DICP scale"}

# metric key -> (label in table.md, "lower" | "higher" is better, format)
METRICS = {
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


class CompareError(RuntimeError):
    """Bad command line or a run directory that cannot be reused as asked; one line, with the fix."""


# ---------------------------------------------------------------------------------------------------------
# Command line and configs
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    import two_stage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="quick", help="Hydra preset config/experiment/<name>.yaml (default quick)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                   help=f"arms to run (default all): {' '.join(ARMS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes run at once (default 1; on 2 cores, 2 single-thread processes is best)")
    p.add_argument("--out", default=None, help="results folder (default results/compare-<experiment>)")
    p.add_argument("--aux-recon-weight", type=float, default=1.0, help="model.aux_recon_weight of aux_recon")
    p.add_argument("--long-episodes", type=int, default=500, help="episodes of the long-horizon eval (default 500)")
    p.add_argument("--long-seeds-per-goal", type=int, default=2,
                   help="rollouts per held-out goal in the long eval (default 2: it is ~10x longer than the "
                        "standard one, and AD recomputes its window every step; 0 = the preset's seeds_per_goal)")
    two_stage.add_launch_args(p)
    p.add_argument("--force", action="store_true", help="redo every run (overwrite=true) instead of reusing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the table from what exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, optionally stage:key=value")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    if a.long_episodes < 1 or a.long_seeds_per_goal < 0:
        p.error("--long-episodes must be >= 1 and --long-seeds-per-goal >= 0")
    if len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        p.error("--seeds must be distinct non-negative integers")
    a.arms = [arm for arm in ARMS if arm in a.arms]  # canonical order, no duplicates
    a.out = Path(a.out or ROOT / "results" / f"compare-{a.experiment}").expanduser().resolve()
    return a


def _key(o: str) -> str:
    return o.split("=", 1)[0]


def compose(config_name: str, overrides: list[str]):
    """Hydra compose of config/<config_name>.yaml (nothing written, nothing validated beyond Hydra's own)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra_cli import compose_config

    try:
        return compose_config(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise CompareError(f"{config_name} config: {' '.join(str(e).split())}") from None


def route_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """two_stage.split_overrides (stage:key=value -> that stage, appended last so it wins; group choices ->
    all; key=value -> every stage whose config, without the experiment preset, has the key; a bare model
    key -> model.key), after refusing the keys this runner sets itself."""
    import two_stage

    for o in overrides:
        if "=" not in o:
            raise CompareError(f"override {o!r} is not key=value (stage:key=value targets one stage)")
        k = _key(o).split(":", 1)[-1].lstrip("+~")
        if k in RESERVED:
            raise CompareError(f"{o!r}: the runner sets {k} itself (use --seeds / --out / --force)")
    try:
        return two_stage.split_overrides(overrides)
    except two_stage.PipelineError as e:
        raise CompareError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# The plan: jobs with dependencies
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str  # e.g. train:scratch-seed0
    stage: str
    overrides: list[str]
    deps: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    out_file: Path | None = None  # what must exist after a successful run
    note: str = ""  # "resume" / "fresh" / "overwrite"


@dataclass
class Plan:
    data_path: Path
    collect: Job | None
    jobs: list[Job]
    reused: list[str]
    runs: dict  # (arm, seed) -> run dir
    pretrain_runs: dict  # seed -> run dir
    train_cfgs: dict  # (arm, seed) -> composed train config (plain dict)
    eval_cfgs: dict  # out_name -> composed evaluate config (plain dict)


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:  # evaluate + a preset: data_path: ...${data_seed} has no data_seed
        return OmegaConf.to_container(cfg, resolve=False)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _run_state(run_dir: Path, want: dict, want_steps: int, what: str, force: bool,
               report_only: bool = False) -> str:
    """'reuse' (finished, same config), 'resume' (checkpoints, no done.json), 'fresh' or 'overwrite'."""
    import loop

    if force:
        return "overwrite" if (run_dir / "config.json").exists() else "fresh"
    saved = _read_json(run_dir / "config.json")
    if saved is not None and loop._identity(saved) != loop._identity(want):
        diff = "; ".join(loop._differing_keys(saved, want)[:6])
        if report_only:  # report what is on disk, but say that it is not what this command would train
            print(f"warning: {run_dir} was trained with another config ({diff})", file=sys.stderr)
            return "reuse" if (run_dir / "done.json").is_file() else "fresh"
        raise CompareError(f"{run_dir} holds a {what} run with another config ({diff}); pass --force to redo "
                           f"it or choose another --out")
    done = _read_json(run_dir / "done.json")
    if done is not None:
        if int(done.get("global_step", -1)) != want_steps and not report_only:
            raise CompareError(f"{run_dir} finished at step {done.get('global_step')} but this comparison "
                               f"trains {want_steps} steps; pass --force to redo it or choose another --out")
        return "reuse"
    if loop.checkpoints(run_dir):
        return "resume"
    return "fresh"


def _eval_reusable(run_dir: Path, out_name: str, want: dict) -> bool:
    ev, done = _read_json(run_dir / f"{out_name}.json"), _read_json(run_dir / "done.json")
    model = run_dir / "model.pt"
    if ev is None or done is None or not model.is_file():
        return False
    if ev.get("global_step") != done.get("global_step"):
        return False
    if (run_dir / f"{out_name}.json").stat().st_mtime < model.stat().st_mtime:
        return False
    got = ev.get("config", {})
    return all(got.get(k) == want.get(k) for k in EVAL_KEYS)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def evaluate_overrides(routed_eval: list[str]) -> list[str]:
    """evaluate.py's overrides with the experiment preset spelled out as the evaluate keys it sets
    (n_episodes=40 seeds_per_goal=4 for quick) instead of `experiment=<name>`. Why: a preset is
    @package _global_ and also carries keys evaluate.yaml lacks (quick's data_path interpolates
    ${data_seed}), and hydra_cli's up-front resolve check rejects `evaluate.py experiment=quick` for that.
    The user's own evaluate overrides come after, so they still win."""
    is_exp = [_key(o).lstrip("+~") == "experiment" for o in routed_eval]
    if not any(is_exp):
        return list(routed_eval)
    others = [o for o, e in zip(routed_eval, is_exp) if not e]
    base = _flatten(_plain(compose("evaluate", others + ["run_dir=x"])))
    preset = _flatten(_plain(compose("evaluate", routed_eval + ["run_dir=x"])))
    spelled = [f"{k}={json.dumps(v)}" for k, v in preset.items() if k in base and base[k] != v and k != "run_dir"]
    return spelled + others


def arm_overrides(arm: str, seed: int, a, pretrain_dir: Path | None) -> list[str]:
    if arm == "ad":
        return ["model=ad_dr"]
    if arm == "scratch":
        return []
    if arm == "aux_recon":
        return [f"model.aux_recon_weight={a.aux_recon_weight}"]
    ckpt = pretrain_dir / "encoder-pretrained-final.pt"
    out = [f"model.pretrained_encoder_path={ckpt}"]
    if arm == "pretrained_frozen":
        out.append("model.freeze_encoder=true")
    return out


def check_dataset(data_path: Path, want: dict, warn_only: bool = False) -> None:
    """An existing dataset is reused only if it is the one collect.py would make now: same env, same source
    settings, same seed (a preset's source settings may have changed since it was collected)."""
    meta = _read_json(data_path / "meta.json") or {}
    diff = [f"env.{k} ({meta['env'][k]!r} -> {v!r})" for k, v in want["env"].items()
            if k in meta.get("env", {}) and meta["env"][k] != v]
    diff += [f"source.{k} ({meta['source'][k]!r} -> {v!r})" for k, v in want["source"].items()
             if k in meta.get("source", {}) and meta["source"][k] != v]
    if "seed" in meta and meta["seed"] != want["seed"]:
        diff.append(f"seed ({meta['seed']!r} -> {want['seed']!r})")
    if diff and warn_only:
        print(f"note: dataset {data_path} (given by data_path=...) differs from the collect config: "
              f"{'; '.join(diff)}; using it as given", file=sys.stderr)
    elif diff:
        raise CompareError(f"dataset {data_path} was collected with other settings ({'; '.join(diff)}): "
                           f"recollect it (python collect.py ... overwrite=true) or pass another data_path=...")


def make_plan(a, routed: dict, tag: str = "", pretrain_dir: Path | None = None,
              long_eval: bool = True) -> Plan:
    """The jobs of one comparison. experiments/pretrain_budget.py plans one comparison per stage-2 budget
    with the same stage 1: `tag` (e.g. "b500") prefixes the stage-2 run dirs and job names, `pretrain_dir`
    holds the stage-1 runs (default <out>/runs), `long_eval=False` drops the long rollouts."""
    runs_dir = a.out / "runs"
    pretrain_dir = runs_dir if pretrain_dir is None else pretrain_dir
    pre = f"{tag}-" if tag else ""
    # 1. data (collect.py resolves a relative data_path against the launch directory, as we do)
    ccfg = compose("collect", routed["collect"])
    data_path = Path(str(ccfg.data_path)).expanduser().resolve()
    collect = None
    if (data_path / "meta.json").is_file():
        # the preset's own dataset must match the preset; a data_path=... given by hand is the user's call
        explicit = any(_key(o) == "data_path" for o in routed["collect"])
        check_dataset(data_path, _plain(ccfg), warn_only=explicit)
    else:
        collect = Job("collect", "collect", routed["collect"] + [f"data_path={data_path}"],
                      out_file=data_path / "meta.json", note="no dataset yet")
    common = [f"data_path={data_path}"]
    jobs: list[Job] = []
    reused: list[str] = []

    def add(job: Job, state: str):
        job.note = state
        if state == "reuse":
            reused.append(job.name)
        else:
            if state == "resume":
                job.overrides.append("resume=true")
            elif state == "overwrite":
                job.overrides.append("overwrite=true")
            jobs.append(job)

    # 2. stage 1, once per seed, when a pretrained arm wants it
    pretrain_runs = {}
    if any(arm in PRETRAINED_ARMS for arm in a.arms):
        for s in a.seeds:
            rd = pretrain_dir / f"pretrain-seed{s}"
            ov = routed["pretrain"] + common + [f"seed={s}", f"run_dir={rd}"]
            cfg = _plain(compose("pretrain", ov))
            state = _run_state(rd, cfg, int(cfg["pretrain_steps"]), "stage-1", a.force, a.report_only)
            if state == "reuse" and not (rd / "encoder-pretrained-final.pt").is_file():
                raise CompareError(f"{rd} is finished but has no encoder-pretrained-final.pt; pass --force")
            add(Job(f"pretrain:seed{s}", "pretrain", ov, run_dir=rd, out_file=rd / "done.json"), state)
            pretrain_runs[s] = rd

    # 3. evaluation settings (the same for every run)
    eval_base = evaluate_overrides(routed["evaluate"])
    eval_cfgs = {}
    long_extra = [f"n_episodes={a.long_episodes}", "splits=[test]", "teacher_forced=false", "tensorboard=false"]
    ecfg = _plain(compose("evaluate", eval_base + ["run_dir=x"]))
    if a.long_seeds_per_goal:
        long_extra.append(f"seeds_per_goal={a.long_seeds_per_goal}")
    eval_cfgs["eval"] = ecfg
    eval_cfgs["eval_long"] = _plain(compose("evaluate", eval_base + ["run_dir=x"] + long_extra))

    # 4. stage 2 + evaluations. List order = scheduling priority: stage 1 (each unblocks two trainings),
    # then the trainings, then the evaluations, which fill the slots no training is ready for. Longest
    # and most-depended-on first keeps --jobs N busy; an evaluation never holds up a training.
    runs, train_cfgs = {}, {}
    evals: list[Job] = []
    for s in a.seeds:
        for arm in a.arms:
            rd = runs_dir / f"{pre}{arm}-seed{s}"
            ov = (routed["train"] + arm_overrides(arm, s, a, pretrain_runs.get(s)) + common
                  + [f"seed={s}", f"run_dir={rd}"])
            cfg = _plain(compose("train", ov))
            state = _run_state(rd, cfg, int(cfg["max_steps"]), "stage-2", a.force, a.report_only)
            deps = [f"pretrain:seed{s}"] if arm in PRETRAINED_ARMS and f"pretrain:seed{s}" not in reused else []
            if deps and state == "reuse" and not a.dry_run:
                raise CompareError(f"{rd} is finished, but the stage-1 run it started from ({pretrain_runs[s]}) "
                                   f"is not: it would be trained anew under a finished run; pass --force")
            tname = f"train:{pre}{arm}-seed{s}"
            add(Job(tname, "train", ov, deps, run_dir=rd, out_file=rd / "done.json"), state)
            for out_name, extra in (("eval", []), ("eval_long", long_extra))[: 2 if long_eval else 1]:
                ename = f"{out_name}:{pre}{arm}-seed{s}"
                keys = {_key(o) for o in extra}  # the long eval's own settings replace the preset's
                eov = [o for o in eval_base if _key(o) not in keys] + [f"run_dir={rd}", f"out_name={out_name}"] + extra
                ok = state == "reuse" and _eval_reusable(rd, out_name, eval_cfgs[out_name])
                job = Job(ename, "evaluate", eov, [] if state == "reuse" else [tname], run_dir=rd,
                          out_file=rd / f"{out_name}.json", note="reuse" if ok else "fresh")
                if ok:
                    reused.append(ename)
                else:
                    evals.append(job)
            runs[(arm, s)] = rd
            train_cfgs[(arm, s)] = cfg
    jobs += evals
    return Plan(data_path, collect, jobs, reused, runs, pretrain_runs, train_cfgs, eval_cfgs)


# ---------------------------------------------------------------------------------------------------------
# Running: a small dependency-aware process pool
# ---------------------------------------------------------------------------------------------------------
_PORTS = iter(range(10**9))


def command(job: Job, a, launching: bool = False) -> list[str]:
    import two_stage

    cmd = two_stage.command(job.stage, job.overrides, a)
    if launching and a.jobs > 1 and "accelerate.commands.launch" in cmd:
        # concurrent launches must not share accelerate's rendezvous port (29500 in accelerate_config.yaml)
        i = cmd.index("accelerate.commands.launch") + 1
        cmd[i:i] = ["--main_process_port", str(29600 + next(_PORTS) % 300)]
    return cmd


def child_env(a) -> dict:
    env = dict(os.environ)
    # N processes on few cores: torch's intra-op threads would fight each other (10x slower, measured
    # on the 2-core box). The user's own OMP_NUM_THREADS wins.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.jobs)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in [ln for ln in lines if ln.strip()][-n:])


def run_jobs(jobs: list[Job], a, logs: Path, timings: dict, timings_path: Path) -> list[str]:
    """Run jobs (list order = priority), at most a.jobs at once, each after its deps succeeded. A failure
    skips its dependants but not the other runs. Returns the names of failed/skipped jobs."""
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(a)
    pending = list(jobs)
    running: dict[str, tuple] = {}
    ok: set[str] = set()
    bad: list[str] = []
    names = {j.name for j in jobs}
    n_total, n_done = len(jobs), 0
    t_start = time.perf_counter()
    try:
        while pending or running:
            started = False
            for job in list(pending):
                if any(d in bad for d in job.deps):
                    pending.remove(job)
                    bad.append(job.name)
                    n_done += 1
                    print(f"[skip]  {job.name}: a run it needs failed", flush=True)
                    continue
                if len(running) >= a.jobs or any(d in names and d not in ok for d in job.deps):
                    continue
                pending.remove(job)
                log = logs / f"{job.name.replace(':', '-')}.log"
                cmd = command(job, a, launching=True)
                with open(log, "a") as f:  # appended: a resumed run's log keeps the interrupted attempt
                    f.write(f"=== {_dt.datetime.now():%Y-%m-%d %H:%M:%S} ({job.note})\n$ {shlex.join(cmd)}\n\n")
                    f.flush()
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
                running[job.name] = (proc, job, time.perf_counter(), log)
                started = True
                print(f"[start] {job.name} ({job.note})  log: {log}", flush=True)
            if not running:
                if pending and not started:  # cannot happen with the plan's ordering; never spin forever
                    raise CompareError(f"jobs wait on runs that never come: {[j.name for j in pending]}")
                continue
            time.sleep(0.5)
            for name, (proc, job, t0, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                n_done += 1
                dt = time.perf_counter() - t0
                timings[name] = round(dt, 1)
                _write_text(timings_path, json.dumps(timings, indent=1, sort_keys=True))
                if rc == 0 and (job.out_file is None or job.out_file.exists()):
                    ok.add(name)
                    print(f"[done]  {name} in {dt:.0f}s  ({n_done}/{n_total}, "
                          f"{time.perf_counter() - t_start:.0f}s elapsed)", flush=True)
                else:
                    bad.append(name)
                    why = (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}" if rc
                           else f"no {job.out_file.name} written")
                    print(f"[FAIL]  {name}: {why}; last lines of {log}:\n{_tail(log)}", file=sys.stderr, flush=True)
    finally:
        for name, (proc, *_rest) in running.items():  # interrupted: stop our own children, nothing else
            proc.terminate()
        for name, (proc, *_rest) in running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return bad


# ---------------------------------------------------------------------------------------------------------
# Collecting the numbers
# ---------------------------------------------------------------------------------------------------------
def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar tag across the run's event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def _nearest(series: list[tuple[int, float]], step: float) -> tuple[int, float] | tuple[None, None]:
    if not series:
        return None, None
    return min(series, key=lambda sv: (abs(sv[0] - step), sv[0]))


def run_metrics(run_dir: Path, max_steps: int) -> dict:
    """Per-run numbers; absent ones (run or eval missing) are None."""
    m: dict = {k: None for k in METRICS}
    info: dict = {"run_dir": str(run_dir), "complete": False}
    loss = read_scalars(run_dir / "tb", "train/loss_action")
    steps = {}
    for f in TRAIN_FRACS:
        st, v = _nearest(loss, f * max_steps)
        m[f"train_loss_action_{int(f * 100)}"] = v
        steps[f"{int(f * 100)}%"] = st
    info["train_loss_steps"] = steps
    done = _read_json(run_dir / "done.json") or {}
    # teacher_forced.py: every step of every test-goal history, each model with its rollout schedule
    m["heldout_loss_same_position"] = done.get("tf_loss_test")
    m["heldout_acc_same_position"] = (done.get("heldout_test") or {}).get("acc")
    info["global_step"] = done.get("global_step")
    ev = _read_json(run_dir / "eval.json")
    if ev and "test" in ev.get("splits", {}):
        s = ev["splits"]["test"]["summary"]
        m.update(return_first=s["first_episode"], return_last5=s["last_k_mean"],
                 return_last5_normalized=s["last_k_normalized"], reward_per_step=s.get("reward_per_step"))
        info["curve"] = s["curve"]
        info["optimal_mean"] = s["optimal_mean"]
        info["eval_last_k"] = s["last_k"]
        info["n_test_goals"] = s["n_goals"]
        info["eval_device"] = ev.get("device")
    lev = _read_json(run_dir / "eval_long.json")
    if lev and "test" in lev.get("splits", {}):
        s = lev["splits"]["test"]["summary"]
        c = s["curve"]
        lo = len(c) - max(1, len(c) // 5)  # the last 20% of the episodes (400..499 of 500)
        tail = sum(c[lo:]) / len(c[lo:])
        m.update(long_return_last5=s["last_k_mean"], long_return_tail=tail,
                 long_return_tail_normalized=tail / s["optimal_mean"] if s["optimal_mean"] > 0 else None,
                 long_reward_per_step=s.get("reward_per_step"))
        info["long_curve"] = c
        info["long_tail_episodes"] = [lo + 1, len(c)]
        info["long_last_k"] = s["last_k"]
        info["long_n_seeds_per_goal"] = s["n_seeds"]
    info["complete"] = all(v is not None for v in m.values())
    return {"metrics": m, **info}


def _mean_std(vals: list) -> tuple:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return mean, std, len(v)


def collect_results(a, plan: Plan) -> dict:
    results = {}
    for arm in a.arms:
        per_seed = {}
        for s in a.seeds:
            saved = _read_json(plan.runs[(arm, s)] / "config.json") or plan.train_cfgs[(arm, s)]
            max_steps = int(saved["max_steps"])  # the run's own (--report-only may read older runs)
            per_seed[str(s)] = run_metrics(plan.runs[(arm, s)], max_steps)
        mean, std, n = {}, {}, {}
        for k in METRICS:
            mean[k], std[k], n[k] = _mean_std([r["metrics"][k] for r in per_seed.values()])
        mc = plan.train_cfgs[(arm, a.seeds[0])]["model"]
        memory = (f"window {mc['context_len']} steps" if mc["name"] == "ad" else
                  f"window {mc['seg_len']} steps + {mc['n_latent']} latents")
        results[arm] = {"label": ARMS[arm], "memory": memory, "mean": mean, "std": std, "n": n,
                        "per_seed": per_seed}
    return results


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def device_description(results: dict) -> str:
    devs = {r.get("eval_device") for res in results.values() for r in res["per_seed"].values()} - {None}
    if any(str(d).startswith("cuda") for d in devs):
        try:
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})"
        except Exception:  # noqa: BLE001 -- only a label
            return "GPU"
    return f"a {os.cpu_count()}-core CPU"


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render_markdown(rep: dict) -> str:
    arms = rep["arms"]
    res = rep["results"]
    lines = [f"# Does pretraining help? CompressedAD comparison ({rep['experiment']})", "",
             f"- **Scale:** {rep['scale']}",
             f"- **Date:** {rep['date']}",
             f"- **Command:** `{rep['command']}`",
             f"- **Dataset:** `{rep['dataset']['path']}` ({rep['dataset'].get('summary', '')})",
             f"- **Budget:** {rep['budget']}",
             (f"- **Seeds:** {', '.join(map(str, rep['seeds']))} (cells: mean ± sample std over training seeds; "
              "a cell marked (n=k) averages only the k seeds whose runs finished)"),
             f"- **Status:** {'complete' if rep['complete'] else 'INCOMPLETE: ' + ', '.join(rep['missing'])}",
             "", "| metric | " + " | ".join(f"`{arm}`" for arm in arms) + " |",
             "|---|" + "---|" * len(arms)]
    lines.append("| memory | " + " | ".join(res[arm]["memory"] for arm in arms) + " |")
    for k, (label, better, fmt) in METRICS.items():
        kk = rep["long_eval" if k.startswith("long_") else "eval"].get("last_k")
        if kk:  # evaluate.py clips last_k to n_episodes
            label = label.replace("last 5", f"last {kk}").replace("last-5", f"last-{kk}")
        means = {arm: res[arm]["mean"][k] for arm in arms}
        valid = [v for v in means.values() if v is not None]
        best = (min(valid) if better == "lower" else max(valid)) if len(valid) > 1 else None
        cells = []
        for arm in arms:
            mu, sd, n = means[arm], res[arm]["std"][k], res[arm]["n"][k]
            c = _fmt(mu, fmt) + ("" if sd is None else f" ± {_fmt(sd, fmt)}")
            if mu is not None and n < len(rep["seeds"]):
                c += f" (n={n})"
            cells.append(f"**{c}**" if best is not None and mu == best else c)
        lines.append(f"| {label} ({better} is better) | " + " | ".join(cells) + " |")
    lt = rep["long_eval"]
    lines += ["", "Arms: " + "; ".join(f"`{arm}` = {ARMS[arm]}" for arm in arms) + ".", "",
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


def plot(path: Path, rep: dict) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red")))
    opt = rep["eval"].get("optimal_mean")
    for ax, key, title in ((axes[0], "curve", f"held-out goals, {rep['eval']['n_episodes']} episodes"),
                           (axes[1], "long_curve", f"long rollout, {rep['long_eval']['n_episodes']} episodes")):
        smooth = 1
        for arm in rep["arms"]:
            curves = [r[key] for r in rep["results"][arm]["per_seed"].values() if r.get(key)]
            if not curves:
                continue
            n = min(map(len, curves))
            c = np.asarray([cv[:n] for cv in curves])
            mean = c.mean(0)
            std = c.std(0, ddof=1) if len(c) > 1 else np.zeros(n)
            if key == "long_curve" and n >= 100:  # 500 noisy points: a 10-episode moving average reads better
                smooth = 10
                k = np.ones(smooth) / smooth
                mean, std = np.convolve(mean, k, "valid"), np.convolve(std, k, "valid")
            x = np.arange(1, len(mean) + 1) + (smooth - 1)
            ax.plot(x, mean, color=colors[arm], label=f"{arm} ({len(c)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colors[arm], alpha=0.15, linewidth=0)
        src = rep["dataset"].get("source_curve_test")
        if src:  # what AD distils: the source algorithm learning the same held-out goals from scratch
            n_src = min(len(src), rep["eval" if key == "curve" else "long_eval"]["n_episodes"])
            ax.plot(np.arange(1, n_src + 1), src[:n_src], color="k", linewidth=1, alpha=0.6, linestyle="-.",
                    label="source algorithm (its histories)")
        if opt:
            ax.axhline(opt, color="k", linestyle="--", linewidth=1, label=f"optimal ({opt:.2f})")
        ep_hist = rep["dataset"].get("episodes_per_history")
        if key == "long_curve" and ep_hist and ep_hist <= rep["long_eval"]["n_episodes"]:
            ax.axvline(ep_hist, color="k", linestyle=":", linewidth=1, label=f"source history length ({ep_hist} ep.)")
        ax.set_title(title + (f" ({smooth}-episode moving average)" if smooth > 1 else ""), fontsize=10)
        ax.set_xlabel("episode (in context, frozen weights)")
        ax.set_ylabel("mean return (± std over training seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Does pretraining help? {rep['scale']}, {rep['date']}", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)


def write_report(a, plan: Plan, routed: dict, command_line: str, timings: dict, failed: list[str]) -> dict:
    results = collect_results(a, plan)
    missing = [f"{arm}-seed{s}" for arm in a.arms for s in a.seeds
               if not results[arm]["per_seed"][str(s)]["complete"]]
    meta = _read_json(plan.data_path / "meta.json") or {}
    env = meta.get("env", {})
    ep_hist = meta["n_steps"] // env["horizon"] if meta.get("n_steps") and env.get("horizon") else None
    n_train = len(meta.get("split", {}).get("train_goals", []))
    tc = plan.train_cfgs[(a.arms[0], a.seeds[0])]
    budget = f"{tc['max_steps']} optimizer steps x batch {tc['batch_size']}, lr {tc['lr']} (every arm)"
    if plan.pretrain_runs:
        pc = _plain(compose("pretrain", routed["pretrain"] + [f"data_path={plan.data_path}"]))
        budget += f"; stage 1: {pc['pretrain_steps']} steps x batch {pc['pretrain_batch_size']}, lr {pc['pretrain_lr']}"
    e, le = plan.eval_cfgs["eval"], plan.eval_cfgs["eval_long"]

    def first(key):  # a per-run fact that is the same for every run (None if no run got that far)
        return next((r[key] for res in results.values() for r in res["per_seed"].values() if r.get(key)), None)

    tail = first("long_tail_episodes")
    rep = {
        "format_version": 1,
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": command_line,
        "cwd": str(Path.cwd()),
        "experiment": a.experiment,
        "scale": f"{SCALES.get(a.experiment, 'custom scale')}: experiment={a.experiment} on "
                 f"{device_description(results)}",
        "arms": a.arms,
        "seeds": a.seeds,
        "budget": budget,
        "dataset": {"path": str(plan.data_path), "n_stream": meta.get("n_stream"), "n_steps": meta.get("n_steps"),
                    "episodes_per_history": ep_hist, "env": env.get("name"),
                    "source_curve_test": meta.get("return_curve_test"),
                    "summary": f"{env.get('name')}, {n_train} train goals x {meta.get('n_stream')} streams x "
                               f"{meta.get('n_steps')} steps"},
        "eval": {"n_episodes": e["n_episodes"], "seeds_per_goal": e["seeds_per_goal"], "last_k": first("eval_last_k"),
                 "n_test_goals": first("n_test_goals"), "optimal_mean": first("optimal_mean")},
        "long_eval": {"n_episodes": le["n_episodes"], "seeds_per_goal": le["seeds_per_goal"],
                      "last_k": first("long_last_k"),
                      "tail_episodes": f"{tail[0]}-{tail[1]}" if tail else "–"},
        "metrics": {k: {"label": lab, "better": b} for k, (lab, b, _) in METRICS.items()},
        "complete": not missing,
        "missing": missing,
        "failed_jobs": failed,
        "results": results,
        "runs": {f"{arm}-seed{s}": str(p) for (arm, s), p in plan.runs.items()},
        "pretrain_runs": {str(s): str(p) for s, p in plan.pretrain_runs.items()},
        "overrides": routed,
        "timings_s": timings,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    _write_text(a.out / "table.json", json.dumps(rep, indent=1, default=str))
    _write_text(a.out / "table.md", render_markdown(rep))
    plot(a.out / "curves.png", rep)
    return rep


def execute(a, collect: Job | None, jobs: list[Job]) -> tuple[dict, list[str]] | None:
    """The runner both experiment scripts share. Prints the plan for --dry-run (and returns None: nothing
    runs) or --report-only (nothing runs, the report is rewritten from disk); otherwise runs the collect job
    (a failure stops everything) and then the others, --jobs at a time. Returns (timings, failed job names);
    timings persist in <out>/timings.json across interrupted invocations."""
    if a.dry_run or a.report_only:
        for job in ([collect] if collect else []) + jobs:
            deps = f"  (after {', '.join(job.deps)})" if job.deps else ""
            print(f"[{'plan' if a.dry_run else 'not run'}]  {job.name} ({job.note}){deps}\n    $ {shlex.join(command(job, a))}")
        if a.dry_run:
            return None
    timings_path = a.out / "timings.json"
    timings = _read_json(timings_path) or {}
    failed: list[str] = []
    if not a.report_only:
        a.out.mkdir(parents=True, exist_ok=True)
        if collect is not None and run_jobs([collect], a, a.out / "logs", timings, timings_path):
            raise SystemExit(1)
        if jobs:
            print(f"{len(jobs)} process(es) to run, {a.jobs} at a time; logs in {a.out / 'logs'}", flush=True)
        failed = run_jobs(jobs, a, a.out / "logs", timings, timings_path)
    return timings, failed


def exit_if_failed(failed: list[str]) -> None:
    if failed:
        print(f"{len(failed)} job(s) failed or were skipped: {', '.join(failed)}; fix and rerun the same command "
              f"(finished runs are reused)", file=sys.stderr)
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    command_line = shlex.join(["python", "experiments/compare_pretraining.py", *argv])
    routed = route_overrides([f"experiment={a.experiment}", *a.overrides])
    print(f"comparison: arms {' '.join(a.arms)} | seeds {' '.join(map(str, a.seeds))} | experiment={a.experiment} "
          f"| out {a.out}", flush=True)
    plan = make_plan(a, routed)
    if plan.collect is None:
        print(f"[collect] dataset exists at {plan.data_path}; reusing it", flush=True)
    for name in plan.reused:
        print(f"[reuse] {name}: already complete; reusing it", flush=True)
    done = execute(a, plan.collect, plan.jobs)
    if done is None:
        return {"plan": plan}
    timings, failed = done
    rep = write_report(a, plan, routed, command_line, timings, failed)
    print(f"\nwrote {a.out / 'table.md'}, table.json, curves.png"
          + ("" if rep["complete"] else f"  (INCOMPLETE: {', '.join(rep['missing'])})"), flush=True)
    print(render_markdown(rep).split("\n\nArms:")[0], flush=True)
    exit_if_failed(failed)
    return rep


if __name__ == "__main__":
    try:
        main()
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # run_jobs has stopped its children; checkpoints written so far are kept
        print("\ninterrupted: run the same command again to resume (finished runs are reused)", file=sys.stderr)
        sys.exit(130)
