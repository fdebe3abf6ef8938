"""Stage 2 (train.py) end to end on tiny configs: TensorBoard scalars, held-out loss, in-context eval,
model.pt / done.json, the pretrained-encoder and auxiliary-reconstruction paths, the gated latent update, a
full disk at the end of the run (one line), and a learning check."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import compose, raises_one_line_in_cli

import collect
import loop
import rundir
import train
from model import EncoderPretrainer, ModelConfig, save_encoder_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """2 shared cores: multi-threaded torch on these tiny ops thrashes (10-100x slower)."""


@pytest.fixture(scope="module")
def greedy_data(tmp_path_factory):
    """Histories whose actions can be learned in a few hundred steps. The shared tiny dataset is 200 steps of
    epsilon 1.0 -> 0.62 exploration, i.e. mostly uniformly random actions: no model gets far below ln 5 on
    it. Here epsilon is 0 (optimistic Q-learning still explores systematically at first) and histories run
    600 steps, most of them after the goal was found."""
    path = tmp_path_factory.mktemp("greedy") / "data"
    collect.main(
        compose(
            "collect",
            [
                "source.n_stream=2",
                "source.n_steps=600",
                "source.n_stream_eval=1",
                "source.eps_start=0.0",
                "source.eps_end=0.0",
                f"data_path={path}",
                "progress=false",
            ],
        )
    )
    return path


def check_run_files(run, steps: int):
    done = json.loads((run / "done.json").read_text())
    assert done["global_step"] == steps and done["run_dir"] == str(run)
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["global_step"] == steps and ck["model_state_dict"] and ck["config"]["run_dir"] == str(run)
    assert json.loads((run / "config.json").read_text())["run_dir"] == str(run)
    return done


EVAL_TAGS = ("eval/return_val", "eval/return_train", "eval/return_val_normalized")
TRAIN_TAGS = (
    "train/loss_action",
    "train/acc_action",
    "train/lr",
    "train/labels_per_s",
    "train/grad_norm",
    "heldout/loss_val",
    "heldout/acc_val",
    "heldout/loss_test",
    "heldout/loss_test_steps_0-200",
)


def test_compressed_ad_end_to_end_and_learns(tiny, greedy_data, tmp_path, tb_scalars):
    run = tmp_path / "cad"
    steps = 200
    # Depth <= 1 (weights 1:2 over depths 0, 1): deeper samples cost 2-3 encoder passes, which on this CPU
    # doubles the time of the test; depths 2-3 train in the other tests.
    cfg = tiny.compose(
        "train",
        f"data_path={greedy_data}",
        f"max_steps={steps}",
        "batch_size=16",
        "lr=0.003",
        "warmup_steps=20",
        "log_every=50",
        "heldout_every=100",
        f"eval_every={steps}",
        "model.dropout=0.0",
        "model.max_compression_depth=1",
        "sampler.depth_weights=[1,2]",
        run_dir=run,
    )
    summary = train.main(cfg)
    done = check_run_files(run, steps)
    tags = tb_scalars(run)
    for tag in TRAIN_TAGS + EVAL_TAGS:
        assert tag in tags, sorted(tags)
        assert all(math.isfinite(v) for _, v in tags[tag]), tag
    assert [s for s, _ in tags["train/loss_action"]] == list(range(50, steps + 1, 50))
    assert [s for s, _ in tags["heldout/loss_val"]] == [100, 200]  # periodic on validation goals + final
    assert [s for s, _ in tags["heldout/loss_test"]] == [200]      # test goals: only the final figure
    assert [s for s, _ in tags["eval/return_val"]] == [steps]  # exactly one in-context evaluation
    assert "eval/return_test" not in tags  # the test goals' rollouts are left to evaluate.py
    probe = done["heldout_test"]["memory_probe"]
    assert {"k0", "k1", "k2", "k3", "all", "verdict"} <= set(probe)
    assert tags["memory/loss_all_test"][0][1] == pytest.approx(done["tf_loss_test"])
    assert "train/loss_recon" not in tags
    assert done["tf_loss_test"] == pytest.approx(summary["tf_loss_test"])
    # Learning: ln 5 = 1.61 is the uniform guess. Measured: train 1.20-1.25 at step 50 -> 0.90-0.94 at 200,
    # held-out 0.81-0.82, accuracy 0.60.
    loss = [v for _, v in tags["train/loss_action"]]
    assert loss[-1] < 1.1 < math.log(5) - 0.5, loss
    assert loss[-1] < loss[0] - 0.15, loss
    # Same-position held-out losses (every step of the held-out histories, random exploration included).
    # Measured: test 0.70 (late steps 0.43), val 1.13 (late 0.82; only 5 histories, 1 per goal).
    assert summary["tf_loss_test"] < 1.1 and summary["tf_loss_val"] < math.log(5) - 0.3, summary
    for split in ("val", "test"):
        assert done[f"heldout_{split}"]["buckets"]["500-end"] < 1.0, done[f"heldout_{split}"]
    assert tags["train/acc_action"][-1][1] > 0.45


def test_ad_baseline_end_to_end(tiny, tmp_path, tb_scalars):
    run = tmp_path / "ad"
    cfg = tiny.compose(
        "train", "model=ad_dr", "model.context_len=20", "heldout_every=3", "eval_every=6", run_dir=run
    )
    assert cfg.model.name == "ad" and cfg.sampler.win_len_max == 20
    train.main(cfg)
    check_run_files(run, 6)
    tags = tb_scalars(run)
    for tag in TRAIN_TAGS + EVAL_TAGS:
        assert tag in tags, sorted(tags)
    assert [s for s, _ in tags["eval/return_val"]] == [6]
    assert "memory/loss_k1_test" not in tags  # AD has no compressed memory to probe


def test_heldout_max_histories_scores_histories_spread_over_each_split(tiny, tmp_path):
    done = {}
    for cap in (None, 2):
        run = tmp_path / f"cap{cap}"
        over = ["max_steps=2", "warmup_steps=1"] + ([f"heldout_max_histories={cap}"] if cap else [])
        train.main(tiny.compose("train", *over, run_dir=run))
        done[cap] = json.loads((run / "done.json").read_text())
    for split in ("val", "test"):
        n_all = done[None][f"heldout_{split}"]["n_histories"]
        capped = done[2][f"heldout_{split}"]
        assert n_all > 2 and capped["n_histories"] == 2
        # the same model (same seed, same steps) scored on two histories spread over the split (every k-th:
        # the first of its first goal and one further on), not its first two (Histories.split_indices)
        k = -(-n_all // 2)
        assert capped["per_history"] == pytest.approx(done[None][f"heldout_{split}"]["per_history"][::k][:2])


def test_stage2_from_pretrained_encoder_with_aux_recon(tiny, tmp_path, capsys, tb_scalars):
    cfg = tiny.compose("pretrain")
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    ckpt = tmp_path / "stage1" / "encoder-pretrained-final.pt"
    save_encoder_checkpoint(
        ckpt, EncoderPretrainer(mcfg), 5, {"model": mcfg.to_dict(), "env": loop.to_plain(cfg.env)}
    )
    run = tmp_path / "run"
    train.main(
        tiny.compose(
            "train", f"model.pretrained_encoder_path={ckpt}", "model.aux_recon_weight=0.5", run_dir=run
        )
    )
    out = capsys.readouterr().out
    assert f"Loading pretrained encoder from {ckpt}\n" in out
    assert "encoder fine-tuned, shared embeddings fine-tuned" in out
    tags = tb_scalars(run)
    assert "train/loss_recon" in tags and all(v > 0 and math.isfinite(v) for _, v in tags["train/loss_recon"])
    # train/loss is the weighted sum the optimizer saw: loss_action + 0.5 * loss_recon.
    total, act, rec = (dict(tags[t]) for t in ("train/loss", "train/loss_action", "train/loss_recon"))
    for s in total:
        assert total[s] == pytest.approx(act[s] + 0.5 * rec[s], rel=1e-4)
    sd = torch.load(run / "model.pt", weights_only=True)["model_state_dict"]
    assert any(k.startswith("recon.") for k in sd)
    assert json.loads((run / "config.json").read_text())["model"]["pretrained_encoder_path"] == str(ckpt)


def test_pretrained_path_needs_compressed_model(tiny, tmp_path):
    cfg = tiny.compose(
        "train", "model=ad_dr", "model.pretrained_encoder_path=/nowhere.pt", run_dir=tmp_path / "r"
    )
    with pytest.raises(ValueError, match="model=ad_compressed_dr"):
        train.main(cfg)
    assert not (tmp_path / "r").exists()


def test_disk_full_writing_model_pt_is_one_line(tiny, tmp_path, monkeypatch, one_thread):
    """The end of stage 2 on a full disk (torch.save's RuntimeError used to escape as a traceback)."""
    import atomic_io

    real_save, real_fdopen = atomic_io.atomic_torch_save, os.fdopen

    def full_save(obj, path):
        with monkeypatch.context() as m:
            m.setattr(atomic_io.os, "fdopen", lambda fd, mode: (os.close(fd), real_fdopen(
                os.open("/dev/full", os.O_WRONLY), mode))[1])
            return real_save(obj, path)

    monkeypatch.setattr(train, "atomic_torch_save", full_save)
    raises_one_line_in_cli(rundir.RunDirError, r"cannot access .*model.pt \(no space left on device\); nothing complete was "
                r"lost", train.main, tiny.compose("train", "max_steps=2", run_dir=tmp_path / "r"))


def test_train_main_with_the_gated_update(tiny, tmp_path):
    summary = train.main(tiny.compose("train", "sampler.schedule=rollout", "model.seg_len=8",
                                      "sampler.min_seg_len=8", "model.bptt_segments=2",
                                      "model.latent_update=gated", run_dir=tmp_path / "r"))
    assert np.isfinite(summary["tf_loss_test"])
    with pytest.raises(ValueError, match="model.latent_update='sideways'"):
        train.main(tiny.compose("train", "model.latent_update=sideways", run_dir=tmp_path / "bad"))
