"""One entry point per question the stages ask of an env config, for every env family.

A family is picked by `env.reward_mode`: 'every_step' / 'once' are Darkroom (a task is a goal cell (x, y)),
'key_to_door' is Dark Key-to-Door (a task is (key_x, key_y, door_x, door_y)). collect.py, histories.py,
evaluate.py and train.py ask here instead of naming an env class, so a run of either family goes through
the same code; only the task width and the env class differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from env import darkroom, key_to_door


def _get(env_cfg, key, default=None):
    return env_cfg.get(key, default) if hasattr(env_cfg, "get") else getattr(env_cfg, key, default)


def is_key_to_door(env_cfg) -> bool:
    return _get(env_cfg, "reward_mode") == key_to_door.KEY_TO_DOOR


def task_dim(env_cfg) -> int:
    """Numbers per task: 2 (Darkroom goal) or 4 (key cell, door cell); goals.npy is [N, task_dim]."""
    return key_to_door.TASK_DIM if is_key_to_door(env_cfg) else 2


def make_batched_env(env_cfg, tasks, device: str | torch.device = "cpu"):
    """The batched env of the config's family over `tasks` ([E, task_dim])."""
    cls = key_to_door.BatchedKeyToDoor if is_key_to_door(env_cfg) else darkroom.BatchedDarkroom
    return cls.from_cfg(env_cfg, tasks, device)


def task_optimal_return(env_cfg, task: Sequence[int]) -> float:
    """Exact optimal episode return of one task under the config's env."""
    g, h = int(_get(env_cfg, "grid_size")), int(_get(env_cfg, "horizon"))
    if is_key_to_door(env_cfg):
        return key_to_door.optimal_return(task, g, h)
    return darkroom.optimal_return(task, g, h, _get(env_cfg, "reward_mode"))


def splits_from_cfg(env_cfg) -> dict[str, list[tuple[int, ...]]]:
    """{'train', 'val', 'test'} task lists every stage uses (a run config from before the validation split
    has no n_val_goals: no validation tasks). env.max_train_tasks (null / absent = all) keeps only the
    first that many train tasks of the seeded order."""
    g, frac, seed = int(_get(env_cfg, "grid_size")), float(_get(env_cfg, "train_frac")), int(_get(env_cfg, "split_seed"))
    split = key_to_door.task_split if is_key_to_door(env_cfg) else darkroom.goal_split
    return darkroom.carve_splits(*split(g, frac, seed), int(_get(env_cfg, "n_val_goals", 0) or 0),
                                 _get(env_cfg, "max_train_tasks"))
