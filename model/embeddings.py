"""Transition features and the embeddings shared by encoder and decoder.

A transition tau = (s, a, r, s') is stored packed as 6 integers (sx, sy, a, r, nsx, nsy). Its feature
vector f(tau) = [s/(G-1), onehot(a), r, s'/(G-1)] is both the input of `embed_context` and the target of
the stage-1 reconstruction, so it lives here, in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def featurize(trans: torch.Tensor, grid_size: int, n_actions: int = 5) -> torch.Tensor:
    """Packed transitions [..., 6] (any int dtype) -> float features [..., 2 + n_actions + 1 + 2]."""
    t = trans.long()
    scale = float(grid_size - 1)
    s = t[..., 0:2].float() / scale
    a = F.one_hot(t[..., 2], n_actions).float()
    r = t[..., 3:4].float()
    ns = t[..., 4:6].float() / scale
    return torch.cat([s, a, r, ns], dim=-1)


class ContextEmbedding(nn.Module):
    """embed_ln(embed_context(f(tau))): the transition embedding used by both networks.

    The two submodules keep the names `embed_context` / `embed_ln` because the encoder checkpoint
    contract (docs/design.md §6) stores them under those names.
    """

    def __init__(self, feat_dim: int, d_model: int, grid_size: int, n_actions: int):
        super().__init__()
        self.grid_size = grid_size
        self.n_actions = n_actions
        self.embed_context = nn.Linear(feat_dim, d_model)
        self.embed_ln = nn.LayerNorm(d_model)

    def forward(self, trans: torch.Tensor) -> torch.Tensor:
        return self.embed_ln(self.embed_context(featurize(trans, self.grid_size, self.n_actions)))
