"""Experiment sweeps on Hydra's multirun: one job = one stage-2 run, any Hydra launcher (docs/design.md §10, 17).

    python experiments/sweep.py -m                                    # sweep=compare: 5 arms x seeds 0 1 2
    python experiments/sweep.py -m sweep=memory experiment=mid window=20 arm=ad,ad_3w seed=0,1 \\
        hydra/launcher=joblib hydra.launcher.n_jobs=2 omp_threads=1
    python experiments/sweep.py -m arm=scratch,pretrained_ft seed=0 train:lr=1e-4 model.d_model=32
    python experiments/sweep.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=4 accelerate=true num_processes=4 experiment=full

Config: experiments/conf/sweep.yaml (the keys), conf/sweep/<name>.yaml (an experiment: arms, seeds, budgets,
evaluations, stage defaults), conf/arm/<name>.yaml (an arm: stage-2 overrides, stage-1 encoder or not).
A job runs each stage as its own process (log: <out>/logs/<run>.log) and decides from the disk (§10.17 there):
stage 1 is <out>/runs/pretrain-seed<s>, stage 2 <out>/runs/<run>. Ctrl-C: exit 130; rerun to resume.

Stage overrides: every `key=value` that is not the sweep's own (conf/sweep.yaml, arm=, sweep=, hydra...)
is routed as two_stage.py routes it (`stage:key=value` targets one stage; seed and data_seed mean what they
mean there). The job sets seed, run_dir, data_path, max_steps (budget=), resume/overwrite and the encoder path.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/sweep.py` puts experiments/ first, not the repository
    sys.path.insert(0, str(ROOT))

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

import rundir
import two_stage
from atomic_io import PathLock
from errors import UserError
from experiments import outdir, runs
from experiments.outdir import SweepError, held, record
from hydra_cli import abspath, compose_config, flatten, override_key
from rundir import read_json

# Keys a job sets per run (for the training stages and evaluate); a free override of them would silently be
# overridden, so refuse it. collect:... targets none of them (collect:overwrite=true re-collects the dataset).
RESERVED = {"seed", "run_dir", "run_name", "resume", "resume_from", "overwrite", "out_name",
            "model.pretrained_encoder_path", "model.freeze_encoder", "pretrained_encoder_path", "freeze_encoder"}
# evaluate.py keys that do not change an evaluation's numbers; every other key (env.* included) must equal
# the eval json's own config for it to be reused.
EVAL_IGNORED = {"run_dir", "out_name", "progress", "tensorboard", "device", "cpu_threads"}
ENCODER_FILE = "encoder-pretrained-final.pt"
FIX = "pass force=true to redo it, or choose another out="  # how a sweep's refusal of a run dir ends
# The job keys that vary inside one out dir (they name the run); everything else a job's stages are given is
# the out dir's identity (out_identity). env is one too: `env=darkroom,darkroom_hard` is one memory sweep.
PER_RUN = ("arm", "seed", "budget", "window", "env")
STATUS: dict = {}  # this multirun's planned runs (for its end), and {"error": one line} for _entry


def compose(stage: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(two_stage.compose(stage, overrides), resolve=True)


def route(user: list[str], defaults: list[str], experiment: str, env: str | None,
          budget: int | None = None, split_seed: int | None = None) -> dict[str, list[str]]:
    """two_stage.split_overrides of the preset choice, the goal split, the sweep's stage defaults and the user's
    overrides (in that order: the user's win), after refusing the keys the job sets itself. A split_seed goes
    to every stage as env.split_seed, and names the dataset (two_stage.dataset_for_split) unless the user gave data_path."""
    for o in user:
        if "=" not in o:
            raise SweepError(f"override {o!r} is not key=value (stage:key=value targets one stage)")
        if override_key(o) in RESERVED and not o.startswith("collect:"):  # no collect key is the job's
            raise SweepError(f"{o!r}: the sweep sets {override_key(o)} itself (use seed=..., budget=..., out=..., "
                             f"force=true)")
        if override_key(o) == "max_steps" and budget is not None:
            raise SweepError(f"{o!r}: this sweep's stage-2 budget is budget={budget}, not max_steps")
    groups = [f"experiment={experiment}"] + ([f"env={env}"] if env else [])
    groups += [] if split_seed is None else [f"env.split_seed={split_seed}"]
    try:
        routed = two_stage.split_overrides(groups + list(defaults) + list(user))
        if split_seed is None or any(override_key(o) == "data_path" for o in user):
            return routed
        data = two_stage.dataset_for_split(compose("collect", routed["collect"])["data_path"], split_seed)
        return two_stage.split_overrides(groups + [f"data_path={data}"] + list(defaults) + list(user))
    except two_stage.PipelineError as e:
        raise SweepError(str(e)) from None


def job_keys(arm, seed, budget, window, env) -> dict:
    """A job's PER_RUN values as typed (ints, None) and its run's folder name under <out>/runs: {arm, seed,
    budget, window, env, run}; what run_job and planned_jobs (sweep.json) agree on."""
    arm, seed, budget, window = str(arm), int(seed), *(None if v is None else int(v) for v in (budget, window))
    parts = ([env] if env else []) + ([f"w{window}"] if window else []) + ([f"b{budget}"] if budget else [])
    return {"arm": arm, "seed": seed, "budget": budget, "window": window, "env": env,
            "run": "-".join(parts + [arm, f"seed{seed}"])}


def out_identity(sweep_name: str, experiment: str, evals, routed: dict, env: str | None) -> dict:
    """{dotted key: value}: the sweep, its evaluations and the identity (rundir.identity) of every stage's
    composed config for these routed overrides, without the PER_RUN keys (no arm, budget or window is in
    `routed`; the env choice is taken out here; seed is the job's)."""
    drop = {f"env={env}"} if env else set()
    evals = evals if isinstance(evals, dict) else OmegaConf.to_container(evals, resolve=True)
    ident = {"sweep": sweep_name, "experiment": experiment, **flatten({"evals": evals})}
    for stage, ov in routed.items():
        c = compose(stage, [o for o in ov if o not in drop] + (["run_dir=x"] if stage == "evaluate" else []))
        ident.update(flatten({stage: rundir.identity(c, ignore=("seed",))}))
        if stage == "train":  # volatile for a run (it may be extended), but a free max_steps= is no budget
            ident["train.max_steps"] = c.get("max_steps")
    return ident


def claim(cfg, out: Path) -> tuple[dict, str]:
    """The routed stage overrides and the out dir's identity hash, claimed in <out>/sweep.json (refused in one line
    if out is no writable folder or holds another sweep configuration)."""
    routed = route(list(cfg.overrides), list(cfg.sweep.overrides), cfg.experiment, cfg.env, cfg.budget,
                   cfg.split_seed)
    outdir.check_out(out)
    ident = out_identity(cfg.sweep.name, cfg.experiment, cfg.sweep.evals, routed, cfg.env)
    return routed, outdir.check_identity(out, ident, claim=True)


class Job:
    """One sweep job's context: where it writes, how it launches its child processes."""

    def __init__(self, cfg, out: Path, cwd: Path, num: int | None):
        """num: the job's number in a multirun (None: a single run, `python experiments/sweep.py arm=...`)."""
        self.cfg, self.out, self.cwd, self.num = cfg, out, cwd, num or 0
        # when this sweep started (Report.on_multirun_start); a single run is a sweep of its own
        self.started = outdir.sweep_started(out) if num is not None else time.time()
        self.launch = SimpleNamespace(accelerate=bool(cfg.accelerate), num_processes=cfg.num_processes,
                                      accelerate_config=str(cfg.accelerate_config or ROOT / "accelerate_config.yaml"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if cfg.omp_threads:
            self.env["OMP_NUM_THREADS"] = str(cfg.omp_threads)

    def command(self, stage: str, overrides: list[str]) -> list[str]:
        # parallel jobs must not share accelerate's rendezvous port
        return two_stage.command(stage, overrides, self.launch, port=29600 + self.num % 300)

    def run(self, name: str, stage: str, overrides: list[str], log_name: str, note: str, expect: Path) -> float:
        """Run one stage's script as its own process, output appended to <out>/logs/<log_name>.log; its
        wall seconds. A failure (exit code, or `expect` not written) raises SweepError."""
        cmd = self.command(stage, overrides)
        log = self.out / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[start] {name} ({note})  log: {log}", flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as f:  # appended: a resumed run's log keeps the interrupted attempt
            f.write(f"=== {_dt.datetime.now():%Y-%m-%d %H:%M:%S} {name} ({note})\n$ {shlex.join(cmd)}\n\n")
            f.flush()
            rc = two_stage.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        if rc in (130, -signal.SIGINT):
            # The child took Ctrl-C (exit 130) before this process's own KeyboardInterrupt surfaced (the
            # signal reaches the whole process group; which handler runs first is a race): the same interrupt.
            raise KeyboardInterrupt
        if rc != 0 or not expect.exists():
            why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}" if rc else f"no {expect.name} written"
            lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
            raise SweepError(f"{name} failed ({why}); last lines in {log}:{' | '.join(lines[-3:])}")
        dt = time.perf_counter() - t0
        print(f"[done]  {name} in {dt:.0f}s", flush=True)
        return dt


def ensure_dataset(job: Job, routed: dict) -> Path:
    """The dataset collect's config names: collected once under a lock (collect:overwrite=true: once per
    sweep), else checked against that config (two_stage.check_dataset)."""
    ccfg = compose("collect", routed["collect"])
    data_path = Path(abspath(ccfg["data_path"], job.cwd))
    meta = data_path / "meta.json"
    if not meta.is_file() or ccfg["overwrite"]:  # no lock beside a dataset that is only read (it may be read-only)
        with held(data_path):
            if not meta.is_file() or (ccfg["overwrite"] and meta.stat().st_mtime < job.started):
                job.run("collect", "collect", routed["collect"] + [f"data_path={data_path}"],
                        f"collect-{data_path.name}", "overwrite" if meta.is_file() else "no dataset yet", meta)
                return data_path
    print(f"[reuse] dataset {data_path}", flush=True)
    note = two_stage.check_dataset(data_path, ccfg, routed["collect"])
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return data_path


def ensure_stage1(job: Job, routed: dict, data_path: Path, seed: int, fp: str | None) -> Path:
    """This seed's stage-1 run, produced once (under a lock) and reused by every arm and budget."""
    rd, name = job.out / "runs" / f"pretrain-seed{seed}", f"pretrain-seed{seed}"
    ov = routed["pretrain"] + [f"data_path={data_path}", f"seed={seed}", f"run_dir={rd}"]
    with held(rd):
        # force=true redoes stage 1 once per sweep: not when another job of this sweep already redid it
        redone = (rd / "done.json").is_file() and (rd / "done.json").stat().st_mtime >= job.started
        st = two_stage.stage_state("pretrain", ov, bool(job.cfg.force) and not redone, FIX, fp)
        if st.state == "reuse":
            if not (rd / ENCODER_FILE).is_file():
                raise SweepError(f"{rd} is finished but has no {ENCODER_FILE}; pass force=true")
            print(f"[reuse] pretrain:seed{seed}", flush=True)
            return rd
        rec = read_json(job.out / "jobs" / f"{name}.json") or {}
        if rec.get("status") == "failed" and rec.get("updated_unix", 0.0) >= job.started:
            # another job of this sweep tried it and failed: do not retry it once per dependent run
            raise SweepError(f"stage 1 of seed {seed} failed earlier in this sweep: {rec.get('error')}")
        base = {"kind": "pretrain", "seed": seed, "run_dir": str(rd)}
        try:
            dt = job.run(f"pretrain:seed{seed}", "pretrain", st.overrides, name, st.state, rd / "done.json")
        except SweepError as e:
            record(job.out, name, **base, status="failed", error=str(e))
            raise
        record(job.out, name, **base, status="done", error=None, wall_s={"pretrain": dt})
        runs.keep_record(job.out, name)
    return rd


def run_job(cfg) -> dict:
    from histories import dataset_fingerprint

    if str(ROOT) not in sys.path:  # a launcher's worker process (joblib, submitit) started elsewhere
        sys.path.insert(0, str(ROOT))
    hc = HydraConfig.get()
    j = job_keys(hc.runtime.choices["arm"], cfg.seed, cfg.budget, cfg.window, cfg.env)
    arm, seed, budget, window, name = j["arm"], j["seed"], j["budget"], j["window"], j["run"]
    cwd = Path(hc.runtime.cwd)
    out = Path(abspath(cfg.out, cwd))
    rd = out / "runs" / name
    base = {"kind": "train", "sweep": cfg.sweep.name, "arm": arm, "label": cfg.arm.label,
            "encoder": cfg.arm.encoder, "seed": seed, "budget": budget, "window": window, "env": cfg.env,
            "experiment": cfg.experiment, "run_dir": str(rd)}
    claimed = False  # the job's record is written only once its run-state check has passed
    lock = PathLock(out / "jobs" / name)  # held while the job runs: the report tells running from interrupted
    try:
        if (budget is not None and budget < 1) or (window is not None and window < 1) or seed < 0:
            raise SweepError(f"budget={budget}, window={window}, seed={seed}: budget and window must be >= 1, "
                             f"seed >= 0")
        routed, ident = claim(cfg, out)
        job = Job(cfg, out, cwd, int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None)
        holder = lock.acquire()
        if holder:
            raise SweepError(f"{name} is being run by another sweep into {out} ({holder}): wait for it to finish")
        data_path = ensure_dataset(job, routed)
        fp = dataset_fingerprint(data_path)
        outdir.check_dataset_identity(out, cfg.env, data_path, fp)
        plan = plan_train(cfg, routed, data_path, rd, out, fp)
        record(out, name, **base, status="running", error=None, overrides=routed, identity=ident,
               data_fingerprint=fp, sweep_started_unix=job.started)
        claimed = True
        if kept_run(out / "records" / name, plan, eval_overrides(cfg, routed)):
            print(f"[kept] {name}: finished earlier (its run dir is gone; records/{name} holds it)", flush=True)
            record(out, name, status="done")
            return {"run": name, "status": "done"}
        wall = train_and_evaluate(job, cfg, routed, plan, rd, name)
        record(out, name, status="done", wall_s=wall)
        runs.keep_record(out, name)  # what the report reads, kept beside the record (runs/ is not committed)
        return {"run": name, "status": "done"}
    except (UserError, OSError) as e:
        err = outdir.disk_error(e, out) if isinstance(e, OSError) else e  # other OSErrors are bugs: traceback
        outdir.failed(out, name, str(err), claimed)
        if hc.mode != RunMode.MULTIRUN:
            raise (err if isinstance(err, SweepError) else SweepError(str(err))) from None
        return {"run": name, "status": "failed", "error": str(err)}
    except KeyboardInterrupt:
        if claimed:
            outdir.failed(out, name, "interrupted (Ctrl-C): run the same command again to resume it", True,
                          status="interrupted")
        raise
    finally:
        lock.release()


def plan_train(cfg, routed: dict, data_path: Path, rd: Path, out: Path, fp: str | None) -> SimpleNamespace:
    """The stage-2 overrides, composed config and run state of this job, decided before anything is written
    (a run dir of another config, steps or dataset is refused here)."""
    seed, arm = int(cfg.seed), cfg.arm
    extra = list(arm.train)
    if cfg.window is not None:
        extra.append(f"{arm.window_key}={int(cfg.window) * int(arm.window_mult)}")
    if cfg.budget is not None:
        extra.append(f"max_steps={int(cfg.budget)}")
    encoder = out / "runs" / f"pretrain-seed{seed}" / ENCODER_FILE if arm.encoder else None
    if arm.encoder:
        if arm.encoder not in ("pretrained", "frozen"):
            raise SweepError(f"arm.encoder={arm.encoder!r}: use null, pretrained or frozen")
        extra += [f"model.pretrained_encoder_path={encoder}"] + (["model.freeze_encoder=true"]
                                                                 if arm.encoder == "frozen" else [])
    ov = routed["train"] + extra + [f"data_path={data_path}", f"seed={seed}", f"run_dir={rd}"]
    return SimpleNamespace(**vars(two_stage.stage_state("train", ov, bool(cfg.force), FIX, fp)), fp=fp,
                           data_path=data_path, encoder=encoder)


def train_and_evaluate(job: Job, cfg, routed: dict, plan: SimpleNamespace, rd: Path, name: str) -> dict:
    wall: dict = {}
    state = plan.state
    if plan.encoder is not None:
        # this seed's stage 1 as this sweep configures it (reused, or made now); a finished stage 2 is reused
        # only if it was trained from that very encoder file (its hash in the job record), not from one
        # stage 1 has replaced since
        ensure_stage1(job, routed, plan.data_path, int(cfg.seed), plan.fp)
        sha = hashlib.sha256(plan.encoder.read_bytes()).hexdigest()[:16]
        had = (read_json(job.out / "jobs" / f"{name}.json") or {}).get("encoder_sha256")
        if state == "reuse" and had is None:  # a record from before the hashes, or a lost one: file dates decide
            steps_key, what = two_stage.TRAINING["train"]  # the planned config again, not composed a second time
            rundir.run_state(plan.run_dir, plan.want, int(plan.want[steps_key]), what, False, FIX, plan.fp, plan.encoder)
        elif state == "reuse" and had != sha:
            raise SweepError(f"{rd} was trained from another {ENCODER_FILE} than {plan.encoder} holds now (stage 1 "
                             f"was redone since): {FIX}")
        elif state != "resume":
            record(job.out, name, encoder_sha256=sha)
    if state == "reuse":
        print(f"[reuse] train:{name}", flush=True)
    else:
        wall["train"] = job.run(f"train:{name}", "train", plan.overrides, name, state, rd / "done.json")
    for out_name, eov in eval_overrides(cfg, routed).items():
        if state == "reuse" and eval_reusable(rd, out_name, compose("evaluate", eov + ["run_dir=x"])):
            print(f"[reuse] {out_name}:{name}", flush=True)
            continue
        wall[out_name] = job.run(f"{out_name}:{name}", "evaluate", eov + [f"run_dir={rd}", f"out_name={out_name}"],
                                 name, "fresh", rd / f"{out_name}.json")
    return wall


def eval_overrides(cfg, routed: dict) -> dict[str, list[str]]:
    """{out_name: evaluate's overrides} of each evaluation the sweep asks for (sweep.evals): the eval's own
    settings replace the preset's (routed["evaluate"])."""
    evals = {}
    for out_name, settings in cfg.sweep.evals.items():
        ev_extra = [f"{k}={json.dumps(v)}" for k, v in OmegaConf.to_container(settings, resolve=True).items()]
        keys = {override_key(o) for o in ev_extra}
        evals[out_name] = [o for o in routed["evaluate"] if override_key(o) not in keys] + ev_extra
    return evals


def kept_run(kept: Path, plan: SimpleNamespace, evals: dict[str, list[str]]) -> bool:
    """Whether a job with no run dir (plan.state fresh) finished earlier, in another session or on another
    machine: its kept record (runs.keep_record) holds the same config, steps and dataset (rundir.run_state's
    rule) and every evaluation asked for, with the same settings. Nothing of it is redone, stage 1 included; a
    kept record of anything else is replaced when the job finishes anew."""
    if plan.state != "fresh" or not (kept / "done.json").is_file():
        return False
    steps_key, what = two_stage.TRAINING["train"]
    try:
        if rundir.run_state(kept, plan.want, int(plan.want[steps_key]), what, False, FIX, plan.fp) != "reuse":
            return False
    except UserError:
        return False
    return all(eval_reusable(kept, o, compose("evaluate", eov + ["run_dir=x"]), kept=True) for o, eov in evals.items())


def eval_reusable(run_dir: Path, out_name: str, want: dict, kept: bool = False) -> bool:
    """Whether <run_dir>/<out_name>.json evaluated this run's final model with the settings `want`; a run dir's
    eval must also be newer than its model.pt (a kept record has no model: its eval and done.json were kept
    together)."""
    ev, done = read_json(run_dir / f"{out_name}.json"), read_json(run_dir / "done.json")
    model = run_dir / "model.pt"
    if ev is None or done is None or ev.get("global_step") != done.get("global_step"):
        return False
    if not kept and (not model.is_file() or (run_dir / f"{out_name}.json").stat().st_mtime < model.stat().st_mtime):
        return False
    got, asked = flatten(ev.get("config") or {}), flatten(want)
    later = rundir.LATER_KEY_DEFAULTS  # a key added after the eval ran counts with its default
    return all(got.get(k, later.get(k, "<absent>")) == asked[k] for k in asked if k not in EVAL_IGNORED)


# ---------------------------------------------------------------------------------------------------------
# The multirun: its planned jobs and its end (a Hydra callback), the command line
# ---------------------------------------------------------------------------------------------------------
def planned_jobs(config) -> list[dict]:
    """The jobs this multirun launches (the basic sweeper's product of hydra.sweeper.params and the command
    line's overrides, the command line winning), each as {arm, seed, budget, window, env, run}."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    axes: dict = {}
    for o in OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task)):
        if o.get_key_element() in PER_RUN:
            vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes[o.get_key_element()] = [None if v in ("null", "None") else v for v in vals]
    default = {"arm": config.hydra.runtime.choices.get("arm"), "seed": config.seed, "budget": config.budget,
               "window": config.window, "env": config.env}
    return [job_keys(**{**default, **dict(zip(axes, combo))}) for combo in itertools.product(*axes.values())]


class Report(Callback):
    """Writes <out>/sweep.json (the command, the planned jobs) when a multirun starts, and the report when
    it ends. (Hydra turns a callback's exception into a warning: a sweep whose runs did not all finish, or
    whose report failed, is reported through STATUS, and _entry exits 1 with one line.)"""

    def on_multirun_start(self, config, **kwargs) -> None:
        task = [o for o in config.hydra.overrides.task if override_key(o) != "overrides"]
        planned = planned_jobs(config)
        STATUS["planned"] = {j["run"] for j in planned}  # this sweep's runs: what its end accounts for
        os.environ[outdir.SWEEP_STARTED] = repr(outdir.start(  # before the launcher starts its processes
            Path(abspath(config.out)), shlex.join(["python", "experiments/sweep.py", "-m", *task, *config.overrides]),
            planned, sweep=config.sweep.name, experiment=config.experiment,
            launcher=config.hydra.runtime.choices.get("hydra/launcher"), evals=list(config.sweep.evals)))

    def on_multirun_end(self, config, **kwargs) -> None:
        from experiments import report

        out = Path(abspath(config.out))
        bad, errors = outdir.failures(out, outdir.sweep_started(out), STATUS.get("planned", set()))
        rep_error = None
        if config.report:
            try:
                rep = report.write(out)
                print(f"\nwrote the report into {out}", flush=True)
                print(report.render(rep), flush=True)
                bad |= set(rep.get("missing") or [])
            except UserError as e:
                rep_error = f"the report failed: {e}"
        if bad or rep_error:
            STATUS["error"] = "; ".join(
                ([f"{len(bad)} run(s) did not finish ({', '.join(sorted(bad))})"] if bad else [])
                + ([f"first error: {errors[0]}"] if errors else []) + ([rep_error] if rep_error else [])
                + ["fix and rerun the same command (finished runs are reused)"])


def sweep_argv(argv: list[str]) -> list[str]:
    """The command line for Hydra: the sweep's own keys (conf/sweep.yaml, arm=, sweep=, hydra..., flags)
    stay; every other `key=value` / `stage:key=value` is a stage override and joins `overrides=[...]`
    (quoted for Hydra's grammar, which does not take `=` in a bare list element)."""
    own = set(OmegaConf.load(Path(__file__).parent / "conf" / "sweep.yaml")) | {"arm", "sweep", "hydra"}
    keep, free = [], []
    for a in argv:
        head = a.split("=", 1)[0].lstrip("+~")
        own_key = ":" not in head and head.split(".")[0].split("/")[0] in own
        (keep if a.startswith("-") or "=" not in a or own_key else free).append(a)
    if free and any(override_key(a) == "overrides" for a in keep):
        raise SweepError("give stage overrides either as key=value arguments or as overrides=[...], not both")
    if free:
        quoted = ",".join('"' + o.replace("\\", "\\\\").replace('"', '\\"') + '"' for o in free)
        keep.append(f"overrides=[{quoted}]")
    return keep


def precheck(argv: list[str]) -> None:
    """Route the stage overrides once before any job starts, so a typo fails in one line up front (every
    job routes them again); check `out` and claim the out dir's identity, before Hydra or a job writes into
    it (a concurrent sweep with other settings is then refused at its start). Skipped where the preset or
    the sweep is itself swept (several identities: each job checks its own)."""
    try:
        # the overrides: not the flags (-m, --cfg job, ...), nor their values (which have no `=`)
        parsed = OverridesParser.create().parse_overrides([a for a in argv if a.startswith("~") or "=" in a
                                                           and not a.startswith("-")])
        if any(o.is_sweep_override() and o.key_or_group == "split_seed" for o in parsed):
            raise SweepError("split_seed takes one value per multirun (each split writes its own out dir and "
                             "dataset): run the command once per split")
        if any(o.is_sweep_override() and o.key_or_group in ("experiment", "sweep") for o in parsed):
            return
        cfg = compose_config("sweep", [o.input_line for o in parsed if not o.is_sweep_override()
                                       and not o.key_or_group.startswith("hydra")],
                             config_dir=str(Path(__file__).parent / "conf"))
    except Exception as e:  # noqa: BLE001 -- bad grammar, arm/sweep name or key: one line (Hydra's own words)
        raise SweepError(" ".join(str(e).split())) from None
    if "--cfg" in argv or "-c" in argv:  # printing a config (--cfg job) runs nothing and writes nothing
        return
    claim(cfg, Path(abspath(cfg.out)))


def _entry() -> None:
    @hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
    def main(cfg):
        return run_job(cfg)

    try:
        sys.argv[1:] = sweep_argv(sys.argv[1:])
        precheck(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); the runs in progress are recorded as interrupted and keep their "
              "checkpoints: run the same command again to resume them", file=sys.stderr)
        sys.exit(130)
    status = getattr(sys.modules.get("experiments.sweep"), "STATUS", {})
    if status.get("error"):
        print(f"error: {status['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _entry()
