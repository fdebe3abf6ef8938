"""Grid worlds: Darkroom (env/darkroom.py) and Dark Key-to-Door (env/key_to_door.py) as batched torch
environments with DICP's task splits and exact optimal returns, gymnasium views, and env/tasks.py's
family-independent entry points (which env, which splits, which optimum a config means).

Importing this package registers the gymnasium ids 'Darkroom-v0' and 'DarkKeyToDoor-v0'.
"""

from env.darkroom import (
    ACTION_DELTAS,
    N_ACTIONS,
    REWARD_MODES,
    SPLITS,
    BatchedDarkroom,
    goal_split,
    goal_splits,
    optimal_return,
    start_state,
)
from env.gym_env import ENV_ID, KEY_TO_DOOR_ENV_ID, DarkroomGymEnv, KeyToDoorGymEnv, register_gym_env
from env.key_to_door import KEY_TO_DOOR, BatchedKeyToDoor, task_split
from env.tasks import is_key_to_door, make_batched_env, splits_from_cfg, task_dim, task_optimal_return

goal_splits_from_cfg = splits_from_cfg  # the former Darkroom-only reader: a Darkroom config gives goal_splits
register_gym_env()

__all__ = [
    "ACTION_DELTAS",
    "ENV_ID",
    "KEY_TO_DOOR",
    "KEY_TO_DOOR_ENV_ID",
    "N_ACTIONS",
    "REWARD_MODES",
    "SPLITS",
    "BatchedDarkroom",
    "BatchedKeyToDoor",
    "DarkroomGymEnv",
    "KeyToDoorGymEnv",
    "goal_split",
    "goal_splits",
    "goal_splits_from_cfg",
    "is_key_to_door",
    "make_batched_env",
    "optimal_return",
    "register_gym_env",
    "splits_from_cfg",
    "start_state",
    "task_dim",
    "task_optimal_return",
    "task_split",
]
