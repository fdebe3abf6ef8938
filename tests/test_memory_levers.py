"""Issue-11 levers for a memory that remembers: the gated latent update (model.latent_update=gated) and the
long-memory readout (model.memory_aux_weight > 0, model/memory_readout.py). Their equivalence between
training and rollouts at depth >= 10 is in tests/test_schedule.py (parametrised with the gated update)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import train
from dataset import HistoryBatches
from histories import load_histories
from model import build_model
from model.compressed_ad import CompressedAD
from model.config import ModelConfig
from model.memory_readout import memory_loss, memory_targets

S = 8


def tiny_model(**kw) -> CompressedAD:
    torch.manual_seed(0)
    base = {"name": "ad_compressed", "d_model": 32, "n_head": 2, "n_layer": 1, "enc_n_layer": 1, "n_latent": 3,
            "seg_len": S, "context_len": S, "dropout": 0.0, "aux_recon_weight": 0.0, "bptt_segments": 3}
    return build_model(OmegaConf.create({**base, **kw}), OmegaConf.create({"grid_size": 9, "n_actions": 5}))


def test_memory_targets_cover_every_real_transition_of_every_used_slot_and_nothing_else():
    g = 9
    seg = torch.zeros(2, 2, 3, 6, dtype=torch.long)
    # sample 0, slot 0: 2 real transitions, then padding that must not count
    seg[0, 0, 0] = torch.tensor([1, 2, 0, 0, 1, 3])
    seg[0, 0, 1] = torch.tensor([1, 3, 0, 1, 4, 4])  # reward on arriving at (4, 4)
    seg[0, 0, 2] = torch.tensor([7, 7, 0, 1, 8, 8])  # padding
    seg[0, 1, 0] = torch.tensor([5, 5, 0, 0, 5, 6])
    seg_len = torch.tensor([[2, 1], [0, 0]])  # sample 1 has no folded segment
    t = memory_targets(seg, seg_len, g)
    cell = lambda x, y: x * g + y
    visited = {cell(1, 2), cell(1, 3), cell(4, 4), cell(5, 5), cell(5, 6)}
    assert set(t[0, :, 0].nonzero().flatten().tolist()) == visited
    assert t[0, :, 1].nonzero().flatten().tolist() == [cell(4, 4)]
    assert t[1].sum() == 0
    # the reward term is a categorical over cells + none; samples without latents are ignored
    logits = {"visited": torch.full((2, g * g), -5.0), "reward": torch.zeros(2, g * g + 1)}
    logits["reward"][0, cell(4, 4)] = 5.0
    m = memory_loss(logits, t, torch.tensor([True, False]))
    assert float(m["reward_acc"]) == 1.0
    logits["reward"][0, cell(4, 4)] = 0.0
    logits["reward"][0, -1] = 5.0  # "none seen" while the goal was seen: wrong, and a higher loss
    worse = memory_loss(logits, t, torch.tensor([True, False]))
    assert float(worse["reward_acc"]) == 0.0 and worse["loss"] > m["loss"] + 4
    logits["reward"][1] = 100.0  # anything on the sample without latents changes nothing
    logits["visited"][1] = 100.0
    assert torch.allclose(memory_loss(logits, t, torch.tensor([True, False]))["loss"], worse["loss"])
    # a sample with latents but no reward seen: the target is "none"
    m = memory_loss(logits, t, torch.tensor([False, True]))
    assert float(m["reward_acc"]) == 0.0  # cell 0 (all 100s, argmax first) is not "none"


def test_a_closed_gate_carries_the_latents_through_a_fold_unchanged_and_an_open_one_replaces_them():
    cfg = ModelConfig(grid_size=9, d_model=32, n_head=2, n_layer=1, enc_n_layer=1, n_latent=3, seg_len=S,
                      dropout=0.0, latent_update="gated")
    model = CompressedAD(cfg).eval()
    seg = torch.randint(0, 5, (4, 2, S, 6))
    seg_len = torch.full((4, 2), S)
    with torch.no_grad():
        first, _ = model.compress(seg[:, :1], seg_len[:, :1])
        torch.nn.init.constant_(model.encoder.gate.bias, -50.0)  # g = 0: keep the previous latents
        kept, _ = model.compress(seg, seg_len)
        torch.nn.init.constant_(model.encoder.gate.bias, 50.0)  # g = 1: the plain replacement
        replaced, _ = model.compress(seg, seg_len)
        model.encoder.gate = None
        plain, _ = model.compress(seg, seg_len)
    assert torch.allclose(kept, first, atol=1e-5)  # the first fold has no previous latents: never gated
    assert torch.allclose(replaced, plain, atol=1e-5)
    assert not torch.allclose(kept, plain, atol=1e-3)


@pytest.mark.slow
def test_memory_readout_learns_what_the_folded_history_held(tiny):
    """300 steps on rollout-schedule batches of depth <= 1: the readout's loss with the sample's own latents
    falls well below the loss with another sample's latents (what a head that ignores the memory gets).
    Measured: own 0.31 vs shuffled 0.90 at step 300; both ~0.6 at step 60, before the code forms."""
    hist = load_histories(tiny.data_path, tiny.compose("train").env)
    ds = HistoryBatches(hist, "train", batch_size=32, seg_len=S, min_seg_len=S, max_depth=3, seed=0,
                        schedule="rollout", max_windows=2)
    model = tiny_model(memory_aux_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for k in range(300):
        b = ds[k]
        out = model(b)
        loss = memory_loss(out["memory_logits"], out["memory_targets"], out["has_latents"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    own, shuffled = [], []
    with torch.no_grad():
        for k in range(500, 504):
            b = ds[k]
            out = model(b)
            keep = out["has_latents"]
            own.append(float(memory_loss(out["memory_logits"], out["memory_targets"], keep)["loss"]))
            perm = torch.roll(torch.arange(len(keep)), 1)
            other = model.memory(out["latents"][perm])
            shuffled.append(float(memory_loss(other, out["memory_targets"], keep & keep[perm])["loss"]))
    assert np.mean(own) < 0.6 * np.mean(shuffled), (own, shuffled)


def test_old_encoder_checkpoints_load_as_replace_and_a_gated_one_refuses_a_replace_model(tmp_path):
    from model.checkpoint import EncoderCheckpointError, check_architecture

    cfg = ModelConfig(grid_size=9, d_model=32, n_head=2, n_layer=1, enc_n_layer=1, n_latent=3, seg_len=S)
    saved = cfg.arch_dict()
    del saved["latent_update"]  # written before the key existed
    check_architecture({"model": saved}, cfg, "old.pt")
    with pytest.raises(EncoderCheckpointError, match="latent_update: checkpoint=gated current=replace"):
        check_architecture({"model": {**saved, "latent_update": "gated"}}, cfg, "new.pt")


def test_train_main_logs_the_memory_readout(tiny, tmp_path, tb_scalars):
    summary = train.main(tiny.compose("train", "model.schedule=rollout", "model.seg_len=8", "model.min_seg_len=8",
                                      "model.bptt_segments=2", "model.memory_aux_weight=0.5",
                                      "model.latent_update=gated", "log_every=2", run_dir=tmp_path / "r"))
    assert np.isfinite(summary["tf_loss_test"])
    tags = tb_scalars(tmp_path / "r")
    for t in ("train/loss_memory", "train/memory_reward_acc", "train/memory_visited_acc"):
        assert t in tags and all(np.isfinite(v) for _, v in tags[t]), sorted(tags)
    with pytest.raises(ValueError, match="model.latent_update='sideways'"):
        train.main(tiny.compose("train", "model.latent_update=sideways", run_dir=tmp_path / "bad"))
