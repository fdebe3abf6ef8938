"""Experiment sweeps on Hydra's multirun: one job = one stage-2 run, any Hydra launcher.

    python experiments/sweep.py -m                                    # sweep=compare: 5 arms x seeds 0 1 2
    python experiments/sweep.py -m sweep=pretrain_budget              # 3 arms x budgets 200 500 1200 x 3 seeds
    python experiments/sweep.py -m sweep=memory                       # AD w / 3w vs CompressedAD w (issue 11)
    python experiments/sweep.py -m arm=scratch,pretrained_ft seed=0 train:lr=1e-4 model.d_model=32
    python experiments/sweep.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 omp_threads=1
    python experiments/sweep.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=4 hydra.launcher.timeout_min=600 accelerate=true num_processes=4 experiment=full
    python experiments/report.py results/compare-quick                # rewrite the report from the run dirs

Config: experiments/conf/sweep.yaml (the keys), conf/sweep/<name>.yaml (an experiment: the arms, seeds and
budgets it sweeps, its evaluations, its stage defaults), conf/arm/<name>.yaml (an arm: its stage-2
overrides, whether it starts from this seed's stage-1 encoder). Adding an experiment = a sweep file (+ arm
files) + a report function in experiments/report.py.

One job, whatever the launcher (basic: in this process, one after the other; joblib: local worker
processes; submitit_local / submitit_slurm: submitit jobs), does, each stage as its own process
(`python <script>.py ...`, or `accelerate launch --config_file <accelerate_config> ...` for pretrain /
train with accelerate=true), its output appended to <out>/logs/<run>.log:
0. the out dir's identity: a hash of every stage's composed config (rundir.identity: no paths or cadence
   keys) without the keys that name a run (arm, seed, budget, window, env), recorded in <out>/sweep.json by
   the first sweep into it (before Hydra starts: precheck) and checked by every job before it writes
   anything; a sweep with other settings is refused in one line naming the keys and an out= of its own.
   Likewise one dataset (fingerprint) per env and out dir;
1. the dataset: collected if missing (under a lock beside it: parallel jobs collect it once), else checked
   against the preset's collect settings (two_stage.dataset_mismatch);
2. stage 1, if the arm starts from a pretrained encoder: <out>/runs/pretrain-seed<s>, produced once under a
   lock however many jobs need it (the others wait, then reuse it; if it failed in this sweep, they fail
   at once instead of retrying it); checked even when stage 2 is reused;
3. stage 2 in <out>/runs/<run>/ (rundir.run_state, the rule two_stage.py uses too): reused if it has
   done.json with the same config identity, budget and data fingerprint, and was trained from the current
   stage-1 encoder (the file's hash in the job record; without one, no newer than the run); resumed
   (resume=true) if it has checkpoints; refused if it holds another config or was trained on other data
   (force=true redoes it);
4. evaluate.py per sweep.evals entry (<run>/<out_name>.json), reused if it matches the finished model and
   every evaluate setting (EVAL_IGNORED aside: paths, device, threads, logging).
The job's record <out>/jobs/<run>.json says what it is (arm, seed, budget, ..., identity, data fingerprint),
its status and the wall seconds of every process; it is written only once the run-state check passed (a
refusal goes to <out>/refused/<run>.json), and the job holds a lock beside it while it runs. sweep.json also
lists the planned jobs; the report (experiments/report.py) covers those and the recorded ones, and reads
each run's state from its run dir. An interrupted sweep (Ctrl-C: its running jobs are recorded as
interrupted): run the same command again.

Stage overrides: every `key=value` on the command line that is not the sweep's own (conf/sweep.yaml, arm=,
sweep=, hydra...) goes into the `overrides` list (sweep_argv) and from there to every stage whose config
has that key (as in two_stage.py): `model.d_model=32` reaches pretrain and train, `n_episodes=...` only
evaluate; prefix one with a stage to target it alone: `train:lr=1e-4`, `pretrain:pretrain_lr=5e-4`,
`collect:source.n_stream=10`. The job itself sets seed, run_dir, data_path, max_steps (when budget is set),
resume/overwrite and the encoder path.
"""

from __future__ import annotations

import datetime as _dt
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

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback

from atomic_io import PathLock, atomic_write_text
from errors import UserError
from experiments.report import read_json
from hydra_cli import flatten

# Keys a job sets per run; a free override of them would silently be overridden, so refuse it.
RESERVED = {"seed", "run_dir", "run_name", "resume", "resume_from", "overwrite", "out_name",
            "model.pretrained_encoder_path", "model.freeze_encoder", "pretrained_encoder_path", "freeze_encoder"}
# evaluate.py keys that do not change an evaluation's numbers; every other key (env.* included) must equal
# the eval json's own config for it to be reused.
EVAL_IGNORED = {"run_dir", "out_name", "progress", "tensorboard", "device", "cpu_threads"}
ENCODER_FILE = "encoder-pretrained-final.pt"
# How a sweep's refusal of a run dir ends (rundir.run_state's `fix`).
FIX = "pass force=true to redo it, or choose another out="
# The job keys that vary inside one out dir (they name the run); everything else a job's stages are given is
# the out dir's identity (out_identity). env is one too: `env=darkroom,darkroom_hard` is one memory sweep.
PER_RUN = ("arm", "seed", "budget", "window", "env")


class SweepError(UserError, CompactHydraException):
    """Bad input or a run directory that cannot be reused as asked; Hydra prints it as one line."""


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def _key(o: str) -> str:
    return o.split("=", 1)[0].split(":", 1)[-1].lstrip("+~")


def plain(cfg) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:  # evaluate + a preset: data_path: ...${data_seed} has no data_seed
        return OmegaConf.to_container(cfg, resolve=False)


def compose(stage: str, overrides: list[str]) -> dict:
    """The plain composed config of a stage's script for these (routed) overrides. Hydra's compose API
    inside a running Hydra job: the job's own global Hydra state is put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import two_stage

    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None
    try:
        return plain(two_stage.compose(stage, overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise SweepError(f"{stage} config: {' '.join(str(e).split())}") from None
    finally:
        if outer is not None and not gh.is_initialized():
            gh.initialize(outer)


def route(user: list[str], defaults: list[str], experiment: str, env: str | None,
          budget: int | None = None) -> dict[str, list[str]]:
    """two_stage.split_overrides of the preset choice, the sweep's stage defaults and the user's overrides
    (in that order: the user's win), after refusing the keys the job sets itself."""
    import two_stage

    for o in user:
        if "=" not in o:
            raise SweepError(f"override {o!r} is not key=value (stage:key=value targets one stage)")
        if _key(o) in RESERVED:
            raise SweepError(f"{o!r}: the sweep sets {_key(o)} itself (use seed=..., budget=..., out=..., "
                             f"force=true)")
        if _key(o) == "max_steps" and budget is not None:
            raise SweepError(f"{o!r}: this sweep's stage-2 budget is budget={budget}, not max_steps")
    groups = [f"experiment={experiment}"] + ([f"env={env}"] if env else [])
    try:
        return two_stage.split_overrides(groups + list(defaults) + list(user))
    except two_stage.PipelineError as e:
        raise SweepError(str(e)) from None


def run_name(arm: str, seed: int | None, budget, window, env) -> str:
    """The run's folder name under <out>/runs; seed=None: the name of its group (every seed)."""
    parts = ([env] if env else []) + ([f"w{window}"] if window else []) + ([f"b{budget}"] if budget else [])
    return "-".join(parts + [arm] + ([f"seed{seed}"] if seed is not None else []))


# ---------------------------------------------------------------------------------------------------------
# One identity per out dir: what every run of it shares
# ---------------------------------------------------------------------------------------------------------
def out_identity(sweep_name: str, experiment: str, evals, routed: dict, env: str | None) -> dict:
    """{dotted key: value}: the sweep, its evaluations and the identity (rundir.identity: no paths, cadence or
    performance keys) of every stage's composed config for these routed overrides, without the PER_RUN keys
    (no arm, budget or window is in `routed`; the env choice is taken out here; seed is the job's)."""
    import rundir

    drop = {f"env={env}"} if env else set()
    ident = {"sweep": sweep_name, "experiment": experiment,
             **flatten({"evals": evals if isinstance(evals, dict) else plain(evals)})}
    for stage, ov in routed.items():
        ov = [o for o in ov if o not in drop] + (["run_dir=x"] if stage == "evaluate" else [])
        c = compose(stage, ov)
        ident.update(flatten({stage: rundir.identity(c, ignore=("seed",))}))
        if stage == "train":  # volatile for a run (it may be extended), but a free max_steps= is no budget
            ident["train.max_steps"] = c.get("max_steps")
    return ident


def identity_hash(ident: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _identity_refusal(out: Path, old: dict, new: dict, h: str) -> str:
    keys = sorted(set(old) | set(new), key=str)
    diff = [f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in keys
            if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
    return (f"{out} holds the runs of another sweep configuration ({'; '.join(diff[:6])}{more}): pass "
            f"out={out}-{h[:8]} to run these settings in a folder of their own (or rerun with the old ones)")


def _same_but_later_keys(old: dict, new: dict) -> bool:
    """An identity recorded before a key existed (rundir.LATER_KEY_DEFAULTS: '<stage>.<group>.<key>' absent)
    equals a new one that has the key at its backward-compatible default, as for a run's own config."""
    import rundir

    filled = {**old, **{k: v for k, v in new.items() if k not in old and "." in k
                        and k.split(".", 1)[1] in rundir.LATER_KEY_DEFAULTS
                        and v == rundir.LATER_KEY_DEFAULTS[k.split(".", 1)[1]]}}
    return identity_hash(filled) == identity_hash(new)


def check_identity(out: Path, ident: dict, claim: bool) -> str:
    """The identity hash; SweepError if <out>/sweep.json records another. claim: record it when none is
    recorded yet (under a lock: concurrent sweeps into one out agree on one identity)."""
    h = identity_hash(ident)

    def check(info: dict) -> bool:
        old = info.get("identity") or {}
        if old and old.get("hash") != h and not _same_but_later_keys(old.get("config") or {}, ident):
            raise SweepError(_identity_refusal(out, old.get("config") or {}, ident, h))
        return bool(old)

    if check(read_json(out / "sweep.json") or {}) or not claim:
        return h
    with Held(out / "sweep.json"):
        info = read_json(out / "sweep.json") or {}
        if not check(info):
            _write(out / "sweep.json", json.dumps({**info, "identity": {"hash": h, "config": ident}}, indent=1))
    return h


def check_dataset_identity(out: Path, env: str | None, data_path: Path, fp: str | None) -> None:
    """An out dir's runs of one env are all trained on one dataset (its fingerprint, in sweep.json): a
    re-collected dataset or another data_path= is refused, not mixed into the table."""
    if fp is None:
        return
    key = env or "-"
    with Held(out / "sweep.json"):
        info = read_json(out / "sweep.json") or {}
        was = (info.get("datasets") or {}).get(key)
        if was and was["fingerprint"] != fp:
            raise SweepError(f"{out} holds runs trained on dataset {was['path']} (fingerprint {was['fingerprint']}) "
                             f"but {data_path} now holds fingerprint {fp} (re-collected, or another data_path=): "
                             f"choose another out= for this dataset, or restore that one")
        if not was:
            datasets = {**(info.get("datasets") or {}), key: {"fingerprint": fp, "path": str(data_path)}}
            _write(out / "sweep.json", json.dumps({**info, "datasets": datasets}, indent=1))


def _write(path: Path, text: str) -> None:
    """atomic_write_text with a disk error (full, read-only, permissions) as one SweepError line."""
    from atomic_io import os_error_reason

    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise SweepError(f"cannot write {path} ({os_error_reason(e)}): free space or fix the permissions, or "
                         f"choose another out=") from None


def check_out(out: Path) -> None:
    """out must be a folder this process can write (not a file, not on a read-only or full disk): one line
    before Hydra creates <out>/hydra/ or a job writes anything."""
    import tempfile

    from atomic_io import os_error_reason

    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise SweepError(f"out={out}: {p} is a file, not a folder: choose another out=")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SweepError(f"out={out} is not writable ({os_error_reason(e)}): choose another out= or fix its "
                         f"permissions") from None


# ---------------------------------------------------------------------------------------------------------
# Run-directory states and the child processes
# ---------------------------------------------------------------------------------------------------------
def run_state(run_dir: Path, want: dict, want_steps: int, what: str, force: bool, fingerprint: str | None = None,
              encoder: Path | None = None) -> str:
    """rundir.run_state (the rule two_stage.py uses too), its refusal as a SweepError line."""
    import rundir

    try:
        return rundir.run_state(run_dir, want, want_steps, what, force, FIX, fingerprint, encoder)
    except rundir.RunDirError as e:
        raise SweepError(str(e)) from None


def eval_reusable(run_dir: Path, out_name: str, want: dict) -> bool:
    ev, done = read_json(run_dir / f"{out_name}.json"), read_json(run_dir / "done.json")
    model = run_dir / "model.pt"
    if ev is None or done is None or not model.is_file() or ev.get("global_step") != done.get("global_step"):
        return False
    if (run_dir / f"{out_name}.json").stat().st_mtime < model.stat().st_mtime:
        return False
    got, asked = flatten(ev.get("config") or {}), flatten(want)
    return all(got.get(k, "<absent>") == asked[k] for k in asked if k not in EVAL_IGNORED)


def check_dataset(data_path: Path, want: dict, warn_only: bool) -> None:
    """An existing dataset is used only if it is the one collect.py would make now (two_stage's
    dataset_mismatch: env, source settings, seeds); a data_path=... given by hand is the user's call: a
    note only (the runs' data fingerprints still keep other data out of the out dir)."""
    import two_stage

    diff = two_stage.dataset_mismatch(read_json(data_path / "meta.json") or {}, want)
    if diff and warn_only:
        print(f"note: dataset {data_path} (given by data_path=...) differs from the collect config: "
              f"{'; '.join(diff)}; using it as given", file=sys.stderr, flush=True)
    elif diff:
        raise SweepError(f"dataset {data_path} was collected with other settings ({'; '.join(diff)}): recollect "
                         f"it (python collect.py ... overwrite=true) or pass another data_path=...")


class Held:
    """PathLock beside `path` (<parent>/.<name>.sweep.lock), waited for: parallel jobs that need the same
    dataset or stage-1 run produce it once; the others wait here and then find it finished."""

    def __init__(self, path: Path):
        self.lock = PathLock(path.parent / f"{path.name}.sweep")

    def __enter__(self):
        said = False
        while (holder := self.lock.acquire()) is not None:
            if not said:
                print(f"[wait]  {self.lock.path.name[:-6]} is being produced by {holder}", flush=True)
                said = True
            time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.lock.release()


class Job:
    """One sweep job's context: where it writes, how it launches its child processes."""

    def __init__(self, cfg, out: Path, cwd: Path, num: int | None):
        """num: the job's number in a multirun (None: a single run, `python experiments/sweep.py arm=...`)."""
        self.cfg, self.out, self.cwd, self.num = cfg, out, cwd, num or 0
        # when this sweep started (Report.on_multirun_start); a single run is a sweep of its own
        self.started = (read_json(out / "sweep.json") or {}).get("started_unix", 0.0) if num is not None \
            else time.time()
        self.launch = SimpleNamespace(accelerate=bool(cfg.accelerate), num_processes=cfg.num_processes,
                                      accelerate_config=str(cfg.accelerate_config or ROOT / "accelerate_config.yaml"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if cfg.omp_threads:
            self.env["OMP_NUM_THREADS"] = str(cfg.omp_threads)

    def command(self, stage: str, overrides: list[str]) -> list[str]:
        import two_stage

        cmd = two_stage.command(stage, overrides, self.launch)
        if "accelerate.commands.launch" in cmd:  # parallel jobs must not share accelerate's rendezvous port
            i = cmd.index("accelerate.commands.launch") + 1
            cmd[i:i] = ["--main_process_port", str(29600 + self.num % 300)]
        return cmd

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
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
            try:
                rc = p.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the child too (one process group): let it finish its interrupted-run
                # handling (train.py says where its last checkpoint is) instead of killing it mid-write.
                try:
                    p.wait(timeout=60)
                except (KeyboardInterrupt, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()
                raise
        dt = time.perf_counter() - t0
        if rc in (130, -signal.SIGINT):
            # The child took Ctrl-C (exit 130) before this process's own KeyboardInterrupt surfaced (the
            # signal reaches the whole process group; which handler runs first is a race): the same interrupt.
            raise KeyboardInterrupt
        if rc != 0 or not expect.exists():
            why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}" if rc else f"no {expect.name} written"
            raise SweepError(f"{name} failed ({why}); last lines in {log}:{_tail(log)}")
        print(f"[done]  {name} in {dt:.0f}s", flush=True)
        return dt


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in lines[-n:])


def record(out: Path, name: str, **fields) -> dict:
    """Merge `fields` into <out>/jobs/<name>.json (wall_s entries add up over attempts)."""
    path = out / "jobs" / f"{name}.json"
    rec = read_json(path) or {}
    wall = rec.get("wall_s", {})
    for k, v in fields.pop("wall_s", {}).items():
        wall[k] = round(wall.get(k, 0.0) + v, 1)
    rec.update(fields, wall_s=wall, updated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               updated_unix=time.time())
    _write(path, json.dumps(rec, indent=1, default=str))
    return rec


def note_refusal(out: Path, name: str, error: str) -> None:
    """A job refused before its run-state check passed leaves its record (and the run) as they were; the
    refusal goes to <out>/refused/<name>.json, which only the end of this multirun reads."""
    try:
        atomic_write_text(out / "refused" / f"{name}.json", json.dumps({"error": error, "unix": time.time()}))
    except OSError:
        pass  # an unwritable out: the refusal line itself is printed by the job


# ---------------------------------------------------------------------------------------------------------
# One job
# ---------------------------------------------------------------------------------------------------------
def ensure_dataset(job: Job, routed: dict) -> Path:
    ccfg = compose("collect", routed["collect"])
    data_path = Path(str(ccfg["data_path"])).expanduser()
    data_path = data_path if data_path.is_absolute() else (job.cwd / data_path).resolve()
    explicit = any(_key(o) == "data_path" for o in routed["collect"])
    if not (data_path / "meta.json").is_file():
        with Held(data_path):
            if not (data_path / "meta.json").is_file():
                job.run("collect", "collect", routed["collect"] + [f"data_path={data_path}"],
                        f"collect-{data_path.name}", "no dataset yet", data_path / "meta.json")
                return data_path
    print(f"[reuse] dataset {data_path}", flush=True)
    check_dataset(data_path, ccfg, warn_only=explicit)
    return data_path


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def data_fingerprint(data_path: Path) -> str | None:
    from histories import dataset_fingerprint

    return dataset_fingerprint(data_path)


def ensure_stage1(job: Job, routed: dict, data_path: Path, seed: int) -> Path:
    """This seed's stage-1 run, produced once (under a lock) and reused by every arm and budget."""
    rd = job.out / "runs" / f"pretrain-seed{seed}"
    ov = routed["pretrain"] + [f"data_path={data_path}", f"seed={seed}", f"run_dir={rd}"]
    want = compose("pretrain", ov)
    steps = int(want["pretrain_steps"])  # config/pretrain.yaml (stage-1 budget keys are top level)
    with Held(rd):
        # force=true redoes stage 1 once per sweep: not when another job of this sweep already redid it
        started = job.started
        redone = (rd / "done.json").is_file() and (rd / "done.json").stat().st_mtime >= started
        state = run_state(rd, want, steps, "stage-1", bool(job.cfg.force) and not redone, data_fingerprint(data_path))
        if state == "reuse":
            if not (rd / ENCODER_FILE).is_file():
                raise SweepError(f"{rd} is finished but has no {ENCODER_FILE}; pass force=true")
            print(f"[reuse] pretrain:seed{seed}", flush=True)
            return rd
        name = f"pretrain-seed{seed}"
        rec = read_json(job.out / "jobs" / f"{name}.json") or {}
        if rec.get("status") == "failed" and rec.get("updated_unix", 0.0) >= started:
            # another job of this sweep tried it and failed: do not retry it once per dependent run
            raise SweepError(f"stage 1 of seed {seed} failed earlier in this sweep: {rec.get('error')}")
        flags = {"resume": ["resume=true"], "overwrite": ["overwrite=true"]}.get(state, [])
        try:
            dt = job.run(f"pretrain:seed{seed}", "pretrain", ov + flags, name, state, rd / "done.json")
        except SweepError as e:
            record(job.out, name, kind="pretrain", seed=seed, run_dir=str(rd), status="failed", error=str(e))
            raise
        record(job.out, name, kind="pretrain", seed=seed, run_dir=str(rd), status="done", error=None,
               wall_s={"pretrain": dt})
    return rd


def run_job(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if str(ROOT) not in sys.path:  # a launcher's worker process (joblib, submitit) started elsewhere
        sys.path.insert(0, str(ROOT))
    hc = HydraConfig.get()
    arm, seed = hc.runtime.choices["arm"], int(cfg.seed)
    cwd = Path(hc.runtime.cwd)
    out = Path(str(cfg.out)).expanduser()
    out = out if out.is_absolute() else cwd / out
    budget = int(cfg.budget) if cfg.budget is not None else None
    window = int(cfg.window) if cfg.window is not None else None
    name = run_name(arm, seed, budget, window, cfg.env)
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
        check_out(out)
        job = Job(cfg, out, cwd, int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None)
        routed = route(list(cfg.overrides), list(cfg.sweep.overrides), cfg.experiment, cfg.env, budget)
        ident = check_identity(out, out_identity(cfg.sweep.name, cfg.experiment, cfg.sweep.evals, routed, cfg.env),
                               claim=True)
        holder = lock.acquire()
        if holder:
            raise SweepError(f"{name} is being run by another sweep into {out} ({holder}): wait for it to finish")
        data_path = ensure_dataset(job, routed)
        fp = data_fingerprint(data_path)
        check_dataset_identity(out, cfg.env, data_path, fp)
        plan = plan_train(cfg, routed, data_path, rd, job.out, fp)
        record(out, name, **base, status="running", error=None, overrides=routed, identity=ident,
               data_fingerprint=fp)
        claimed = True
        wall = train_and_evaluate(job, cfg, routed, plan, rd, name)
        record(out, name, status="done", wall_s=wall)
        return {"run": name, "status": "done"}
    except (SweepError, OSError) as e:
        err = e if isinstance(e, SweepError) else disk_error(e, out)  # other OSErrors are bugs: traceback
        _failed(out, name, str(err), claimed)
        if hc.mode != RunMode.MULTIRUN:
            raise err from None
        return {"run": name, "status": "failed", "error": str(err)}
    except KeyboardInterrupt:
        if claimed:
            _failed(out, name, "interrupted (Ctrl-C): run the same command again to resume it", True,
                    status="interrupted")
        raise
    finally:
        lock.release()


def disk_error(e: OSError, out: Path) -> SweepError:
    """A full, read-only or forbidden disk as one line; any other OSError is re-raised (a bug)."""
    from atomic_io import DISK_ERRNOS, os_error_reason

    if e.errno not in DISK_ERRNOS:
        raise e
    return SweepError(f"cannot write {e.filename or out} ({os_error_reason(e)}): free space or fix the permissions, "
                      f"then run the same command again (finished runs are reused)")


def _failed(out: Path, name: str, error: str, claimed: bool, status: str = "failed") -> None:
    print(f"error: [{name}] {error}", file=sys.stderr, flush=True)
    if not claimed:
        note_refusal(out, name, error)
        return
    try:
        record(out, name, status=status, error=error)
    except SweepError as e:  # the disk that failed the job may fail its record too
        print(f"error: [{name}] {e}", file=sys.stderr, flush=True)


def plan_train(cfg, routed: dict, data_path: Path, rd: Path, out: Path, fp: str | None) -> SimpleNamespace:
    """The stage-2 overrides, composed config and run state of this job, decided before anything is written
    (a run dir of another config, steps or dataset is refused here)."""
    seed, arm = int(cfg.seed), cfg.arm
    extra = list(arm.train)
    if cfg.window is not None:
        extra.append(f"{arm.window_key}={int(cfg.window) * int(arm.window_mult)}")
    if cfg.budget is not None:
        extra.append(f"max_steps={int(cfg.budget)}")
    pre_rd = out / "runs" / f"pretrain-seed{seed}"
    if arm.encoder:
        if arm.encoder not in ("pretrained", "frozen"):
            raise SweepError(f"arm.encoder={arm.encoder!r}: use null, pretrained or frozen")
        extra.append(f"model.pretrained_encoder_path={pre_rd / ENCODER_FILE}")
        if arm.encoder == "frozen":
            extra.append("model.freeze_encoder=true")
    ov = routed["train"] + extra + [f"data_path={data_path}", f"seed={seed}", f"run_dir={rd}"]
    want = compose("train", ov)
    steps = int(want["max_steps"])
    state = run_state(rd, want, steps, "stage-2", bool(cfg.force), fp)
    return SimpleNamespace(ov=ov, want=want, steps=steps, state=state, fp=fp, data_path=data_path,
                           encoder=pre_rd / ENCODER_FILE if arm.encoder else None)


def train_and_evaluate(job: Job, cfg, routed: dict, plan: SimpleNamespace, rd: Path, name: str) -> dict:
    seed = int(cfg.seed)
    wall: dict = {}
    state = plan.state
    if plan.encoder is not None:
        # this seed's stage 1 as this sweep configures it (reused, or made now); a finished stage 2 is reused
        # only if it was trained from that very encoder file (its hash in the job record), not from one
        # stage 1 has replaced since
        ensure_stage1(job, routed, plan.data_path, seed)
        sha = file_sha256(plan.encoder)
        had = (read_json(job.out / "jobs" / f"{name}.json") or {}).get("encoder_sha256")
        if state == "reuse" and had is None:  # a record from before the hashes, or a lost one: file dates decide
            run_state(rd, plan.want, plan.steps, "stage-2", False, plan.fp, plan.encoder)
        elif state == "reuse" and had != sha:
            raise SweepError(f"{rd} was trained from another {ENCODER_FILE} than {plan.encoder} holds now (stage 1 "
                             f"was redone since): {FIX}")
        elif state in ("fresh", "overwrite"):
            record(job.out, name, encoder_sha256=sha)
    if state == "reuse":
        print(f"[reuse] train:{name}", flush=True)
    else:
        flags = {"resume": ["resume=true"], "overwrite": ["overwrite=true"]}.get(state, [])
        wall["train"] = job.run(f"train:{name}", "train", plan.ov + flags, name, state, rd / "done.json")
    eval_base = routed["evaluate"]  # the preset reaches evaluate.py as experiment=<name> (its evaluate slice)
    for out_name, settings in cfg.sweep.evals.items():
        ev_extra = [f"{k}={json.dumps(v)}" for k, v in plain(settings).items()]
        keys = {_key(o) for o in ev_extra}  # the eval's own settings replace the preset's
        eov = [o for o in eval_base if _key(o) not in keys] + ev_extra
        if state == "reuse" and eval_reusable(rd, out_name, compose("evaluate", eov + ["run_dir=x"])):
            print(f"[reuse] {out_name}:{name}", flush=True)
            continue
        wall[out_name] = job.run(f"{out_name}:{name}", "evaluate", eov + [f"run_dir={rd}", f"out_name={out_name}"],
                                 name, "fresh", rd / f"{out_name}.json")
    return wall


# ---------------------------------------------------------------------------------------------------------
# The report at the end of a multirun (a Hydra callback)
# ---------------------------------------------------------------------------------------------------------


STATUS: dict = {}  # what the multirun's end left for _entry: {"error": one line} when runs did not finish


def planned_jobs(config) -> list[dict]:
    """The jobs this multirun launches (the basic sweeper's product of hydra.sweeper.params and the command
    line's overrides, the command line winning), each as {arm, seed, budget, window, env, run}."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    axes: dict = {}
    for o in parsed:
        key = o.get_key_element()
        if key in PER_RUN:
            vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes[key] = [None if v in ("null", "None") else v for v in vals]
    default = {"arm": config.hydra.runtime.choices.get("arm"), "seed": config.seed, "budget": config.budget,
               "window": config.window, "env": config.env}
    out = []
    for combo in itertools.product(*axes.values()):
        j = {**default, **dict(zip(axes, combo))}
        j = {"arm": str(j["arm"]), "seed": int(j["seed"]), "budget": None if j["budget"] is None else int(j["budget"]),
             "window": None if j["window"] is None else int(j["window"]), "env": j["env"]}
        out.append({**j, "run": run_name(j["arm"], j["seed"], j["budget"], j["window"], j["env"])})
    return out


class Report(Callback):
    """Writes <out>/sweep.json (the command, the planned jobs) when a multirun starts, and the report when
    it ends. (Hydra turns a callback's exception into a warning: a sweep whose runs did not all finish, or
    whose report failed, is reported through STATUS, and _entry exits 1 with one line.)"""

    def on_multirun_start(self, config, **kwargs) -> None:
        out = _out_dir(config)
        task = [o for o in config.hydra.overrides.task if _key(o) != "overrides"]
        argv = ["python", "experiments/sweep.py", "-m", *task, *config.overrides]  # as typed (sweep_argv)
        with Held(out / "sweep.json"):
            old = read_json(out / "sweep.json") or {}
            planned = {j["run"]: j for j in old.get("planned") or []}  # earlier sweeps into this out stay planned
            planned.update({j["run"]: j for j in planned_jobs(config)})
            cmd = shlex.join(argv)
            commands = list(old.get("commands") or ([old["command"]] if old.get("command") else []))
            commands += [] if cmd in commands else [cmd]  # every sweep that filled this out dir, oldest first
            info = {**old, "sweep": config.sweep.name, "experiment": config.experiment, "command": cmd,
                    "commands": commands,
                    "cwd": str(Path.cwd()), "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "started_unix": time.time(), "launcher": config.hydra.runtime.choices.get("hydra/launcher"),
                    "evals": list(config.sweep.evals), "planned": sorted(planned.values(), key=lambda j: j["run"])}
            _write(out / "sweep.json", json.dumps(info, indent=1))

    def on_multirun_end(self, config, **kwargs) -> None:
        from experiments import report

        out = _out_dir(config)
        started = (read_json(out / "sweep.json") or {}).get("started_unix", 0.0)
        failed = [r for r in report.load_jobs(out) if r.get("kind") == "train" and r.get("status") == "failed"
                  and r.get("updated_unix", 0.0) >= started]  # failed in this sweep
        refused = [(p.stem, r["error"]) for p in sorted((out / "refused").glob("*.json"))
                   if (r := read_json(p)) and r.get("unix", 0.0) >= started]  # refused in this sweep
        errors = [r["error"] for r in failed] + [e for _, e in refused]
        bad = {Path(r["run_dir"]).name for r in failed} | {n for n, _ in refused}
        rep_error = None
        if config.report:
            try:
                rep = report.write(out)
                print(f"\nwrote the report into {out}", flush=True)
                print(report.render(out, rep), flush=True)
                bad |= set(rep.get("missing") or [])
            except (report.ReportError, SweepError) as e:
                rep_error = f"the report failed: {e}"
        if bad or rep_error:
            STATUS["error"] = "; ".join(
                ([f"{len(bad)} run(s) did not finish ({', '.join(sorted(bad))})"] if bad else [])
                + ([f"first error: {errors[0]}"] if errors else []) + ([rep_error] if rep_error else [])
                + ["fix and rerun the same command (finished runs are reused)"])


def _out_dir(config) -> Path:
    out = Path(str(config.out)).expanduser()
    return out if out.is_absolute() else Path.cwd() / out


def sweep_argv(argv: list[str]) -> list[str]:
    """The command line for Hydra: the sweep's own keys (conf/sweep.yaml, arm=, sweep=, hydra..., flags)
    stay; every other `key=value` / `stage:key=value` is a stage override and joins `overrides=[...]`
    (quoted for Hydra's grammar, which does not take `=` in a bare list element)."""
    from omegaconf import OmegaConf

    own = set(OmegaConf.load(Path(__file__).parent / "conf" / "sweep.yaml")) | {"arm", "sweep", "hydra"}
    keep, free = [], []
    for a in argv:
        head = a.split("=", 1)[0].lstrip("+~")
        if a.startswith("-") or "=" not in a or (":" not in head and head.split(".")[0].split("/")[0] in own):
            keep.append(a)
        else:
            free.append(a)
    if free and any(a.split("=", 1)[0].lstrip("+~") == "overrides" for a in keep):
        raise SweepError("give stage overrides either as key=value arguments or as overrides=[...], not both")
    if free:
        quoted = ",".join('"' + o.replace("\\", "\\\\").replace('"', '\\"') + '"' for o in free)
        keep.append(f"overrides=[{quoted}]")
    return keep


def _entry() -> None:
    import hydra

    try:
        sys.argv[1:] = sweep_argv(sys.argv[1:])
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
    def main(cfg):
        return run_job(cfg)

    try:
        precheck(sys.argv[1:])
    except SweepError as e:
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


# Hydra's flags that take a value (`--cfg job`, `-p model`, ...): the value is no override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--info", "-i", "--experimental-rerun"}


def hydra_overrides(argv: list[str]) -> list[str]:
    """The overrides among a Hydra command line: no flags, and not the values of the flags that take one."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUE_FLAGS
        else:
            out.append(a)
    return out


def precheck(argv: list[str]) -> None:
    """Route the stage overrides once before any job starts, so a typo fails in one line up front (every
    job routes them again); check `out` and the out dir's identity. Skipped where the preset or the sweep is
    itself swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_cli import compose_config

    try:
        parsed = OverridesParser.create().parse_overrides(hydra_overrides(argv))
    except Exception as e:  # noqa: BLE001 -- Hydra reports its own grammar errors the same way afterwards
        raise SweepError(" ".join(str(e).split())) from None
    plain_ov = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    if any(o.is_sweep_override() and o.key_or_group in ("experiment", "sweep") for o in parsed):
        return  # several identities: each job checks its own (env is no part of one: out_identity)
    try:
        cfg = compose_config("sweep", plain_ov, config_dir=str(Path(__file__).parent / "conf"))
    except Exception as e:  # noqa: BLE001 -- a bad arm/sweep name or key: one line
        raise SweepError(" ".join(str(e).split())) from None
    if "--cfg" in argv or "-c" in argv:  # printing a config (--cfg job) runs nothing and writes nothing
        return
    routed = route(list(cfg.overrides), list(cfg.sweep.overrides), cfg.experiment, cfg.env, cfg.budget)
    out = Path(str(cfg.out)).expanduser().absolute()
    check_out(out)
    # a rerun with other settings is refused here, before Hydra or a job writes anything into out; a first
    # sweep claims the out dir now, so a concurrent one with other settings is refused at its start too
    check_identity(out, out_identity(cfg.sweep.name, cfg.experiment, cfg.sweep.evals, routed, cfg.env), claim=True)


if __name__ == "__main__":
    _entry()
