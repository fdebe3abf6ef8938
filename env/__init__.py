"""Darkroom family: batched torch environment, DICP goal split, optimal return, gymnasium view.

Importing this package registers the gymnasium id 'Darkroom-v0'.
"""

from env.darkroom import (
    ACTION_DELTAS,
    N_ACTIONS,
    REWARD_MODES,
    SPLITS,
    BatchedDarkroom,
    goal_split,
    goal_splits,
    goal_splits_from_cfg,
    optimal_return,
    start_state,
)
from env.gym_env import ENV_ID, DarkroomGymEnv, register_gym_env

register_gym_env()

__all__ = [
    "ACTION_DELTAS",
    "ENV_ID",
    "N_ACTIONS",
    "REWARD_MODES",
    "SPLITS",
    "BatchedDarkroom",
    "DarkroomGymEnv",
    "goal_split",
    "goal_splits",
    "goal_splits_from_cfg",
    "optimal_return",
    "register_gym_env",
    "start_state",
]
