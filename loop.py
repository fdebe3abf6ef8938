"""The one training loop both stages share: Accelerator set-up, run directory, TensorBoard logging,
checkpoint/resume. pretrain_encoder.py and train.py differ only in the `Task` they hand to `fit`
(model, data, loss, periodic extras).

Multi-process rules (DESIGN §8):
- every rank computes the same run directory (it comes from the config, never from a clock);
- only the main process writes logs, configs, final weights and encoder checkpoints;
- every rank calls `save_state` (each writes its own RNG state);
- the data for global (micro-)batch k is a pure function of (seed, k), and each rank takes its slice of
  it, so N processes see exactly the batches one process would, and resuming needs only the step;
- each micro-batch's loss is weighted by its share of the step's labels (summed over ranks and
  accumulation micro-batches), so N processes x grad_accum give the gradient of one big batch.

Resume (DESIGN §6): `resume=true` continues from the newest complete checkpoint of run_dir,
`resume_from=<run dir | checkpoints/step-N>` from a given one. A checkpoint is Accelerate's `save_state`
(model, optimizer, scheduler, GradScaler, per-rank RNG states) plus our step counter; the data position
is the step. A run SIGKILLed at any moment and resumed ends with the same weights, bit for bit on CPU
(tests/test_resume.py), because nothing between a checkpoint and the next step draws from the global
RNGs differently in a resumed process (the DataLoader's seed draw is isolated; in-context evaluation
uses its own torch.Generator) and TensorBoard drops the killed run's events past the checkpoint.

Atomicity: checkpoints are written into checkpoints/.tmp-step-N, fsync'd, then renamed to step-N;
readers only ever see step-N folders. Pruning (keep_last) runs after the rename, so the newest
complete checkpoint is never deleted before its successor exists. config.json / done.json go through
atomic_write_text (temp file + os.replace).
"""

from __future__ import annotations

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

from atomic_io import atomic_write_text, fsync_dir
from model.config import ConfigError


class RunDirError(RuntimeError):
    """The output run directory cannot be used as asked (holds another run, or nothing to resume), or a
    checkpoint cannot be resumed from."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops instead of writing garbage."""


# Keys that may change between a run and its resumption without making it "a different run".
# (Logging/eval cadence and performance knobs; not the data, model, optimisation or seed.)
_VOLATILE_KEYS = {"resume", "resume_from", "overwrite", "max_steps", "num_workers", "cpu_threads", "progress",
                  "log_every", "eval_every", "eval", "heldout_every", "diag_every",
                  "diag_batches", "checkpoint_every", "keep_last"}
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

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def validate(self) -> LoopSettings:
        """Coerce types and reject impossible values with one actionable line (ConfigError)."""
        def coerce(name, typ, ok, rule):
            v = getattr(self, name)
            try:
                if typ is bool and not isinstance(v, bool):
                    raise TypeError
                cv = typ(v)
                if typ is int and cv != v:
                    raise TypeError
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={v!r} must be {'true/false' if typ is bool else typ.__name__}") from None
            if not ok(cv):
                raise ConfigError(f"{name}={v!r} {rule}")
            setattr(self, name, cv)

        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_last"):
            coerce(name, int, lambda v: v >= 1, "must be >= 1")
        coerce("warmup_steps", int, lambda v: v >= 0, "must be >= 0")
        coerce("seed", int, lambda v: v >= 0, "must be >= 0")
        coerce("lr", float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
        coerce("weight_decay", float, lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0")
        coerce("min_lr_ratio", float, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        coerce("grad_clip", float, lambda v: v >= 0, "must be >= 0 (0 disables clipping)")
        for name in ("cpu", "resume", "overwrite", "progress"):
            coerce(name, bool, lambda v: True, "")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16")
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
    skip = _VOLATILE_KEYS | set(ignore)
    return {k: v for k, v in cfg.items() if k not in skip}


def _differing_keys(a: dict, b: dict) -> list[str]:
    """Dotted paths where two configs differ (volatile top-level keys ignored)."""
    out = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if not prefix and k in _VOLATILE_KEYS:
                    continue
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]} ({x!r} -> {y!r})")

    walk(a, b, "")
    return out


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, dir), oldest first. Half-written ones live under .tmp-* names."""
    d = Path(run_dir) / "checkpoints"
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = CHECKPOINT_RE.fullmatch(p.name)
            if m and p.is_dir() and (p / "loop_state.json").is_file():
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


def apply_run_dir(plan: RunPlan, cfg: dict) -> None:
    """Main process only: carry out the plan, then write config.json."""
    d = plan.run_dir
    if plan.wipe:
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if plan.restart:  # partial outputs of the same run; nothing to continue from
        for name in ("tb", "checkpoints", "done.json", "model.pt"):
            p = d / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    ck_root = d / "checkpoints"
    if ck_root.is_dir():  # leftovers of a save that was killed: never complete, never read
        for p in ck_root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
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
    biases, norms and embeddings-like vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (everything frozen?): unfreeze something")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


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


def fit(task: Task, s: LoopSettings, run_dir: Path, config: dict, accelerator=None) -> dict:
    """Train task.model for s.max_steps optimizer steps; returns a summary dict (same on every rank)."""
    from torch.utils.tensorboard import SummaryWriter

    s.validate()
    acc = accelerator or make_accelerator(s)
    world, rank = acc.num_processes, acc.process_index
    if s.batch_size % (world * s.grad_accum):
        raise ConfigError(f"batch_size={s.batch_size} must be divisible by processes x grad_accum = "
                          f"{world} x {s.grad_accum}: change batch_size or --num_processes")
    run_dir = Path(run_dir).resolve()
    plan = plan_run_dir(run_dir, config, s)
    task.accelerator = acc
    # Build the data pipeline before anything is written: a bad size fails with the disk untouched. The
    # DataLoader iterator draws its base seed from the global torch RNG; fork it so a resumed process
    # (which creates the iterator after restoring the RNG) continues the exact random stream.
    with torch.random.fork_rng(devices=[]):
        batches = iter(task.batches(plan.start_step * s.grad_accum, rank, world, s.micro_batch // world))

    from accelerate.utils import set_seed

    set_seed(s.seed, device_specific=True)  # dropout streams: seed + rank (rank 0 = a 1-process run)
    model = task.model
    opt = make_optimizer(model, s)
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
    sums: dict[str, torch.Tensor] = {}
    w_sum, t0 = 0.0, time.perf_counter()
    pbar = None
    if s.progress and acc.is_main_process:
        from tqdm import tqdm

        pbar = tqdm(total=s.max_steps, initial=state.step, desc=ns, dynamic_ncols=True, mininterval=1.0)
    max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")  # inf: norm computed, grads untouched
    model.train()
    while state.step < s.max_steps:
        rows = s.micro_batch // world  # rows per rank and micro-batch (a constant, same on every rank)
        n_here = 0.0  # labels in this rank's micro-batches of this step
        bad = torch.zeros((), device=acc.device)  # a non-finite loss value seen in this step (0 = none)
        for i in range(s.grad_accum):
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in next(batches).items()}
            sync = i == s.grad_accum - 1
            ctx = acc.no_sync(model) if (not sync and world > 1) else _null()
            with ctx:
                with acc.autocast():
                    loss, metrics = task.loss(model, batch)
                n_i = float(task.n_labels(batch))  # after loss(): a task may count labels in the forward
                lv = loss.detach().float()
                bad = torch.where(torch.isfinite(lv), bad, lv)
                # Backward the label SUM (scaled by 1/rows to keep magnitudes ~ a mean); the gradient is
                # divided by the step's global label count below, once all ranks' counts are known.
                acc.backward(loss * (n_i / rows))
            for k, v in {"loss": lv, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=acc.device).detach().float() * n_i
            n_here += n_i
            w_sum += n_i
        # One small all-reduce per step: the global label count and whether any rank saw a NaN/inf loss
        # (checked before the optimizer step, on every rank together: one rank's NaN stops them all).
        red = torch.stack([torch.tensor(n_here, device=acc.device), (bad != 0).float()])
        if world > 1:
            red = acc.reduce(red, "sum")
        n_total, nbad = red.tolist()
        if nbad:
            raise NonFiniteLossError(_nonfinite_msg(ns, "loss", bad.item() if bad != 0 else float("nan"),
                                                    state.step + 1, s))
        # DDP averaged the rank gradients (1/world); x world*rows/N turns the summed, 1/rows-scaled label
        # losses into the gradient of the mean over all N labels of the global batch: N processes x
        # grad_accum micro-batches give exactly one big batch's gradient.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, world * rows / max(n_total, 1.0))
        gnorm = float(acc.clip_grad_norm_(model.parameters(), max_norm))
        if not math.isfinite(gnorm):  # identical on every rank (computed from the all-reduced gradients)
            raise NonFiniteLossError(_nonfinite_msg(ns, "gradient norm", gnorm, state.step + 1, s))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        if pbar:
            pbar.update(1)

        if state.step % s.log_every == 0 or state.step == s.max_steps:
            keys = sorted(sums)
            vec = torch.stack([sums[k].double() for k in keys]
                              + [torch.tensor(w_sum, dtype=torch.float64, device=acc.device)])
            if world > 1:
                vec = acc.reduce(vec, "sum")
            dt = time.perf_counter() - t0
            scalars = {f"{ns}/{k}": (vec[i] / vec[-1].clamp(min=1)).item() for i, k in enumerate(keys)}
            scalars[f"{ns}/lr"] = sched.get_last_lr()[0]
            scalars[f"{ns}/labels_per_s"] = vec[-1].item() / dt
            scalars[f"{ns}/grad_norm"] = gnorm
            run.log(scalars, state.step)
            if pbar:
                pbar.set_postfix(loss=f"{scalars[f'{ns}/loss']:.4f}")
            sums, w_sum, t0 = {}, 0.0, time.perf_counter()

        task.on_step(run, state.step)
        _kill_point(state.step, "step")
        if state.step % s.checkpoint_every == 0 and state.step < s.max_steps:
            if writer is not None:
                writer.flush()  # events up to this step must survive a kill that the checkpoint survives
            save_checkpoint(acc, run_dir, state.step, s.keep_last, config)

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
    return (f"{ns} {what} is {value} at step {step}; stopped, earlier checkpoints are intact: lower lr "
            f"(now {s.lr:g}), keep grad_clip > 0 (now {s.grad_clip:g}) or check the data, then start over "
            f"(overwrite=true) or continue the last checkpoint in a new run_dir (resume_from=<this run_dir>)")


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
    acc.save_state(str(tmp))
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
            shutil.rmtree(p, ignore_errors=True)
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
