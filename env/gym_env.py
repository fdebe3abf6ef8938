"""Single-environment gymnasium views of Darkroom ('Darkroom-v0') and Dark Key-to-Door ('DarkKeyToDoor-v0'):
thin wrappers over a batched env with E = 1, so the dynamics exist in exactly one place.

    env = gymnasium.make("Darkroom-v0", goal=(4, 2), grid_size=9, horizon=20, reward_mode="every_step")
    obs, info = env.reset(seed=0)                  # obs = np.array([x, y]) of the start cell
    obs, r, terminated, truncated, info = env.step(1)

The episode ends by time limit only: `terminated` is always False, `truncated` True at the horizon. The goal
is the `goal` argument, overridden per episode by `reset(options={"goal": (x, y)})`; with neither, one is
drawn uniformly with the env's seeded np_random. 'DarkKeyToDoor-v0' takes `task=(key_x, key_y, door_x,
door_y)` (or options={"task": ...}), horizon 50 by default, and its info adds `has_key` / `door_opened`.
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from env.darkroom import N_ACTIONS, BatchedDarkroom
from env.key_to_door import BatchedKeyToDoor

ENV_ID = "Darkroom-v0"
KEY_TO_DOOR_ENV_ID = "DarkKeyToDoor-v0"


class DarkroomGymEnv(gymnasium.Env):
    metadata: ClassVar[dict] = {"render_modes": ["ansi"], "render_fps": 4}
    _batched = BatchedDarkroom  # the batched env it wraps (KeyToDoorGymEnv: BatchedKeyToDoor)
    _goal_key = "goal"  # the goal's name in info and reset's options (KeyToDoorGymEnv: "task"; "goal" also works)

    def __init__(self, goal=None, grid_size: int = 9, horizon: int = 20,
                 reward_mode: str = "every_step", render_mode: str | None = None):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r} not supported: use None or 'ansi'")
        self.grid_size, self.horizon, self.reward_mode = int(grid_size), int(horizon), reward_mode
        self.render_mode = render_mode
        self._fixed_goal = None if goal is None else tuple(int(v) for v in goal)
        self.observation_space = spaces.MultiDiscrete([self.grid_size, self.grid_size])
        self.action_space = spaces.Discrete(N_ACTIONS)
        # Built here (validates goal / reward_mode early); reset() re-targets it to the episode's goal.
        env_cfg = {"grid_size": self.grid_size, "horizon": self.horizon, "reward_mode": reward_mode}
        self._env = self._batched.from_cfg(env_cfg, [self._fixed_goal or (0,) * self._batched.goal_width])
        self._obs: np.ndarray | None = None

    @property
    def goal(self) -> tuple[int, ...]:
        return tuple(self._env.goals[0].tolist())

    def _info(self) -> dict:
        return {self._goal_key: self.goal, "t": self._env.t}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        goal = options.get(self._goal_key, options.get("goal", self._fixed_goal))
        if goal is None:
            goal = tuple(int(v) for v in self.np_random.integers(0, self.grid_size, size=self._env.goal_width))
        states = self._env.reset([tuple(goal)])
        self._obs = states[0].numpy().astype(np.int64)
        return self._obs.copy(), self._info()

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("Darkroom-v0: call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}: use an int in [0, {N_ACTIONS - 1}]")
        next_states, rewards, done = self._env.step(torch.tensor([int(action)]))
        self._obs = next_states[0].numpy().astype(np.int64)
        return self._obs.copy(), float(rewards[0]), False, bool(done[0]), self._info()

    def render(self):
        """'ansi': the grid as text (x = column, y = row), A = agent over the `_marks` of the task."""
        if self.render_mode != "ansi" or self._obs is None:
            return None
        marks = self._marks() | {tuple(self._obs): "A"}
        return "\n".join("".join(marks.get((x, y), ".") for x in range(self.grid_size))
                         for y in range(self.grid_size)) + "\n"

    def _marks(self) -> dict:
        return {self.goal: "G"}


class KeyToDoorGymEnv(DarkroomGymEnv):
    """'DarkKeyToDoor-v0': DarkroomGymEnv's wrapper over a BatchedKeyToDoor (E = 1); the goal is the task
    (key_x, key_y, door_x, door_y), given as `task=` (or `goal=`) and per episode as options={"task": ...}."""

    _batched = BatchedKeyToDoor
    _goal_key = "task"

    def __init__(self, task=None, grid_size: int = 9, horizon: int = 50, render_mode: str | None = None,
                 goal=None):
        super().__init__(goal=task if task is not None else goal, grid_size=grid_size, horizon=horizon,
                         reward_mode="key_to_door", render_mode=render_mode)

    def _info(self) -> dict:
        return super()._info() | {"has_key": bool(self._env.has_key[0]), "door_opened": bool(self._env.door_opened[0])}

    def _marks(self) -> dict:  # K = key (until held), D = door
        kx, ky, dx, dy = self.goal
        return {(dx, dy): "D"} | ({} if self._env.has_key[0] else {(kx, ky): "K"})


def register_gym_env() -> None:
    """Register 'Darkroom-v0' and 'DarkKeyToDoor-v0' once (importing `env` calls this; re-imports are
    harmless)."""
    for env_id, cls in ((ENV_ID, DarkroomGymEnv), (KEY_TO_DOOR_ENV_ID, KeyToDoorGymEnv)):
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=f"env.gym_env:{cls.__name__}")
