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
