"""The one training loop both stages share (docs/design.md §6, §8): pretrain_encoder.py and train.py differ only
in the `Task` they hand to `fit`. `fit` holds the run-dir lock; `_train` plans the run dir (rundir.py), builds
data, model and optimizer and writes the run dir; `_loop` is the step (forward, label-weighted backward,
all-reduce, clip, step, log, checkpoint); `_finish` writes the last checkpoint and done.json. Every rank
computes the same run dir and calls `save_state` (its RNG state); only the main process writes the rest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

import rundir
from atomic_io import atomic_write_json
from errors import UserError
from optim import lr_lambda, make_optimizer
from rundir import RunDirError
from schema import COMPILE_BACKENDS, Budget, Checked, ConfigError, LoopOptions


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops instead of writing garbage."""


class LoopSettings(Budget, LoopOptions, Checked):
    """What the loop runs with: the budget and loop keys of train.yaml / pretrain.yaml (their types, ranges and
    docs: schema.Budget, schema.LoopOptions), checked on construction."""

    namespace: str = "train"  # not a config key: TensorBoard tag prefix, train/... or pretrain/...

    def __init__(self, *args, **kw):  # max_steps, batch_size, lr may be positional
        super().__init__(**dict(zip(Budget.model_fields, args)), **kw)

    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode (or debug backend, see COMPILE_BACKENDS)."""
        return None if self.compile is False else "default" if self.compile is True else self.compile

    def compile_kwargs(self) -> dict:
        mode = self.compile_mode()
        return {"backend": mode} if mode in COMPILE_BACKENDS else {"mode": mode}

    @property
    def micro_batch(self) -> int:
        """Rows of one global micro-batch: all processes together, one accumulation step."""
        return self.batch_size // self.grad_accum

    def validate(self) -> LoopSettings:
        """Relations between keys (each key's own range is checked on construction), one line (ConfigError)."""
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.resume and self.resume_from:
            raise ConfigError("pass either resume=true (latest checkpoint of run_dir) or resume_from=<dir>, "
                              "not both")
        if self.overwrite and (self.resume or self.resume_from):
            raise ConfigError("overwrite=true discards run_dir, resume continues it: pass only one of them")
        return self


class Task(Protocol):
    """What a training script supplies (train.py / pretrain_encoder.py). No hook may draw from the global RNGs
    (use a private generator), or resumed runs would diverge."""

    model: nn.Module

    def setup(self, accelerator, global_micro_batch: int) -> None:
        """Once, before `batches` and before anything is written: keep the accelerator, build (and validate)
        the held-out / diagnostic data the hooks use, as this rank's slices of `global_micro_batch` rows."""

    def batches(self, start: int, rank: int, world: int, global_micro_batch: int) -> Iterable[dict]:
        """Infinite iterable over this rank's slices of global micro-batches start, start+1, ... (each
        `global_micro_batch` = batch_size / grad_accum rows over all ranks, whatever the number of ranks).
        Builds (and validates) the training data: called before anything is written."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor | int]:
        """(loss = MEAN over the batch's labels, {metric: scalar tensor}, n_labels = the count that mean is
        over). The loop weights micro-batches by n_labels: the gradient is the mean over all labels of the
        global batch. A device tensor n_labels keeps the step free of host syncs."""

    def on_step(self, run: Run, step: int) -> None:
        """Periodic extras after optimizer step `step` (held-out loss, eval, encoder checkpoints)."""

    def on_end(self, run: Run, step: int) -> dict:
        """Final extras; returns metrics merged into the run summary."""


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; call before building a model so its init depends on the seed only."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class _LoopState:
    """Step counter saved with Accelerate's state (its own iteration counter is not restored on load), and the
    training wall seconds of steps 1..step summed over every process that trained them (a resumed run's cost
    is the whole run's, not its last process's; None after resuming from a checkpoint that predates it)."""

    step, wall_s, t0 = 0, 0.0, None  # t0: perf_counter when this process started training

    def run_wall_s(self, now: float) -> float | None:
        """Wall seconds of steps 1..step up to `now` (a perf_counter reading)."""
        return None if self.wall_s is None else self.wall_s + (now - self.t0 if self.t0 is not None else 0.0)

    def state_dict(self):
        return {"step": self.step, "wall_s": self.run_wall_s(time.perf_counter())}

    def load_state_dict(self, sd):
        self.step, self.wall_s = int(sd["step"]), sd.get("wall_s")


@dataclass
class Run:
    """What task hooks see."""

    accelerator: Any
    run_dir: Path
    writer: Any  # a SummaryWriter on the main process, None on the others
    settings: LoopSettings
    config: dict
    model: Any = None  # the prepared (possibly DDP-wrapped) model; loop.unwrap() gives the module

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)


def make_accelerator(s: LoopSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if s.mixed_precision == "fp16" and (s.cpu or not torch.cuda.is_available()):  # Accelerate would quietly
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU but this run is on the CPU (it would run in "
                          "float32): use mixed_precision=no, or bf16 (CPU autocast)")  # run float32
    # Depth-0 batches leave the encoder out of the graph; DDP must tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the scheduler num_processes
    # times per optimizer step (it assumes a per-process batch); ours is a schedule over global steps.
    return Accelerator(mixed_precision=s.mixed_precision, cpu=s.cpu, kwargs_handlers=[ddp],
                       step_scheduler_with_optimizer=False)


def fit(task: Task, s: LoopSettings, run_dir: Path, config: dict, accelerator=None) -> dict:
    """Train task.model for s.max_steps optimizer steps; returns a summary dict (same on every rank). Holds the
    run-dir lock until return; shuts an accelerator it made down, error or not. Ctrl-C and a full / read-only
    disk propagate: the CLI layer turns them into one line (hydra_cli.run)."""
    s.validate()
    acc, lock = accelerator or make_accelerator(s), None
    try:
        if s.batch_size % (acc.num_processes * s.grad_accum):
            raise ConfigError(f"batch_size={s.batch_size} must be divisible by processes x grad_accum = "
                              f"{acc.num_processes} x {s.grad_accum}: change batch_size or --num_processes")
        if s.warmup_steps > s.max_steps and acc.is_main_process:
            steps_key = "pretrain_steps" if s.namespace == "pretrain" else "max_steps"
            print(f"warning: warmup_steps={s.warmup_steps} > {steps_key}={s.max_steps}: the learning rate is still "
                  f"warming up when training ends and never reaches lr={s.lr:g}; lower warmup_steps", flush=True)
        run_dir = Path(run_dir).resolve()
        lock = rundir.lock_run_dir(acc, run_dir)
        return _train(task, s, run_dir, config, acc)
    finally:
        if lock is not None:
            lock.release()
        if accelerator is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            acc.end_training()  # destroy the process group (else a warning at exit)


def _train(task: Task, s: LoopSettings, run_dir: Path, config: dict, acc) -> dict:
    """Plan the run dir, build data, model and optimizer (from the checkpoint), write the run dir; `_loop`."""
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    plan = rundir.plan_run_dir(run_dir, config, s)
    # Build the data before anything is written: a bad size fails with the disk untouched. The DataLoader
    # iterator draws its base seed from the global torch RNG; fork it so a resumed process (which creates
    # the iterator after restoring the RNG) continues the exact random stream.
    task.setup(acc, s.micro_batch)
    with torch.random.fork_rng(devices=[]):
        batches = iter(task.batches(plan.start_step * s.grad_accum, acc.process_index, acc.num_processes,
                                    s.micro_batch))
    set_seed(s.seed, device_specific=True)  # dropout streams: seed + rank (rank 0 = a 1-process run)
    model = task.model.to(acc.device)  # (prepare would move it too) so make_optimizer sees the device
    opt = make_optimizer(model, s)
    if s.compile_mode():
        # In place (nn.Module.compile): parameter names, state_dict and checkpoints stay those of the eager
        # module, and DDP wraps it as usual. The model picks its static (mask) path while compiling.
        model.compile(**s.compile_kwargs())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s))
    model, opt, sched = acc.prepare(model, opt, sched)  # the scheduler must be prepared to be saved
    state = _LoopState()
    acc.register_for_checkpointing(state)
    if plan.resume_ckpt is not None:
        rundir.load_checkpoint(acc, plan.resume_ckpt)
        if state.step != plan.start_step:
            raise RunDirError(f"{plan.resume_ckpt}: loop_state.json says step {plan.start_step} but the "
                              f"saved state says {state.step}; resume from another checkpoint")
        acc.print(f"Resumed from {plan.resume_ckpt} at step {state.step}")
    # Only now, with the config, the data and the checkpoint all known to be usable, touch the run dir.
    acc.wait_for_everyone()  # every rank has read the run dir before the main process changes it
    if acc.is_main_process:
        rundir.apply_run_dir(plan, config)
    acc.wait_for_everyone()
    # Events at steps <= the checkpoint's step were flushed before it was written; purge_step hides whatever
    # a killed process logged after it, so the curves continue without duplicates.
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1) if acc.is_main_process else None
    run, start, t0 = Run(acc, run_dir, writer, s, config, model), state.step, time.perf_counter()
    state.t0 = t0
    pbar = tqdm(total=s.max_steps, initial=start, desc=s.namespace, dynamic_ncols=True, mininterval=1.0,
                disable=not (s.progress and acc.is_main_process))
    labels = _loop(task, run, opt, sched, batches, state, pbar)
    # What the run paid (the reports' compute columns): labels and wall time of the steps this process
    # trained, and the wall time of all the run's steps (run_train_wall_s: resumes included), before the final
    # extras (held-out scoring) and the last checkpoint.
    now = time.perf_counter()
    run_wall = state.run_wall_s(now)
    compute = {"steps_trained": state.step - start, "labels_trained": labels, "train_wall_s": round(now - t0, 3),
               "run_train_wall_s": None if run_wall is None else round(run_wall, 3)}
    pbar.close()
    return _finish(task, run, state.step, start, compute)


def _loop(task: Task, run: Run, opt, sched, batches, state: _LoopState, pbar) -> int:
    """The optimizer steps; returns the labels trained over all ranks. A NaN/inf loss (any rank) or gradient
    norm is recorded on the device (no host sync per step), its update skipped (GradScaler), and raised at the
    next log / checkpoint / end, before anything is written."""
    acc, s, model = run.accelerator, run.settings, run.model
    dev, world = acc.device, acc.num_processes
    rows, zero = s.micro_batch // world, torch.zeros((), device=dev)  # this rank's rows of each micro-batch
    inner = getattr(opt, "optimizer", opt)  # the torch optimizer inside Accelerate's wrapper
    # fp16: Accelerate's scaler. Otherwise scale 1, never grown: only its skip of an update with NaN/inf grads.
    scaler = acc.scaler or torch.amp.GradScaler(dev.type, init_scale=1.0, growth_interval=2**31 - 1)
    sums, labels, total, t_log = {}, zero, zero, time.perf_counter()  # this rank's log window
    bad = torch.zeros(3, dtype=torch.float64, device=dev)  # first non-finite: (step, is grad norm, value)
    model.train()
    while state.step < s.max_steps:
        step, n_step, loss_bad = state.step + 1, zero, zero
        for i in range(s.grad_accum):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
            with acc.no_sync(model) if (i < s.grad_accum - 1 and world > 1) else contextlib.nullcontext():
                with acc.autocast():
                    loss, metrics, n = task.loss(model, batch)
                n = torch.as_tensor(n, device=dev).float()
                # Backward the label SUM (x 1/rows keeps magnitudes ~ a mean); divided by the global count below.
                scaler.scale(loss * (n / rows)).backward()
            lv = loss.detach().float()
            loss_bad = torch.where(torch.isfinite(lv), loss_bad, lv)
            for k, v in {"loss": lv, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=dev).detach().float() * n
            n_step = n_step + n
        n_all, n_bad = n_step, (loss_bad != 0).float()
        if world > 1:  # one small all-reduce: the global label count and how many ranks saw a NaN/inf loss
            n_all, n_bad = acc.reduce(torch.stack([n_all, n_bad]), "sum")
        scaler.unscale_(inner)
        for p in model.parameters():  # DDP averaged the ranks' gradients (1/world): x world*rows/N gives
            if p.grad is not None:  # the gradient of the mean over all N labels of the global batch
                p.grad.mul_(world * rows / n_all.clamp(min=1.0))
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip or float("inf")).float()
        now = torch.stack([torch.full((), float(step), device=dev), (n_bad == 0).float(),
                           torch.where(n_bad > 0, torch.where(loss_bad != 0, loss_bad, torch.nan), gnorm)])
        bad = torch.where((bad[0] == 0) & ((n_bad > 0) | ~torch.isfinite(gnorm)), now.double(), bad)
        scaler.step(inner)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        labels, total, state.step = labels + n_step, total + n_step, step
        pbar.update(1)
        if step % s.log_every == 0 or step == s.max_steps:
            _check_finite(bad, s)
            _log(run, sums, labels, time.perf_counter() - t_log, sched.get_last_lr()[0], gnorm, step, pbar)
            sums, labels, t_log = {}, zero, time.perf_counter()
        task.on_step(run, step)
        rundir.kill_point(step, "step")
        if step % s.checkpoint_every == 0 and step < s.max_steps:
            _check_finite(bad, s)
            if run.writer is not None:
                run.writer.flush()  # events up to this step must survive a kill that the checkpoint survives
            rundir.save_checkpoint(acc, run.run_dir, step, s.keep_last, run.config)
    _check_finite(bad, s)
    return int((acc.reduce(total.double(), "sum") if world > 1 else total).item())


def _log(run: Run, sums: dict, labels, dt: float, lr: float, gnorm: torch.Tensor, step: int, pbar) -> None:
    """Write `<ns>/<metric>` (label-weighted over the window and all ranks), lr, labels/s and the last step's
    grad_norm. Collective: every rank calls it (one all-reduce, one host read)."""
    ns, keys = run.settings.namespace, sorted(sums)
    vec = torch.stack([sums[k].double() for k in keys] + [labels.double()])
    if run.accelerator.num_processes > 1:
        vec = run.accelerator.reduce(vec, "sum")
    vals = vec.tolist()
    scalars = {f"{ns}/{k}": vals[i] / max(vals[-1], 1.0) for i, k in enumerate(keys)}
    scalars.update({f"{ns}/lr": lr, f"{ns}/labels_per_s": vals[-1] / dt, f"{ns}/grad_norm": gnorm.item()})
    run.log(scalars, step)
    pbar.set_postfix(loss=f"{scalars[f'{ns}/loss']:.4f}")


def _check_finite(bad: torch.Tensor, s: LoopSettings) -> None:
    """Raise if `_loop` recorded a non-finite loss or gradient norm (a host read: at log/checkpoint/end)."""
    step, is_grad, value = bad.tolist()
    if step:
        # Only suggest continuing a checkpoint when there is one (a NaN at step 1 has nothing to resume).
        again = (" or continue the last checkpoint in a new run_dir (resume_from=<this run_dir>)"
                 if step > s.checkpoint_every else "")
        raise NonFiniteLossError(
            f"{s.namespace} {'gradient norm' if is_grad else 'loss'} is {value} at step {int(step)}; stopped, "
            f"earlier checkpoints are intact: lower lr (now {s.lr:g}), keep grad_clip > 0 (now {s.grad_clip:g}) "
            f"or check the data, then start over (overwrite=true){again}")


def _finish(task: Task, run: Run, step: int, start_step: int, compute: dict) -> dict:
    """The final checkpoint (unless a resumed run had nothing left to do), the task's final extras, done.json
    (main process, written last: its presence means the run is complete)."""
    acc, s, run_dir, writer = run.accelerator, run.settings, run.run_dir, run.writer
    if writer is not None:
        writer.flush()
    if not (step == start_step and any(st == step for st, _ in rundir.checkpoints(run_dir))):
        rundir.save_checkpoint(acc, run_dir, step, s.keep_last, run.config)
    summary = {"global_step": step, "run_dir": str(run_dir), "world_size": acc.num_processes,
               "batch_size": s.batch_size, "grad_accum": s.grad_accum, "resumed_from_step": start_step,
               "compute": {**compute, "labels_per_step": (compute["labels_trained"] / compute["steps_trained"]
                                                          if compute["steps_trained"] else None)}}
    summary.update(task.on_end(run, step) or {})
    if acc.is_main_process:
        atomic_write_json(run_dir / "done.json", summary, default=float)
        writer.close()  # flushes
    acc.wait_for_everyone()
    return summary


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
    kw = {k: cfg[k] for k in LoopSettings.model_fields if k in cfg}
    return LoopSettings(**{**kw, **override, "namespace": namespace})
