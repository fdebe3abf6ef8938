"""evaluate.py: main(cfg) end to end on a tiny saved model, and its one-line errors (bad values, a missing GPU,
a model whose weights are not finite)."""

import shutil
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import raises_one_line
from hydra import compose, initialize_config_dir

import evaluate
from tests.test_rollout import ENV, TEST_GOALS, TINY, tiny_model

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")


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


def test_main_missing_model_and_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no trained model at .*model\.pt.*python train\.py"):
        evaluate.main(_compose([f"run_dir={tmp_path}", "device=cpu"]))
    with pytest.raises(ValueError, match="run_dir is required"):
        evaluate.main(_compose(["device=cpu"]))


def test_load_rejects_an_encoder_checkpoint(tmp_path):
    torch.save({"encoder_state_dict": {}, "config": {"model": TINY}, "global_step": 1}, tmp_path / "model.pt")
    with pytest.raises(evaluate.EvalError, match="not a stage-2 model.pt"):
        evaluate.load_trained_model(tmp_path, "cpu")


def test_evaluate_rejects_bad_values_and_names_a_missing_gpu(tmp_path, finished):
    run = finished / "runs" / "done"
    raises_one_line(evaluate.EvalError, r"last_k=0 must be an integer >= 1", evaluate.main,
            conftest.compose("evaluate", [f"run_dir={run}", "last_k=0"]))
    raises_one_line(evaluate.EvalError,
            r"splits=\[.test., .holdout.\] must be a non-empty list of distinct values among test, val, train",
            evaluate.main, conftest.compose("evaluate", [f"run_dir={run}", "splits=[test,holdout]"]))
    # env_from_run=false evaluates on this config's env: another goal split would call "test" goals the model
    # was trained on (the check used to cover the grid only)
    for key, value, trained in (("split_seed", 1, 0), ("n_val_goals", 2, 5), ("grid_size", 7, 9)):
        raises_one_line(evaluate.EvalError, rf"env.{key}={value} but the model was trained with {trained}: "
                        r"use env_from_run=true or a matching env", evaluate.main,
                        conftest.compose("evaluate", [f"run_dir={run}", "env_from_run=false", f"env.{key}={value}"]))
    if not torch.cuda.is_available():  # used to say "not a model.pt ... retrain"
        msg = raises_one_line(evaluate.EvalError, r"device=cuda but this machine has 0 CUDA GPU\(s\): use device=cpu",
                      evaluate.main, conftest.compose("evaluate", [f"run_dir={run}", "device=cuda"]))
        assert "retrain" not in msg


@pytest.mark.parametrize("sample", ["true", "false"])
def test_evaluate_refuses_a_nan_model(finished, tmp_path, sample):
    """Sampling from NaN logits used to crash in torch.multinomial; argmax wrote an all-zero eval.json."""
    run = tmp_path / "nan"
    shutil.copytree(finished / "runs" / "done", run)
    ck = torch.load(run / "model.pt", weights_only=True)
    key = min(ck["model_state_dict"])
    ck["model_state_dict"][key].fill_(float("nan"))
    torch.save(ck, run / "model.pt")
    raises_one_line(evaluate.EvalError, rf"'model_state_dict.{key}' holds NaN or infinite values", evaluate.main,
            conftest.compose("evaluate", [f"run_dir={run}", f"sample={sample}", "n_episodes=2", "progress=false"]))
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_wrapped_models_state_dict_loads(finished, tmp_path, prefix):
    """A model.pt saved through a DDP or torch.compile wrapper (accelerate's --dynamo_backend: unwrap_model keeps
    the compile wrapper by default) has a prefix on every key; evaluation loads the same weights."""
    run = tmp_path / "wrapped"
    shutil.copytree(finished / "runs" / "done", run)
    ck = torch.load(run / "model.pt", weights_only=True)
    plain = ck["model_state_dict"]
    ck["model_state_dict"] = {prefix + k: v for k, v in plain.items()}
    torch.save(ck, run / "model.pt")
    model, _, _ = evaluate.load_trained_model(run)
    assert model.state_dict().keys() == plain.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())


def test_a_longer_horizon_than_in_training_is_evaluated_without_the_source_curve(finished, tmp_path, capsys):
    """config/evaluate.yaml's own example (env_from_run=false env.horizon=...) failed: the run's histories were
    checked against the evaluation's env and the user was told to re-collect the training data. The histories
    are the run's (its env); only the source's curve, learnt in another env, has no place beside these returns."""
    import json

    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    base = [f"run_dir={run}", "n_episodes=2", "seeds_per_goal=1", "n_train_goals=1", "progress=false"]
    evaluate.main(conftest.compose("evaluate", [*base, "env_from_run=false", "env.horizon=30", "out_name=h30"]))
    data = json.loads((run / "h30.json").read_text())
    assert data["env"]["horizon"] == 30 and len(data["splits"]["test"]["per_goal"][0]["curve"]) == 2
    assert "source" not in data["splits"]["test"] and "horizon=20 (dataset) vs 30 (evaluation)" in capsys.readouterr().out
    evaluate.main(conftest.compose("evaluate", [*base, "out_name=h20"]))  # the run's env: the source curve is there
    same = json.loads((run / "h20.json").read_text())
    assert "source" in same["splits"]["test"]
    assert data["same_position"]["test"]["loss"] == pytest.approx(same["same_position"]["test"]["loss"])
    # the rollouts ran 30 steps per episode: every goal's optimal return (H + 1 - distance) is 10 higher
    assert np.subtract(data["splits"]["test"]["optimal"], same["splits"]["test"]["optimal"]).tolist() == [10.0] * 8
