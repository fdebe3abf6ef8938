"""metrics.py: the summary math of a rollout's returns, search vs use, learning speed."""

import numpy as np
import pytest

import metrics
from errors import EvalError


def test_summarize_math():
    # 2 goals x 2 seeds x 3 episodes; goal-averaged curves per seed: seed0 = [1, 2, 3], seed1 = [3, 4, 5].
    r = np.array([[[0, 2, 4], [2, 4, 6]],
                  [[2, 2, 2], [4, 4, 4]]], dtype=float)
    s = metrics.summarize(r, [8.0, 12.0], last_k=2, horizon=10)
    assert s["curve"] == [2.0, 3.0, 4.0] and s["curve_std"] == [1.0, 1.0, 1.0]
    assert s["first_episode"] == 2.0 and s["last_k_mean"] == 3.5 and s["mean_return"] == 3.0
    assert s["last_k_std"] == 1.0  # seed last-2 means 2.5 and 4.5
    assert s["optimal_mean"] == 10.0 and s["last_k_normalized"] == pytest.approx(0.35)
    assert s["first_episode_normalized"] == pytest.approx(0.2)
    assert s["reward_per_step"] == pytest.approx(0.3) and s["reward_per_step_last_k"] == pytest.approx(0.35)
    assert metrics.summarize(r, [8.0, 12.0], last_k=50)["last_k"] == 3  # clipped to n_episodes
    tags = metrics.eval_scalars(s, "test")
    assert tags["eval/return_test"] == tags["eval/return_test_last2"] == 3.5
    assert tags["eval/reward_per_step_test"] == pytest.approx(0.3)
    with pytest.raises(EvalError, match="optimal"):
        metrics.summarize(r, [1.0], last_k=2)


def test_search_and_use_splits_finding_from_returning():
    # goal 0 (optimal 10): seed 0 finds it in episode 2, then 5 and 10; seed 1 never does.
    # goal 1 (optimal 4): seed 0 finds it in episode 1 then forgets (0, 2); seed 1 finds it only in the last.
    r = np.array([[[0, 3, 5, 10], [0, 0, 0, 0]],
                  [[4, 0, 2, 0], [0, 0, 0, 1]]], dtype=float)
    s = metrics.search_and_use(r, [10.0, 4.0])
    assert s["found_goal_frac"] == 0.75
    assert s["episodes_to_first_goal"] == pytest.approx((2 + 1 + 4) / 3)
    # after the first find: goal 0 seed 0 -> 0.5, 1.0; goal 1 seed 0 -> 0, 0.5, 0; goal 1 seed 1 -> nothing
    assert s["return_after_found_normalized"] == pytest.approx((0.5 + 1.0 + 0 + 0.5 + 0) / 5)
    assert metrics.search_and_use(np.zeros((1, 2, 3)), [5.0]) == {
        "found_goal_frac": 0.0, "episodes_to_first_goal": None, "return_after_found_normalized": None}
    assert metrics.summarize(r, [10.0, 4.0])["found_goal_frac"] == 0.75


def test_learning_speed_metrics():
    curve = [0, 0, 2, 4, 6, 8, 8, 10, 10, 10]
    # 5-episode means ending at episodes 5..10: 2.4, 4.0, 5.6, 7.2, 8.4, 9.2
    assert metrics.episodes_to(curve, 5.0) == 7
    assert metrics.episodes_to(curve, 4.0) == 6
    assert metrics.episodes_to(curve, 9.7) is None
    assert metrics.episodes_to([10, 10], 5.0) == 2  # shorter than the window: the whole curve counts
    sp = metrics.learning_speed(curve, 10.0)
    assert sp["episodes_to_0.5"] == 7 and sp["episodes_to_0.8"] == 9 and sp["episodes_to_0.9"] == 10
    assert sp["auc_normalized"] == pytest.approx(0.58)
