"""Single-environment gymnasium view of Darkroom, registered as 'Darkroom-v0'.

A thin wrapper: it owns a BatchedDarkroom with E = 1 and converts tensors to gymnasium's types, so the
dynamics exist in exactly one place (env/darkroom.py). Use it for interop with gymnasium tooling; the
project's own code steps BatchedDarkroom directly (many environments per call).

    env = gymnasium.make("Darkroom-v0", goal=(4, 2), grid_size=9, horizon=20, reward_mode="every_step")
    obs, info = env.reset(seed=0)                  # obs = np.array([x, y]) of the start cell
    obs, r, terminated, truncated, info = env.step(1)

The episode ends by time limit only, so `terminated` is always False and `truncated` becomes True at
the horizon. Goal: the `goal` constructor argument, overridden per episode by `reset(options={"goal":
(x, y)})`; with neither, a goal is drawn uniformly from all cells with the env's seeded np_random.
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from env.darkroom import N_ACTIONS, BatchedDarkroom

ENV_ID = "Darkroom-v0"


class DarkroomGymEnv(gymnasium.Env):
    metadata: ClassVar[dict] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, goal=None, grid_size: int = 9, horizon: int = 20,
                 reward_mode: str = "every_step", render_mode: str | None = None):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r} not supported: use None or 'ansi'")
        self.grid_size, self.horizon, self.reward_mode = int(grid_size), int(horizon), reward_mode
        self.render_mode = render_mode
        self._fixed_goal = None if goal is None else (int(goal[0]), int(goal[1]))
        self.observation_space = spaces.MultiDiscrete([self.grid_size, self.grid_size])
        self.action_space = spaces.Discrete(N_ACTIONS)
        # Built here (validates goal / reward_mode early); reset() re-targets it to the episode's goal.
        self._env = BatchedDarkroom([self._fixed_goal or (0, 0)], self.grid_size, self.horizon,
                                    self.reward_mode)
        self._obs: np.ndarray | None = None

    @property
    def goal(self) -> tuple[int, int]:
        return tuple(self._env.goals[0].tolist())

    def _info(self) -> dict:
        return {"goal": self.goal, "t": self._env.t}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        goal = (options or {}).get("goal", self._fixed_goal)
        if goal is None:
            goal = tuple(int(v) for v in self.np_random.integers(0, self.grid_size, size=2))
        states = self._env.reset(goals=[tuple(goal)])
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
        """'ansi': the grid as text, A = agent, G = goal (x = column, y = row)."""
        if self.render_mode != "ansi" or self._obs is None:
            return None
        gx, gy = self.goal
        rows = []
        for y in range(self.grid_size):
            row = ""
            for x in range(self.grid_size):
                row += "A" if (x, y) == tuple(self._obs) else ("G" if (x, y) == (gx, gy) else ".")
            rows.append(row)
        return "\n".join(rows) + "\n"


def register_gym_env() -> None:
    """Register 'Darkroom-v0' once (importing `env` calls this; re-imports are harmless)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="env.gym_env:DarkroomGymEnv")
