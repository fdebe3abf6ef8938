"""The one training loop both stages share: Accelerator set-up, TensorBoard logging, the optimizer step.
pretrain_encoder.py and train.py differ only in the `Task` they hand to `fit` (model, data, loss,
periodic extras). What the run directory holds, when a run starts, resumes or is refused, the lock and
the resume checkpoints live in rundir.py (docs/design.md §6).

`_fit` reads top to bottom: plan the run dir, build the data, model, optimizer and scheduler, load the
checkpoint, write the run dir; then per step `_train_step` (forward, label-weighted backward, all-reduce,
clip, optimizer step) and, every log_every steps, `_LogWindow.log`; checkpoints every checkpoint_every
steps; at the end the last checkpoint, the task's final extras and done.json.

Multi-process rules (docs/design.md §8):
- every rank computes the same run directory (it comes from the config, never from a clock);
- only the main process writes logs, configs, final weights and encoder checkpoints;
- every rank calls `save_state` (each writes its own RNG state);
- the data for global (micro-)batch k is a pure function of (seed, k), and each rank takes its slice of
  it, so N processes see exactly the batches one process would, and resuming needs only the step;
- each micro-batch's loss is weighted by its share of the step's labels (summed over ranks and
  accumulation micro-batches), so N processes x grad_accum give the gradient of one big batch.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from atomic_io import DISK_ERRNOS, atomic_write_text, os_error_reason
from config_check import Rule, check_value, flag, integer, number, one_of, text
from errors import UserError
from model.config import ConfigError
from rundir import (
    RunDirError,
    apply_run_dir,
    checkpoints,
    kill_point,
    load_checkpoint,
    lock_run_dir,
    plan_run_dir,
    save_checkpoint,
)


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops instead of writing garbage."""


class Interrupted(RunDirError):
    """Ctrl-C (KeyboardInterrupt) during fit; the message says where the last checkpoint is."""

    exit_code = 130  # the shell's convention for SIGINT


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
    "adam_beta1": number(0, 1, hi_open=True, note="AdamW beta1"),
    "adam_beta2": number(0, 1, hi_open=True, note="AdamW beta2"),
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


@dataclass
class LoopSettings:
    max_steps: int
    batch_size: int  # global batch per optimizer step, all processes and accumulation micro-steps together
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
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
        """Rows of one global micro-batch: all processes together, one accumulation step."""
        return self.batch_size // self.grad_accum

    def validate(self) -> LoopSettings:
        """Reject impossible values with one line naming the key and its allowed values (ConfigError), per
        LOOP_RULES; the scripts check the same table on their config first (with their own key names)."""
        for name in self.__dataclass_fields__:
            if name in LOOP_RULES:
                check_value(name, getattr(self, name), LOOP_RULES[name])
        for name in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "min_lr_ratio", "grad_clip"):
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

    def setup(self, accelerator, global_micro_batch: int) -> None:
        """Called once by fit, before `batches` and before anything is written to disk: keep the accelerator
        and build (and validate) the held-out / diagnostic data the hooks use, as this rank's slices of
        batches of `global_micro_batch` rows. Must not draw from the global RNGs."""

    def batches(self, start: int, rank: int, world: int, global_micro_batch: int) -> Iterable[dict]:
        """Infinite iterable over this rank's slices of global micro-batches start, start+1, ...; a global
        micro-batch has `global_micro_batch` rows over all ranks (batch_size / grad_accum), and the data is
        a function of it, not of the number of ranks. Build (and validate) the training data here: fit
        calls it before it writes anything to disk."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor | int]:
        """(scalar loss = MEAN over the batch's labels, {metric name: scalar tensor}, n_labels = the count
        that mean is over: valid action labels / reconstructed transitions). The loop weights micro-batches
        by n_labels, so the gradient is the mean over all labels of the global batch whatever the number
        of processes and grad_accum; also labels/s. A device tensor keeps the step free of host syncs."""

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


def decayed_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to: the weight matrices of nn.Linear layers, the maps
    from one representation to another (as in nanoGPT / minGPT). Not biases and norms, and not tables of
    learned vectors — nn.Embedding weights, and the bare nn.Parameter tables and vectors (position tables
    pos / seg_pos / latent_pos / prefix_pos, the encoder's latent queries, `begin`): each row is a value the
    model reads as it is, so decay would pull positions and queries toward zero rather than regularise a map."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {name for name, p in model.named_parameters() if id(p) in linear}


def make_optimizer(model: nn.Module, s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (frozen ones are not in the optimizer); weight decay on the
    `decayed_parameters` only. With the parameters on CUDA, the fused kernel: one launch for all
    parameters instead of a few per tensor, and it can skip a step on a device-side flag (fit's
    non-finite guard)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (everything frozen?): unfreeze something")
    params = [p for _, p in named]
    decayed = decayed_parameters(model)
    decay = [p for n, p in named if n in decayed]
    no_decay = [p for n, p in named if n not in decayed]
    fused = {"fused": True} if all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                             betas=(s.adam_beta1, s.adam_beta2), **fused)


def make_accelerator(s: LoopSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Depth-0 batches leave the encoder out of the graph; DDP must tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the scheduler num_processes
    # times per optimizer step (it assumes a per-process batch); ours is a schedule over global steps.
    return Accelerator(mixed_precision=s.mixed_precision, cpu=s.cpu, kwargs_handlers=[ddp],
                       step_scheduler_with_optimizer=False)


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
    lock = lock_run_dir(acc, run_dir)
    previous = _catch_ctrl_c()
    try:
        return _fit(task, s, run_dir, config, acc)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_msg(run_dir, s)) from None
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        what = f"{e.filename}" if e.filename else f"a file in {run_dir}"
        raise RunDirError(f"cannot access {what} ({os_error_reason(e)}); nothing complete was lost (the "
                          f"checkpoints in {run_dir / 'checkpoints'} are intact): free space or fix the "
                          f"permissions, then continue with resume=true, or choose another run_dir=...") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if lock is not None:
            lock.release()


# Ctrl-C during fit: the handler raises KeyboardInterrupt where the main thread is (as Python's own does) and
# also sets this flag, which the step loop checks after every step. So an interrupt that some library code
# caught and dropped on its way up still stops the run at the next step boundary. (A training that kept
# running after SIGINT was seen in the full test suite, though not reproduced alone: tests/test_reliability.py.)
_CTRL_C = threading.Event()


def _catch_ctrl_c():
    """Install the SIGINT handler of fit (main thread only; elsewhere signals cannot be set). Returns the
    previous handler to restore, or None if none was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _CTRL_C.clear()

    def on_sigint(signum, frame):
        _CTRL_C.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, on_sigint)


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

    plan = plan_run_dir(run_dir, config, s)
    # Build the data before anything is written: a bad size fails with the disk untouched. The DataLoader
    # iterator draws its base seed from the global torch RNG; fork it so a resumed process (which creates
    # the iterator after restoring the RNG) continues the exact random stream.
    task.setup(acc, s.micro_batch)
    with torch.random.fork_rng(devices=[]):
        batches = iter(task.batches(plan.start_step * s.grad_accum, acc.process_index, acc.num_processes,
                                    s.micro_batch))
    model, opt, sched, state = _prepare_training(task, s, acc, plan)
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
    window = _LogWindow(acc.device)
    pbar = None
    if s.progress and acc.is_main_process:
        from tqdm import tqdm

        pbar = tqdm(total=s.max_steps, initial=state.step, desc=s.namespace, dynamic_ncols=True, mininterval=1.0)
    guard = _NonFiniteGuard(opt, acc, s)

    model.train()
    t_train = time.perf_counter()
    while state.step < s.max_steps:
        if _CTRL_C.is_set():
            raise KeyboardInterrupt
        gnorm = _train_step(task, model, opt, sched, batches, acc, s, guard, window, state.step + 1)
        state.step += 1
        if pbar:
            pbar.update(1)
        if state.step % s.log_every == 0 or state.step == s.max_steps:
            guard.check()
            scalars = window.log(run, s.namespace, sched.get_last_lr()[0], gnorm, state.step)
            if pbar:
                pbar.set_postfix(loss=f"{scalars[f'{s.namespace}/loss']:.4f}")
        task.on_step(run, state.step)
        kill_point(state.step, "step")
        if state.step % s.checkpoint_every == 0 and state.step < s.max_steps:
            guard.check()
            if writer is not None:
                writer.flush()  # events up to this step must survive a kill that the checkpoint survives
            save_checkpoint(acc, run_dir, state.step, s.keep_last, config)

    guard.check()
    if pbar:
        pbar.close()
    # What the run paid (the compute columns of the reports): labels and wall time of the steps this process
    # trained, before the final extras (held-out scoring) and the last checkpoint.
    compute = {"steps_trained": state.step - start_step, "labels_trained": window.total_labels(acc),
               "train_wall_s": round(time.perf_counter() - t_train, 3)}
    return _finish(task, run, state.step, start_step, compute)


def _prepare_training(task: Task, s: LoopSettings, acc, plan) -> tuple:
    """(model, optimizer, scheduler, step counter), prepared by Accelerate, from the plan's checkpoint if
    it names one."""
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
    return model, opt, sched, state


def _train_step(task: Task, model, opt, sched, batches, acc, s: LoopSettings, guard: _NonFiniteGuard,
                window: _LogWindow, step: int) -> torch.Tensor:
    """Optimizer step `step`: grad_accum micro-batches of forward and label-weighted backward, one small
    all-reduce, the exact global-batch gradient, clipping, the non-finite checks, the update and the
    schedule. Returns the gradient norm before clipping (a device tensor: read only at log time)."""
    world, dev = acc.num_processes, acc.device
    rows_per_rank = s.micro_batch // world  # this rank's rows of each micro-batch (the same on every rank)
    n_here = torch.zeros((), device=dev)  # labels in this rank's micro-batches of this step
    bad = torch.zeros((), device=dev)  # a non-finite loss value seen in this step (0 = none)
    for i in range(s.grad_accum):
        batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
        sync = i == s.grad_accum - 1
        with acc.no_sync(model) if (not sync and world > 1) else _null():
            with acc.autocast():
                loss, metrics, n_labels = task.loss(model, batch)
            n_i = torch.as_tensor(n_labels, device=dev).float()
            lv = loss.detach().float()
            bad = torch.where(torch.isfinite(lv), bad, lv)
            # Backward the label SUM (scaled by 1/rows to keep magnitudes ~ a mean); the gradient is
            # divided by the step's global label count below, once all ranks' counts are known.
            acc.backward(loss * (n_i / rows_per_rank))
        window.add({"loss": lv, **metrics}, n_i)
        n_here = n_here + n_i
    window.add_labels(n_here)
    # One small all-reduce per step: the global label count and whether any rank saw a NaN/inf loss
    # (acted on by every rank together: one rank's NaN stops them all).
    red = torch.stack([n_here, (bad != 0).float()])
    if world > 1:
        red = acc.reduce(red, "sum")
    n_total, nbad = red[0], red[1]
    guard.check_loss(nbad, bad, step)
    # DDP averaged the rank gradients (1/world); x world*rows/N turns the summed, 1/rows-scaled label
    # losses into the gradient of the mean over all N labels of the global batch: N processes x
    # grad_accum micro-batches give exactly one big batch's gradient.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, (world * rows_per_rank) / n_total.clamp(min=1.0))
    max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")  # inf: norm computed, grads untouched
    gnorm = torch.as_tensor(acc.clip_grad_norm_(model.parameters(), max_norm), device=dev).float()
    guard.check_update(nbad, bad, gnorm, step)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


class _NonFiniteGuard:
    """A NaN/inf loss (any rank) or gradient norm must never reach a checkpoint or the final weights, and
    the error must name the step and the quantity. With the fused optimizer (CUDA) the step stays free of
    host syncs: the optimizer skips the update on a device-side flag (found_inf, as for AMP grad scaling),
    the first bad step is recorded on the device, and the record is read by `check` at the next log /
    checkpoint / end, before anything is written. Elsewhere a host read costs nothing (CPU) or is needed
    anyway, and the step stops at once."""

    def __init__(self, opt, acc, s: LoopSettings):
        dev = acc.device
        self.s = s
        self.inner_opt = getattr(opt, "optimizer", opt)
        self.deferred = bool(self.inner_opt.defaults.get("fused")) and acc.scaler is None  # fused: CUDA
        self.step = torch.zeros((), dtype=torch.int64, device=dev)  # first non-finite step (0 = none yet)
        self.grad = torch.zeros((), dtype=torch.bool, device=dev)  # ... was it the gradient norm (else loss)
        self.value = torch.zeros((), device=dev)  # ... and its value

    def check_loss(self, nbad: torch.Tensor, bad: torch.Tensor, step: int) -> None:
        """After the all-reduce: stop now (not deferred) if any rank's loss was non-finite."""
        if not self.deferred and nbad.item():
            raise NonFiniteLossError(_nonfinite_msg(self.s.namespace, "loss",
                                                    bad.item() if bad != 0 else float("nan"), step, self.s))

    def check_update(self, nbad: torch.Tensor, bad: torch.Tensor, gnorm: torch.Tensor, step: int) -> None:
        """Before opt.step: deferred, record the first bad step and make the fused AdamW skip this one;
        otherwise stop now on a non-finite gradient norm (identical on every rank: all-reduced gradients)."""
        if self.deferred:
            skip = (nbad > 0) | ~torch.isfinite(gnorm)
            first = skip & (self.step == 0)
            self.grad = torch.where(first, nbad == 0, self.grad)
            # The loss value as this rank saw it (nan if another rank's loss was the bad one, as before).
            loss_value = torch.where(bad != 0, bad, torch.full_like(bad, float("nan")))
            self.value = torch.where(first, torch.where(nbad > 0, loss_value, gnorm), self.value)
            self.step = torch.where(first, step, self.step)
            self.inner_opt.found_inf = skip.float()
        elif not math.isfinite(gnorm.item()):
            raise NonFiniteLossError(_nonfinite_msg(self.s.namespace, "gradient norm", gnorm.item(), step, self.s))

    def check(self) -> None:
        """Raise if a deferred record holds a non-finite step (a host read; only at log/checkpoint/end)."""
        if self.deferred and self.step.item():
            what = "gradient norm" if self.grad.item() else "loss"
            raise NonFiniteLossError(_nonfinite_msg(self.s.namespace, what, self.value.item(), int(self.step.item()),
                                                    self.s))


class _LogWindow:
    """Label-weighted sums of the step metrics since the last log, on the device (no host sync per step);
    `log` reduces them over ranks once per log_every steps and writes the averages."""

    def __init__(self, device):
        self.device = device
        self.total = torch.zeros((), device=device)  # this rank's labels since the process started (compute)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.labels = torch.zeros((), device=self.device)
        self.t0 = time.perf_counter()

    def add(self, metrics: dict, n_labels: torch.Tensor) -> None:
        """One micro-batch's metrics (means over its labels), weighted by its label count."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.as_tensor(v, device=self.device).detach().float() * n_labels

    def add_labels(self, n: torch.Tensor) -> None:
        """One step's label count on this rank (the weights' total, and labels/s)."""
        self.labels = self.labels + n
        self.total = self.total + n

    def total_labels(self, acc) -> int:
        """Labels trained by this process's steps, summed over ranks. Collective: every rank calls it."""
        t = self.total.double()
        return int((acc.reduce(t, "sum") if acc.num_processes > 1 else t).item())

    def log(self, run: Run, ns: str, lr: float, gnorm: torch.Tensor, step: int) -> dict:
        """Write `<ns>/<metric>` (label-weighted over the window, all ranks), lr, labels/s and the last
        step's grad_norm; start a new window. Collective: every rank calls it. Returns the scalars."""
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k].double() for k in keys] + [self.labels.double()])
        if run.accelerator.num_processes > 1:
            vec = run.accelerator.reduce(vec, "sum")
        vals = vec.tolist()  # the one host sync of a log step
        dt = time.perf_counter() - self.t0
        scalars = {f"{ns}/{k}": vals[i] / max(vals[-1], 1.0) for i, k in enumerate(keys)}
        scalars[f"{ns}/lr"] = lr
        scalars[f"{ns}/labels_per_s"] = vals[-1] / dt
        scalars[f"{ns}/grad_norm"] = gnorm.item()
        run.log(scalars, step)
        self._reset()
        return scalars


def _finish(task: Task, run: Run, step: int, start_step: int, compute: dict) -> dict:
    """After the last step: the final checkpoint (unless a resumed run had nothing left to do), the task's
    final extras, done.json (main process, written last: its presence means the run is complete).
    `compute`: steps, labels and wall seconds of this process's training steps (a resumed run counts only
    its own; labels_per_step is their ratio, the same whatever the resume)."""
    acc, s, run_dir, writer = run.accelerator, run.settings, run.run_dir, run.writer
    if writer is not None:
        writer.flush()
    if not (step == start_step and any(st == step for st, _ in checkpoints(run_dir))):
        save_checkpoint(acc, run_dir, step, s.keep_last, run.config)
    summary = {"global_step": step, "run_dir": str(run_dir), "world_size": acc.num_processes,
               "batch_size": s.batch_size, "grad_accum": s.grad_accum, "resumed_from_step": start_step,
               "compute": {**compute, "labels_per_step": (compute["labels_trained"] / compute["steps_trained"]
                                                          if compute["steps_trained"] else None)}}
    summary.update(task.on_end(run, step) or {})
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
