"""rollout.py: rollout wiring (an oracle reaches the optimal return), determinism and RNG isolation, and
constant memory for CompressedAD and AD over long rollouts."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from env import goal_split, optimal_return
from metrics import summarize
from model import build_model
from rollout import incontext_rollout

ENV = {"name": "darkroom", "grid_size": 9, "horizon": 20, "n_actions": 5, "reward_mode": "every_step",
       "train_frac": 0.9, "split_seed": 0}
TINY = {"name": "ad_compressed", "d_model": 32, "n_head": 2, "n_layer": 1, "enc_n_layer": 1, "n_latent": 2,
        "seg_len": 8, "context_len": 8, "dropout": 0.0, "recon_n_layer": 1, "max_compression_depth": 2,
        "aux_recon_weight": 0.0}
TEST_GOALS = goal_split(9)[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # Rollouts are thousands of tiny ops; on a busy 2-core box intra-op threads make each one ~100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(name="ad_compressed"):
    torch.manual_seed(0)
    return build_model(OmegaConf.create({**TINY, "name": name}), OmegaConf.create(ENV))


class Oracle:
    """Knows every env's goal (goal-major layout, as incontext_rollout builds it) and walks straight to it;
    also checks that each observed transition is the step just taken from the state just shown."""

    def __init__(self, goals, seeds_per_goal, once=False):
        self.goals = torch.tensor(goals).repeat_interleave(seeds_per_goal, 0)
        self.once = once  # 'once' reward mode: staying on the goal stops paying

    def init_rollout(self, n_envs, device, use_cache=True):
        assert n_envs == len(self.goals)
        return {"last": None}

    def act(self, st, states):
        d = self.goals - states
        a = torch.zeros(len(states), dtype=torch.long)
        a[d[:, 1] < 0], a[d[:, 1] > 0] = 4, 3
        a[d[:, 0] < 0], a[d[:, 0] > 0] = 2, 1  # x first, then y, then stay on the goal
        logits = torch.full((len(states), 5), float("-inf"))
        logits[torch.arange(len(states)), a] = 0.0  # probability exactly 1 even when sampling
        st["last"] = (states.clone(), a)
        return logits

    def observe(self, st, trans):
        states, a = st["last"]
        assert torch.equal(trans[:, 0:2], states) and torch.equal(trans[:, 2], a)
        at_goal = (trans[:, 4:6] == self.goals).all(-1).long()
        assert (trans[:, 3] <= at_goal).all() if self.once else torch.equal(trans[:, 3], at_goal)


class MemorySpy:
    """Delegates to a real model and records the size of its rollout state after every observe."""

    def __init__(self, model):
        self.model, self.cfg, self.sizes = model, model.cfg, []

    def init_rollout(self, n_envs, device, use_cache=True):
        self.st = self.model.init_rollout(n_envs, device, use_cache=use_cache)
        return self.st

    def act(self, st, states):
        return self.model.act(st, states)

    def observe(self, st, trans):
        self.model.observe(st, trans)
        cache_len = 0 if st.cache is None else st.cache[0][0].shape[2]
        self.sizes.append((tuple(st.buffer.shape), cache_len))


@pytest.mark.parametrize("sample", [True, False])
def test_oracle_reaches_optimal_return(sample):
    goals = TEST_GOALS + [(0, 0), (8, 8), (4, 4)]
    out = incontext_rollout(Oracle(goals, 2), ENV, goals, n_episodes=3, seeds_per_goal=2,
                                     device="cpu", seed=0, sample=sample)
    assert out["returns"].shape == (len(goals), 2, 3)
    expect = np.array([optimal_return(g, 9, 20) for g in goals])
    np.testing.assert_array_equal(out["optimal"], expect)
    np.testing.assert_array_equal(out["returns"], np.broadcast_to(expect[:, None, None], (len(goals), 2, 3)))
    s = summarize(out["returns"], out["optimal"], horizon=20)
    assert s["last_k_normalized"] == pytest.approx(1.0)


def test_oracle_sparse_reward_env():
    env = {**ENV, "grid_size": 17, "horizon": 50, "reward_mode": "once"}
    goals = [(0, 0), (16, 16), (8, 8), (3, 12)]
    out = incontext_rollout(Oracle(goals, 1, once=True), env, goals, 2, 1, "cpu", seed=0)
    np.testing.assert_array_equal(out["returns"], 1.0)


def test_rollout_shapes_determinism_and_rng_isolation():
    model = tiny_model()
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run = lambda seed: incontext_rollout(model, ENV, TEST_GOALS[:3], 2, 2, "cpu", seed=seed)["returns"]
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 2, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "a different seed should draw different actions"
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must not be consumed"
    assert model.training, "the caller's train mode must be restored"


def test_greedy_rollout_seeds_are_identical():
    out = incontext_rollout(tiny_model(), ENV, TEST_GOALS[:2], 2, 3, "cpu", seed=0, sample=False)
    r = out["returns"]
    assert (r == r[:, :1]).all()


@pytest.mark.parametrize("name", ["ad_compressed", "ad"])
def test_long_rollout_constant_memory(name):
    spy = MemorySpy(tiny_model(name).eval())
    out = incontext_rollout(spy, ENV, TEST_GOALS[:2], n_episodes=30, seeds_per_goal=2, device="cpu",
                                     seed=0)
    assert np.isfinite(out["returns"]).all() and out["returns"].shape == (2, 2, 30)
    assert len(spy.sizes) == 30 * 20
    assert len({s for s, _ in spy.sizes}) == 1, "the raw buffer must not grow with the history"
    if name == "ad_compressed":
        assert spy.st.n_compressions == 30 * 20 // TINY["seg_len"]
        assert max(c for _, c in spy.sizes) <= TINY["n_latent"] + TINY["seg_len"]


def test_eval_goals_max_heldout_goals_keeps_the_first_test_and_val_goals():
    """max_heldout_goals cuts the test and val splits to their first goals (the splits are already in a seeded
    random order) and leaves the train sample alone; null keeps every goal."""
    from env import splits_from_cfg
    from rollout import eval_goals

    dktd = {"name": "dark_key_to_door", "grid_size": 9, "horizon": 50, "n_actions": 5,
            "reward_mode": "key_to_door", "train_frac": 0.95, "split_seed": 4, "n_val_goals": 32,
            "max_train_tasks": 200}
    full = splits_from_cfg(dktd)
    assert len(full["test"]) == 328 and len(full["val"]) == 32
    every = eval_goals(dktd, 3, seed=0)
    cut = eval_goals(dktd, 3, seed=0, max_heldout_goals=16)
    assert [list(g) for g in every["test"]] == [list(g) for g in full["test"]]
    assert [list(g) for g in cut["test"]] == [list(g) for g in full["test"][:16]]
    assert [list(g) for g in cut["val"]] == [list(g) for g in full["val"][:16]]
    assert [list(g) for g in cut["train"]] == [list(g) for g in every["train"]] and len(cut["train"]) == 3
