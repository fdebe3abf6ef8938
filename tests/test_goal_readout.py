"""goal_readout.py: reading the goal cell linearly from the latents the rollout schedule builds."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import goal_readout
from histories import load_histories
from transition import NEXT_STATE, REWARD


class RewardedCellMemory:
    """A stand-in model whose 'latents' after each fold of seg_len steps hold (found?, the last rewarded
    cell): a perfect goal memory after the first find, nothing before it."""

    encoder = object()  # has compressed memory
    training = False

    def __init__(self, seg_len):
        self.seg_len = seg_len

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def init_rollout(self, n, device, use_cache=True):
        return SimpleNamespace(n=0, n_compressions=0, latents=None, mem=torch.zeros(n, 1, 3))

    def observe(self, st, trans):
        hit = trans[:, REWARD] > 0
        st.mem[hit, 0, 0] = 1.0
        st.mem[hit, 0, 1:] = trans[hit][:, NEXT_STATE].float()
        st.n += 1
        if st.n % self.seg_len == 0:
            st.latents = st.mem.clone()
            st.n_compressions += 1


def test_a_memory_that_holds_the_goal_is_read_after_the_find_and_not_before(tiny):
    hist = load_histories(tiny.data_path, tiny.compose("train").env)
    rep = goal_readout.report(RewardedCellMemory(20), hist, grid_size=9, device="cpu")
    for split in ("val", "test"):
        r = rep[split]
        # after the first find the rewarded cell IS the goal: read exactly, far above the constant guess
        assert r["after_find"]["acc"] == 1.0 and r["after_find"]["mae"] < 0.01  # ridge shrinkage only
        assert r["constant_after_find"]["acc"] < 0.5
        # before it the memory is empty: the readout is the constant (the intercept)
        assert r["before_find"]["acc"] == pytest.approx(r["constant_before_find"]["acc"], abs=0.05)
        n_hist = len(hist.split_indices(split))
        assert r["after_find"]["n"] + r["before_find"]["n"] == n_hist * (hist.n_steps // 20)
    assert rep["n_features"] == 3 and rep["ridge_lambda"] in goal_readout.LAMBDAS


def test_first_find_counts_the_transitions_up_to_the_first_reward():
    trans = np.zeros((3, 5, 6), np.uint8)
    trans[0, 2, REWARD] = 1
    trans[1, 0, REWARD] = 1
    assert goal_readout.first_find(trans).tolist() == [3, 1, 6]


def test_real_model_latents_follow_the_rollout_schedule(tiny, one_thread):
    from model import build_model

    cfg = tiny.compose("train")
    hist = load_histories(tiny.data_path, cfg.env)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.env)
    idx = hist.split_indices("test")[:3]
    lat, steps = goal_readout.fold_latents(model, hist.transitions(idx), "cpu")
    s = int(cfg.model.seg_len)
    assert steps.tolist() == list(range(s, hist.n_steps + 1, s))
    assert lat.shape == (3, len(steps), cfg.model.n_latent * cfg.model.d_model)
    # the first fold's latents equal the model's own rollout state (eval mode) after seg_len observed steps
    model.eval()
    st = model.init_rollout(3, "cpu", use_cache=False)
    x = torch.as_tensor(hist.transitions(idx)).long()
    for t in range(s):
        model.observe(st, x[:, t])
    assert np.allclose(lat[:, 0], st.latents.flatten(1).numpy(), atol=1e-6)
    ad = build_model(tiny.compose("train", "model=ad_dr", "model.context_len=20").model, cfg.env)
    assert goal_readout.report(ad, hist, 9, "cpu") is None  # AD has no latents to read


@pytest.mark.slow
def test_train_writes_the_goal_readout_to_done_json(tiny, tmp_path, one_thread):
    import train

    train.main(tiny.compose("train", run_dir=tmp_path / "run", max_steps=2))
    gr = json.loads((tmp_path / "run" / "done.json").read_text())["goal_readout"]
    for split in ("val", "test"):
        assert set(gr[split]) == {"after_find", "before_find", "constant_after_find", "constant_before_find"}
        assert 0.0 <= gr[split]["after_find"]["acc"] <= 1.0


def test_the_nth_reward_of_an_episode_reveals_the_nth_cell():
    trans = np.zeros((2, 8, 6), np.uint8)  # episodes of 4 steps
    trans[0, [1, 5, 6], REWARD] = 1        # ep 0: one reward (key); ep 1: key at 5, door at 6
    trans[1, [0, 3], REWARD] = 1           # ep 0: key at 0, door at 3
    assert goal_readout.first_find(trans, 4, 1).tolist() == [2, 1]
    assert goal_readout.first_find(trans, 4, 2).tolist() == [7, 4]
    with pytest.raises(ValueError, match="whole number"):
        goal_readout.first_find(trans, 3, 2)


class KeyDoorMemory(RewardedCellMemory):
    """Latents after each fold: (key found?, key cell, door found?, door cell), the key being an episode's
    first rewarded cell and the door its second."""

    def __init__(self, seg_len, horizon):
        super().__init__(seg_len)
        self.horizon = horizon

    def init_rollout(self, n, device, use_cache=True):
        st = super().init_rollout(n, device, use_cache)
        st.mem, st.rank = torch.zeros(n, 1, 6), torch.zeros(n, dtype=torch.long)
        return st

    def observe(self, st, trans):
        if st.n % self.horizon == 0:
            st.rank[:] = 0
        hit = trans[:, REWARD] > 0
        st.rank += hit.long()
        for slot, rank in ((0, 1), (3, 2)):
            m = hit & (st.rank == rank)
            st.mem[m, 0, slot] = 1.0
            st.mem[m, 0, slot + 1:slot + 3] = trans[m][:, NEXT_STATE].float()
        st.n += 1
        if st.n % self.seg_len == 0:
            st.latents = st.mem.clone()
            st.n_compressions += 1


def key_door_histories(n_per_split=30, horizon=10, n_episodes=4, seed=0):
    """Synthetic Key-to-Door histories: each episode of a history pays at its key (step 2 or later of the
    episode) and, from episode 1 on, at its door a few steps later."""
    rng = np.random.default_rng(seed)
    n, t = 3 * n_per_split, horizon * n_episodes
    goals = rng.integers(0, 9, (n, 4))
    trans = rng.integers(0, 9, (n, t, 6)).astype(np.uint8)
    trans[..., REWARD] = 0
    for i in range(n):
        for e in range(n_episodes):
            k = e * horizon + int(rng.integers(2, 5))
            trans[i, k, REWARD], trans[i, k, 4:6] = 1, goals[i, :2]
            if e:
                d = k + int(rng.integers(1, 4))
                trans[i, d, REWARD], trans[i, d, 4:6] = 1, goals[i, 2:]
    ranges = {s: np.arange(j * n_per_split, (j + 1) * n_per_split) for j, s in enumerate(("train", "val", "test"))}
    return SimpleNamespace(goals=goals, meta={"env": {"horizon": horizon}}, n_steps=t,
                           split_indices=lambda s, at_most=None: ranges[s][:at_most], transitions=lambda idx: trans[idx])


def test_key_to_door_reads_the_key_after_the_first_reward_and_the_door_after_the_second():
    hist = key_door_histories()
    rep = goal_readout.report(KeyDoorMemory(5, 10), hist, grid_size=9, device="cpu")
    assert rep["target"] == "key" and rep["door"]["target"] == "door"
    for split in ("val", "test"):
        key, door = rep[split], rep["door"][split]
        # (ridge shrinkage: the door's readout must also undo the empty slot of the folds before it opened)
        assert key["after_find"]["acc"] == 1.0 and door["after_find"]["acc"] > 0.9
        # the key pays in episode 0 (steps 2-4): only the first fold (steps 1-5) can precede it; the door
        # first pays in episode 1 (steps 13-17): the first three folds precede it
        assert key["before_find"]["n"] <= 30 and door["before_find"]["n"] >= 2 * 30
        assert door["before_find"]["acc"] < 0.5 and door["constant_after_find"]["acc"] < 0.5
        assert key["after_find"]["n"] + key["before_find"]["n"] == 30 * 8
