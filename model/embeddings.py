"""Transition features: what every network sees of a transition.

A transition tau = (s, a, r, s') is stored packed as 6 integers (the layout: transition.py). Its feature
vector f(tau) = [s/(G-1), onehot(a), r, s'/(G-1)] is both the input of the shared embedding
(`TransitionEmbedding` in model/compressor.py) and the target of the stage-1 reconstruction, so it lives
here, in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transition import ACTION, NEXT_STATE, REWARD, STATE


def featurize(trans: torch.Tensor, grid_size: int, n_actions: int = 5) -> torch.Tensor:
    """Packed transitions [..., 6] (any int dtype) -> float features [..., 2 + n_actions + 1 + 2]."""
    t = trans.long()
    scale = float(grid_size - 1)
    s = t[..., STATE].float() / scale
    a = F.one_hot(t[..., ACTION], n_actions).float()
    r = t[..., REWARD, None].float()
    ns = t[..., NEXT_STATE].float() / scale
    return torch.cat([s, a, r, ns], dim=-1)


def input_features(trans: torch.Tensor, cfg) -> torch.Tensor:
    """What the shared transition embedding reads: f(tau), and with cfg.state_features == 'onehot' also the
    one-hot of each coordinate of s and s' ([..., cfg.in_dim]). Scaled coordinates alone make a cell a point
    on a line: telling 9 cells apart after LayerNorm and attention blends needs a precision the one-hot code
    does not (docs/design.md §5)."""
    f = featurize(trans, cfg.grid_size, cfg.n_actions)
    if cfg.state_features == "scalar":
        return f
    t = trans.long()
    cells = torch.cat([t[..., STATE], t[..., NEXT_STATE]], dim=-1)  # [..., 4] coordinates
    return torch.cat([f, F.one_hot(cells, cfg.grid_size).flatten(-2).float()], dim=-1)
