"""Darkroom dynamics (env/darkroom.py) and its gymnasium view (env/gym_env.py).

The expected values come from small independent references written here (a per-cell move rule, a
dynamic-programming optimum, the DICP split procedure verbatim), not from the code under test.
"""

from __future__ import annotations

import random
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hydra import compose, initialize_config_dir

import env as env_pkg
from env import BatchedDarkroom, goal_split, optimal_return

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")
MOVES = {0: (0, 0), 1: (1, 0), 2: (-1, 0), 3: (0, 1), 4: (0, -1)}  # the action table of docs/design.md §3


def ref_move(x, y, a, G):
    """Reference rule: move by the action's delta, a move off the grid leaves that coordinate alone."""
    dx, dy = MOVES[a]
    nx, ny = x + dx, y + dy
    return (nx if 0 <= nx < G else x, ny if 0 <= ny < G else y)


def env_cfg(name="darkroom"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("collect", overrides=[f"env={name}"]).env


# -- dynamics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("G", [9, 4])
def test_every_cell_and_action_matches_reference(G):
    """All G*G cells x 5 actions in one batched step: next state (walls clip) and reward."""
    cells = [(x, y) for x in range(G) for y in range(G)]
    pairs = [(c, a) for c in cells for a in range(5)]
    goal = (G - 1, 0)
    e = BatchedDarkroom([goal] * len(pairs), grid_size=G, horizon=3)
    e.reset()
    e.states = torch.tensor([c for c, _ in pairs])  # place each env on its cell (public attribute)
    ns, r, done = e.step(torch.tensor([a for _, a in pairs]))
    assert ns.dtype == torch.long and r.dtype == torch.float32 and done.dtype == torch.bool
    for i, ((x, y), a) in enumerate(pairs):
        want = ref_move(x, y, a, G)
        assert tuple(ns[i].tolist()) == want, ((x, y), a)
        assert r[i].item() == float(want == goal)
    assert not done.any()


def test_walls_clip_at_corners_and_stay_stays():
    e = BatchedDarkroom([(4, 4)] * 8, grid_size=9)
    e.reset()
    e.states = torch.tensor([[0, 0], [0, 0], [8, 8], [8, 8], [0, 8], [8, 0], [3, 5], [0, 4]])
    ns, _, _ = e.step(torch.tensor([2, 4, 1, 3, 3, 1, 0, 0]))
    assert ns.tolist() == [[0, 0], [0, 0], [8, 8], [8, 8], [0, 8], [8, 0], [3, 5], [0, 4]]


def test_reset_starts_at_centre_and_each_action_from_there():
    e = BatchedDarkroom([(0, 0)] * 5, grid_size=9)
    s = e.reset()
    assert s.tolist() == [[4, 4]] * 5 and e.t == 0
    ns, _, _ = e.step(torch.arange(5))
    assert ns.tolist() == [[4, 4], [5, 4], [3, 4], [4, 5], [4, 3]]


def test_reward_every_step_is_paid_on_arrival_and_while_staying():
    e = BatchedDarkroom([(4, 2)], grid_size=9, horizon=20, reward_mode="every_step")
    e.reset()
    rewards = [e.step(torch.tensor([a]))[1].item() for a in [4, 4, 0, 0, 3, 4, 1]]
    # (4,3) (4,2)=goal stay stay (4,3) (4,2)=goal (5,2)
    assert rewards == [0, 1, 1, 1, 0, 1, 0]


def test_reward_once_pays_only_first_arrival_per_episode():
    e = BatchedDarkroom([(4, 2), (4, 4)], grid_size=9, horizon=6, reward_mode="once")
    e.reset()
    got = [e.step(torch.tensor([a, 0]))[1].tolist() for a in [4, 4, 0, 3, 4, 0]]
    # env 0: arrives at step 2, stays, leaves, comes back: paid once. env 1: goal = start, stays: paid at step 1.
    assert [g[0] for g in got] == [0, 1, 0, 0, 0, 0]
    assert [g[1] for g in got] == [1, 0, 0, 0, 0, 0]
    e.reset()  # a new episode pays again
    assert e.step(torch.tensor([4, 0]))[1].tolist() == [0, 1]
    assert e.step(torch.tensor([4, 0]))[1].tolist() == [1, 0]


def test_horizon_done_and_reset():
    H = 5
    e = BatchedDarkroom([(0, 0), (8, 8), (4, 4)], grid_size=9, horizon=H)
    with pytest.raises(RuntimeError, match="reset"):
        e.step(torch.zeros(3, dtype=torch.long))
    e.reset()
    for t in range(1, H + 1):
        ns, _, done = e.step(torch.tensor([2, 1, 3]))
        assert done.tolist() == [t == H] * 3 and e.t == t
    assert ns.tolist() == [[0, 4], [8, 4], [4, 8]]  # clipped at the walls on the way
    with pytest.raises(RuntimeError, match="horizon 5 reached"):
        e.step(torch.zeros(3, dtype=torch.long))
    assert e.reset().tolist() == [[4, 4]] * 3 and e.t == 0
    assert not e.step(torch.zeros(3, dtype=torch.long))[2].any()


def test_mixed_goals_and_returned_tensors_are_independent():
    e = BatchedDarkroom([(4, 5), (5, 4), (4, 3)], grid_size=9)
    s0 = e.reset()
    ns, r, _ = e.step(torch.tensor([3, 1, 1]))
    assert r.tolist() == [1.0, 1.0, 0.0]
    ns_copy = ns.clone()
    e.step(torch.tensor([1, 1, 1]))
    assert torch.equal(ns, ns_copy) and s0.tolist() == [[4, 4]] * 3  # no aliasing of internal state


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="reward_mode"):
        BatchedDarkroom([(0, 0)], reward_mode="sometimes")
    with pytest.raises(ValueError, match=r"goals must lie in \[0, 8\]"):
        BatchedDarkroom([(9, 0)])
    with pytest.raises(ValueError, match="shape"):
        BatchedDarkroom([1, 2, 3])
    e = BatchedDarkroom([(0, 0), (1, 1)])
    e.reset()
    with pytest.raises(ValueError, match=r"actions must be integers in \[0, 4\]"):
        e.step(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        e.step(torch.tensor([0]))


def test_from_cfg_reads_the_env_configs():
    e = BatchedDarkroom.from_cfg(env_cfg("darkroom"), [(1, 1)])
    assert (e.grid_size, e.horizon, e.reward_mode, e.n_actions) == (9, 20, "every_step", 5)
    h = BatchedDarkroom.from_cfg(env_cfg("darkroom_hard"), [(1, 1)])
    assert (h.grid_size, h.horizon, h.reward_mode) == (17, 50, "once")
    assert h.reset().tolist() == [[8, 8]]


# -- optimal return ----------------------------------------------------------------------------------------

def dp_optimal_every_step(goal, G, H):
    """Max return over all action sequences by backward dynamic programming over (t, cell):
    V_t(c) = max_a [1(next(c, a) = goal) + V_{t+1}(next(c, a))], with next() the reference rule."""
    nxt = np.array([[[ref_move(x, y, a, G) for a in range(5)] for y in range(G)] for x in range(G)])
    nx, ny = nxt[..., 0], nxt[..., 1]                       # [G, G, 5] successor cells
    pay = ((nx == goal[0]) & (ny == goal[1])).astype(float)
    V = np.zeros((G, G))
    for _ in range(H):
        V = (pay + V[nx, ny]).max(axis=-1)
    return V[G // 2, G // 2]


@pytest.mark.parametrize("G,H", [(9, 20), (5, 3), (4, 6)])
def test_optimal_return_equals_dynamic_programming(G, H):
    for goal in [(x, y) for x in range(G) for y in range(G)]:
        assert optimal_return(goal, G, H, "every_step") == dp_optimal_every_step(goal, G, H), goal


def test_optimal_return_formula_and_once_mode():
    assert optimal_return((4, 4)) == 20 and optimal_return((5, 4)) == 20  # m = 0 and m = 1 -> H
    assert optimal_return((0, 0)) == 13 and optimal_return((8, 0)) == 13  # m = 8 -> 21 - 8
    assert optimal_return((0, 0), 9, 5) == 0.0                             # out of reach
    assert optimal_return((0, 0), 9, 20, "once") == 1.0
    assert optimal_return((0, 0), 9, 7, "once") == 0.0
    assert optimal_return((0, 0), 17, 50, "once") == 1.0


def test_optimal_return_is_achieved_in_the_env():
    """Walk straight to the goal then stay: the env pays exactly optimal_return, for every goal."""
    G, H = 9, 20
    goals = [(x, y) for x in range(G) for y in range(G)]
    for mode in ("every_step", "once"):
        e = BatchedDarkroom(goals, grid_size=G, horizon=H, reward_mode=mode)
        s = e.reset()
        total = torch.zeros(len(goals))
        g = torch.tensor(goals)
        for _ in range(H):
            a = torch.where(s[:, 0] < g[:, 0], 1, torch.where(s[:, 0] > g[:, 0], 2,
                            torch.where(s[:, 1] < g[:, 1], 3, torch.where(s[:, 1] > g[:, 1], 4, 0))))
            s, r, _ = e.step(a)
            total += r
        want = torch.tensor([optimal_return(q, G, H, mode) for q in goals])
        assert torch.equal(total, want) and torch.equal(e.optimal_returns(), want)


# -- goal split --------------------------------------------------------------------------------------------

def test_goal_split_is_dicp_compatible():
    train, test = goal_split(9, 0.9, 0)
    assert test == [(4, 2), (5, 6), (6, 8), (7, 2), (3, 6), (0, 5), (5, 8), (5, 4)]
    assert len(train) == 73 and set(train) | set(test) == {(i, j) for i in range(9) for j in range(9)}
    assert not set(train) & set(test)
    assert sum(optimal_return(g) for g in test) / len(test) == 17.25


def test_goal_split_matches_global_random_procedure_and_leaves_global_rng_alone():
    for G, frac, seed in [(9, 0.9, 0), (17, 0.9, 0), (9, 0.5, 3)]:
        goals = [(i, j) for i in range(G) for j in range(G)]
        state = random.getstate()
        random.seed(seed)
        random.shuffle(goals)
        random.setstate(state)
        n = round(G * G * frac)
        before = random.random()
        random.setstate(state)
        assert goal_split(G, frac, seed) == (goals[:n], goals[n:])
        assert random.random() == before  # goal_split did not consume the global RNG
    train, test = goal_split(17)
    assert (len(train), len(test)) == (260, 29)


# -- gymnasium view ----------------------------------------------------------------------------------------

def test_gym_env_is_registered_and_passes_gymnasium_checker():
    assert env_pkg.ENV_ID in gymnasium.registry
    e = gymnasium.make("Darkroom-v0", goal=(2, 3))
    check_env(e.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("mode,G,H", [("every_step", 9, 20), ("once", 17, 50)])
def test_gym_view_agrees_with_batched_env_step_for_step(mode, G, H):
    rng = np.random.default_rng(0)
    paid = 0.0
    for goal in [(4, 2), (0, 0), (G - 1, G // 2)]:
        gym_env = gymnasium.make("Darkroom-v0", goal=goal, grid_size=G, horizon=H, reward_mode=mode)
        ref = BatchedDarkroom([goal], grid_size=G, horizon=H, reward_mode=mode)
        for episode in range(3):
            obs, info = gym_env.reset(seed=episode)
            s = ref.reset()
            assert obs.tolist() == s[0].tolist() and info["goal"] == goal
            for t in range(H):
                # biased toward the goal so rewards actually occur
                a = int(rng.integers(5)) if rng.random() < 0.5 else (1 if obs[0] < goal[0] else 3)
                obs, r, terminated, truncated, info = gym_env.step(a)
                s, rr, done = ref.step(torch.tensor([a]))
                assert gym_env.observation_space.contains(obs)
                assert obs.tolist() == s[0].tolist() and r == rr.item()
                assert terminated is False and truncated == bool(done[0]) == (t == H - 1)
                assert info["t"] == t + 1
                paid += r
    assert paid > 0  # the comparison covered rewarded steps too


def test_gym_goal_from_options_or_seeded_sampling():
    e = gymnasium.make("Darkroom-v0", goal=(1, 1))
    e.reset(options={"goal": (4, 5)})
    assert e.step(3)[1] == 1.0 and e.unwrapped.goal == (4, 5)
    free = gymnasium.make("Darkroom-v0")  # no goal: drawn from np_random, reproducible with the seed
    goals = [free.reset(seed=s)[1]["goal"] for s in (7, 7, 8)]
    assert goals[0] == goals[1] and all(0 <= c < 9 for g in goals for c in g)
    with pytest.raises(ValueError, match="invalid action"):
        e.step(7)


def test_gym_view_wraps_the_batched_env_not_a_copy_of_its_logic():
    e = gymnasium.make("Darkroom-v0", goal=(0, 0), render_mode="ansi")
    assert isinstance(e.unwrapped._env, BatchedDarkroom)
    e.reset()
    text = e.render()
    assert text.count("A") == 1 and text.count("G") == 1 and len(text.splitlines()) == 9


def test_validation_goals_are_carved_from_the_train_goals():
    from env import goal_splits, goal_splits_from_cfg

    train, test = goal_split(9, 0.9, 0)
    s = goal_splits(9, 0.9, 0, n_val_goals=5)
    assert s["test"] == test                                   # DICP's test goals are untouched
    assert s["train"] + s["val"] == train and len(s["val"]) == 5
    assert not set(s["val"]) & set(s["train"]) and not set(s["val"]) & set(test)
    assert goal_splits(9, 0.9, 0, 0) == {"train": train, "val": [], "test": test}
    assert goal_splits(9, 0.9, 1, 5)["val"] != s["val"]        # the split seed moves the validation goals too
    # a run config from before the validation split (no n_val_goals) has none
    assert goal_splits_from_cfg({"grid_size": 9, "train_frac": 0.9, "split_seed": 0})["val"] == []
    with pytest.raises(ValueError, match="n_val_goals=73 must be in"):
        goal_splits(9, 0.9, 0, 73)
