"""Darkroom, batched: E grid-world environments stepped as tensors in one call (CPU or GPU); its rules (the
Algorithm Distillation paper's; DICP repo) and goal split are docs/design.md §3. Reward modes: 'every_step' pays
1 on every step whose NEXT state is the goal (so staying on the goal keeps paying; the classic Darkroom), 'once'
only the first time in an episode (darkroom_hard).

All E environments share one step counter and are reset together, which is what every caller does (the source
algorithm and in-context rollouts run all streams in lock-step) and keeps `step` free of per-env bookkeeping;
`done` says the horizon was reached and the caller calls `reset()`. This module is the only implementation of
the dynamics: the gymnasium view (env/gym_env.py) and the source algorithm (collect.py) step a BatchedDarkroom.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch

N_ACTIONS = 5
# Row a = (dx, dy) of action a. Order is part of the on-disk format (actions.npy stores these ids).
ACTION_DELTAS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
REWARD_MODES = ("every_step", "once")


def _check_reward_mode(reward_mode: str) -> None:
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"unknown reward_mode {reward_mode!r}: use one of {', '.join(REWARD_MODES)}")


def start_state(grid_size: int) -> tuple[int, int]:
    return (grid_size // 2, grid_size // 2)


def optimal_return(goal: Sequence[int], grid_size: int = 9, horizon: int = 20,
                   reward_mode: str = "every_step") -> float:
    """Best achievable episode return for `goal` from the centre start.

    'every_step': walk the m = manhattan(goal, start) steps, then stay; the step that lands on the goal
    and every step after it pays 1, so the return is H - m + 1, capped at H (m = 0: every step pays,
    the first included) and floored at 0 (goal out of reach within H steps).
    'once': 1 if the goal is reachable within the horizon, else 0.
    """
    _check_reward_mode(reward_mode)
    sx, sy = start_state(grid_size)
    m = abs(int(goal[0]) - sx) + abs(int(goal[1]) - sy)
    if reward_mode == "once":
        return 1.0 if m <= horizon else 0.0
    return float(max(0, min(horizon, horizon + 1 - m)))


def goal_split(grid_size: int = 9, train_frac: float = 0.9, seed: int = 0
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """DICP-compatible train/test split of all G*G goal cells (`shuffled_split`). For G=9, seed 0 the 8 test
    goals are (4,2) (5,6) (6,8) (7,2) (3,6) (0,5) (5,8) (5,4), so numbers are comparable with DICP's."""
    return shuffled_split(grid_size, 2, train_frac, seed)


def shuffled_split(grid_size: int, width: int, train_frac: float, seed: int) -> tuple[list, list]:
    """All G^width coordinate tuples, row-major (itertools.product's order), shuffled with Python's Mersenne
    Twister seeded with `seed` (the permutation of `random.seed(seed); random.shuffle(...)`, without touching
    the global RNG); the first round(G^width * train_frac) are train."""
    if not 0.0 < train_frac <= 1.0:
        raise ValueError(f"train_frac={train_frac} must be in (0, 1]")
    tasks = list(itertools.product(range(grid_size), repeat=width))
    random.Random(seed).shuffle(tasks)
    n_train = round(grid_size ** width * train_frac)
    return tasks[:n_train], tasks[n_train:]


SPLITS = ("train", "val", "test")


def goal_splits(grid_size: int = 9, train_frac: float = 0.9, seed: int = 0, n_val_goals: int = 0
                ) -> dict[str, list[tuple[int, int]]]:
    """The three goal splits every stage uses (docs/design.md §3): goal_split's lists carved by `carve_splits`;
    n_val_goals=0 gives DICP's split unchanged with an empty 'val'."""
    return carve_splits(*goal_split(grid_size, train_frac, seed), n_val_goals)


def carve_splits(train: list, test: list, n_val_goals: int = 0, max_train_tasks: int | None = None
                 ) -> dict[str, list]:
    """{'train', 'val', 'test'} from a shuffled train list and the test list (any task type; Darkroom and
    Dark Key-to-Door share it): 'val' = the LAST n_val_goals of `train`, 'train' = the rest, optionally
    only its first max_train_tasks (a smaller training set drawn from the same seeded order; the
    validation and test tasks do not move)."""
    n_val = int(n_val_goals)
    if not 0 <= n_val < len(train):
        raise ValueError(f"env.n_val_goals={n_val_goals} must be in [0, {len(train) - 1}] (there are "
                         f"{len(train)} train goals to carve the validation goals from)")
    rest = train[:len(train) - n_val]
    if max_train_tasks is not None:
        if not 1 <= int(max_train_tasks) <= len(rest):
            raise ValueError(f"env.max_train_tasks={max_train_tasks} must be in [1, {len(rest)}] (the train "
                             f"tasks left after carving {n_val} validation tasks), or null for all")
        rest = rest[:int(max_train_tasks)]
    return {"train": rest, "val": train[len(train) - n_val:], "test": test}


class GridWorld:
    """What every batched grid world here shares: E environments on one device, a G x G grid, the centre
    start, the five moves (walls clip), one step counter for all (reset together), the checks on goals and
    actions, reset() -> states LongTensor[E, 2] and step(actions LongTensor[E]) -> (next_states LongTensor[E, 2],
    rewards float32[E], done bool[E]). Subclasses (BatchedDarkroom, env.key_to_door.BatchedKeyToDoor) add the
    reward rule (_reward), the per-episode progress _clear() resets, and _optimal."""

    n_actions = N_ACTIONS
    n_phases = 1  # hidden progress states the source algorithm may condition on (1: none)
    goal_width = 2  # numbers per goal / task
    goal_what = "goals"  # how errors name them

    def __init__(self, goals, grid_size: int, horizon: int, device: str | torch.device = "cpu"):
        if grid_size < 1 or horizon < 1:
            raise ValueError(f"grid_size={grid_size} and horizon={horizon} must both be >= 1")
        self.grid_size = int(grid_size)
        self.horizon = int(horizon)
        self.device = torch.device(device)
        self.deltas = torch.tensor(ACTION_DELTAS, dtype=torch.long, device=self.device)
        self.start = torch.tensor(start_state(self.grid_size), dtype=torch.long, device=self.device)
        self._set_goals(goals)
        self.t = 0
        self.states: torch.Tensor | None = None  # None until the first reset()
        self._clear()

    def _set_goals(self, goals) -> None:
        goals = torch.as_tensor(goals, dtype=torch.long, device=self.device)
        if goals.ndim != 2 or goals.shape[1] != self.goal_width:
            raise ValueError(f"{self.goal_what} must have shape [E, {self.goal_width}], got {tuple(goals.shape)}")
        if goals.numel() and (goals.min() < 0 or goals.max() >= self.grid_size):
            raise ValueError(f"{self.goal_what} must lie in [0, {self.grid_size - 1}]^2, got values outside")
        self.goals = goals.clone()

    @property
    def n_envs(self) -> int:
        return self.goals.shape[0]

    def optimal_returns(self) -> torch.Tensor:
        """float32[E]: the optimal return of each environment's goal / task (the subclass's `_optimal`)."""
        return torch.tensor([self._optimal(g) for g in self.goals.tolist()], dtype=torch.float32, device=self.device)

    def reset(self, goals=None) -> torch.Tensor:
        """Start a new episode in every environment (optionally with new goals; E may change)."""
        if goals is not None:
            self._set_goals(goals)
        self.t = 0
        self.states = self.start.expand(self.n_envs, 2).clone()
        self._clear()
        return self.states.clone()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply one action per environment (walls clip: a move off the grid leaves the coordinate unchanged).
        Returns fresh tensors (safe to keep across steps)."""
        if self.states is None:
            raise RuntimeError(f"{type(self).__name__}.step() before reset(): call reset() first")
        if self.t >= self.horizon:
            raise RuntimeError(f"episode is over (horizon {self.horizon} reached): call reset() first")
        actions = torch.as_tensor(actions, device=self.device)
        if actions.shape != (self.n_envs,):
            raise ValueError(f"actions must have shape [{self.n_envs}], got {tuple(actions.shape)}")
        if actions.numel() and (actions.min() < 0 or actions.max() >= N_ACTIONS):
            raise ValueError(f"actions must be integers in [0, {N_ACTIONS - 1}]")
        next_states = (self.states + self.deltas[actions.long()]).clamp_(0, self.grid_size - 1)
        paid = self._reward(next_states)
        self.states = next_states
        self.t += 1
        done = torch.full((self.n_envs,), self.t >= self.horizon, dtype=torch.bool, device=self.device)
        return next_states.clone(), paid.to(torch.float32), done


class BatchedDarkroom(GridWorld):
    """E Darkroom environments (any mix of goals) as tensors on one device; goals: LongTensor[E, 2] (or anything
    torch.as_tensor accepts), one goal cell per environment."""

    def __init__(self, goals, grid_size: int = 9, horizon: int = 20, reward_mode: str = "every_step",
                 device: str | torch.device = "cpu"):
        _check_reward_mode(reward_mode)
        self.reward_mode = reward_mode
        super().__init__(goals, grid_size, horizon, device)

    @classmethod
    def from_cfg(cls, env_cfg, goals, device: str | torch.device = "cpu") -> BatchedDarkroom:
        """Build from an `env` config node (config/env/*.yaml) or a plain dict: grid_size, horizon, reward_mode."""
        return cls(goals, grid_size=env_cfg["grid_size"], horizon=env_cfg["horizon"],
                   reward_mode=env_cfg["reward_mode"], device=device)

    def _optimal(self, goal) -> float:
        return optimal_return(goal, self.grid_size, self.horizon, self.reward_mode)

    def _clear(self) -> None:
        # 'once' mode: whether the goal has already paid out in this episode.
        self.reached = torch.zeros(self.n_envs, dtype=torch.bool, device=self.device)

    def _reward(self, next_states: torch.Tensor) -> torch.Tensor:
        at_goal = (next_states == self.goals).all(dim=-1)
        if self.reward_mode == "every_step":
            return at_goal
        paid = at_goal & ~self.reached  # 'once'
        self.reached = self.reached | at_goal
        return paid
