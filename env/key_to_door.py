"""Dark Key-to-Door, batched: E environments stepped as tensors in one call (CPU or GPU); its rules, task split
and action relabelling are docs/design.md §3.

The second grid world of Algorithm Distillation (Laskin et al. 2022), with the rules of DICP (Son et al. 2025,
github.com/jaehyeon-son/dicp, gridworld/env/dark_key_to_door.py). The observation is the position alone: a
learner must remember from its own rewards whether it holds the key. The key pays only on a step that lands on
it, even on the start cell (take 'stay'), and a door on the key's cell pays one step later at the earliest
(DICP's if / elif: one reward per step). DICP orders the actions 0 +x, 1 -x, 2 +y, 3 -y, 4 stay, so ours =
(dicp + 1) % 5 (to_dicp_action / from_dicp_action), and nothing else differs in states, rewards or episode ends
(tests/test_key_to_door.py replays DICP's own trajectories, recorded in tests/data/dicp_key_to_door.json by
tests/tooling/dicp_key_to_door_fixture.py). Our gymnasium view reports the time-limit end as `truncated` only
(DICP: as both `terminated` and `truncated`), as for Darkroom.

Selected by `env.reward_mode: key_to_door`: keeping the family in reward_mode leaves every Darkroom config and
dataset unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import cache

import torch

from env.darkroom import ACTION_DELTAS, N_ACTIONS, GridWorld, shuffled_split, start_state

KEY_TO_DOOR = "key_to_door"  # the env.reward_mode value that selects this env
TASK_DIM = 4                 # (key_x, key_y, door_x, door_y)
N_PHASES = 3                 # hidden progress within an episode: 0 no key, 1 key held, 2 door opened


def to_dicp_action(a: int) -> int:
    """Our action id -> DICP's (0 +x, 1 -x, 2 +y, 3 -y, 4 stay)."""
    return (int(a) - 1) % N_ACTIONS


def from_dicp_action(a: int) -> int:
    """DICP's action id -> ours (0 stay, 1 +x, 2 -x, 3 +y, 4 -y)."""
    return (int(a) + 1) % N_ACTIONS


def task_split(grid_size: int = 9, train_frac: float = 0.95, seed: int = 4
               ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """DICP's train/test split of all G^4 (key, door) tasks (sample_dark_key_to_door): `shuffled_split`, so the
    key is the outer and the door the inner coordinate pair."""
    return shuffled_split(grid_size, TASK_DIM, train_frac, seed)


@cache
def _bfs_steps(a: tuple[int, int], b: tuple[int, int], grid_size: int) -> int:
    """Fewest steps (>= 1: a reward is paid on a step that LANDS on b) from cell a to cell b under the env's
    own moves (ACTION_DELTAS, walls clip). Breadth-first search, so it stays exact if the moves change."""
    frontier, dist = deque([a]), {a: 0}
    while frontier:
        c = frontier.popleft()
        for dx, dy in ACTION_DELTAS:
            n = (min(max(c[0] + dx, 0), grid_size - 1), min(max(c[1] + dy, 0), grid_size - 1))
            if n == b:
                return dist[c] + 1
            if n not in dist:
                dist[n] = dist[c] + 1
                frontier.append(n)
    raise ValueError(f"cell {b} is unreachable from {a} on a {grid_size}x{grid_size} grid")


def optimal_return(task: Sequence[int], grid_size: int = 9, horizon: int = 50) -> float:
    """Best achievable episode return of `task` = (kx, ky, dx, dy) from the centre start, exactly.

    The door pays only after the key, and reaching the key sooner never hurts (the agent can wait with
    'stay'), so an optimal episode walks a shortest path to the key (d1 = BFS steps, >= 1) and then one to
    the door (d2, >= 1): return = [d1 <= H] + [d1 + d2 <= H]. (For G = 9, H = 50: d1 + d2 <= 8 + 16, so 2
    for every task.) tests/test_key_to_door.py checks this against dynamic programming over (cell, phase).
    """
    start = start_state(grid_size)
    key, door = (int(task[0]), int(task[1])), (int(task[2]), int(task[3]))
    d1 = _bfs_steps(start, key, int(grid_size))
    d2 = _bfs_steps(key, door, int(grid_size))
    return float(d1 <= horizon) + float(d1 + d2 <= horizon)


class BatchedKeyToDoor(GridWorld):
    """E Dark Key-to-Door environments (any mix of tasks) as tensors on one device, with GridWorld's
    interface; `goals` holds the tasks, LongTensor[E, 4] (kx, ky, dx, dy) or anything torch.as_tensor accepts.

    The hidden progress is public: `has_key` / `door_opened` bool[E] (this episode), and `phase()` =
    has_key + door_opened in {0, 1, 2}. The source algorithm may condition on it (collect.py); the learners
    never see it (their transitions hold positions and rewards only).
    """

    n_phases = N_PHASES
    goal_width = TASK_DIM
    goal_what = "key-to-door tasks (key_x, key_y, door_x, door_y)"
    reward_mode = KEY_TO_DOOR

    def __init__(self, tasks, grid_size: int = 9, horizon: int = 50, device: str | torch.device = "cpu"):
        super().__init__(tasks, grid_size, horizon, device)

    @classmethod
    def from_cfg(cls, env_cfg, tasks, device: str | torch.device = "cpu") -> BatchedKeyToDoor:
        """Build from an `env` config node (config/env/dark_key_to_door.yaml): grid_size, horizon."""
        return cls(tasks, grid_size=env_cfg["grid_size"], horizon=env_cfg["horizon"], device=device)

    def _set_goals(self, goals) -> None:
        super()._set_goals(goals)
        self.keys, self.doors = self.goals[:, :2], self.goals[:, 2:]

    def _optimal(self, task) -> float:
        return optimal_return(task, self.grid_size, self.horizon)

    def phase(self) -> torch.Tensor:
        """LongTensor[E]: 0 before the key, 1 holding it, 2 after the door (private to the source)."""
        return self.has_key.long() + self.door_opened.long()

    def _clear(self) -> None:
        self.has_key = torch.zeros(self.n_envs, dtype=torch.bool, device=self.device)
        self.door_opened = torch.zeros(self.n_envs, dtype=torch.bool, device=self.device)

    def _reward(self, next_states: torch.Tensor) -> torch.Tensor:
        # DICP's if / elif: the key pays if not yet held; otherwise the door pays if the key was held
        # BEFORE this step and the door is still closed. So one step never pays both.
        got_key = ~self.has_key & (next_states == self.keys).all(dim=-1)
        got_door = self.has_key & ~self.door_opened & (next_states == self.doors).all(dim=-1)
        self.has_key = self.has_key | got_key
        self.door_opened = self.door_opened | got_door
        return got_key | got_door
