"""The one training loop both stages share: Accelerator set-up, run directory, TensorBoard logging,
checkpoint/resume. pretrain_encoder.py and train.py differ only in the `Task` they hand to `fit`
(model, data, loss, periodic extras).

Multi-process rules (DESIGN §8):
- every rank computes the same run directory (it comes from the config, never from a clock);
- only the main process writes logs, configs, final weights and encoder checkpoints;
- every rank calls `save_state` (each writes its own RNG state);
- the data for global (micro-)batch k is a pure function of (seed, k), and each rank takes its slice of
  it, so N processes see exactly the batches one process would, and resuming needs only the step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf


class RunDirError(RuntimeError):
    """The output run directory cannot be used as asked (holds another run, or nothing to resume)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops instead of writing garbage."""


# Keys that may change between a run and its resumption without making it "a different run".
_VOLATILE_KEYS = {"resume", "resume_from", "overwrite", "max_steps", "num_workers", "progress", "log_every",
                  "eval_every", "heldout_every", "checkpoint_every", "keep_last"}


@dataclass
class LoopSettings:
    max_steps: int
    batch_size: int  # global batch per optimizer step, all processes and accumulation micro-steps together
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
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


class Task(Protocol):
    """What a training script supplies. See train.py / pretrain_encoder.py."""

    model: nn.Module

    def batches(self, start: int, rank: int, world: int, micro_batch: int) -> Iterable[dict]:
        """Infinite iterator over this rank's slices of global micro-batches start, start+1, ..."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, {metric name: scalar tensor} to average over a logging window)."""

    def n_labels(self, batch: dict) -> int:
        """Supervised targets in this batch, for the labels/s throughput figure."""

    def on_step(self, run: "Run", step: int) -> None:
        """Periodic extras after optimizer step `step` (held-out loss, eval, encoder checkpoints)."""

    def on_end(self, run: "Run", step: int) -> dict:
        """Final extras; returns metrics merged into the run summary."""


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _identity(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _VOLATILE_KEYS}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, dir), oldest first. Half-written ones live under .tmp-* names."""
    d = run_dir / "checkpoints"
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def prepare_run_dir(run_dir: Path, cfg: dict, s: LoopSettings, is_main: bool) -> Path | None:
    """Decide, identically on every rank, whether to start fresh or resume; returns the checkpoint dir to
    resume from (or None). Refuses to clobber a different run. Only the main process writes."""
    saved_cfg_path = run_dir / "config.json"
    if s.resume_from:
        ck = Path(s.resume_from)
        if not (ck / "loop_state.json").is_file() and checkpoints(ck):
            ck = checkpoints(ck)[-1][1]  # a run directory was given: take its latest checkpoint
        if not (ck / "loop_state.json").is_file():
            raise RunDirError(f"resume_from={s.resume_from} is not a checkpoint (no loop_state.json): pass a "
                              f"run directory or one of its checkpoints/step-* folders")
        return ck
    existing = checkpoints(run_dir)
    if s.overwrite and run_dir.exists():
        if is_main:
            for name in ("checkpoints", "tb", "config.json", "done.json", "model.pt"):
                p = run_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return None
    if saved_cfg_path.is_file():
        saved = json.loads(saved_cfg_path.read_text())
        if _identity(saved) != _identity(cfg):
            diff = sorted(k for k in set(saved) | set(cfg) if k not in _VOLATILE_KEYS and saved.get(k) != cfg.get(k))
            raise RunDirError(
                f"run_dir {run_dir} already holds a different run (config differs in: {', '.join(diff)}); "
                f"choose another run_dir=..., or pass overwrite=true to replace it")
        if s.resume:
            if not existing:
                raise RunDirError(f"resume=true but {run_dir} has no complete checkpoint yet; start it without resume")
            return existing[-1][1]
        if existing or (run_dir / "done.json").exists():
            raise RunDirError(f"run_dir {run_dir} already holds this run (checkpoint step {existing[-1][0] if existing else 'final'}); "
                              f"pass resume=true to continue it or overwrite=true to start over")
    elif s.resume:
        raise RunDirError(f"resume=true but there is no run in {run_dir}; start it without resume or fix run_dir")
    return None


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
        raise ValueError("the model has no trainable parameters (everything frozen?)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def make_accelerator(s: LoopSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Depth-0 batches leave the encoder out of the graph; DDP must tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=s.mixed_precision, cpu=s.cpu, kwargs_handlers=[ddp])


def fit(task: Task, s: LoopSettings, run_dir: Path, config: dict, accelerator=None) -> dict:
    """Train task.model for s.max_steps optimizer steps; returns a summary dict (same on every rank)."""
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    acc = accelerator or make_accelerator(s)
    world, rank = acc.num_processes, acc.process_index
    if s.batch_size % (world * s.grad_accum):
        raise ValueError(f"batch_size={s.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {s.grad_accum}")
    run_dir = Path(run_dir).resolve()
    resume_ckpt = prepare_run_dir(run_dir, config, s, acc.is_main_process)
    acc.wait_for_everyone()
    set_seed(s.seed)  # same init weights on every rank (DDP also broadcasts them)

    model = task.model
    opt = make_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s))
    model, opt, sched = acc.prepare(model, opt, sched)
    state = _LoopState()
    acc.register_for_checkpointing(state)
    if resume_ckpt is not None:
        acc.load_state(str(resume_ckpt))
        acc.print(f"Resumed from {resume_ckpt} at step {state.step}")

    writer = None
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))
        # purge_step drops events a killed run wrote after its last checkpoint, so curves stay continuous.
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step if state.step else None)
    run = Run(acc, run_dir, writer, s, config, model)
    task.accelerator = acc

    mb = s.micro_batch // world
    batches = iter(task.batches(state.step * s.grad_accum, rank, world, mb))
    ns = s.namespace
    sums: dict[str, torch.Tensor] = {}
    n_acc, labels, t0 = 0, 0, time.perf_counter()
    pbar = None
    if s.progress and acc.is_main_process:
        from tqdm import tqdm

        pbar = tqdm(total=s.max_steps, initial=state.step, desc=ns, dynamic_ncols=True)
    model.train()
    while state.step < s.max_steps:
        for micro in range(s.grad_accum):
            batch = next(batches)
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            sync = micro == s.grad_accum - 1
            ctx = acc.no_sync(model) if (not sync and world > 1) else _null()
            with ctx:
                with acc.autocast():
                    loss, metrics = task.loss(model, batch)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLossError(f"{ns} loss is {loss.item()} at step {state.step}: lower lr "
                                             f"(now {s.lr}), enable grad_clip, or check the data")
                acc.backward(loss / s.grad_accum)
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n_acc += 1
            labels += task.n_labels(batch)
        gnorm = acc.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
        if gnorm is not None and not torch.isfinite(torch.as_tensor(gnorm)):
            raise NonFiniteLossError(f"gradient norm is {float(gnorm)} at step {state.step}: lower lr (now {s.lr}) "
                                     f"or check the data")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        if pbar:
            pbar.update(1)

        if state.step % s.log_every == 0 or state.step == s.max_steps:
            keys = sorted(sums)
            vec = torch.stack([sums[k] / n_acc for k in keys]).to(acc.device)
            vec = acc.reduce(vec, "mean")
            tot = acc.reduce(torch.tensor(float(labels), device=acc.device), "sum")
            dt = time.perf_counter() - t0
            scalars = {f"{ns}/{k}": v.item() for k, v in zip(keys, vec)}
            scalars[f"{ns}/lr"] = sched.get_last_lr()[0]
            scalars[f"{ns}/labels_per_s"] = tot.item() / dt
            if gnorm is not None:
                scalars[f"{ns}/grad_norm"] = float(gnorm)
            run.log(scalars, state.step)
            if pbar:
                pbar.set_postfix(loss=f"{scalars[f'{ns}/loss']:.4f}")
            sums, n_acc, labels, t0 = {}, 0, 0, time.perf_counter()

        task.on_step(run, state.step)
        if state.step % s.checkpoint_every == 0 and state.step < s.max_steps:
            save_checkpoint(acc, run_dir, state.step, s.keep_last)

    if pbar:
        pbar.close()
    save_checkpoint(acc, run_dir, state.step, s.keep_last)
    summary = {"global_step": state.step, "run_dir": str(run_dir)}
    summary.update(task.on_end(run, state.step) or {})
    if acc.is_main_process:
        atomic_write_text(run_dir / "done.json", json.dumps(summary, indent=2, default=float))
        writer.flush()
        writer.close()
    acc.wait_for_everyone()
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def save_checkpoint(acc, run_dir: Path, step: int, keep_last: int) -> Path:
    """save_state on every rank into a temp folder; the main process renames it into place, then prunes
    older checkpoints — the newest complete checkpoint is never deleted before its successor exists."""
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{step:08d}"
    if final.exists():
        return final
    tmp = ck_root / f".tmp-step-{step:08d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "loop_state.json").write_text(json.dumps({"step": step}))
        os.replace(tmp, final)
        for _, old in checkpoints(run_dir)[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def unwrap(acc, model: nn.Module) -> nn.Module:
    return acc.unwrap_model(model) if acc is not None else model


def settings_from_cfg(cfg, namespace: str, **override: Any) -> LoopSettings:
    """LoopSettings from the common top-level keys of train.yaml / pretrain.yaml."""
    names = LoopSettings.__dataclass_fields__
    kw = {k: cfg[k] for k in names if k in cfg}
    kw.update(override)
    kw["namespace"] = namespace
    return LoopSettings(**kw)
