"""The optimizer and learning-rate schedule of both training stages (docs/design.md §10.7); `s` is a
loop.LoopSettings."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from model.config import ConfigError


def lr_lambda(s) -> Callable[[int], float]:
    """The learning-rate factor of step k (torch LambdaLR): linear warmup over warmup_steps, then cosine decay to
    min_lr_ratio at max_steps."""

    def f(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        span = max(1, s.max_steps - s.warmup_steps)
        prog = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def decayed_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to: the weight matrices of nn.Linear layers (as in nanoGPT).
    Not biases, norms, nn.Embedding weights or bare nn.Parameter tables (positions, latent queries, `begin`):
    each row is a value the model reads as it is, so decay would pull it toward zero, not regularise a map."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {name for name, p in model.named_parameters() if id(p) in linear}


def make_optimizer(model: nn.Module, s) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (frozen ones are not in the optimizer); weight decay on the
    `decayed_parameters` only. With the parameters on CUDA, the fused kernel: one launch for all parameters
    instead of a few per tensor, and the GradScaler's skip of a non-finite update needs no host sync."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (everything frozen?): unfreeze something")
    decayed = decayed_parameters(model)
    decay = [p for n, p in named if n in decayed]
    no_decay = [p for n, p in named if n not in decayed]
    fused = {"fused": True} if all(p.is_cuda for _, p in named) else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                             betas=(s.adam_beta1, s.adam_beta2), **fused)
