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

