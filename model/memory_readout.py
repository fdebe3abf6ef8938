"""MemoryReadout: a long-memory auxiliary objective for stage 2 (`model.memory_aux_weight` > 0).

Measured without it, the compressed memory keeps nothing the last folded segment does not already give
(docs/design.md §7.1, memory probe): the action loss alone never asks the latents for anything older,
because on most steps the recent past predicts the source's action as well. This head asks for exactly
what an in-context learner must carry across many folds — for every grid cell, from the latents alone:

    visited:  did any transition of ANY folded segment start or end in this cell?
    rewarded: did any folded transition receive reward on arriving in this cell (where the goal was seen)?

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


class MemoryReadout(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, g = cfg.d_model, cfg.grid_size
        self.grid_size = g
        self.cell_x = nn.Embedding(g, d)
        self.cell_y = nn.Embedding(g, d)
        self.block = Block(d, cfg.n_head, cfg.dropout, cross=True)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)  # (visited, rewarded) logits

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, n, d] -> logits [B, G*G, 2]; cell index x * G + y."""
        g = self.grid_size
        q = (self.cell_x.weight[:, None, :] + self.cell_y.weight[None, :, :]).reshape(g * g, -1)
        x, _ = self.block(q.expand(latents.shape[0], -1, -1), source=latents)
        return self.head(self.ln_f(x))


def memory_targets(seg: torch.Tensor, seg_len: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Folded segments seg [B, D, S, 6] (packed sx, sy, a, r, nsx, nsy), seg_len [B, D] -> float targets
    [B, G*G, 2]: (visited, rewarded) of every cell over every real transition of every used slot."""
    b = seg.shape[0]
    g = grid_size
    t = seg.long().reshape(b, -1, seg.shape[-1])  # [B, D*S, 6]
    real = (torch.arange(seg.shape[2], device=seg.device) < seg_len[..., None]).reshape(b, -1)
    s_cell = t[..., 0] * g + t[..., 1]
    ns_cell = t[..., 4] * g + t[..., 5]
    out = torch.zeros(b, g * g, 2, device=seg.device)
    one = real.float()
    out[..., 0].scatter_add_(1, s_cell, one)
    out[..., 0].scatter_add_(1, ns_cell, one)
    out[..., 1].scatter_add_(1, ns_cell, one * (t[..., 3] > 0).float())
    return (out > 0).float()


def memory_loss(logits: torch.Tensor, targets: torch.Tensor, has: torch.Tensor) -> dict:
    """Mean BCE over cells and both targets, over the samples that have latents (has [B]); plus the
    accuracy of the 'rewarded' bit on the cells where it is 1 (recall of the remembered goal)."""
    w = has.float()[:, None, None]
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    n = (w.sum() * logits.shape[1] * 2).clamp(min=1)
    with torch.no_grad():
        pos = targets[..., 1] * w[..., 0]
        hit = ((logits[..., 1] > 0).float() * pos).sum()
        recall = hit / pos.sum().clamp(min=1)
        vis_acc = (((logits[..., 0] > 0).float() == targets[..., 0]).float() * w[..., 0]).sum() / (
            w.sum() * logits.shape[1]).clamp(min=1)
    return {"loss": (bce * w).sum() / n, "reward_recall": recall, "visited_acc": vis_acc}
