"""Issue-11 lever for a memory that remembers: the gated latent update (model.latent_update=gated). Its
equivalence between training and rollouts at depth >= 10 is in tests/test_schedules.py (parametrised with
the gated update). (The long-memory readout lever was measured worse and removed: docs/design.md §9.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from model.compressed_ad import CompressedAD
from model.config import ModelConfig

S = 8


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


def test_old_encoder_checkpoints_load_as_replace_and_a_gated_one_refuses_a_replace_model(tmp_path):
    from model.checkpoint import EncoderCheckpointError, check_architecture

    cfg = ModelConfig(grid_size=9, d_model=32, n_head=2, n_layer=1, enc_n_layer=1, n_latent=3, seg_len=S)
    saved = cfg.arch_dict()
    del saved["latent_update"]  # written before the key existed
    check_architecture({"model": saved}, cfg, "old.pt")
    with pytest.raises(EncoderCheckpointError, match="latent_update: checkpoint=gated current=replace"):
        check_architecture({"model": {**saved, "latent_update": "gated"}}, cfg, "new.pt")


def test_train_main_with_the_gated_update(tiny, tmp_path):
    summary = train.main(tiny.compose("train", "sampler.schedule=rollout", "model.seg_len=8",
                                      "sampler.min_seg_len=8", "model.bptt_segments=2",
                                      "model.latent_update=gated", run_dir=tmp_path / "r"))
    assert np.isfinite(summary["tf_loss_test"])
    with pytest.raises(ValueError, match="model.latent_update='sideways'"):
        train.main(tiny.compose("train", "model.latent_update=sideways", run_dir=tmp_path / "bad"))
