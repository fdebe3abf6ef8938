"""The transition record, defined once (docs/design.md §4.1): tau = (s, a, r, s') packed as 6 integers,
one column each:

    column   0    1    2   3   4     5
    field    sx   sy   a   r   nsx   nsy

Everything after loading (the samplers' packed copy, the batches, the model, the rollout's records, the
same-position scoring) names its columns through this module instead of spelling indices. It imports neither
torch nor model/, so the data side (histories.py) and the networks can both use it.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("sx", "sy", "a", "r", "nsx", "nsy")
N_FIELDS = len(FIELDS)
SX, SY, ACTION, REWARD, NSX, NSY = range(N_FIELDS)
STATE = slice(SX, SY + 1)  # (sx, sy): a slice keeps the last dim, for [..., STATE] -> [..., 2]
NEXT_STATE = slice(NSX, NSY + 1)  # (nsx, nsy)

# The four fields a transition is scored on (stage-1 diagnostics): its columns. A state is one field of two
# columns, so it counts as right only if both coordinates are.
FIELD_COLUMNS = {"state": (SX, SY), "action": (ACTION,), "reward": (REWARD,), "next_state": (NSX, NSY)}


def pack(states, actions, rewards, next_states, out=None):
    """(s [..., 2], a [...], r [...], s' [..., 2]) -> packed transitions [..., 6], numpy or torch (the
    inputs' kind; the caller gives them one dtype). `out` (numpy only) receives the result in place."""
    parts = [states, actions[..., None], rewards[..., None], next_states]
    if isinstance(states, np.ndarray):
        return np.concatenate(parts, axis=-1, out=out)
    import torch  # only for tensors: histories.py works on numpy without importing torch

    if out is not None:
        raise ValueError("pack: out= is for numpy arrays only")
    return torch.cat(parts, dim=-1)


# Field accessors: [..., 6] -> [..., 2] for the two states, [...] for the action and the reward.
def state(trans):
    return trans[..., STATE]


def action(trans):
    return trans[..., ACTION]


def reward(trans):
    return trans[..., REWARD]


def next_state(trans):
    return trans[..., NEXT_STATE]
