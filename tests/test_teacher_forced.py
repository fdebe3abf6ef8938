"""teacher_forced.py: the same-position held-out evaluation replays each model's ROLLOUT schedule exactly.

The reference is a real rollout.incontext_rollout (sampled actions, KV cache on) with record=True: scoring
its recorded transitions through `rollout_logits` must give the log-probabilities the rollout itself gave
the actions it took, at every step, across many compressions (CompressedAD) and a sliding window (AD).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import teacher_forced as tf
from env import goal_split
from model import build_model
from rollout import incontext_rollout

ENV = {"name": "darkroom", "grid_size": 9, "horizon": 20, "n_actions": 5, "reward_mode": "every_step",
       "train_frac": 0.9, "split_seed": 0}
TINY = {"d_model": 32, "n_head": 2, "n_layer": 2, "enc_n_layer": 1, "n_latent": 3, "seg_len": 7,
        "context_len": 9, "dropout": 0.0, "recon_n_layer": 1, "max_compression_depth": 2, "aux_recon_weight": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models are fastest on one thread


def tiny_model(name, seed=0, **extra):
    torch.manual_seed(seed)
    model = build_model(OmegaConf.create({**TINY, "name": name, **extra}), OmegaConf.create(ENV)).eval()
    if getattr(model, "memory_in", None) is not None:  # zero-initialised: give the decoder's view a real say
        torch.nn.init.normal_(model.memory_in.weight, std=0.5)
    return model


@pytest.mark.parametrize("name, extra, cache", [
    ("ad_compressed", {}, True), ("ad", {}, True), ("ad_compressed", {"memory_reads": "decoder"}, True),
    ("ad_compressed", {"keep_recent": 3}, True), ("ad_compressed", {"keep_recent": 3}, False),
    ("ad_compressed", {"keep_recent": 5, "latent_update": "gated", "memory_reads": "decoder"}, True)])
def test_same_position_loss_equals_the_rollouts_own_log_probs(name, extra, cache):
    """4 goals x 2 seeds x 6 episodes = 120 steps: CompressedAD compresses 17 times (depth >= 10 reached;
    with model.keep_recent = K a fold takes 7 - K steps and keeps K: 29 folds at K = 3, 57 at K = 5), AD's
    9-step window slides 111 times. Every step's loss must equal -log p(action) of the rollout, with the KV
    cache (kept tokens re-encoded after each fold) and without it."""
    model = tiny_model(name, **extra)
    ro = incontext_rollout(model, ENV, goal_split(9)[1][:4], n_episodes=6, seeds_per_goal=2, device="cpu",
                           seed=3, sample=True, use_cache=cache, record=True)
    assert ro["trans"].shape == (8, 120, 6)
    nll, ok = tf.history_nll(model, ro["trans"], "cpu", histories_per_pass=3)  # several passes, too
    assert nll.shape == (8, 120) and ok.dtype == torch.bool
    assert torch.allclose(nll, -ro["action_logp"].double(), atol=1e-5), (nll + ro["action_logp"]).abs().max()
    # the recorded histories are real Darkroom transitions in the packed layout
    t = ro["trans"]
    assert torch.equal(t[:, :-1, 4:6][:, [i for i in range(119) if (i + 1) % 20]],
                       t[:, 1:, 0:2][:, [i for i in range(119) if (i + 1) % 20]])


def test_memory_probe_all_equals_the_full_history_and_k_changes_the_memory():
    model = tiny_model("ad_compressed", seed=1)
    check_memory_probe(model, fold=7, keep=0)
    check_memory_probe(tiny_model("ad_compressed", seed=1, keep_recent=3), fold=4, keep=3)


def check_memory_probe(model, fold, keep):
    """Window m of the rollout covers steps [m*fold, m*fold + 7) and predicts from step m*fold + keep on."""
    trans = incontext_rollout(model, ENV, goal_split(9)[1][:3], n_episodes=3, seeds_per_goal=1, device="cpu",
                              seed=0, record=True)["trans"]
    full, _ = tf.history_nll(model, trans, "cpu")
    # k >= the number of compressed segments rebuilds exactly the whole-history latents
    deep, _ = tf.history_nll(model, trans, "cpu", memory_segments=60 // fold + 1)
    assert torch.allclose(deep, full, atol=1e-6)
    rep = tf.report(tf.score(model, trans, "cpu", probe=True))
    probe = rep["memory_probe"]
    assert probe["all"] == pytest.approx(float(full.mean())) == pytest.approx(rep["loss"])
    assert set(probe) >= {"k0", "k1", "k2", "k3", "all", "buckets", "all_minus_k1", "verdict"}
    assert "memory_probe" not in tf.report(tf.score(tiny_model("ad"), trans, "cpu", probe=True))  # AD: nothing to probe
    # every k agrees on the first window (no memory yet) and k0 differs later (it never has latents)
    k0, _ = tf.history_nll(model, trans, "cpu", memory_segments=0)
    k1, _ = tf.history_nll(model, trans, "cpu", memory_segments=1)
    w1, w2 = fold + 7, 2 * fold + 7  # the first steps predicted by the 3rd window and by the one after it
    assert torch.allclose(k0[:, :7], full[:, :7]) and torch.allclose(k1[:, :w1], full[:, :w1], atol=1e-6)
    assert not torch.allclose(k0[:, 7:], full[:, 7:])
    assert not torch.allclose(k1[:, w1:], full[:, w1:])  # from the 3rd window on, k1 forgets segment 1
    assert not torch.allclose(k1[:, w1:w2], full[:, w1:w2])
    assert keep + fold == 7
    with pytest.raises(ValueError, match="AD has no compressed memory"):
        tf.history_nll(tiny_model("ad"), trans, "cpu", memory_segments=1)


def test_summary_buckets_and_verdict():
    nll = torch.arange(12, dtype=torch.float64).view(2, 6)  # two histories of 6 steps
    s = tf.nll_summary(nll, torch.ones(2, 6, dtype=torch.bool), buckets=((0, 2), (2, 4), (4, None)))
    assert s["loss"] == pytest.approx(5.5) and s["acc"] == 1.0 and (s["n_histories"], s["n_steps"]) == (2, 6)
    assert s["buckets"] == {"0-2": pytest.approx(3.5), "2-4": pytest.approx(5.5), "4-end": pytest.approx(7.5)}
    assert s["loss_se"] == pytest.approx(np.std([2.5, 8.5], ddof=1) / np.sqrt(2))
    tags = tf.scalars({**s, "memory_probe": {"k0": 1.0, "k1": 0.5, "all": 0.4}}, "val")
    assert tags["heldout/loss_val"] == pytest.approx(5.5) and tags["heldout/loss_val_steps_4-end"] == 7.5
    assert tags["memory/loss_k1_val"] == 0.5 and tags["memory/loss_all_val"] == 0.4


def test_same_position_experiment_compares_runs_pairwise(tiny, tmp_path, capsys):
    """experiments/same_position.py on two model.pt files of the tiny dataset: per-run figures, the paired
    difference to the first run, the memory probe of the CompressedAD run, summary.json + table.md."""
    import json

    from experiments import same_position

    env = {**ENV, "n_val_goals": 5}
    runs = []
    for name in ("ad_compressed", "ad"):
        d = tmp_path / name
        d.mkdir()
        torch.save({"model_state_dict": tiny_model(name).state_dict(), "global_step": 3,
                    "config": {"model": {**TINY, "name": name}, "env": env, "data_path": str(tiny.data_path)}},
                   d / "model.pt")
        runs.append(str(d))
    out = tmp_path / "out"
    summary = same_position.main([*runs, "--split", "test", "val", "--device", "cpu", "--out", str(out)])
    a, b = (r["reports"]["test"] for r in summary["runs"])
    assert a["n_steps"] == b["n_steps"] == 200 and len(a["per_history"]) == 8
    d = tf.paired_difference(a, b)
    assert d["diff"] == pytest.approx(b["loss"] - a["loss"])  # equal-length histories: mean of differences
    text = (out / "table.md").read_text()
    from experiments import stats

    ci = stats.paired(dict(enumerate(b["per_history"])), dict(enumerate(a["per_history"])), "lower")
    assert ci["n"] == 8 and ci["lo"] < ci["diff"] < ci["hi"] and ci["diff"] == pytest.approx(d["diff"])
    assert stats.fmt_paired(ci, ".4f") in text and "Memory probe (test)" in text
    assert "memory_probe" in a and "memory_probe" not in b
    assert json.loads((out / "summary.json").read_text())["runs"][0]["reports"]["val"]["n_histories"] == 5
    with pytest.raises(ValueError, match="same histories"):
        tf.paired_difference(a, summary["runs"][1]["reports"]["val"])
    # a run whose dataset was re-collected since (its recorded fingerprint differs) is refused in one line,
    # not scored on histories it never saw under its name
    ck = torch.load(Path(runs[1]) / "model.pt", weights_only=False)
    ck["config"]["data_fingerprint"] = "f" * 16
    torch.save(ck, Path(runs[1]) / "model.pt")
    with pytest.raises(SystemExit) as ei:
        same_position.main([*runs, "--device", "cpu"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "re-collected since the run trained" in err


def test_memory_verdict_needs_a_clear_and_relevant_gain():
    base = torch.linspace(0.5, 1.5, 40, dtype=torch.float64)[:, None].expand(40, 10).clone()
    noise = torch.linspace(-1e-4, 1e-4, 40, dtype=torch.float64)[:, None]

    def verdict(gain):  # 'all' is lower than k1 by `gain` nats at every step (+ a little per-history noise)
        return tf.report({"nll": base - gain + noise, "nll_k0": base + 0.1, "nll_k1": base})["memory_probe"]

    assert verdict(0.02)["verdict"].startswith("the whole compressed history predicts better")
    assert "negligible" in verdict(0.001)["verdict"]          # 10 standard errors, but only 0.001 nats
    assert verdict(0.0)["verdict"].startswith("the compressed memory carries nothing measurable")
    assert verdict(0.02)["all_minus_k1"] == pytest.approx(-0.02)
