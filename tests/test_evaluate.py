"""evaluate.py: rollout wiring (an oracle reaches the optimal return), determinism, constant memory for
CompressedAD and AD over long rollouts, summary math, and main(cfg) end to end on a tiny saved model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import evaluate
from env import goal_split, optimal_return
from model import build_model

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")
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
    out = evaluate.incontext_rollout(Oracle(goals, 2), ENV, goals, n_episodes=3, seeds_per_goal=2,
                                     device="cpu", seed=0, sample=sample)
    assert out["returns"].shape == (len(goals), 2, 3)
    expect = np.array([optimal_return(g, 9, 20) for g in goals])
    np.testing.assert_array_equal(out["optimal"], expect)
    np.testing.assert_array_equal(out["returns"], np.broadcast_to(expect[:, None, None], (len(goals), 2, 3)))
    s = evaluate.summarize(out["returns"], out["optimal"], horizon=20)
    assert s["last_k_normalized"] == pytest.approx(1.0)


def test_oracle_sparse_reward_env():
    env = {**ENV, "grid_size": 17, "horizon": 50, "reward_mode": "once"}
    goals = [(0, 0), (16, 16), (8, 8), (3, 12)]
    out = evaluate.incontext_rollout(Oracle(goals, 1, once=True), env, goals, 2, 1, "cpu", seed=0)
    np.testing.assert_array_equal(out["returns"], 1.0)


def test_rollout_shapes_determinism_and_rng_isolation():
    model = tiny_model()
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run = lambda seed: evaluate.incontext_rollout(model, ENV, TEST_GOALS[:3], 2, 2, "cpu", seed=seed)["returns"]
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 2, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "a different seed should draw different actions"
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must not be consumed"
    assert model.training, "the caller's train mode must be restored"


def test_greedy_rollout_seeds_are_identical():
    out = evaluate.incontext_rollout(tiny_model(), ENV, TEST_GOALS[:2], 2, 3, "cpu", seed=0, sample=False)
    r = out["returns"]
    assert (r == r[:, :1]).all()


@pytest.mark.parametrize("name", ["ad_compressed", "ad"])
def test_long_rollout_constant_memory(name):
    spy = MemorySpy(tiny_model(name).eval())
    out = evaluate.incontext_rollout(spy, ENV, TEST_GOALS[:2], n_episodes=30, seeds_per_goal=2, device="cpu",
                                     seed=0)
    assert np.isfinite(out["returns"]).all() and out["returns"].shape == (2, 2, 30)
    assert len(spy.sizes) == 30 * 20
    assert len({s for s, _ in spy.sizes}) == 1, "the raw buffer must not grow with the history"
    if name == "ad_compressed":
        assert spy.st.n_compressions == 30 * 20 // TINY["seg_len"]
        assert max(c for _, c in spy.sizes) <= TINY["n_latent"] + TINY["seg_len"]


def test_summarize_math():
    # 2 goals x 2 seeds x 3 episodes; goal-averaged curves per seed: seed0 = [1, 2, 3], seed1 = [3, 4, 5].
    r = np.array([[[0, 2, 4], [2, 4, 6]],
                  [[2, 2, 2], [4, 4, 4]]], dtype=float)
    s = evaluate.summarize(r, [8.0, 12.0], last_k=2, horizon=10)
    assert s["curve"] == [2.0, 3.0, 4.0] and s["curve_std"] == [1.0, 1.0, 1.0]
    assert s["first_episode"] == 2.0 and s["last_k_mean"] == 3.5 and s["mean_return"] == 3.0
    assert s["last_k_std"] == 1.0  # seed last-2 means 2.5 and 4.5
    assert s["optimal_mean"] == 10.0 and s["last_k_normalized"] == pytest.approx(0.35)
    assert s["first_episode_normalized"] == pytest.approx(0.2)
    assert s["reward_per_step"] == pytest.approx(0.3) and s["reward_per_step_last_k"] == pytest.approx(0.35)
    assert evaluate.summarize(r, [8.0, 12.0], last_k=50)["last_k"] == 3  # clipped to n_episodes
    tags = evaluate.eval_scalars(s, "test")
    assert tags["eval/return_test"] == tags["eval/return_test_last2"] == 3.5
    assert tags["eval/reward_per_step_test"] == pytest.approx(0.3)
    with pytest.raises(evaluate.EvalError, match="optimal"):
        evaluate.summarize(r, [1.0], last_k=2)


def test_search_and_use_splits_finding_from_returning():
    # goal 0 (optimal 10): seed 0 finds it in episode 2, then 5 and 10; seed 1 never does.
    # goal 1 (optimal 4): seed 0 finds it in episode 1 then forgets (0, 2); seed 1 finds it only in the last.
    r = np.array([[[0, 3, 5, 10], [0, 0, 0, 0]],
                  [[4, 0, 2, 0], [0, 0, 0, 1]]], dtype=float)
    s = evaluate.search_and_use(r, [10.0, 4.0])
    assert s["found_goal_frac"] == 0.75
    assert s["episodes_to_first_goal"] == pytest.approx((2 + 1 + 4) / 3)
    # after the first find: goal 0 seed 0 -> 0.5, 1.0; goal 1 seed 0 -> 0, 0.5, 0; goal 1 seed 1 -> nothing
    assert s["return_after_found_normalized"] == pytest.approx((0.5 + 1.0 + 0 + 0.5 + 0) / 5)
    assert evaluate.search_and_use(np.zeros((1, 2, 3)), [5.0]) == {
        "found_goal_frac": 0.0, "episodes_to_first_goal": None, "return_after_found_normalized": None}
    assert evaluate.summarize(r, [10.0, 4.0])["found_goal_frac"] == 0.75


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def test_main_end_to_end(tmp_path, tiny):
    """A model.pt whose config names the tiny dataset: rollouts on test, validation and train-sample goals,
    learning-speed metrics, the source's own curve, and the same-position loss + memory probe."""
    env = {**ENV, "n_val_goals": 5}  # the tiny dataset is collected with the default env (5 validation goals)
    model = tiny_model()
    torch.save({"model_state_dict": model.state_dict(), "global_step": 42,
                "config": {"model": TINY, "env": env, "data_path": str(tiny.data_path)}}, tmp_path / "model.pt")
    cfg = _compose([f"run_dir={tmp_path}", "n_episodes=6", "seeds_per_goal=2", "n_train_goals=2",
                    "last_k=2", "device=cpu", "progress=false"])
    rep = evaluate.main(cfg)

    import json
    data = json.loads((tmp_path / "eval.json").read_text())
    assert {"config", "splits", "metrics", "wall_s", "global_step", "env", "same_position"} <= data.keys()
    assert data["global_step"] == 42 and rep["metrics"] == data["metrics"]
    test = data["splits"]["test"]
    assert [tuple(g) for g in test["goals"]] == TEST_GOALS
    assert len(test["per_goal"]) == 8 and len(test["per_goal"][0]["curve"]) == 6
    assert np.asarray(test["returns"]).shape == (8, 2, 6)
    assert len(data["splits"]["train"]["goals"]) == 2 and len(data["splits"]["val"]["goals"]) == 5
    s = test["summary"]
    assert {"last_k_normalized", "reward_per_step", "curve", "last_k_std", "episodes_to_0.5", "episodes_to_0.8",
            "episodes_to_0.9", "auc_normalized", "per_goal_last"} <= s.keys()
    assert len(s["per_goal_last"]) == 8 and s["auc_normalized"] == pytest.approx(s["mean_return_normalized"])
    # the source algorithm's own learning on the same goals, from the dataset's meta.json
    meta = json.loads((tiny.data_path / "meta.json").read_text())
    assert test["source"]["curve"] == meta["return_curve_test"]
    assert data["splits"]["val"]["source"]["curve"] == meta["return_curve_val"]
    # the same-position loss covers every step of every held-out history, with the memory probe
    for split in ("val", "test"):
        sp = data["same_position"][split]
        assert sp["n_steps"] == 200 and sp["n_histories"] == len(meta["split"][f"{split}_goals"])
        assert {"k0", "k1", "all", "verdict"} <= sp["memory_probe"].keys()
        assert data["metrics"][f"heldout/loss_{split}"] == sp["loss"] > 0
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for t in ("eval/return_test", "eval/return_test_last2", "eval/return_test_normalized",
              "eval/reward_per_step_test", "eval/return_train", "eval/reward_per_step_train", "eval/return_val",
              "eval/auc_test_normalized"):
        assert t in tags
    ev = acc.Scalars("eval/return_test_normalized")[0]
    assert ev.step == 42 and ev.value == pytest.approx(data["metrics"]["eval/return_test_normalized"])
    assert [e.step for e in acc.Scalars("eval/curve_test")] == list(range(1, 7))

    # Without a dataset: the rollouts alone, if asked; otherwise a one-line error that says what to pass.
    torch.save({"model_state_dict": model.state_dict(), "global_step": 1, "config": {"model": TINY, "env": env}},
               tmp_path / "model.pt")
    with pytest.raises(evaluate.EvalError, match="names no data_path.*teacher_forced=false source_curve=false"):
        evaluate.main(cfg)
    out = evaluate.main(_compose([f"run_dir={tmp_path}", "n_episodes=2", "seeds_per_goal=1", "n_train_goals=0",
                                  "device=cpu", "progress=false", "teacher_forced=false", "source_curve=false"]))
    assert out["same_position"] == {} and set(out["splits"]) == {"test", "val"}


def test_learning_speed_metrics():
    curve = [0, 0, 2, 4, 6, 8, 8, 10, 10, 10]
    # 5-episode means ending at episodes 5..10: 2.4, 4.0, 5.6, 7.2, 8.4, 9.2
    assert evaluate.episodes_to(curve, 5.0) == 7
    assert evaluate.episodes_to(curve, 4.0) == 6
    assert evaluate.episodes_to(curve, 9.7) is None
    assert evaluate.episodes_to([10, 10], 5.0) == 2  # shorter than the window: the whole curve counts
    sp = evaluate.learning_speed(curve, 10.0)
    assert sp["episodes_to_0.5"] == 7 and sp["episodes_to_0.8"] == 9 and sp["episodes_to_0.9"] == 10
    assert sp["auc_normalized"] == pytest.approx(0.58)


def test_main_missing_model_and_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no trained model at .*model\.pt.*python train\.py"):
        evaluate.main(_compose([f"run_dir={tmp_path}", "device=cpu"]))
    with pytest.raises(ValueError, match="run_dir is required"):
        evaluate.main(_compose(["device=cpu"]))


def test_load_rejects_an_encoder_checkpoint(tmp_path):
    torch.save({"encoder_state_dict": {}, "config": {"model": TINY}, "global_step": 1}, tmp_path / "model.pt")
    with pytest.raises(evaluate.EvalError, match="not a stage-2 model.pt"):
        evaluate.load_trained_model(tmp_path, "cpu")
