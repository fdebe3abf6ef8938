"""The fast-step data and model paths (issue 13): static shapes and device-side sampling, each compared against
the plain path it replaces (the loop's side: tests/test_loop.py; fused-optimizer selection: tests/test_optim.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset import HistoryBatches, batch_loader, data_device
from dataset_pretrain import PretrainBatches
from model import CompressedAD, EncoderPretrainer, ModelConfig
from model.losses import action_loss, reconstruction_loss


class _Hist:
    """Random Darkroom-like histories with the attributes the samplers read."""

    def __init__(self, n=12, t=200, g=5, seed=0):
        rng = np.random.default_rng(seed)
        self.states = rng.integers(0, g, (n, t, 2), dtype=np.uint8)
        self.next_states = rng.integers(0, g, (n, t, 2), dtype=np.uint8)
        self.actions = rng.integers(0, 5, (n, t), dtype=np.uint8)
        self.rewards = rng.integers(0, 2, (n, t), dtype=np.uint8)

    def split_indices(self, split):
        return np.arange(len(self.states))


def _cfg(**kw):
    base = {"d_model": 32, "n_head": 2, "n_layer": 1, "enc_n_layer": 1, "n_latent": 3, "seg_len": 10,
            "context_len": 10, "dropout": 0.0, "grid_size": 5, "recon_n_layer": 1}
    return ModelConfig(**(base | kw))


def _stage2(static, **kw):
    return HistoryBatches(_Hist(), "train", batch_size=8, seg_len=10, min_seg_len=4, max_depth=3,
                          win_len_min=3, win_len_max=10, seed=1, static_shapes=static, **kw)


def test_static_batches_hold_the_same_samples_with_fixed_shapes():
    dyn, sta = _stage2(False), _stage2(True)
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
    pre = PretrainBatches(_Hist(), "train", batch_size=8, seg_len=10, min_seg_len=4, static_shapes=True)
    assert {tuple(pre[k]["seg"].shape) for k in range(4)} == {(8, 3, 10, 6)}


@pytest.mark.parametrize("static", [False, True])
def test_device_gather_equals_host_gather(static):
    """The torch gather (run here on the CPU 'device') gives exactly the numpy batches, per rank too."""
    for rank in (0, 1):
        host = _stage2(static, rank=rank, world_size=2)
        dev = _stage2(static, rank=rank, world_size=2).to_device("cpu")
        for k in range(5):
            a, b = host[k], dev[k]
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (k, key)
    it = batch_loader(_stage2(static), start=3, stop=5, device="cpu")
    got = list(it)
    assert len(got) == 2 and torch.equal(got[0]["seg"], _stage2(static)[3]["seg"])


def test_data_device_setting():
    ds = _stage2(False)
    assert data_device(None, "cpu", ds) is None  # default: only CUDA
    assert data_device(True, "cpu", ds) == torch.device("cpu")
    assert data_device(False, "cpu", ds) is None


def test_static_forward_equals_dynamic_forward():
    """Masks instead of .nonzero(): same logits, segment logits (on used slots), loss and gradients."""
    torch.manual_seed(0)
    m = CompressedAD(_cfg())
    batch = _stage2(True)[0]
    assert batch["depth"].min() < 3  # a mix of depths, so unused slots exist
    outs = []
    for static in (False, True):
        m.cfg.static_shapes = static
        m.zero_grad()
        out = m(batch)
        loss = action_loss(out["logits"], batch, seg_logits=out["seg_logits"])
        loss["loss"].backward()
        outs.append((out, loss, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (o1, l1, g1), (o2, l2, g2) = outs
    used = (torch.arange(10) < batch["seg_len"][..., None])
    assert torch.allclose(o1["logits"], o2["logits"], atol=1e-5)
    assert torch.allclose(o1["seg_logits"][used], o2["seg_logits"][used], atol=1e-5)
    assert torch.allclose(o1["latents"], o2["latents"], atol=1e-5)
    assert torch.equal(l1["n_labels"], l2["n_labels"]) and torch.allclose(l1["loss"], l2["loss"], atol=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-5), n


def test_static_pretrainer_equals_dynamic():
    torch.manual_seed(0)
    m = EncoderPretrainer(_cfg())
    batch = PretrainBatches(_Hist(), "train", batch_size=8, seg_len=10, min_seg_len=4, static_shapes=True)[0]
    preds = []
    for static in (False, True):
        m.cfg.static_shapes = static
        preds.append(m(batch)["pred"])
    mask = torch.arange(10) < batch["seg_len"][..., None]
    assert torch.allclose(preds[0][mask], preds[1][mask], atol=1e-5)
    assert torch.allclose(reconstruction_loss(preds[0], batch["seg"], batch["seg_len"], m.cfg),
                          reconstruction_loss(preds[1], batch["seg"], batch["seg_len"], m.cfg), atol=1e-6)
