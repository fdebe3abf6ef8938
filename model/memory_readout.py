"""MemoryReadout: a long-memory auxiliary objective for stage 2 (`model.memory_aux_weight` > 0).

Measured without it, the compressed memory keeps nothing the last folded segment does not already give
(docs/design.md §7.1, memory probe): the action loss alone never asks the latents for anything older,
because on most steps the recent past predicts the source's action as well. This head asks for exactly
what an in-context learner must carry across many folds — for every grid cell, from the latents alone:

    visited:  did any transition of ANY folded segment start or end in this cell?  (per-cell BCE)
    reward:   in which cell did the folded history receive reward (where the goal was seen), or nowhere
              yet?  (cross-entropy over the G*G cells + a "none" class; the target spreads evenly over the
              rewarded cells if there are several)

The reward term is a categorical over cells on purpose: as one more per-cell bit it was 1 positive among
2*G*G bits, its gradient vanished and the measured recall stayed 0 (experiment=quick, 400 steps).

The targets cover every segment the latents were folded from (with `model.schedule=rollout`, the whole
history before the decoder window, including the folds that ran without gradients), so the only way to
lower this loss is to keep old content in the latents through later folds. One query per cell (x and y
embeddings added) cross-attends to the latents; a linear head gives the two logits. It is a training-only
head: rollouts never run it, and it is not part of the encoder checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.transformer import Block
from transition import NSX, NSY, REWARD, SX, SY


class MemoryReadout(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, g = cfg.d_model, cfg.grid_size
        self.grid_size = g
        self.cell_x = nn.Embedding(g, d)
        self.cell_y = nn.Embedding(g, d)
        self.block = Block(d, cfg.n_head, cfg.dropout, cross=True)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)  # (visited, reward-cell) logits
        self.none_logit = nn.Parameter(torch.zeros(()))  # "no reward seen yet" class of the reward term

    def forward(self, latents: torch.Tensor) -> dict:
        """latents [B, n, d] -> {'visited': [B, G*G] logits, 'reward': [B, G*G + 1] logits (last = none)};
        cell index x * G + y."""
        g = self.grid_size
        q = (self.cell_x.weight[:, None, :] + self.cell_y.weight[None, :, :]).reshape(g * g, -1)
        x, _ = self.block(q.expand(latents.shape[0], -1, -1), source=latents)
        out = self.head(self.ln_f(x))
        none = self.none_logit.expand(latents.shape[0], 1).to(out.dtype)
        return {"visited": out[..., 0], "reward": torch.cat([out[..., 1], none], dim=1)}


def memory_targets(seg: torch.Tensor, seg_len: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Folded segments seg [B, D, S, 6] (packed sx, sy, a, r, nsx, nsy), seg_len [B, D] -> float targets
    [B, G*G, 2]: (visited, rewarded) of every cell over every real transition of every used slot."""
    b = seg.shape[0]
    g = grid_size
    t = seg.long().reshape(b, -1, seg.shape[-1])  # [B, D*S, 6]
    real = (torch.arange(seg.shape[2], device=seg.device) < seg_len[..., None]).reshape(b, -1)
    s_cell = t[..., SX] * g + t[..., SY]
    ns_cell = t[..., NSX] * g + t[..., NSY]
    out = torch.zeros(b, g * g, 2, device=seg.device)
    one = real.float()
    out[..., 0].scatter_add_(1, s_cell, one)
    out[..., 0].scatter_add_(1, ns_cell, one)
    out[..., 1].scatter_add_(1, ns_cell, one * (t[..., REWARD] > 0).float())
    return (out > 0).float()


def memory_loss(logits: dict, targets: torch.Tensor, has: torch.Tensor) -> dict:
    """Over the samples that have latents (has [B]): mean per-cell BCE of 'visited' + cross-entropy of the
    reward cell (or none). Also the reward term's accuracy (argmax is a rewarded cell, or none when none
    was seen) and the visited bits' accuracy."""
    w = has.float()
    n = w.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits["visited"].float(), targets[..., 0], reduction="none")
    rew = targets[..., 1]
    seen = rew.sum(1, keepdim=True)
    dist = torch.cat([rew / seen.clamp(min=1), (seen == 0).float()], dim=1)  # [B, G*G + 1]
    ce = -(dist * F.log_softmax(logits["reward"].float(), dim=1)).sum(1)
    loss = ((bce.mean(1) + ce) * w).sum() / n
    with torch.no_grad():
        hit = dist.gather(1, logits["reward"].argmax(1, keepdim=True))[:, 0] > 0
        reward_acc = (hit.float() * w).sum() / n
        vis_acc = (((logits["visited"] > 0).float() == targets[..., 0]).float().mean(1) * w).sum() / n
    return {"loss": loss, "reward_acc": reward_acc, "visited_acc": vis_acc}
