"""Stage-1/2 samplers (dataset.py, dataset_pretrain.py) on small synthetic histories.

The synthetic transitions encode where they come from, so tests can check every gathered value
against the source: (sx, sy) = (t % 256, t // 256) and (nsx, nsy) the same for t+1, a = history id,
r = (t + history id) % 256 (an extra value that must line up too). The fast-step paths are compared with the plain
ones they replace: static-shape batches hold the same samples, and the device-side gather equals the host's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dataset import HistoryBatches, batch_loader, collate, data_device, spec_items
from dataset_pretrain import PretrainBatches
from histories import FORMAT_VERSION, Histories, load_histories, save_histories
from model.losses import lengths_mask
from transition import ACTION, NSX, NSY, REWARD, SX, SY

N_HIST, T = 24, 600          # 24 histories: 0..17 'train', 18..23 'test'
N_TEST = 6
TEST_IDS = np.arange(N_HIST - N_TEST, N_HIST)


def make_histories(n=N_HIST, t_len=T, n_test=N_TEST):
    """In-memory histories.Histories; the last n_test histories are the 'test' split (as on disk)."""
    t = np.arange(t_len)
    i = np.arange(n)[:, None]
    states = np.stack(np.broadcast_arrays(t % 256, t // 256), -1)[None].repeat(n, 0).astype(np.uint8)
    next_states = np.stack([(t + 1) % 256, (t + 1) // 256], -1)[None].repeat(n, 0).astype(np.uint8)
    actions = np.broadcast_to(i, (n, t_len)).astype(np.uint8)
    rewards = ((t[None] + i) % 256).astype(np.uint8)
    meta = {"histories": {"train": {"start": 0, "stop": n - n_test}, "val": {"start": n - n_test, "stop": n - n_test},
                          "test": {"start": n - n_test, "stop": n}}}
    return Histories(path=Path("synthetic"), states=states, actions=actions, rewards=rewards,
                     next_states=next_states, goals=np.zeros((n, 2), np.uint8), meta=meta)


@pytest.fixture(scope="module")
def hist():
    return make_histories()


def stage2(hist, **kw):
    args = {"split": "train", "batch_size": 64, "seg_len": 40, "min_seg_len": 10, "max_depth": 3,
            "depth_weights": [1, 2, 3, 4], "win_len_min": 5, "win_len_max": 40, "seed": 0}
    args.update(kw)
    return HistoryBatches(hist, **args)


def decode(trans):
    """[..., 6] long -> (time index of the state, time index of the next state, history id, reward)."""
    t = trans[..., SX] + 256 * trans[..., SY]
    nt = trans[..., NSX] + 256 * trans[..., NSY]
    return t, nt, trans[..., ACTION], trans[..., REWARD]


# -- format -------------------------------------------------------------------------------------------

def test_shapes_dtypes_and_right_alignment(hist):
    ds = stage2(hist)
    b = ds[0]
    assert set(b) == {"seg", "seg_len", "win", "win_len", "depth"}
    B, D, S, F = b["seg"].shape
    assert (B, S, F) == (64, 40, 6) and D == b["depth"].max().item() == 3
    assert b["seg_len"].shape == (B, D) and b["win"].shape == (B, b["win_len"].max().item(), 6)
    assert all(v.dtype == torch.long for v in b.values())
    for i in range(B):
        d = b["depth"][i].item()
        assert (b["seg_len"][i, :D - d] == 0).all() and (b["seg_len"][i, D - d:] > 0).all()


def test_lengths_within_ranges(hist):
    ds = stage2(hist)
    for k in range(5):
        b = ds[k]
        used = b["seg_len"] > 0                            # slot used <=> length > 0
        assert ((b["seg_len"][used] >= 10) & (b["seg_len"][used] <= 40)).all()
        assert ((b["win_len"] >= 5) & (b["win_len"] <= 40)).all()
        assert torch.equal(used.sum(1), b["depth"])


def test_default_window_is_full_seg_len(hist):
    ds = stage2(hist, win_len_min=None, win_len_max=None, depth_weights=None)
    b = ds[3]
    assert (b["win_len"] == 40).all() and b["win"].shape[1] == 40
    assert ds.depth_weights == [1, 2, 3, 4]


def test_padding_is_zero(hist):
    b = stage2(hist)[1]
    # The masks the losses use (model/losses.py): what they leave out must be exactly the zero padding.
    seg_pad = ~lengths_mask(b["seg_len"], b["seg"].shape[2])
    win_pad = ~lengths_mask(b["win_len"], b["win"].shape[1])
    assert seg_pad.any() and win_pad.any()
    assert (b["seg"][seg_pad] == 0).all() and (b["win"][win_pad] == 0).all()


def test_transitions_are_consecutive_in_one_history(hist):
    ds = stage2(hist)
    for k in range(4):
        b = ds[k]
        for i in range(b["depth"].shape[0]):
            d = b["depth"][i].item()
            D = b["seg"].shape[1]
            parts = [b["seg"][i, j, :b["seg_len"][i, j]] for j in range(D - d, D)]
            parts.append(b["win"][i, :b["win_len"][i]])
            run = torch.cat(parts)                          # oldest segment ... window
            t, nt, h, r = decode(run)
            assert (h == h[0]).all() and h[0].item() in set(range(18))     # one train history
            assert torch.equal(t, torch.arange(t[0].item(), t[0].item() + len(run)))
            assert torch.equal(nt, t + 1) and torch.equal(r, (t + h) % 256)
            assert 0 <= t[0] and t[-1] < T


def test_split_only_uses_its_histories(hist):
    b = stage2(hist, split="test")[0]
    assert set(b["win"][:, 0, 2].tolist()) <= set(TEST_IDS.tolist())


def test_depth_frequencies_follow_weights(hist):
    ds = stage2(hist, batch_size=128, depth_weights=[1, 2, 3, 4])
    depths = torch.cat([ds[k]["depth"] for k in range(40)]).numpy()     # 5,120 samples
    counts = np.bincount(depths, minlength=4)
    expected = len(depths) * np.array([1, 2, 3, 4]) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3, (counts, expected)                             # p = 0.001 at 3 dof


def test_ad_baseline_depth_zero_fixed_window(hist):
    ds = stage2(hist, max_depth=0, depth_weights=None, win_len_min=60, win_len_max=60)
    b = ds[0]
    assert b["seg"].shape == (64, 0, 40, 6) and b["seg_len"].shape == (64, 0)
    assert (b["depth"] == 0).all() and b["win"].shape == (64, 60, 6) and (b["win_len"] == 60).all()


# -- determinism, distribution, reference path ----------------------------------------------------------

def test_deterministic_and_batch_dependent(hist):
    a, a2, c = stage2(hist)[7], stage2(hist)[7], stage2(hist)[8]
    assert all(torch.equal(a[key], a2[key]) for key in a)
    assert not torch.equal(a["depth"], c["depth"]) and not torch.equal(a["win_len"], c["win_len"])
    other_seed = stage2(hist, seed=1)[7]
    assert not torch.equal(a["depth"], other_seed["depth"])


def test_rank_slices_concatenate_to_global_batch(hist):
    full = stage2(hist)[5]
    parts = [stage2(hist, rank=r, world_size=2)[5] for r in range(2)]
    assert parts[0]["depth"].shape == (32,)
    for key in full:
        assert torch.equal(torch.cat([p[key] for p in parts]), full[key]), key


@pytest.mark.parametrize("make", [lambda h: stage2(h), lambda h: stage2(h, rank=1, world_size=2),
                                  lambda h: PretrainBatches(h, "train", 32, 40, 10, seed=3)])
def test_vectorised_equals_collate_of_same_specs(hist, make):
    ds = make(hist)
    for k in range(3):
        fast, ref = ds[k], ds.collate_items(k)
        assert fast.keys() == ref.keys()
        for key in fast:
            assert torch.equal(fast[key], ref[key]), key


def test_collate_default_padding_is_batch_max():
    rng = np.random.default_rng(0)
    samples = [{"seg": [rng.integers(1, 9, (n, 6)) for n in ns], "win": rng.integers(1, 9, (w, 6))}
               for ns, w in [([3], 4), ([], 2), ([5, 2], 7)]]
    b = collate(samples)
    assert b["seg"].shape == (3, 2, 5, 6) and b["win"].shape == (3, 7, 6)
    assert b["seg_len"].tolist() == [[0, 3], [0, 0], [5, 2]] and b["depth"].tolist() == [1, 0, 2]
    assert torch.equal(b["seg"][2, 1, :2], torch.as_tensor(samples[2]["seg"][1]))
    assert "win" not in collate([{"seg": s["seg"]} for s in samples])


def test_batch_loader_resumes_at_step(hist):
    ds = stage2(hist, batch_size=8)
    got = list(batch_loader(ds, start=3, stop=6, num_workers=1))
    assert len(got) == 3
    for k, b in zip(range(3, 6), got):
        assert all(torch.equal(b[key], ds[k][key]) for key in b)


def test_spec_items_match_source(hist):
    ds = stage2(hist, batch_size=4)
    specs = ds.global_specs(0)
    for item, h, ws, wl in zip(spec_items(ds.packed, specs), specs.hist, specs.win_start, specs.win_len):
        assert np.array_equal(item["win"][:, REWARD], (np.arange(ws, ws + wl) + h) % 256)


def test_transition_record_one_layout(hist):
    """transition.pack is the one layout: the sampler's packed copy, Histories.transitions and a rollout's
    torch record agree, and the named columns read back the four arrays."""
    import transition
    from dataset import pack_transitions

    flat = pack_transitions(hist)
    n, t = np.asarray(hist.states).shape[:2]
    assert flat.shape == (n * t + 1, transition.N_FIELDS) and not flat[-1].any()  # the zero padding row
    per_history = flat[:-1].reshape(n, t, transition.N_FIELDS)
    assert np.array_equal(per_history[2:4], hist.transitions(np.arange(2, 4)))
    tr = hist.transitions(5, 3, 10)
    assert np.array_equal(transition.state(tr), hist.states[5, 3:10])
    assert np.array_equal(transition.action(tr), hist.actions[5, 3:10])
    assert np.array_equal(transition.reward(tr), hist.rewards[5, 3:10])
    assert np.array_equal(transition.next_state(tr), hist.next_states[5, 3:10])
    as_torch = transition.pack(*(torch.from_numpy(np.asarray(a[5, 3:10])).long() for a in
                                 (hist.states, hist.actions, hist.rewards, hist.next_states)))
    assert torch.equal(as_torch, torch.from_numpy(tr).long())
    assert transition.FIELDS[transition.ACTION] == "a" and transition.N_FIELDS == 6


# -- stage 1 --------------------------------------------------------------------------------------------

def test_pretrain_depths_and_weights(hist):
    ds = PretrainBatches(hist, "train", batch_size=128, seg_len=40, min_seg_len=10, seed=0)
    assert ds.depth_weights == [2, 3, 4]
    batches = [ds[k] for k in range(40)]
    assert set(batches[0]) == {"seg", "seg_len", "depth"}
    depths = torch.cat([b["depth"] for b in batches]).numpy()
    assert depths.min() >= 1
    counts = np.bincount(depths, minlength=4)[1:]
    expected = len(depths) * np.array([2, 3, 4]) / 9
    assert ((counts - expected) ** 2 / expected).sum() < 13.8, counts   # p = 0.001 at 2 dof
    b = batches[0]
    assert torch.equal((b["seg_len"] > 0).sum(1), b["depth"])


# -- config and errors ----------------------------------------------------------------------------------

def test_from_cfg(hist):
    cfg = OmegaConf.create({"batch_size": 16, "seed": 4, "model": {"seg_len": 30, "max_compression_depth": 2},
                            "sampler": {"min_seg_len": 8, "depth_weights": None, "win_len_min": None,
                                        "win_len_max": None, "pretrain_depth_weights": [1, 1]}})
    ds = HistoryBatches.from_cfg(hist, cfg, split="train", rank=1, world_size=2)
    assert (ds.local_batch_size, ds.seg_len, ds.win_len_max, ds.depth_weights) == (8, 30, 30, [1, 2, 3])
    assert torch.equal(ds[0]["depth"], stage2(hist, batch_size=16, seg_len=30, min_seg_len=8, max_depth=2,
                                              depth_weights=None, win_len_min=None, win_len_max=None,
                                              seed=4)[0]["depth"][8:])
    pre = PretrainBatches.from_cfg(hist, cfg)
    assert pre.depth_weights == [1, 1] and pre.max_depth == 2
    del cfg.model.seg_len
    with pytest.raises(KeyError, match="seg_len"):
        HistoryBatches.from_cfg(hist, cfg)


@pytest.mark.parametrize("kw, match", [
    ({"seg_len": 200, "min_seg_len": 10, "win_len_min": None, "win_len_max": None},
     r"needs up to max_depth\*seg_len \+ win_len_max = 3\*200 \+ 200 = 800 steps but histories have only 600"),
    ({"depth_weights": [1, 2, 3]}, "depth_weights has 3 entries but depths 0..3 need 4"),
    ({"depth_weights": [1, -1, 3, 4]}, "depth_weights must be finite, >= 0 and not all zero"),
    ({"depth_weights": [0, 0, 0, 0]}, "depth_weights must be finite, >= 0 and not all zero"),
    ({"min_seg_len": 41}, r"min_seg_len must be in \[1, seg_len=40\], got 41"),
    ({"min_seg_len": 0}, r"min_seg_len must be in \[1, seg_len=40\], got 0"),
    ({"win_len_min": 30, "win_len_max": 20}, "need 1 <= win_len_min <= win_len_max"),
    ({"win_len_min": 0}, "need 1 <= win_len_min <= win_len_max"),
    ({"batch_size": 63, "world_size": 2}, "global batch_size 63 is not divisible by world_size 2"),
    ({"rank": 2, "world_size": 2}, "need 0 <= rank < world_size"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"max_depth": -1, "depth_weights": None}, "max_compression_depth must be >= 0"),
])
def test_errors(hist, kw, match):
    with pytest.raises(ValueError, match=match):
        stage2(hist, **kw)


def test_pretrain_errors(hist):
    with pytest.raises(ValueError, match="max_compression_depth must be >= 1"):
        PretrainBatches(hist, "train", 8, 40, 10, max_depth=0)
    with pytest.raises(ValueError, match="depth_weights has 4 entries but depths 1..3 need 3"):
        PretrainBatches(hist, "train", 8, 40, 10, depth_weights=[1, 2, 3, 4])


def test_empty_split_and_out_of_range_batch(hist):
    hist_empty = make_histories(n_test=N_HIST)
    with pytest.raises(ValueError, match="split 'train' has no histories"):
        stage2(hist_empty)
    with pytest.raises(IndexError):
        stage2(hist, num_batches=10)[10]


def test_memory_mapped_dataset_on_disk(tmp_path):
    """A real saved + loaded (memmap) dataset: the sampler copies it into RAM once and cuts it right."""
    from env.darkroom import goal_split
    env = {"name": "darkroom", "grid_size": 9, "horizon": 20, "n_actions": 5, "reward_mode": "every_step",
           "train_frac": 0.9, "split_seed": 0}
    train, test = goal_split(9, 0.9, 0)
    goals = np.array(train + test, dtype=np.uint8)                      # one history per goal
    n, t_len = len(goals), 200
    rng = np.random.default_rng(0)
    arrays = {"states": rng.integers(0, 9, (n, t_len, 2), dtype=np.uint8),
              "actions": rng.integers(0, 5, (n, t_len), dtype=np.uint8),
              "rewards": rng.integers(0, 2, (n, t_len), dtype=np.uint8),
              "next_states": rng.integers(0, 9, (n, t_len, 2), dtype=np.uint8), "goals": goals}
    meta = {"format_version": FORMAT_VERSION, "env": env,
            "split": {"train_goals": train, "val_goals": [], "test_goals": test},
            "n_steps": t_len, "histories": {"train": {"start": 0, "stop": len(train)},
                                            "val": {"start": len(train), "stop": len(train)},
                                            "test": {"start": len(train), "stop": n}}}
    h = load_histories(save_histories(tmp_path / "ds", arrays, meta), env)
    assert isinstance(h.states, np.memmap)
    ds = HistoryBatches(h, "test", batch_size=8, seg_len=20, min_seg_len=5, max_depth=3, seed=0)
    specs, b = ds.global_specs(0), ds[0]
    assert set(specs.hist.tolist()) <= set(range(len(train), n))
    for i in range(8):
        ws, wl = specs.win_start[i], specs.win_len[i]
        assert np.array_equal(b["win"][i, :wl].numpy(), h.transitions(specs.hist[i], ws, ws + wl))
        for j in range(b["seg"].shape[1]):
            s0, n0 = specs.seg_start[i, 3 - b["seg"].shape[1] + j], b["seg_len"][i, j].item()
            assert np.array_equal(b["seg"][i, j, :n0].numpy(), h.transitions(specs.hist[i], s0, s0 + n0))


class RandomHistories:
    """Random Darkroom-like histories with the attributes the samplers read."""

    def __init__(self, n=12, t=200, g=5, seed=0):
        rng = np.random.default_rng(seed)
        self.states = rng.integers(0, g, (n, t, 2), dtype=np.uint8)
        self.next_states = rng.integers(0, g, (n, t, 2), dtype=np.uint8)
        self.actions = rng.integers(0, 5, (n, t), dtype=np.uint8)
        self.rewards = rng.integers(0, 2, (n, t), dtype=np.uint8)

    def split_indices(self, split):
        return np.arange(len(self.states))


def random_stage2(static, **kw):
    return HistoryBatches(RandomHistories(), "train", batch_size=8, seg_len=10, min_seg_len=4, max_depth=3,
                          win_len_min=3, win_len_max=10, seed=1, static_shapes=static, **kw)


def test_static_batches_hold_the_same_samples_with_fixed_shapes():
    dyn, sta = random_stage2(False), random_stage2(True)
    shapes = set()
    for k in range(6):
        a, b = dyn[k], sta[k]
        shapes.add((tuple(b["seg"].shape), tuple(b["win"].shape)))
        D, W = a["seg"].shape[1], a["win"].shape[1]
        # Slots are right-aligned: the dynamic batch's D slots are the static batch's last D.
        assert torch.equal(b["seg"][:, 3 - D:, :, :], a["seg"]) and not b["seg"][:, :3 - D].any()
        assert torch.equal(b["seg_len"][:, 3 - D:], a["seg_len"]) and not b["seg_len"][:, :3 - D].any()
        assert torch.equal(b["win"][:, :W], a["win"]) and not b["win"][:, W:].any()
        assert torch.equal(b["win_len"], a["win_len"]) and torch.equal(b["depth"], a["depth"])
    assert shapes == {((8, 3, 10, 6), (8, 10, 6))}
    pre = PretrainBatches(RandomHistories(), "train", batch_size=8, seg_len=10, min_seg_len=4, static_shapes=True)
    assert {tuple(pre[k]["seg"].shape) for k in range(4)} == {(8, 3, 10, 6)}


@pytest.mark.parametrize("static", [False, True])
def test_device_gather_equals_host_gather(static):
    """The torch gather (run here on the CPU 'device') gives exactly the numpy batches, per rank too."""
    for rank in (0, 1):
        host = random_stage2(static, rank=rank, world_size=2)
        dev = random_stage2(static, rank=rank, world_size=2).to_device("cpu")
        for k in range(5):
            a, b = host[k], dev[k]
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (k, key)
    it = batch_loader(random_stage2(static), start=3, stop=5, device="cpu")
    got = list(it)
    assert len(got) == 2 and torch.equal(got[0]["seg"], random_stage2(static)[3]["seg"])


def test_data_device_setting():
    ds = random_stage2(False)
    assert data_device(None, "cpu", ds) is None  # default: only CUDA
    assert data_device(True, "cpu", ds) == torch.device("cpu")
    assert data_device(False, "cpu", ds) is None
