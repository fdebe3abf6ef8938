"""Stage 1 (pretrain_encoder.py) and the stage-1 -> stage-2 encoder contract (model/checkpoint.py).

The must-show of the stage-1 issue: a collapsed (constant) encoder cannot lower the reconstruction loss
below what the data's per-position averages give and has a latent-ablation gap of exactly zero, while the
real encoder, trained the same way for a few hundred tiny CPU steps, carries information (clearly positive
gap, lower held-out loss). Then: checkpoint round trip, freezing through train.main, the loader's errors,
TensorBoard tags and checkpoint files of pretrain_encoder.main, and the short CLI keys.

The encoder contract: every architecture key that shapes the encoder (state_features, keep_recent,
latent_update, ...) is checked against the checkpoint, a key the checkpoint predates reads as the default that
kept the old behaviour, bad weights name the first bad key, and an encoder pretrained on other data is refused
unless allow_data_change=true. A stage-1 code that can be read back: one-hot state features of the shared
embedding, the position-addressed slot initialisation (each (latent, head) reads its own segment position, not
its query token), the reconstruction decoder's linear readout, and the task-relevant targets
(model.recon_task_weight).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import collect_small, compose, raises_one_line
from torch import nn

import loop
import pretrain_encoder
import train
from dataset_pretrain import PretrainBatches
from histories import load_histories
from hydra_cli import rewrite_overrides
from model import (
    CompressedAD,
    EncoderCheckpointError,
    EncoderPretrainer,
    ModelConfig,
    save_encoder_checkpoint,
)
from model.checkpoint import REQUIRED_KEYS, check_architecture, load_pretrained_encoder
from model.config import ENCODER_ARCH_KEYS, ConfigError
from model.embeddings import featurize, input_features
from model.reconstruction import ReconstructionDecoder, recon_out_dim


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """2 shared cores: multi-threaded torch on these tiny ops thrashes (10-100x slower)."""


def tiny_mcfg(tiny, **kw) -> tuple[ModelConfig, object]:
    """(ModelConfig, composed pretrain cfg) of the tiny architecture both stages share."""
    cfg = tiny.compose("pretrain", *(f"model.{k}={v}" for k, v in kw.items()))
    return ModelConfig.from_cfg(cfg.model, cfg.env), cfg


def write_checkpoint(tiny, path, seed=1) -> EncoderPretrainer:
    """A (randomly initialised) stage-1 model saved as encoder-pretrained-*.pt, config as stage 1 has it."""
    mcfg, cfg = tiny_mcfg(tiny)
    torch.manual_seed(seed)
    pre = EncoderPretrainer(mcfg)
    save_encoder_checkpoint(
        path, pre, 7, {"model": loop.to_plain(cfg.model) | mcfg.to_dict(), "env": loop.to_plain(cfg.env)}
    )
    return pre


# ---- collapse detectors vs real pretraining ---------------------------------------------------------------
class ConstantEncoder(nn.Module):
    """A collapsed encoder: the same (learned) latents for every input."""

    def __init__(self, n_latent: int, d_model: int):
        super().__init__()
        self.value = nn.Parameter(torch.randn(n_latent, d_model) * 0.02)

    def forward(self, prev_latents, has_prev, seg_emb, seg_mask):
        return self.value.expand(seg_emb.shape[0], -1, -1)


# A few hundred CPU steps show learning fastest at depth 1 (deeper folds need longer runs); lr 1e-3.
LEARN = [
    "pretrain_steps=300",
    "pretrain_batch_size=16",
    "pretrain_lr=0.001",
    "warmup_steps=20",
    "log_every=25",
    "model.dropout=0.0",
    "model.max_compression_depth=1",
    "sampler.pretrain_depth_weights=[1]",
    "diag_batches=4",
]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mse-parallel", "ce-causal", "ce-causal-slot", "ce-causal_fields-slot"])
def test_collapsed_encoder_has_zero_gap_and_real_pretraining_learns(objective, tiny, tmp_path, monkeypatch,
                                                                    tb_scalars):
    # The seed's objective (MSE, latents-only decoder), the causal teacher-forced decoder (which could in
    # principle lean on the prefix alone), the default (causal + slot init: a code wired at step 0, which a
    # constant encoder must not be able to fake) and causal + field-level autoregression (whose heads also
    # see the transition's own earlier fields): a constant encoder must show as one in all.
    loss, dec, *slot = objective.split("-")
    learn = [*LEARN, f"model.recon_loss={loss}", f"model.recon_decoder={dec}",
             f"model.pretrain_slot_init={bool(slot)}"]
    # Collapsed: identical run (data, steps, decoder, lr, diagnostics), but the encoder is a constant.
    real_cls = pretrain_encoder.EncoderPretrainer

    def collapsed(mcfg):
        net = real_cls(mcfg)
        net.encoder = ConstantEncoder(mcfg.n_latent, mcfg.d_model)
        return net

    monkeypatch.setattr(pretrain_encoder, "EncoderPretrainer", collapsed)
    const = pretrain_encoder.main(tiny.compose("pretrain", *learn, run_dir=tmp_path / "const"))
    monkeypatch.undo()
    real = pretrain_encoder.main(tiny.compose("pretrain", *learn, run_dir=tmp_path / "real"))

    # ReconstructionTask.diagnostics: loss with latents rolled across the batch minus loss with true latents.
    assert const["ablation_gap"] == 0.0, const  # the latents carry nothing, bit for bit
    assert const["ablation_r2"] == const["r2"] and const["ablation_acc_exact"] == const["acc_exact"]
    assert const["latent_effective_rank"] == 0.0
    assert real["latent_effective_rank"] > 1.0
    if slot or dec == "causal_fields":
        # With causal_fields the diagnostics read each transition greedily (the decoder's own s and a feed
        # its s' head), so these are reconstructions, not teacher-forced scores.
        # Measured on this tiny data (300 steps): causal + slot init: gap 2.14, held-out CE 6.54 vs 7.09
        # collapsed, action accuracy 0.39 vs 0.20 with shuffled latents, R² 0.17 vs 0.03; causal_fields +
        # slot init: gap 3.30, CE 6.47 vs 7.13, action 0.24 vs 0.17, R² 0.15 vs 0.06.
        assert real["ablation_gap"] > 0.05, real
        assert real["heldout_loss"] < const["heldout_loss"] - 0.05, (real["heldout_loss"], const["heldout_loss"])
        assert real["acc_action"] > real["ablation_acc_action"] + 0.05, real
        assert real["r2"] > real["ablation_r2"] + 0.02, real
        return
    if objective == "ce-causal":
        # Measured on this tiny data (300 steps): held-out CE 7.114 vs 7.137 collapsed, gap 0.007 vs exactly 0;
        # early on the causal decoder lives mostly off the prefix, which is why the gap and the ablation_*
        # scores are reported beside every figure.
        assert real["ablation_gap"] > 0.003, real
        assert real["heldout_loss"] < const["heldout_loss"] - 0.01, (real["heldout_loss"], const["heldout_loss"])
        return
    assert real["r2"] > real["ablation_r2"] + 0.01, real  # the true latents explain variance shuffled ones do not
    # Measured on this tiny data (300 steps; two inits of the learned position vectors, std 1.0 / 0.02): gap
    # 0.0085 / 0.017 on held-out goals, held-out loss 0.095 / 0.089 vs 0.100 collapsed, final training loss
    # 0.097 / 0.090 vs >= 0.1035 collapsed.
    assert real["ablation_gap"] > 0.004, real
    assert real["heldout_loss"] < const["heldout_loss"] - 0.002, (real["heldout_loss"], const["heldout_loss"])
    # The training loss falls by a real margin, and below anything the constant encoder reached.
    curve = [v for _, v in tb_scalars(tmp_path / "real")["pretrain/loss"]]
    const_curve = [v for _, v in tb_scalars(tmp_path / "const")["pretrain/loss"]]
    assert curve[-1] < 0.8 * curve[0], curve
    assert curve[-1] < min(const_curve) - 0.002, (curve, const_curve)


# ---- checkpoint round trip --------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_encoder_outputs(tiny, tmp_path):
    path = tmp_path / "encoder-pretrained-final.pt"
    pre = write_checkpoint(tiny, path).eval()
    mcfg, cfg = tiny_mcfg(tiny)
    torch.manual_seed(2)
    net = CompressedAD(mcfg).eval()
    hist = load_histories(tiny.data_path, cfg.env)
    b = PretrainBatches(hist, "train", 8, mcfg.seg_len, 10, 3, None, seed=0)[0]
    assert b["depth"].max() > 1  # hierarchical folds, not just one segment
    with torch.no_grad():
        want, _ = pre.compress(b["seg"], b["seg_len"])
        before, _ = net.compress(b["seg"], b["seg_len"])
        assert not torch.equal(want, before)  # otherwise the test proves nothing
        logs = []
        ck = load_pretrained_encoder(net, path, log=logs.append)
        got, _ = net.compress(b["seg"], b["seg_len"])
    assert torch.equal(want, got)
    assert logs[0] == f"Loading pretrained encoder from {path}"
    assert ck["global_step"] == 7
    for name in ("encoder", "embed_context", "embed_ln"):
        a, c = getattr(pre, name).state_dict(), getattr(net, name).state_dict()
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), name


# ---- freezing through train.main --------------------------------------------------------------------------
def _train_with_checkpoint(tiny, tmp_path, ckpt, monkeypatch, name, *overrides):
    """train.main for 4 steps from `ckpt` -> (state_dict before training, after training, names of the
    parameters the optimizer got)."""
    seen = {}
    real_make = loop.make_optimizer

    def spy(model, s):
        opt = real_make(model, s)
        seen["model"], seen["opt"] = model, opt
        seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}  # as loaded, before any step
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = tiny.compose(
        "train",
        f"model.pretrained_encoder_path={ckpt}",
        "max_steps=4",
        "lr=0.003",
        *overrides,
        run_dir=tmp_path / name,
    )
    train.main(cfg)
    in_opt = {id(p) for g in seen["opt"].param_groups for p in g["params"]}
    owner = {id(p): n for n, p in seen["model"].named_parameters()}
    sd = torch.load(tmp_path / name / "model.pt", weights_only=True)["model_state_dict"]
    return seen["init"], sd, {owner[i] for i in in_opt}


def _part(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefix + ".")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_freeze_encoder_and_embeddings(tiny, tmp_path, monkeypatch):
    ckpt = tmp_path / "encoder-pretrained-final.pt"
    pre = write_checkpoint(tiny, ckpt)
    saved = {k: v.clone() for k, v in pre.state_dict().items()}
    enc, emb = _part(saved, "encoder"), {**_part(saved, "embed_context"), **_part(saved, "embed_ln")}

    def parts(sd):
        return _part(sd, "encoder"), {**_part(sd, "embed_context"), **_part(sd, "embed_ln")}

    # freeze_encoder=true, freeze_embeddings=null -> both frozen: bit-identical, never in the optimizer.
    init, sd, opt_names = _train_with_checkpoint(
        tiny, tmp_path, ckpt, monkeypatch, "frozen", "model.freeze_encoder=true"
    )
    assert _same(parts(init)[0], enc) and _same(parts(init)[1], emb)  # loaded before training
    e, m = parts(sd)
    assert _same(e, enc) and _same(m, emb)
    assert not any(n.startswith(("encoder.", "embed_context.", "embed_ln.")) for n in opt_names)
    assert any(n.startswith("decoder.") for n in opt_names)
    assert not _same(_part(sd, "decoder"), _part(init, "decoder"))  # training did happen

    # freeze_embeddings=false: the encoder stays frozen, the shared embeddings train.
    _, sd, opt_names = _train_with_checkpoint(
        tiny, tmp_path, ckpt, monkeypatch, "emb", "model.freeze_encoder=true", "model.freeze_embeddings=false"
    )
    e, m = parts(sd)
    assert _same(e, enc) and not any(n.startswith("encoder.") for n in opt_names)
    assert {n.split(".")[0] for n in opt_names} >= {"embed_context", "embed_ln", "decoder"}
    assert all(not torch.equal(m[k], emb[k]) for k in m if k.startswith("embed_context"))

    # Fine-tuned (default): everything loaded, everything trains.
    init, sd, opt_names = _train_with_checkpoint(tiny, tmp_path, ckpt, monkeypatch, "tuned")
    assert _same(parts(init)[0], enc)
    e, m = parts(sd)
    assert {n.split(".")[0] for n in opt_names} >= {"encoder", "embed_context", "embed_ln", "decoder"}
    changed = [k for k in e if not torch.equal(e[k], enc[k])]
    assert len(changed) > len(e) // 2, f"only {changed} of the encoder changed"


def test_freeze_without_checkpoint_is_refused(tiny, tmp_path):
    cfg = tiny.compose("train", "model.freeze_encoder=true", run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="pretrained_encoder_path"):
        train.main(cfg)
    assert not (tmp_path / "run").exists()


# ---- loader errors ----------------------------------------------------------------------------------------
def test_architecture_mismatch_lists_every_differing_key(tiny, tmp_path):
    ckpt = tmp_path / "enc.pt"
    write_checkpoint(tiny, ckpt)  # d_model 32, n_head 2, enc_n_layer 1, n_latent 4, seg_len 20
    other, _ = tiny_mcfg(tiny, d_model=48, n_head=4, enc_n_layer=2, n_latent=5, seg_len=24, n_layer=2)
    with pytest.raises(EncoderCheckpointError) as ei:
        load_pretrained_encoder(CompressedAD(other), ckpt, log=lambda *_: None)
    msg = str(ei.value)
    for key, have, want in [
        ("d_model", 32, 48),
        ("n_head", 2, 4),
        ("enc_n_layer", 1, 2),
        ("n_latent", 4, 5),
        ("seg_len", 20, 24),
    ]:
        assert f"{key}: checkpoint={have} current={want}" in msg, msg
    assert "n_layer:" not in msg.replace("enc_n_layer:", "")  # decoder depth is not part of the contract
    assert str(ckpt) in msg and "\n" not in msg
    # The same error, in one line, through train.main, before anything is written.
    cfg = tiny.compose(
        "train", f"model.pretrained_encoder_path={ckpt}", "model.n_latent=5", run_dir=tmp_path / "r"
    )
    with pytest.raises(EncoderCheckpointError, match="n_latent: checkpoint=4 current=5"):
        train.main(cfg)
    assert not (tmp_path / "r").exists()


def test_every_arch_key_is_checked(tiny, tmp_path):
    ckpt = tmp_path / "enc.pt"
    write_checkpoint(tiny, ckpt)
    ck = torch.load(ckpt, weights_only=True)
    assert set(ENCODER_ARCH_KEYS) <= set(ck["config"]["model"])
    for key in ENCODER_ARCH_KEYS:
        bad = dict(ck, config={**ck["config"], "model": {**ck["config"]["model"], key: 999}})
        torch.save(bad, tmp_path / "bad.pt")
        mcfg, _ = tiny_mcfg(tiny)
        with pytest.raises(EncoderCheckpointError, match=f"{key}: checkpoint=999 current="):
            load_pretrained_encoder(CompressedAD(mcfg), tmp_path / "bad.pt", log=lambda *_: None)


def test_stage_one_folds_the_fold_length_and_stage_two_refuses_another(tiny, tmp_path):
    """model.keep_recent=K: stage 1's segments are at most seg_len - K long (what a stage-2 fold takes), its
    checkpoint records K, and a stage 2 with another K is refused in one line before anything is written."""
    cfg = tiny.compose("pretrain", "model.keep_recent=12")  # tiny: seg_len 20, min_seg_len 10 -> lengths 8
    hist = load_histories(tiny.data_path, cfg.env)
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    task = pretrain_encoder.ReconstructionTask(cfg, EncoderPretrainer(mcfg), hist)
    batch = next(iter(task.batches(0, 0, 1, 16)))
    lens = batch["seg_len"][batch["seg_len"] > 0]
    assert batch["seg"].shape[2] == 8 and (lens == 8).all()
    loss, _, _ = task.loss(task.model, batch)
    assert torch.isfinite(loss)
    wide = next(iter(pretrain_encoder.ReconstructionTask(
        tiny.compose("pretrain", "model.keep_recent=4"), EncoderPretrainer(mcfg), hist).batches(0, 0, 1, 64)))
    lens = wide["seg_len"][wide["seg_len"] > 0]
    assert wide["seg"].shape[2] == 16 and lens.min() >= 10 and lens.max() == 16
    ckpt = tmp_path / "enc.pt"
    save_encoder_checkpoint(ckpt, task.model, 1, {"model": loop.to_plain(cfg.model) | mcfg.to_dict()})
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["keep_recent"] == 12
    two = tiny.compose("train", f"model.pretrained_encoder_path={ckpt}", "sampler.schedule=rollout",
                       "model.keep_recent=4", run_dir=tmp_path / "r")
    with pytest.raises(EncoderCheckpointError, match="keep_recent: checkpoint=12 current=4"):
        train.main(two)
    assert not (tmp_path / "r").exists()


def test_missing_and_foreign_files(tiny, tmp_path, monkeypatch):
    mcfg, _ = tiny_mcfg(tiny)
    net = CompressedAD(mcfg)
    quiet = {"log": lambda *_: None}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EncoderCheckpointError) as ei:
        load_pretrained_encoder(net, "runs/nope/encoder-pretrained-final.pt", **quiet)
    assert str(tmp_path / "runs/nope/encoder-pretrained-final.pt") in str(ei.value)  # the path it looked at

    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(EncoderCheckpointError, match="notes.pt is not a readable torch checkpoint"):
        load_pretrained_encoder(net, tmp_path / "notes.pt", **quiet)

    torch.save({"model_state_dict": net.state_dict(), "config": {}}, tmp_path / "model.pt")  # a stage-2 model
    with pytest.raises(EncoderCheckpointError, match="not a CompressedAD encoder checkpoint") as ei:
        load_pretrained_encoder(net, tmp_path / "model.pt", **quiet)
    assert "encoder_state_dict" in str(ei.value)

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(EncoderCheckpointError, match="has Tensor"):
        load_pretrained_encoder(net, tmp_path / "tensor.pt", **quiet)


# ---- pretrain_encoder.main: TensorBoard + checkpoint files ------------------------------------------------
def test_pretrain_main_writes_tags_and_checkpoints(tiny, tmp_path, tb_scalars):
    run = tmp_path / "pre"
    summary = pretrain_encoder.main(
        tiny.compose("pretrain", "save_every=2", "diag_every=3", "diag_batches=2", run_dir=run)
    )
    tags = tb_scalars(run)
    for tag in (
        "pretrain/loss",
        "pretrain/r2",
        "pretrain/r2_state_depth1",
        "pretrain/baseline_r2",
        "pretrain/acc_action_depth1",
        "pretrain/baseline_acc_action_depth1",
        "pretrain/acc_exact",
        "pretrain/ablation_r2",
        "pretrain/correlation_pooled",
        "pretrain/latent_effective_rank",
        "pretrain/ablation_gap",
        "pretrain/lr",
        "pretrain/heldout_loss",
    ):
        assert tag in tags, sorted(tags)
        assert all(math.isfinite(v) for _, v in tags[tag])
    assert "pretrain/correlation" not in tags  # the unfair pooled figure only under its honest name
    assert sorted({s for s, _ in tags["pretrain/ablation_gap"]}) == [3, 6]  # diag_every=3, and at the end
    assert sorted(p.name for p in run.glob("encoder-pretrained-*.pt")) == [
        "encoder-pretrained-2.pt",
        "encoder-pretrained-4.pt",
        "encoder-pretrained-6.pt",
        "encoder-pretrained-final.pt",
    ]
    assert summary["encoder_checkpoint"] == str(run / "encoder-pretrained-final.pt")
    done = json.loads((run / "done.json").read_text())
    for key in ("r2", "r2_action", "baseline_r2", "acc_state", "baseline_acc_state", "acc_exact",
                "baseline_acc_exact", "ablation_r2", "ablation_gap"):
        assert math.isfinite(done[key]), key
        assert math.isfinite(done["test"][key]), key  # the test goals' figures, computed once at the end
    assert done["diagnostics_split"] == "val" and done["test"]["r2"] != done["r2"]
    assert "pretrain_test/r2" in tags and [s for s, _ in tags["pretrain_test/r2"]] == [6]

    for name, step in (("encoder-pretrained-2.pt", 2), ("encoder-pretrained-final.pt", 6)):
        ck = torch.load(run / name, weights_only=True)  # plain tensors/dicts/ints only
        assert set(ck) == set(REQUIRED_KEYS)
        assert type(ck["global_step"]) is int and ck["global_step"] == step
        assert type(ck["config"]) is dict and type(ck["config"]["model"]) is dict
        assert {
            k: ck["config"]["model"][k] for k in ("d_model", "n_head", "enc_n_layer", "n_latent", "seg_len")
        } == {"d_model": 32, "n_head": 2, "enc_n_layer": 1, "n_latent": 4, "seg_len": 20}
        assert ck["config"]["env"]["grid_size"] == 9
        for key in ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"):
            assert all(isinstance(v, torch.Tensor) for v in ck[key].values()) and ck[key]
    # The final file loads into a stage-2 model of the same architecture.
    mcfg, _ = tiny_mcfg(tiny)
    load_pretrained_encoder(CompressedAD(mcfg), run / "encoder-pretrained-final.pt", log=lambda *_: None)


# ---- short CLI keys ---------------------------------------------------------------------------------------
def test_short_keys_compose_into_model():
    args = rewrite_overrides(
        "pretrain",
        ["pretrain_lr=0.0005", "n_latent=15", "max_compression_depth=2", "freeze_encoder=true", "seed=3"],
    )
    assert args == [
        "pretrain_lr=0.0005",
        "model.n_latent=15",
        "model.max_compression_depth=2",
        "model.freeze_encoder=true",
        "seed=3",
    ]
    cfg = compose("pretrain", args)
    assert (cfg.pretrain_lr, cfg.model.n_latent, cfg.model.max_compression_depth) == (0.0005, 15, 2)
    assert cfg.seed == 3 and "pretrain_lr" not in cfg.model and "n_latent" not in cfg
    # The same keys reach stage 2's model group (the encoder architecture is shared).
    cfg = compose("train", rewrite_overrides("train", ["n_latent=15", "freeze_encoder=true"]))
    assert cfg.model.n_latent == 15 and cfg.model.freeze_encoder is True


def test_documented_short_key_example_builds_its_batches(tiny):
    cfg = tiny.compose(
        "pretrain",
        *rewrite_overrides("pretrain", ["pretrain_lr=0.0005", "n_latent=15", "max_compression_depth=2"]),
    )
    hist = load_histories(tiny.data_path, cfg.env)
    task = pretrain_encoder.ReconstructionTask(
        cfg, EncoderPretrainer(ModelConfig.from_cfg(cfg.model, cfg.env)), hist
    )
    batch = next(iter(task.batches(0, 0, 1, 4)))
    assert batch["seg"].shape[0] == 4 and (batch["depth"] >= 1).all()
    # The held-out diagnostics are built explicitly (not as a side effect of batches): validation and test
    # goals, each its own stream, with a training micro-batch's rows.
    diag = task.diagnostic_data(0, 1, 4)
    assert set(diag) == {"val", "test"} and all(d.global_batch_size == 4 for d in diag.values())
    loss, metrics, n_labels = task.loss(task.model, batch)
    assert loss.ndim == 0 and metrics == {} and int(n_labels) == int(batch["seg_len"].sum()) > 0


def test_effective_rank_of_identical_rows_is_zero():
    from model.losses import effective_rank

    torch.manual_seed(0)
    one = torch.nn.functional.layer_norm(torch.randn(4, 32), (32,))
    assert effective_rank(one.expand(16, -1, -1)) == 0.0  # float rounding of the mean is not "rank 1"
    assert effective_rank(torch.zeros(8, 4, 32)) == 0.0
    assert effective_rank(torch.randn(16, 4, 32)) > 10


# ---- fair stage-1 metrics -----------------------------------------------------------------------------------
def _diag_batch(tiny, **kw):
    """(mse-head ModelConfig, a stage-1 batch of depths 1..3 from the tiny train histories)."""
    mcfg, cfg = tiny_mcfg(tiny, **({"recon_loss": "mse"} | kw))
    hist = load_histories(tiny.data_path, cfg.env)
    return mcfg, PretrainBatches(hist, "train", 16, mcfg.seg_len, 10, 3, None, seed=3)[0]


def test_constant_predictor_scores_zero_r2_and_majority_accuracy(tiny):
    from model.embeddings import featurize
    from model.losses import lengths_mask, reconstruction_metrics

    mcfg, b = _diag_batch(tiny)
    seg, seg_len, depth = b["seg"], b["seg_len"], b["depth"]
    mask = lengths_mask(seg_len, seg.shape[2])
    real = seg[mask]
    # The constant-mean predictor (mse head): every transition gets the mean feature vector of the batch.
    mean = featurize(real, mcfg.grid_size, mcfg.n_actions).mean(0)
    m = reconstruction_metrics(mean.expand(*seg.shape[:3], -1), seg, seg_len, depth, mcfg, 3)
    for key in ("r2", "r2_state", "r2_action", "r2_reward", "r2_next_state"):
        assert abs(m[key]) < 1e-5, (key, m[key])
        assert m[f"baseline_{key}"] == 0.0
    # ...while the pooled correlation, the seed's figure, calls the same do-nothing predictor "good".
    assert m["correlation_pooled"] > 0.3, m["correlation_pooled"]
    # The majority-class predictor (ce head, logits peaked at each field's most common class; the state's
    # class is the grid cell) scores exactly the majority-class accuracy, counted here independently.
    ce = ModelConfig(**(mcfg.to_dict() | {"recon_loss": "ce"}))
    g, a = ce.grid_size, ce.n_actions
    rows = [tuple(t) for t in real.tolist()]
    top = {name: Counter(tuple(r[c] for c in cols) for r in rows).most_common(1)[0]
           for name, cols in {"state": (0, 1), "action": (2,), "reward": (3,), "next_state": (4, 5)}.items()}
    (sx, sy), (act,), (rew,), (nx, ny) = (top[k][0] for k in ("state", "action", "reward", "next_state"))
    logits = torch.zeros(4 * g + a + 2)
    for off, cls in ((0, sx), (g, sy), (2 * g, act), (2 * g + a, rew), (2 * g + a + 2, nx), (3 * g + a + 2, ny)):
        logits[off + cls] = 10.0
    m = reconstruction_metrics(logits.expand(*seg.shape[:3], -1), seg, seg_len, depth, ce, 3)
    for name, (_, count) in top.items():
        assert m[f"acc_{name}"] == pytest.approx(count / len(rows), abs=1e-6), name
        assert m[f"baseline_acc_{name}"] == pytest.approx(count / len(rows), abs=1e-6), name
    assert m["acc_exact"] == pytest.approx(m["baseline_acc_exact"])
    assert 0.2 < m["baseline_acc_action"] < 1 and m["baseline_acc_state"] < 0.5  # the test has teeth
    # Per depth: the baseline is recomputed on that depth's transitions.
    for d in (1, 2, 3):
        sel = mask & (depth[:, None, None] == d)
        if sel.any():
            acts = seg[sel][:, 2]
            assert m[f"baseline_acc_action_depth{d}"] == pytest.approx(
                float(torch.bincount(acts).max()) / len(acts), abs=1e-6)


def test_perfect_predictor_scores_one_and_shuffled_prediction_shows_as_ablation(tiny):
    from model.embeddings import featurize
    from model.losses import field_slices, reconstruction_metrics

    mcfg, b = _diag_batch(tiny)
    seg, seg_len, depth = b["seg"], b["seg_len"], b["depth"]
    perfect = featurize(seg, mcfg.grid_size, mcfg.n_actions)
    shuffled = perfect.roll(1, dims=0)
    m = reconstruction_metrics(perfect, seg, seg_len, depth, mcfg, 3, ablated_pred=shuffled)
    for key in ("r2", "r2_state", "r2_action", "r2_reward", "r2_next_state", "r2_depth1"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key
    for key in ("acc_state", "acc_action", "acc_reward", "acc_next_state", "acc_exact", "acc_exact_depth2"):
        assert m[key] == 1.0, key
    assert m["ablation_r2"] < 0.5 and m["ablation_acc_exact"] < 0.5, m
    # The ce head's point estimate is its expectation: peaked logits on the truth give R² -> 1.
    ce = ModelConfig(**(mcfg.to_dict() | {"recon_loss": "ce"}))
    logits = torch.cat([torch.nn.functional.one_hot(seg[..., c], sl.stop - sl.start).float() * 30
                        for c, sl in enumerate(field_slices(ce))], dim=-1)
    m = reconstruction_metrics(logits, seg, seg_len, depth, ce, 3)
    assert m["r2"] > 0.999 and m["acc_exact"] == 1.0


def test_causal_recon_decoder_sees_only_earlier_transitions(tiny):
    """Teacher forcing must not leak: the prediction of transition j depends on transitions < j (and the
    latents) only; and transition j-1 is what it gets, across segment boundaries and padding."""
    from model.reconstruction import ReconstructionDecoder, previous_transitions

    mcfg, b = _diag_batch(tiny, recon_decoder="causal", dropout=0.0)
    seg, seg_len = b["seg"], b["seg_len"]
    prev, has = previous_transitions(seg, seg_len)
    i = int(torch.nonzero(b["depth"] >= 2)[0])  # a sample with a segment boundary
    real = [t for k in range(seg.shape[1]) for t in seg[i, k, : seg_len[i, k]].tolist()]
    s = seg.shape[2]
    flat_pos = [k * s + t for k in range(seg.shape[1]) for t in range(int(seg_len[i, k]))]
    assert not has[i, flat_pos[0]]
    assert [prev[i, p].tolist() for p in flat_pos[1:]] == real[:-1]

    torch.manual_seed(0)
    dec = ReconstructionDecoder(mcfg).eval()
    lat = torch.randn(seg.shape[0], mcfg.n_latent, mcfg.d_model)
    with torch.no_grad():
        base = dec(lat, seg, seg_len).flatten(1, 2)
        j = flat_pos[len(flat_pos) // 2]
        k, t = divmod(j, s)
        changed = seg.clone()
        changed[i, k, t:] = (changed[i, k, t:] + 1) % 2  # alter transition j and everything after it
        changed[i, k + 1:] = (changed[i, k + 1:] + 1) % 2
        out = dec(lat, changed, seg_len).flatten(1, 2)
    upto = [p for p in flat_pos if p <= j]
    after = [p for p in flat_pos if p > j]
    assert torch.equal(out[i, upto], base[i, upto])  # nothing from j onwards reaches positions <= j
    assert not torch.allclose(out[i, after[0]], base[i, after[0]])  # but j is seen by j+1
    others = [r for r in range(seg.shape[0]) if r != i]
    assert torch.equal(out[others], base[others])


def test_depth_curriculum_opens_depths_at_their_steps(tiny):
    _, cfg = tiny_mcfg(tiny)
    hist = load_histories(tiny.data_path, cfg.env)
    ds = PretrainBatches(hist, "train", 16, 20, 10, 3, None, seed=0, depth_starts=[4, 8])
    plain = PretrainBatches(hist, "train", 16, 20, 10, 3, None, seed=0)
    depths = [set(ds.global_specs(k).depth.tolist()) for k in range(14)]
    assert all(d == {1} for d in depths[:4])
    assert all(d <= {1, 2} for d in depths[4:8]) and 2 in set().union(*depths[4:8])
    assert set().union(*depths[8:]) == {1, 2, 3}
    assert [ds[k]["depth"].tolist() for k in range(10)] == [ds[k]["depth"].tolist() for k in range(10)]  # pure in k
    assert 3 in set().union(*(set(plain.global_specs(k).depth.tolist()) for k in range(4)))  # no curriculum
    # From the config: fractions of pretrain_steps; the diagnostics stream never has a curriculum.
    cfg = tiny.compose("pretrain", "pretrain_steps=10", "sampler.pretrain_depth_curriculum=[0.5,0.8]")
    assert PretrainBatches.from_cfg(hist, cfg, batch_size=8, curriculum=True).depth_starts == [5, 8]
    assert PretrainBatches.from_cfg(hist, cfg, batch_size=8).depth_starts is None
    with pytest.raises(ValueError, match="one start"):
        PretrainBatches(hist, "train", 16, 20, 10, 3, None, depth_starts=[4])


def test_field_decoder_reads_only_earlier_fields(tiny):
    """recon_decoder=causal_fields: teacher-forced, the logits of a field depend on the transition's own
    earlier fields only (s <- nothing of its own, a <- s, s' <- s, a, r <- s, a, s'); greedy (eval), on
    none of its own fields (it feeds its argmax instead)."""
    from model.losses import field_slices
    from model.reconstruction import ReconstructionDecoder

    mcfg, b = _diag_batch(tiny, recon_decoder="causal_fields", recon_loss="ce", dropout=0.0)
    seg, seg_len = b["seg"], b["seg_len"]
    torch.manual_seed(0)
    dec = ReconstructionDecoder(mcfg).eval()
    lat = torch.randn(seg.shape[0], mcfg.n_latent, mcfg.d_model)
    sx, sy, a, r, nx, ny = field_slices(mcfg)
    last = seg_len[0, -1] - 1  # the last real transition of sample 0: nothing after it in the sample
    g = mcfg.grid_size

    def run(changed, teacher):
        with torch.no_grad():
            return dec(lat, changed, seg_len, teacher_fields=teacher)[0, -1, last]

    for teacher in (True, False):
        base = run(seg, teacher)
        for col, seen_by in ((0, [a, nx, ny, r]), (2, [nx, ny, r]), (4, [r]), (3, [])):
            changed = seg.clone()
            changed[0, -1, last, col] = (changed[0, -1, last, col] + 1) % (2 if col == 3 else min(g, 5))
            out = run(changed, teacher)
            moved = [sl for sl in (sx, sy, a, r, nx, ny) if not torch.equal(out[sl], base[sl])]
            if teacher:
                assert all(sl in seen_by for sl in moved), (col, moved)
                assert all(sl in moved for sl in seen_by), (col, moved)
            else:
                assert not moved, (col, moved)  # greedy: its own fields never leak in


def test_slot_init_keeps_the_encoder_contract_and_starts_chunked(tiny, tmp_path):
    """pretrain_slot_init only initialises existing weights: same state-dict keys and shapes, the
    checkpoint loads into stage 2 and gives identical latents; at step 0 latent i attends mostly to
    chunk i of the segment."""
    from model.compressor import Compressor

    mcfg, cfg = tiny_mcfg(tiny, pretrain_slot_init=True, recon_decoder="causal_fields", recon_loss="ce")
    plain, _ = tiny_mcfg(tiny)
    torch.manual_seed(0)
    pre = EncoderPretrainer(mcfg).eval()
    ref = EncoderPretrainer(plain)
    for part in ("encoder", "embed_context", "embed_ln"):
        got, want = getattr(pre, part).state_dict(), getattr(ref, part).state_dict()
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}, part
    path = tmp_path / "encoder-pretrained-final.pt"
    save_encoder_checkpoint(path, pre, 3, {"model": loop.to_plain(cfg.model) | mcfg.to_dict(),
                                           "env": loop.to_plain(cfg.env)})
    stage2_cfg, _ = tiny_mcfg(tiny)  # stage 2 does not know the key: its default
    net = CompressedAD(stage2_cfg).eval()
    load_pretrained_encoder(net, path, log=lambda *_: None)
    hist = load_histories(tiny.data_path, cfg.env)
    b = PretrainBatches(hist, "train", 8, mcfg.seg_len, 10, 3, None, seed=0)[0]
    with torch.no_grad():
        want = Compressor.compress(pre, b["seg"], b["seg_len"])[0]
        got = net.compress(b["seg"], b["seg_len"])[0]
    assert torch.equal(got, want)
    # Step-0 attention of the encoder's first block: latent query i -> segment positions.
    enc, s, n = pre.encoder, mcfg.seg_len, mcfg.n_latent
    with torch.no_grad():
        emb = pre.embed_transitions(b["seg"][:, -1])
        x = enc.blocks[0].ln1(torch.cat([emb + enc.seg_pos, enc.queries.expand(emb.shape[0], -1, -1)], 1))
        attn = enc.blocks[0].attn
        q, k = attn._heads(attn.q(x)), attn._heads(attn.kv(x).chunk(2, -1)[0])
        w = (q[:, :, s:] @ k[:, :, :s].transpose(-1, -2)).softmax(-1).mean((0, 1))  # [n, S]
    chunk = torch.arange(s) * n // s
    in_own = torch.stack([w[i, chunk == i].sum() for i in range(n)])
    assert (in_own > 2.0 / n).all(), in_own  # well above uniform (1 / n)
    assert (w.argmax(-1) * n // s == torch.arange(n)).all(), w.argmax(-1)


def test_copy_previous_state_baseline_counts_the_free_state_of_the_prefix(tiny):
    from model.losses import copy_previous_state, lengths_mask, reconstruction_metrics

    mcfg, b = _diag_batch(tiny)
    seg, seg_len, depth = b["seg"], b["seg_len"], b["depth"]
    mask = lengths_mask(seg_len, seg.shape[2])
    copied = copy_previous_state(seg, seg_len, torch.tensor([4, 4]))
    # counted independently: walk each sample's transitions in history order, copying the previous s'
    hits = total = 0
    for i in range(seg.shape[0]):
        prev = (4, 4)
        for j in [j for j in range(seg.shape[1]) if seg_len[i, j] > 0]:  # used slots, oldest first
            for t in range(int(seg_len[i, j])):
                tr = seg[i, j, t].tolist()
                assert tuple(copied[i, j, t].tolist()) == prev
                hits += prev == (tr[0], tr[1])
                total += 1
                prev = (tr[4], tr[5])
    assert total == int(mask.sum()) and 0.9 < hits / total < 1.0  # Darkroom: s = previous s' except resets
    m = reconstruction_metrics(featurize_zero(seg, mcfg), seg, seg_len, depth, mcfg, 3)
    assert 0.9 < m["copyprev_acc_state"] <= 1.0 and "copyprev_acc_state_depth1" in m


def featurize_zero(seg, mcfg):
    from model.embeddings import featurize

    return torch.zeros_like(featurize(seg, mcfg.grid_size, mcfg.n_actions))


def test_encoder_pretrained_on_other_data_is_refused_unless_allowed(tiny, tmp_path, one_thread):
    pre = tmp_path / "pre"
    pretrain_encoder.main(tiny.compose("pretrain", "pretrain_steps=2", run_dir=pre))
    ckpt = torch.load(pre / "encoder-pretrained-final.pt", weights_only=True)
    assert ckpt["config"]["data_fingerprint"] == load_histories(tiny.data_path, compose("collect", []).env).fingerprint
    other = tmp_path / "other"
    collect_small(other, "source.n_stream=3")
    enc = f"model.pretrained_encoder_path={pre / 'encoder-pretrained-final.pt'}"
    raises_one_line(EncoderCheckpointError, r"was pretrained on other data \(fingerprint \w+\) than this run's data_path.*"
            r"allow_data_change=true", train.main,
            tiny.compose("train", enc, "max_steps=1", data_path=other, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    train.main(tiny.compose("train", enc, "max_steps=1", "allow_data_change=true", data_path=other,
                            run_dir=tmp_path / "r"))
    train.main(tiny.compose("train", enc, "max_steps=1", run_dir=tmp_path / "same"))  # same data: fine


def _encoder_ckpt(tiny, path: Path, mutate) -> Path:
    from model import EncoderPretrainer, ModelConfig

    cfg = tiny.compose("pretrain")
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    torch.manual_seed(0)
    save_encoder_checkpoint(path, EncoderPretrainer(mcfg), 5, {"model": mcfg.to_dict()})
    ck = torch.load(path, weights_only=True)
    mutate(ck)
    torch.save(ck, path)
    return path


def _first_key(ck, part="encoder_state_dict"):
    return next(iter(ck[part]))


@pytest.mark.parametrize("mutate, match", [
    (lambda ck: ck["encoder_state_dict"][_first_key(ck)].fill_(float("nan")),
     r"'encoder_state_dict\.\S+' holds NaN or infinite values"),
    (lambda ck: ck["embed_ln_state_dict"].update(weight=torch.ones(32, dtype=torch.int64)),
     r"'embed_ln_state_dict.weight' has dtype torch.int64, the model needs torch.float32"),
    (lambda ck: ck["embed_ln_state_dict"].update(weight=torch.ones(7)),
     r"'embed_ln_state_dict.weight' has shape \[7\], the model needs \[32\]"),
    (lambda ck: ck.update(encoder_state_dict=list(ck["encoder_state_dict"].values())),
     r"'encoder_state_dict' is a list, not a dict of tensors"),
    (lambda ck: ck.update(config=None), r"has a NoneType as 'config' instead of the dict"),
    (lambda ck: ck.update(config="ad_compressed"), r"has a str as 'config' instead of the dict"),
    (lambda ck: ck.update(config={"model": "x"}), r"has a str as config\['model'\]"),
])
def test_bad_encoder_weights_name_the_first_bad_key(tiny, tmp_path, mutate, match):
    p = _encoder_ckpt(tiny, tmp_path / "enc.pt", mutate)
    raises_one_line(EncoderCheckpointError, match, train.main,
            tiny.compose("train", f"model.pretrained_encoder_path={p}", run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_old_encoder_checkpoints_load_as_replace_and_a_gated_one_refuses_a_replace_model(tmp_path):
    from model.checkpoint import EncoderCheckpointError, check_architecture

    cfg = ModelConfig(grid_size=9, d_model=32, n_head=2, n_layer=1, enc_n_layer=1, n_latent=3, seg_len=8)
    saved = cfg.arch_dict()
    del saved["latent_update"]  # written before the key existed
    check_architecture({"model": saved}, cfg, "old.pt")
    with pytest.raises(EncoderCheckpointError, match="latent_update: checkpoint=gated current=replace"):
        check_architecture({"model": {**saved, "latent_update": "gated"}}, cfg, "new.pt")


G = 9


def _cfg(**kw) -> ModelConfig:
    base = {"grid_size": G, "d_model": 64, "n_head": 4, "n_layer": 1, "enc_n_layer": 2, "n_latent": 5, "seg_len": 20,
            "dropout": 0.0, "recon_loss": "ce", "recon_decoder": "causal", "max_compression_depth": 3}
    return ModelConfig(**(base | kw))


def _transitions(shape) -> torch.Tensor:
    t = torch.randint(0, G, (*shape, 6))
    t[..., 2] = torch.randint(0, 5, shape)
    t[..., 3] = torch.randint(0, 2, shape)
    return t


def test_onehot_state_features_extend_the_scalar_ones_with_each_coordinate():
    trans = _transitions((3, 7))
    scalar, onehot = _cfg(state_features="scalar"), _cfg(state_features="onehot")
    assert torch.equal(input_features(trans, scalar), featurize(trans, G))
    f = input_features(trans, onehot)
    assert f.shape == (3, 7, onehot.in_dim) and onehot.in_dim == scalar.feat_dim + 4 * G
    assert torch.equal(f[..., :scalar.feat_dim], featurize(trans, G))
    codes = f[..., scalar.feat_dim:].view(3, 7, 4, G)
    assert torch.equal(codes.argmax(-1), trans[..., [0, 1, 4, 5]]) and torch.equal(codes.sum(-1), torch.ones(3, 7, 4))
    # The shared embedding (an encoder-checkpoint weight) reads exactly these features.
    net = EncoderPretrainer(onehot)
    assert net.embed_context.in_features == onehot.in_dim
    assert net.embed_transitions(trans).shape == (3, 7, onehot.d_model)


def test_state_features_is_part_of_the_encoder_contract_and_old_checkpoints_read_as_scalar():
    saved = _cfg(state_features="scalar").arch_dict()
    del saved["state_features"]  # an encoder written before the key existed
    check_architecture({"model": saved}, _cfg(state_features="scalar"), "old.pt")
    with pytest.raises(EncoderCheckpointError, match="state_features: checkpoint=scalar current=onehot"):
        check_architecture({"model": saved}, _cfg(state_features="onehot"), "old.pt")
    with pytest.raises(ConfigError, match="model.state_features='binary'"):
        _cfg(state_features="binary").validate()


def test_keep_recent_is_part_of_the_encoder_contract_and_old_checkpoints_read_as_zero():
    """The fold length seg_len - keep_recent is what stage 1 trained the encoder to fold: a stage 2 that
    folds other lengths is refused in one line; a checkpoint written before the key folded whole windows."""
    saved = _cfg().arch_dict()
    del saved["keep_recent"]
    check_architecture({"model": saved}, _cfg(), "old.pt")
    with pytest.raises(EncoderCheckpointError, match="keep_recent: checkpoint=0 current=10") as ei:
        check_architecture({"model": saved}, _cfg(keep_recent=10), "old.pt")
    assert "\n" not in str(ei.value)
    assert _cfg(keep_recent=5).fold_len == 15 and _cfg().fold_len == 20
    with pytest.raises(ConfigError, match="model.keep_recent=20 must be in"):
        _cfg(keep_recent=20).validate()


def test_slot_init_gives_every_latent_head_its_own_segment_position_and_not_its_query_token():
    """At step 0 head h of latent i in the encoder's first block attends to one segment position, a
    different one for each (i, h), with the segment length = n_latent x n_head (the quick preset's shape). The
    query tokens are keys too: before the negated code, head 0 of every latent spent half its attention on
    its own query token and read back every 4th position at ~0.6 accuracy instead of ~1.0."""
    cfg = _cfg(pretrain_slot_init=True, state_features="onehot")
    torch.manual_seed(0)
    net = EncoderPretrainer(cfg).eval()
    enc, s, n, h = net.encoder, cfg.seg_len, cfg.n_latent, cfg.n_head
    seg = _transitions((16, s))
    with torch.no_grad():
        emb = net.embed_transitions(seg)
        x = enc.blocks[0].ln1(torch.cat([emb + enc.seg_pos, enc.queries.expand(16, -1, -1)], 1))
        attn = enc.blocks[0].attn
        q, k = attn._heads(attn.q(x)), attn._heads(attn.kv(x).chunk(2, -1)[0])
        w = (q[:, :, s:] @ k.transpose(-1, -2) / (cfg.d_model // h) ** 0.5).softmax(-1).mean(0)  # [h, n, S + n]
    on_queries = w[..., s:].sum(-1)
    assert (on_queries < 0.05).all(), on_queries
    top = w[..., :s].max(-1)
    assert (top.values > 0.5).all(), top.values
    slots = top.indices.T.flatten()  # [(latent i, head h)], latent-major
    assert len(set(slots.tolist())) == n * h  # every position of the segment has its own reader


def test_linear_readout_adds_a_per_position_map_of_the_latents_and_keeps_the_decoder_causal():
    cfg = _cfg(recon_linear_readout=True)
    torch.manual_seed(0)
    dec = ReconstructionDecoder(cfg).eval()
    assert dec.readout.in_features == cfg.n_latent * cfg.d_model
    assert dec.readout.out_features == cfg.max_compression_depth * cfg.seg_len * recon_out_dim(cfg)
    seg = _transitions((4, 2, cfg.seg_len))
    seg_len = torch.tensor([[20, 20], [0, 12], [15, 20], [0, 20]])
    lat = torch.randn(4, cfg.n_latent, cfg.d_model)
    with torch.no_grad():
        base = dec(lat, seg, seg_len)
        nudged = lat.clone()
        nudged[:, 0, 0] += 1.0
        plain = dec.readout
        dec.readout = None
        without = dec(lat, seg, seg_len)
        dec.readout = plain
        moved = dec(nudged, seg, seg_len)
        changed = seg.clone()
        changed[:, 1, 10:] = (changed[:, 1, 10:] + 1) % 2
        later = dec(lat, changed, seg_len)
    # Slot k of D decodes with its age's maps: the newest slot uses age 0's.
    r = dec.readout(lat.flatten(1)).view(4, cfg.max_compression_depth, cfg.seg_len, -1)
    assert torch.allclose(base - without, r[:, [1, 0]], atol=1e-5)
    assert not torch.allclose(moved, base)  # every position can read every latent
    # Teacher forcing still leaks nothing forward: positions before 10 of slot 1 are unchanged.
    assert torch.equal(later[:, 0], base[:, 0]) and torch.equal(later[:, 1, :10], base[:, 1, :10])
    assert not torch.allclose(later[:, 1, 11:], base[:, 1, 11:])


def test_linear_readout_reaches_every_field_of_the_field_decoder():
    """recon_decoder=causal_fields: the readout's logits are added to each field's head (before its argmax is
    fed on): with the readout's weights zeroed the output is the plain decoder's, with them set every field moves."""
    cfg = _cfg(recon_linear_readout=True, recon_decoder="causal_fields")
    torch.manual_seed(0)
    dec = ReconstructionDecoder(cfg).eval()
    seg = _transitions((2, 1, cfg.seg_len))
    seg_len = torch.full((2, 1), cfg.seg_len)
    lat = torch.randn(2, cfg.n_latent, cfg.d_model)
    with torch.no_grad():
        torch.nn.init.zeros_(dec.readout.weight)
        torch.nn.init.zeros_(dec.readout.bias)
        zero = dec(lat, seg, seg_len, teacher_fields=True)
        readout, dec.readout = dec.readout, None
        plain = dec(lat, seg, seg_len, teacher_fields=True)
        dec.readout = readout
        torch.nn.init.normal_(dec.readout.bias)
        moved = dec(lat, seg, seg_len, teacher_fields=True)
    assert torch.equal(zero, plain)
    bias = dec.readout.bias.view(cfg.max_compression_depth, cfg.seg_len, -1)[0]  # the newest slot: age 0
    assert torch.allclose(moved - plain, bias.expand_as(moved), atol=1e-5)  # teacher-forced: a pure offset


def test_linear_readout_reads_back_a_linear_code_of_every_position():
    """The readout's reason to exist, on a toy: latents that are a fixed random linear code of the segment's
    actions (uniform over 5: chance 0.2). 150 Adam steps of the decoder reach > 0.9 action accuracy at
    every position, which needs each position to address its own part of the code."""
    torch.manual_seed(0)
    cfg = _cfg(recon_linear_readout=True, recon_decoder="parallel", seg_len=10, n_latent=2, d_model=32, n_head=2)
    dec = ReconstructionDecoder(cfg)
    code = torch.randn(cfg.seg_len * 5, cfg.n_latent * cfg.d_model) / 5
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)

    def batch(n):
        seg = _transitions((n, 1, cfg.seg_len))
        lat = (F.one_hot(seg[:, 0, :, 2], 5).float().flatten(1) @ code).view(n, cfg.n_latent, cfg.d_model)
        return lat, seg, torch.full((n, 1), cfg.seg_len)

    for _ in range(150):
        lat, seg, seg_len = batch(64)
        logits = dec(lat, seg, seg_len)[..., 2 * G: 2 * G + 5]  # 'ce' layout: sx, sy (G each), a, r, nsx, nsy
        loss = F.cross_entropy(logits.reshape(-1, 5), seg[..., 2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lat, seg, seg_len = batch(256)
    with torch.no_grad():
        acc = (dec(lat, seg, seg_len)[..., 2 * G: 2 * G + 5].argmax(-1) == seg[..., 2]).float().mean((0, 1))
    assert (acc > 0.9).all(), acc


def _tr(s, a, r, ns):
    return [s[0], s[1], a, r, ns[0], ns[1]]


def test_task_targets_are_the_newest_reward_cell_and_every_visited_cell_never_padding():
    from model.task_targets import task_targets

    g = 4
    seg = torch.zeros(3, 2, 3, 6, dtype=torch.long)
    # sample 0: reward seen at (1, 2) in the older slot, then at (3, 3) in the newer one -> the newer
    seg[0, 0, :2] = torch.tensor([_tr((0, 0), 1, 0, (1, 0)), _tr((1, 2), 0, 1, (1, 2))])
    seg[0, 1, :1] = torch.tensor([_tr((3, 2), 3, 1, (3, 3))])
    seg[0, 1, 1:] = torch.tensor(_tr((2, 2), 0, 1, (2, 2)))  # padding: must count for nothing
    # sample 1: no reward at all; sample 2: depth 1 (slot 0 unused), reward at (0, 1)
    seg[1, 1, :3] = torch.tensor([_tr((0, 0), 0, 0, (0, 0)), _tr((0, 0), 1, 0, (1, 0)), _tr((1, 0), 3, 0, (1, 1))])
    seg[2, 1, :1] = torch.tensor([_tr((0, 0), 3, 1, (0, 1))])
    seg_len = torch.tensor([[2, 1], [0, 3], [0, 1]])
    goal, visited = task_targets(seg, seg_len, g)
    assert goal.tolist() == [[3, 3], [g, g], [0, 1]]
    cells = [sorted(torch.nonzero(v)[:, 0].tolist()) for v in visited]
    assert cells[0] == sorted({0, 1 * g, 1 * g + 2, 3 * g + 2, 3 * g + 3})
    assert cells[1] == [0, 1 * g, 1 * g + 1]
    assert cells[2] == [0, 1]


def test_pretraining_with_task_targets_logs_them_beside_their_baselines(tiny, tmp_path):
    import pretrain_encoder

    out = pretrain_encoder.main(tiny.compose("pretrain", "pretrain_steps=6", "model.recon_task_weight=0.5",
                                             "diag_every=3", run_dir=tmp_path / "p"))
    for key in ("task_goal_acc", "task_visited_acc", "task_visited_f1", "baseline_task_goal_acc",
                "baseline_task_visited_acc", "ablation_task_goal_acc"):
        assert 0.0 <= out[key] <= 1.0, (key, out)
    ck = torch.load(tmp_path / "p" / "encoder-pretrained-final.pt", weights_only=True)
    assert set(ck) >= {"encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"}
    assert not any("task" in k for k in ck), "the task head is not an encoder weight"
    with pytest.raises(ConfigError, match="recon_task_weight=-1"):
        pretrain_encoder.main(tiny.compose("pretrain", "model.recon_task_weight=-1", run_dir=tmp_path / "bad"))


def test_a_model_config_saved_before_state_features_builds_the_scalar_embedding():
    """model.pt / encoder checkpoints written before the key: no state_features in their config -> scalar."""
    saved = {"name": "ad_compressed", "d_model": 32, "n_head": 2, "n_latent": 3, "seg_len": 8}
    cfg = ModelConfig.from_cfg(saved, {"grid_size": G, "n_actions": 5})
    assert cfg.state_features == "scalar" and cfg.in_dim == cfg.feat_dim == 10
