"""The one training loop both stages share: Accelerator set-up, run directory, TensorBoard logging,
checkpoint/resume. pretrain_encoder.py and train.py differ only in the `Task` they hand to `fit`
(model, data, loss, periodic extras).

Multi-process rules (docs/design.md §8):
- every rank computes the same run directory (it comes from the config, never from a clock);
- only the main process writes logs, configs, final weights and encoder checkpoints;
- every rank calls `save_state` (each writes its own RNG state);
- the data for global (micro-)batch k is a pure function of (seed, k), and each rank takes its slice of
  it, so N processes see exactly the batches one process would, and resuming needs only the step;
- each micro-batch's loss is weighted by its share of the step's labels (summed over ranks and
  accumulation micro-batches), so N processes x grad_accum give the gradient of one big batch.

Resume (docs/design.md §6): `resume=true` continues from the newest complete checkpoint of run_dir,
`resume_from=<run dir | checkpoints/step-N>` from a given one. A checkpoint is Accelerate's `save_state`
(model, optimizer, scheduler, GradScaler, per-rank RNG states) plus our step counter; the data position
is the step. A run SIGKILLed at any moment and resumed ends with the same weights, bit for bit on CPU
(tests/test_resume.py), because nothing between a checkpoint and the next step draws from the global
RNGs differently in a resumed process (the DataLoader's seed draw is isolated; in-context evaluation
uses its own torch.Generator) and TensorBoard drops the killed run's events past the checkpoint.

Atomicity: checkpoints are written into checkpoints/.tmp-step-N, fsync'd, then renamed to step-N;
readers only ever see step-N folders. Pruning (keep_last) runs after the rename, so the newest
complete checkpoint is never deleted before its successor exists; a pruned checkpoint is first renamed
to .old-step-N, so an interrupted prune never leaves a half-deleted step-N. config.json / done.json go
through atomic_write_text (temp file + os.replace). Leftovers of a killed process (.tmp-/.old- folders,
.<file>.*.tmp files, incomplete step-N folders) are removed, and reported, by the next start.

Run identity: a run is its config minus the volatile keys (cadence, performance knobs) and minus paths
(run_dir, data_path, the encoder path: a moved or differently spelled folder is the same run). What the
data path points at is checked by content instead: `data_fingerprint` (histories.fingerprint) is recorded
in config.json, and resuming on data with another fingerprint is refused unless allow_data_change=true.

One process per run directory: the main process holds an exclusive lock (atomic_io.PathLock) on run_dir
for the whole of fit; a second launch on the same run_dir fails at once with a line naming the holder's
pid. The other ranks of the same launch rely on the main process's lock.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from atomic_io import PathLock, atomic_write_text, fsync_dir, os_error_reason
from config_check import Rule, check_value, flag, integer, number, one_of, text
from model.config import ConfigError


class RunDirError(RuntimeError):
    """The output run directory cannot be used as asked (holds another run, or nothing to resume), or a
    checkpoint cannot be resumed from."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops instead of writing garbage."""


class Interrupted(RunDirError):
    """Ctrl-C (KeyboardInterrupt) during fit; the message says where the last checkpoint is."""

    exit_code = 130  # the shell's convention for SIGINT


# Keys that may change between a run and its resumption without making it "a different run".
# (Logging/eval cadence and performance knobs; not the data, model, optimisation or seed.) Dotted keys
# name nested ones.
_VOLATILE_KEYS = {"resume", "resume_from", "overwrite", "max_steps", "num_workers", "cpu_threads", "progress",
                  "log_every", "eval_every", "eval", "heldout_every", "diag_every",
                  "diag_batches", "checkpoint_every", "keep_last", "allow_data_change", "save_every",
                  "data_on_device"}  # data_on_device: identical batches either way
# Paths say where things are, not what the run is: a run dir moved or spelled differently (./runs/x, an
# absolute path) is the same run. Different data behind the same or another data_path is caught by
# data_fingerprint instead; on resume the encoder weights come from the checkpoint, not from its path.
_PATH_KEYS = {"run_dir", "run_name", "data_path", "model.pretrained_encoder_path"}
FINGERPRINT_KEY = "data_fingerprint"  # histories.fingerprint of the training data, set by the scripts
_NOT_IDENTITY = _VOLATILE_KEYS | _PATH_KEYS | {FINGERPRINT_KEY}

# torch.compile modes the `compile` key accepts ("reduce-overhead" adds CUDA graphs on CUDA), and the
# debug backend that traces the same graphs but runs them without code generation (seconds, not minutes,
# to compile on a CPU: what the tests use).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("aot_eager",)

# The config keys LoopSettings reads (top level of train.yaml / pretrain.yaml), plus the other keys every
# training script shares. Scripts merge this into their config_check table.
LOOP_RULES = {
    "max_steps": integer(1, note="optimizer steps"),
    "batch_size": integer(1, note="global batch per optimizer step"),
    "grad_accum": integer(1),
    "lr": number(0, lo_open=True),
    "weight_decay": number(0),
    "warmup_steps": integer(0),
    "min_lr_ratio": number(0, 1),
    "grad_clip": number(0, note="0 disables clipping"),
    "log_every": integer(1),
    "checkpoint_every": integer(1),
    "keep_last": integer(1),
    "mixed_precision": one_of("no", "fp16", "bf16", note="fp16 needs a CUDA GPU"),
    "cpu": flag(),
    "seed": integer(0),
    "resume": flag(),
    "resume_from": text(null=True, note="a run dir or one of its checkpoints/step-N folders"),
    "overwrite": flag(),
    "progress": flag(),
    "cpu_threads": integer(1, 1024, null=True, note="torch CPU threads; null = torch's default"),
    "num_workers": integer(0, 256, note="DataLoader worker processes; 0 = sample in the main process"),
    "compile": one_of(False, True, *COMPILE_MODES, *COMPILE_BACKENDS, note="torch.compile the model; "
                      "reduce-overhead adds CUDA graphs"),
    "data_on_device": Rule("bool", null=True, note="histories on the accelerator; null = on for CUDA when "
                                                   "they fit"),
    "allow_data_change": flag(note="true: resume / load an encoder even though the data's fingerprint differs"),
    "data_seed": integer(0),
    "data_path": text(),
    "run_name": text(),
    "run_dir": text(),
}
CHECKPOINT_RE = re.compile(r"step-(\d+)")
# Test-only fault injection (tests/test_resume.py): CAD_TEST_KILL_AT=<step>[:<where>] makes the process
# SIGKILL itself at that point, exactly like an OOM killer or a pre-empted node would.
KILL_ENV = "CAD_TEST_KILL_AT"


@dataclass
class LoopSettings:
    max_steps: int
    batch_size: int  # global batch per optimizer step, all processes and accumulation micro-steps together
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping (the gradient norm is still computed, logged and checked)
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_last: int = 2
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    resume: bool = False
    resume_from: str | None = None
    overwrite: bool = False
    namespace: str = "train"  # TensorBoard tag prefix: train/... or pretrain/...
    progress: bool = True
    compile: bool | str = False  # torch.compile the model: false | true (= "default") | a torch.compile mode

    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode (or debug backend, see COMPILE_BACKENDS)."""
        if self.compile is False or self.compile is None:
            return None
        return "default" if self.compile is True else str(self.compile)

    def compile_kwargs(self) -> dict:
        mode = self.compile_mode()
        return {"backend": mode} if mode in COMPILE_BACKENDS else {"mode": mode}

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def validate(self) -> LoopSettings:
        """Reject impossible values with one line naming the key and its allowed values (ConfigError), per
        LOOP_RULES; the scripts check the same table on their config first (with their own key names)."""
        for name in self.__dataclass_fields__:
            if name in LOOP_RULES:
                check_value(name, getattr(self, name), LOOP_RULES[name])
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            setattr(self, name, float(getattr(self, name)))
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.resume and self.resume_from:
            raise ConfigError("pass either resume=true (latest checkpoint of run_dir) or resume_from=<dir>, "
                              "not both")
        if self.overwrite and (self.resume or self.resume_from):
            raise ConfigError("overwrite=true discards run_dir, resume continues it: pass only one of them")
        return self


class Task(Protocol):
    """What a training script supplies. See train.py / pretrain_encoder.py."""

    model: nn.Module

    def batches(self, start: int, rank: int, world: int, micro_batch: int) -> Iterable[dict]:
        """Infinite iterable over this rank's slices of global micro-batches start, start+1, ...
        Build (and validate) everything here: fit calls it before it writes anything to disk."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss = MEAN over the batch's labels, {metric name: scalar tensor})."""

    def n_labels(self, batch: dict) -> int:
        """The count the loss is a mean over (valid labels / reconstructed transitions); called right after
        loss() on the same batch. The loop weights micro-batches by it, so the gradient is the mean over
        all labels of the global batch whatever the number of processes and grad_accum; also labels/s."""

    def on_step(self, run: Run, step: int) -> None:
        """Periodic extras after optimizer step `step` (held-out loss, eval, encoder checkpoints). Must not
        draw from the global RNGs (use a private generator), or resumed runs would diverge."""

    def on_end(self, run: Run, step: int) -> dict:
        """Final extras; returns metrics merged into the run summary."""


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; call before building a model so its init depends on the seed only."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


def _identity(cfg: dict, ignore: Iterable[str] = ()) -> dict:
    """The config minus volatile keys, paths and the data fingerprint (dotted names reach nested keys)."""
    skip = _NOT_IDENTITY | set(ignore)

    def strip(d: dict, prefix: str) -> dict:
        return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in d.items() if f"{prefix}{k}" not in skip}

    return strip(cfg, "")


def _differing_keys(a: dict, b: dict) -> list[str]:
    """Dotted paths where two configs differ (keys that are not part of a run's identity ignored)."""
    out = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if f"{prefix}{k}" in _NOT_IDENTITY:
                    continue
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]} ({x!r} -> {y!r})")

    walk(a, b, "")
    return out


def _is_complete(ck: Path) -> bool:
    """A checkpoint folder holds our step counter, the optimizer and the model weights. loop_state.json
    alone is what an interrupted prune or copy can leave; it must not count."""
    return ((ck / "loop_state.json").is_file() and any(ck.glob("optimizer*.bin"))
            and (any(ck.glob("model*.safetensors")) or any(ck.glob("pytorch_model*.bin"))))


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, dir), oldest first. Half-written ones live under .tmp-* names."""
    d = Path(run_dir) / "checkpoints"
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = CHECKPOINT_RE.fullmatch(p.name)
            if m and p.is_dir() and _is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return data
    except (OSError, ValueError, TypeError) as e:
        raise RunDirError(f"{path} ({what}) is unreadable ({type(e).__name__}): {fix}") from None


def checkpoint_step(ck: Path) -> int:
    st = _read_json(ck / "loop_state.json", "checkpoint state", "resume from another checkpoint "
                    "(resume_from=<run_dir>/checkpoints/step-N) or start over with overwrite=true")
    try:
        return int(st["step"])
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{ck}/loop_state.json has no integer 'step': resume from another checkpoint") from None


@dataclass
class RunPlan:
    """What fit will do with the run directory, decided identically on every rank before any write."""

    run_dir: Path
    resume_ckpt: Path | None = None  # checkpoint to load
    start_step: int = 0
    wipe: bool = False  # overwrite=true on an existing run: delete its contents first
    restart: bool = False  # same run, killed before its first checkpoint: clear its partial outputs
    notes: list[str] = field(default_factory=list)


def _resolve_resume_from(arg: str) -> Path:
    ck = Path(arg).expanduser().resolve()
    if not (ck / "loop_state.json").is_file() and checkpoints(ck):
        ck = checkpoints(ck)[-1][1]  # a run directory was given: take its latest checkpoint
    if not (ck / "loop_state.json").is_file():
        raise RunDirError(f"resume_from={arg} is not a checkpoint (no {ck}/loop_state.json): pass a run "
                          f"directory that has checkpoints/step-* folders, or one of those folders")
    return ck


def plan_run_dir(run_dir: Path, cfg: dict, s: LoopSettings) -> RunPlan:
    """Decide whether to start fresh, start over or resume; refuse to clobber anything that is not this run.
    Pure (reads only), so every rank reaches the same decision before the main process writes."""
    run_dir = Path(run_dir)
    plan = RunPlan(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} exists and is not a folder: choose another run_dir=...")
    saved = None
    if (run_dir / "config.json").is_file():
        saved = _read_json(run_dir / "config.json", "the run's config",
                           "remove that run directory by hand or choose another run_dir=...")
    elif run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise RunDirError(f"run_dir {run_dir} is not empty and holds no run (no config.json); refusing to "
                          f"write into it: choose a new or empty run_dir=...")
    if s.overwrite:
        plan.wipe = saved is not None
        return plan

    def same_run_or_raise():
        if saved is not None and _identity(saved) != _identity(cfg):
            diff = _differing_keys(saved, cfg)
            raise RunDirError(
                f"run_dir {run_dir} already holds a different run (config differs in: {'; '.join(diff)}); "
                f"choose another run_dir=..., or pass overwrite=true to replace it")

    if s.resume_from:
        same_run_or_raise()
        plan.resume_ckpt = _resolve_resume_from(s.resume_from)
        plan.start_step = checkpoint_step(plan.resume_ckpt)
        ck_cfg = _read_json(plan.resume_ckpt / "loop_state.json", "checkpoint state", "resume from another "
                            "checkpoint").get("config")
        check_same_data(ck_cfg if isinstance(ck_cfg, dict) else saved, cfg, f"checkpoint {plan.resume_ckpt}")
        return plan
    existing = checkpoints(run_dir)
    if saved is not None:
        same_run_or_raise()
        if s.resume:
            if not existing:
                raise RunDirError(f"resume=true but {run_dir} has no complete checkpoint yet (it was stopped "
                                  f"before checkpoint_every={s.checkpoint_every} steps): run it without resume")
            plan.resume_ckpt = existing[-1][1]
            plan.start_step = checkpoint_step(plan.resume_ckpt)
            check_same_data(saved, cfg, f"run_dir {run_dir}")
            return plan
        if existing or (run_dir / "done.json").exists():
            where = f"checkpoint step {existing[-1][0]}" if existing else "finished"
            raise RunDirError(f"run_dir {run_dir} already holds this run ({where}); pass resume=true to "
                              f"continue it, or overwrite=true to start over")
        plan.restart = True
        return plan
    if s.resume:
        raise RunDirError(f"resume=true but there is no run in {run_dir}: start it without resume, or fix "
                          f"run_dir=... (or pass resume_from=<checkpoint>)")
    return plan


def check_same_data(saved: dict | None, cfg: dict, where: str) -> None:
    """Refuse to continue training on data other than the data `saved` (a run's config) was trained on,
    unless cfg says allow_data_change=true. Configs from before fingerprints existed are not checked."""
    was = (saved or {}).get(FINGERPRINT_KEY)
    now = cfg.get(FINGERPRINT_KEY)
    if was and now and was != now and not cfg.get("allow_data_change"):
        raise RunDirError(
            f"{where} was trained on other data: it records data fingerprint {was} but data_path="
            f"{cfg.get('data_path')} holds data with fingerprint {now} (re-collected with other settings?): "
            f"point data_path at the data it was trained on, or pass allow_data_change=true to continue on "
            f"the new data")


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def leftovers(run_dir: Path) -> list[Path]:
    """What killed processes leave in a run dir: atomic_write temp files (.<name>.*.tmp), checkpoint
    saves or prunes that were cut short (checkpoints/.tmp-*, .old-*) and step-N folders that are not
    complete checkpoints. None of them is ever read."""
    d = Path(run_dir)
    out = sorted(p for p in d.glob(".*.tmp") if p.is_file()) if d.is_dir() else []
    ck_root = d / "checkpoints"
    if ck_root.is_dir():
        out += sorted(p for p in ck_root.iterdir() if p.name.startswith((".tmp-", ".old-"))
                      or (CHECKPOINT_RE.fullmatch(p.name) and p.is_dir() and not _is_complete(p)))
    return out


def apply_run_dir(plan: RunPlan, cfg: dict) -> None:
    """Main process only: carry out the plan (saying what it removes), then write config.json."""
    d = plan.run_dir
    if plan.wipe:
        for p in d.iterdir():
            _remove(p)
    if plan.restart:  # partial outputs of the same run; nothing to continue from
        for name in ("tb", "checkpoints", "done.json", "model.pt"):
            _remove(d / name)
    d.mkdir(parents=True, exist_ok=True)
    junk = leftovers(d)
    for p in junk:
        _remove(p)
    if junk:
        print(f"note: removed {len(junk)} leftover(s) of an interrupted run in {d}: "
              f"{', '.join(str(p.relative_to(d)) for p in junk)}", flush=True)
    atomic_write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True))


class _LoopState:
    """Step counter saved with Accelerate's state (its own iteration counter is not restored on load)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])


class Run:
    """What task hooks see: the accelerator, the run dir, and main-process-only logging."""

    def __init__(self, accelerator, run_dir: Path, writer, settings: LoopSettings, config: dict, model=None):
        self.accelerator = accelerator
        self.model = model  # the prepared (possibly DDP-wrapped) model; loop.unwrap() gives the module
        self.run_dir = run_dir
        self.writer = writer
        self.settings = settings
        self.config = config

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def print(self, *a, **kw) -> None:
        self.accelerator.print(*a, **kw)


def _lr_lambda(s: LoopSettings):
    def f(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        span = max(1, s.max_steps - s.warmup_steps)
        prog = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def make_optimizer(model: nn.Module, s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (frozen ones are not in the optimizer); no decay on
    biases, norms and embeddings-like vectors. With the parameters on CUDA, the fused kernel: one launch
    for all parameters instead of a few per tensor, and it can skip a step on a device-side flag (fit's
    non-finite guard)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (everything frozen?): unfreeze something")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95), **fused)


def make_accelerator(s: LoopSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Depth-0 batches leave the encoder out of the graph; DDP must tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the scheduler num_processes
    # times per optimizer step (it assumes a per-process batch); ours is a schedule over global steps.
    return Accelerator(mixed_precision=s.mixed_precision, cpu=s.cpu, kwargs_handlers=[ddp],
                       step_scheduler_with_optimizer=False)


def _kill_point(step: int, where: str) -> None:
    """Fault injection for the kill/resume tests (CAD_TEST_KILL_AT=<step>[:step|save]); no-op otherwise."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        at, _, w = spec.partition(":")
        if int(at) == step and (w or "step") == where:
            os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(acc, ck: Path) -> None:
    """accelerate load_state with one-line errors. Accelerate silently skips a missing RNG file, so say it."""
    rng = ck / f"random_states_{acc.process_index}.pkl"
    if not rng.is_file():
        print(f"warning: {ck} has no RNG state for process {acc.process_index} (saved with fewer processes?); "
              f"continuing, but the run will not be bit-identical to an uninterrupted one", flush=True)
    try:
        acc.load_state(str(ck))
    except Exception as e:  # noqa: BLE001 -- size mismatch, torn file, foreign folder: name it instead of a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunDirError(f"cannot resume from {ck}: {type(e).__name__}: {first[:300]} -- the checkpoint "
                          f"is damaged or from another model config; resume_from=<an older "
                          f"checkpoints/step-N>, or start over with overwrite=true") from None


def shutdown(acc) -> None:
    """End of an accelerate-launched run: destroy the process group (no "destroy_process_group() was not
    called" warning at exit). A no-op in a single process without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        acc.end_training()


def fit(task: Task, s: LoopSettings, run_dir: Path, config: dict, accelerator=None) -> dict:
    """Train task.model for s.max_steps optimizer steps; returns a summary dict (same on every rank).

    Around the training itself (_fit): settings checks, the run-dir lock (held until return), and the
    translation of Ctrl-C and of a full / read-only disk into one-line errors. An accelerator made
    here is shut down (process group destroyed) on the way out, error or not; a caller's is left to the caller."""
    s.validate()
    # Checked before the accelerator exists (its state is process-wide and cannot be re-made): on a CPU,
    # Accelerate would quietly run float32 while config.json says fp16.
    device = getattr(accelerator, "device", None)
    on_cpu = device.type == "cpu" if device is not None else (s.cpu or not torch.cuda.is_available())
    if s.mixed_precision == "fp16" and on_cpu and (accelerator is None or device is not None):
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU but this run is on the CPU (it would run in "
                          "float32): use mixed_precision=no, or bf16 (CPU autocast)")
    acc = accelerator or make_accelerator(s)
    try:
        return _fit_in_run_dir(task, s, run_dir, config, acc)
    finally:
        if accelerator is None:
            shutdown(acc)


def _fit_in_run_dir(task: Task, s: LoopSettings, run_dir: Path, config: dict, acc) -> dict:
    """fit after the accelerator exists: batch-size check, run-dir lock, one-line errors around _fit."""
    world = acc.num_processes
    if s.batch_size % (world * s.grad_accum):
        raise ConfigError(f"batch_size={s.batch_size} must be divisible by processes x grad_accum = "
                          f"{world} x {s.grad_accum}: change batch_size or --num_processes")
    steps_key = "pretrain_steps" if s.namespace == "pretrain" else "max_steps"
    if s.warmup_steps > s.max_steps and acc.is_main_process:
        print(f"warning: warmup_steps={s.warmup_steps} > {steps_key}={s.max_steps}: the learning rate is still "
              f"warming up when training ends and never reaches lr={s.lr:g}; lower warmup_steps", flush=True)
    run_dir = Path(run_dir).resolve()
    lock = _lock_run_dir(acc, run_dir)
    try:
        return _fit(task, s, run_dir, config, acc)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_msg(run_dir, s)) from None
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        what = f"{e.filename}" if e.filename else f"a file in {run_dir}"
        raise RunDirError(f"cannot access {what} ({os_error_reason(e)}); nothing complete was lost (the "
                          f"checkpoints in {run_dir / 'checkpoints'} are intact): free space or fix the "
                          f"permissions, then continue with resume=true, or choose another run_dir=...") from None
    finally:
        if lock is not None:
            lock.release()


# Write failures that are the machine's state, not a bug: reported in one line.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _lock_run_dir(acc, run_dir: Path) -> PathLock | None:
    """The main process locks run_dir; every rank learns whether that worked (and fails together)."""
    lock, err = None, None
    if acc.is_main_process:
        lock = PathLock(run_dir)
        try:
            holder = lock.acquire()
        except OSError as e:
            holder, err = None, (f"cannot create the lock file {lock.file} ({os_error_reason(e)}): make "
                                 f"{run_dir.parent} writable or choose another run_dir=...")
        if holder:
            err = (f"run_dir {run_dir} is in use by another training ({holder}, lock file {lock.file}): wait "
                   f"for it to finish or stop it, or choose another run_dir=...")
        if err:
            lock = None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        err = broadcast_object_list([err])[0]
    if err:
        raise RunDirError(err)
    return lock


def _interrupted_msg(run_dir: Path, s: LoopSettings) -> str:
    done = checkpoints(run_dir)
    if done:
        step, ck = done[-1]
        return (f"interrupted; the last checkpoint is {ck} (step {step}): continue with the same command plus "
                f"resume=true")
    return (f"interrupted before the first checkpoint (checkpoint_every={s.checkpoint_every}), nothing to "
            f"resume: run the same command again to start over")


def _fit(task: Task, s: LoopSettings, run_dir: Path, config: dict, acc) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    world, rank = acc.num_processes, acc.process_index
    plan = plan_run_dir(run_dir, config, s)
    task.accelerator = acc
    # Build the data pipeline before anything is written: a bad size fails with the disk untouched. The
    # DataLoader iterator draws its base seed from the global torch RNG; fork it so a resumed process
    # (which creates the iterator after restoring the RNG) continues the exact random stream.
    with torch.random.fork_rng(devices=[]):
        batches = iter(task.batches(plan.start_step * s.grad_accum, rank, world, s.micro_batch // world))

    from accelerate.utils import set_seed

    set_seed(s.seed, device_specific=True)  # dropout streams: seed + rank (rank 0 = a 1-process run)
    model = task.model.to(acc.device)  # (prepare would move it too) so make_optimizer sees the device
    opt = make_optimizer(model, s)
    if s.compile_mode():
        # In place (nn.Module.compile): parameter names, state_dict and checkpoints stay those of the eager
        # module, and DDP wraps it as usual. The model picks its static (mask) path while compiling.
        model.compile(**s.compile_kwargs())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s))
    model, opt, sched = acc.prepare(model, opt, sched)  # the scheduler must be prepared to be saved
    state = _LoopState()
    acc.register_for_checkpointing(state)
    if plan.resume_ckpt is not None:
        load_checkpoint(acc, plan.resume_ckpt)
        if state.step != plan.start_step:
            raise RunDirError(f"{plan.resume_ckpt}: loop_state.json says step {plan.start_step} but the "
                              f"saved state says {state.step}; resume from another checkpoint")
        acc.print(f"Resumed from {plan.resume_ckpt} at step {state.step}")
    start_step = state.step
    # Only now, with the config, the data and the checkpoint all known to be usable, touch the run dir.
    acc.wait_for_everyone()  # every rank has read the run dir before the main process changes it
    if acc.is_main_process:
        apply_run_dir(plan, config)
    acc.wait_for_everyone()

    writer = None
    if acc.is_main_process:
        # Events at steps <= the checkpoint's step were flushed before it was written; purge_step hides
        # whatever a killed process logged after it, so the curves continue without duplicates.
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1)
    run = Run(acc, run_dir, writer, s, config, model)

    ns = s.namespace
    dev = acc.device
    sums: dict[str, torch.Tensor] = {}
    w_sum, t0 = torch.zeros((), device=dev), time.perf_counter()
    pbar = None
    if s.progress and acc.is_main_process:
        from tqdm import tqdm

        pbar = tqdm(total=s.max_steps, initial=state.step, desc=ns, dynamic_ncols=True, mininterval=1.0)
    max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")  # inf: norm computed, grads untouched
    # Non-finite guard. A NaN/inf loss (any rank) or gradient norm must never reach a checkpoint or the
    # final weights, and the error must name the step and the quantity. With the fused optimizer (CUDA)
    # the step stays free of host syncs: the optimizer skips the update on a device-side flag (found_inf,
    # as for AMP grad scaling), the first bad step is recorded on the device, and the record is read at
    # the next log / checkpoint / end, before anything is written. Elsewhere a host read costs nothing
    # (CPU) or is needed anyway, and the step stops at once.
    inner_opt = getattr(opt, "optimizer", opt)
    deferred = bool(inner_opt.defaults.get("fused")) and acc.scaler is None  # fused: CUDA (make_optimizer)
    nf_step = torch.zeros((), dtype=torch.int64, device=dev)  # first non-finite step (0 = none yet)
    nf_grad = torch.zeros((), dtype=torch.bool, device=dev)  # ... was it the gradient norm (else the loss)
    nf_value = torch.zeros((), device=dev)  # ... and its value

    def check_finite() -> None:
        if deferred and nf_step.item():
            what = "gradient norm" if nf_grad.item() else "loss"
            raise NonFiniteLossError(_nonfinite_msg(ns, what, nf_value.item(), int(nf_step.item()), s))

    model.train()
    while state.step < s.max_steps:
        rows = s.micro_batch // world  # rows per rank and micro-batch (a constant, same on every rank)
        n_here = torch.zeros((), device=dev)  # labels in this rank's micro-batches of this step
        bad = torch.zeros((), device=dev)  # a non-finite loss value seen in this step (0 = none)
        for i in range(s.grad_accum):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
            sync = i == s.grad_accum - 1
            ctx = acc.no_sync(model) if (not sync and world > 1) else _null()
            with ctx:
                with acc.autocast():
                    loss, metrics = task.loss(model, batch)
                # After loss(): a task may count labels in the forward. A device tensor keeps the step
                # free of host syncs; a Python number works too.
                n_i = torch.as_tensor(task.n_labels(batch), device=dev).float()
                lv = loss.detach().float()
                bad = torch.where(torch.isfinite(lv), bad, lv)
                # Backward the label SUM (scaled by 1/rows to keep magnitudes ~ a mean); the gradient is
                # divided by the step's global label count below, once all ranks' counts are known.
                acc.backward(loss * (n_i / rows))
            for k, v in {"loss": lv, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=dev).detach().float() * n_i
            n_here = n_here + n_i
        w_sum = w_sum + n_here
        # One small all-reduce per step: the global label count and whether any rank saw a NaN/inf loss
        # (acted on by every rank together: one rank's NaN stops them all).
        red = torch.stack([n_here, (bad != 0).float()])
        if world > 1:
            red = acc.reduce(red, "sum")
        n_total, nbad = red[0], red[1]
        if not deferred and nbad.item():
            raise NonFiniteLossError(_nonfinite_msg(ns, "loss", bad.item() if bad != 0 else float("nan"),
                                                    state.step + 1, s))
        # DDP averaged the rank gradients (1/world); x world*rows/N turns the summed, 1/rows-scaled label
        # losses into the gradient of the mean over all N labels of the global batch: N processes x
        # grad_accum micro-batches give exactly one big batch's gradient.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (world * rows) / n_total.clamp(min=1.0))
        gnorm = acc.clip_grad_norm_(model.parameters(), max_norm)  # a device tensor; read at log time
        gnorm = torch.as_tensor(gnorm, device=dev).float()
        if deferred:
            # Identical on every rank (all-reduced counts and gradients). found_inf=1 -> fused AdamW skips.
            skip = (nbad > 0) | ~torch.isfinite(gnorm)
            first = skip & (nf_step == 0)
            nf_grad = torch.where(first, nbad == 0, nf_grad)
            # The loss value as this rank saw it (nan if another rank's loss was the bad one, as before).
            loss_value = torch.where(bad != 0, bad, torch.full_like(bad, float("nan")))
            nf_value = torch.where(first, torch.where(nbad > 0, loss_value, gnorm), nf_value)
            nf_step = torch.where(first, state.step + 1, nf_step)
            inner_opt.found_inf = skip.float()
        elif not math.isfinite(gnorm.item()):  # identical on every rank (from the all-reduced gradients)
            raise NonFiniteLossError(_nonfinite_msg(ns, "gradient norm", gnorm.item(), state.step + 1, s))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        if pbar:
            pbar.update(1)

        if state.step % s.log_every == 0 or state.step == s.max_steps:
            check_finite()
            keys = sorted(sums)
            vec = torch.stack([sums[k].double() for k in keys] + [w_sum.double()])
            if world > 1:
                vec = acc.reduce(vec, "sum")
            vals = vec.tolist()  # the one host sync of a log step
            dt = time.perf_counter() - t0
            scalars = {f"{ns}/{k}": vals[i] / max(vals[-1], 1.0) for i, k in enumerate(keys)}
            scalars[f"{ns}/lr"] = sched.get_last_lr()[0]
            scalars[f"{ns}/labels_per_s"] = vals[-1] / dt
            scalars[f"{ns}/grad_norm"] = gnorm.item()
            run.log(scalars, state.step)
            if pbar:
                pbar.set_postfix(loss=f"{scalars[f'{ns}/loss']:.4f}")
            sums, w_sum, t0 = {}, torch.zeros((), device=dev), time.perf_counter()

        task.on_step(run, state.step)
        _kill_point(state.step, "step")
        if state.step % s.checkpoint_every == 0 and state.step < s.max_steps:
            check_finite()
            if writer is not None:
                writer.flush()  # events up to this step must survive a kill that the checkpoint survives
            save_checkpoint(acc, run_dir, state.step, s.keep_last, config)

    check_finite()
    if pbar:
        pbar.close()
    if writer is not None:
        writer.flush()
    if not (state.step == start_step and any(st == state.step for st, _ in checkpoints(run_dir))):
        save_checkpoint(acc, run_dir, state.step, s.keep_last, config)
    summary = {"global_step": state.step, "run_dir": str(run_dir), "world_size": world,
               "batch_size": s.batch_size, "grad_accum": s.grad_accum, "resumed_from_step": start_step}
    summary.update(task.on_end(run, state.step) or {})
    if acc.is_main_process:
        atomic_write_text(run_dir / "done.json", json.dumps(summary, indent=2, default=float))
        writer.flush()
        writer.close()
    acc.wait_for_everyone()
    return summary


def _nonfinite_msg(ns: str, what: str, value: float, step: int, s: LoopSettings) -> str:
    # Only suggest continuing a checkpoint when there is one (a NaN at step 1 has nothing to resume).
    again = (" or continue the last checkpoint in a new run_dir (resume_from=<this run_dir>)"
             if step > s.checkpoint_every else "")
    return (f"{ns} {what} is {value} at step {step}; stopped, earlier checkpoints are intact: lower lr "
            f"(now {s.lr:g}), keep grad_clip > 0 (now {s.grad_clip:g}) or check the data, then start over "
            f"(overwrite=true){again}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def save_checkpoint(acc, run_dir: Path, step: int, keep_last: int, config: dict | None = None) -> Path:
    """save_state on every rank into checkpoints/.tmp-step-N; the main process fsyncs it and renames it to
    step-N, then prunes: checkpoints newer than N (an abandoned timeline after resume_from an older one)
    and all but the keep_last newest. The newest complete checkpoint is never deleted before its
    successor exists. Assumes a filesystem shared by all ranks (multi-node: a shared run_dir)."""
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{step:08d}"
    tmp = ck_root / f".tmp-step-{step:08d}"
    old = ck_root / f".old-step-{step:08d}"
    if acc.is_main_process:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        ck_root.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except OSError as e:  # disk full / read-only: drop the partial save, keep every complete checkpoint
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"cannot write checkpoint {final} ({os_error_reason(e)}); the earlier checkpoints "
                          f"are intact: free space or fix the permissions, then continue with resume=true") from None
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "loop_state.json").write_text(json.dumps(
            {"step": step, "world_size": acc.num_processes, "config": config}, indent=1, default=str))
        _fsync_tree(tmp)
        _kill_point(step, "save")
        if final.exists():  # same step saved again (resume_from an older checkpoint): swap, then delete
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(ck_root)
        shutil.rmtree(old, ignore_errors=True)
        complete = checkpoints(run_dir)
        newer = [p for st, p in complete if st > step]
        kept = [p for st, p in complete if st <= step]
        for p in newer + kept[:-max(1, keep_last)]:
            gone = p.with_name(f".old-{p.name}")  # one rename: a kill mid-delete leaves no half step-N
            if gone.exists():
                shutil.rmtree(gone, ignore_errors=True)
            os.rename(p, gone)
            shutil.rmtree(gone, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def reduce_means(acc, sums: dict, counts: dict) -> dict:
    """{key: sum over ranks of sums[key] / sum over ranks of counts[key]} for metrics that some ranks may
    lack (e.g. per-depth metrics of a depth absent from one rank's batch). Collective: every rank calls it
    (a per-rank key set would otherwise give the all-reduce mismatched sizes)."""
    keys = set(sums)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        keys = keys.union(*gather_object([sorted(keys)]))
    keys = sorted(keys)
    vec = torch.tensor([[float(sums.get(k, 0.0)), float(counts.get(k, 0))] for k in keys] or [[0.0, 0.0]],
                       dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        vec = acc.reduce(vec, "sum")
    return {k: (vec[i, 0] / vec[i, 1]).item() for i, k in enumerate(keys) if vec[i, 1] > 0}


def unwrap(acc, model: nn.Module) -> nn.Module:
    return acc.unwrap_model(model) if acc is not None else model


def settings_from_cfg(cfg, namespace: str, **override: Any) -> LoopSettings:
    """LoopSettings from the common top-level keys of train.yaml / pretrain.yaml."""
    names = LoopSettings.__dataclass_fields__
    kw = {k: cfg[k] for k in names if k in cfg}
    kw.update(override)
    kw["namespace"] = namespace
    return LoopSettings(**kw)
