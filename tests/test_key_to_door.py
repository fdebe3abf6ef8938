"""Dark Key-to-Door (env/key_to_door.py, env/tasks.py, the 'DarkKeyToDoor-v0' gymnasium view).

The reference is DICP's own environment: tests/data/dicp_key_to_door.json records its task split and 1,200
episodes it played (tests/tooling/dicp_key_to_door_fixture.py made it with DICP's file present; these tests
do not need it). The optimum is checked against dynamic programming written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hydra import compose, initialize_config_dir

from env import (
    ACTION_DELTAS,
    KEY_TO_DOOR_ENV_ID,
    BatchedKeyToDoor,
    make_batched_env,
    splits_from_cfg,
    task_dim,
    task_optimal_return,
    task_split,
)
from env.key_to_door import from_dicp_action, optimal_return, to_dicp_action
from tests.tooling.dicp_key_to_door_fixture import decode_actions, digest, trajectory_digest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "data" / "dicp_key_to_door.json").read_text())
DICP_DELTAS = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1), 4: (0, 0)}  # their step(): 0 +x 1 -x 2 +y 3 -y else stay


def env_cfg():
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return compose("collect", overrides=["env=dark_key_to_door"]).env


# -- DICP agreement ----------------------------------------------------------------------------------------

def test_action_relabelling_maps_dicp_moves_onto_ours():
    for a_dicp, delta in DICP_DELTAS.items():
        ours = from_dicp_action(a_dicp)
        assert ACTION_DELTAS[ours] == delta and to_dicp_action(ours) == a_dicp


def test_task_split_is_dicps():
    c, sp = FIXTURE["config"], FIXTURE["split"]
    train, test = task_split(c["grid_size"], c["train_env_ratio"], c["env_split_seed"])
    assert (len(train), len(test)) == (sp["n_train"], sp["n_test"]) == (6233, 328)
    assert [list(t) for t in test] == sp["test"]
    assert digest(train) == sp["train_sha256"] and digest(test) == sp["test_sha256"]
    cfg = env_cfg()  # the shipped config is DICP's split, with validation / train subset carved from train
    s = splits_from_cfg(cfg)
    assert s["test"] == test and s["val"] == train[len(train) - cfg.n_val_goals:]
    assert s["train"] == train[:cfg.max_train_tasks]


def test_replays_dicp_episodes_step_for_step():
    """Every recorded DICP episode (>= 1,000, many tasks, random and oracle-driven actions) replayed at once:
    next states, rewards and end flags identical."""
    rows, h = FIXTURE["episodes"], FIXTURE["config"]["horizon"]
    assert len(rows) >= 1000 and len({tuple(r[0]) for r in rows}) >= 1000
    env = BatchedKeyToDoor([r[0] for r in rows], grid_size=FIXTURE["config"]["grid_size"], horizon=h)
    env.reset()
    actions = torch.tensor([decode_actions(r[1], h) for r in rows])
    steps = [env.step(actions[:, t]) for t in range(h)]
    states = torch.stack([s for s, _, _ in steps], 1)
    rewards = torch.stack([r for _, r, _ in steps], 1)
    dones = torch.stack([d for _, _, d in steps], 1)
    paid = [torch.nonzero(rewards[e]).flatten().tolist() for e in range(len(rows))]
    assert paid == [r[2] for r in rows]
    got = [trajectory_digest(states[e].tolist(), dones[e].tolist()) for e in range(len(rows))]
    assert got == [r[3] for r in rows]
    totals = rewards.sum(1).long().tolist()
    assert [totals.count(k) for k in (0, 1, 2)] == FIXTURE["counts"]["returns_0_1_2"]
    for full in FIXTURE["full"]:  # a few whole trajectories, verbatim
        e = BatchedKeyToDoor([full["task"]])
        e.reset()
        for a, s, r, d in zip(full["dicp_actions"], full["next_states"], full["rewards"], full["dones"]):
            ns, rr, dd = e.step(torch.tensor([from_dicp_action(a)]))
            assert (ns[0].tolist(), rr.item(), bool(dd[0])) == (s, r, d)


def test_optimal_return_is_dicps_max_return_for_every_task():
    train, test = task_split()
    assert {optimal_return(t) for t in train + test} == {float(FIXTURE["max_return"])}


# -- rules -------------------------------------------------------------------------------------------------

def test_reward_rules_edge_cases():
    tasks = {  # task: (our actions, rewards DICP's rules give)
        (4, 4, 8, 8): ([0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]),  # key on the start cell: paid by a step onto it
        (4, 5, 4, 5): ([3, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]),  # key == door: the door pays one step later
        (4, 3, 4, 5): ([3, 4, 4, 3, 3, 0], [0, 0, 1, 0, 1, 0]),  # the door before the key pays nothing
        (4, 5, 4, 4): ([3, 4, 0, 0, 4, 3], [1, 1, 0, 0, 0, 0]),  # the door pays once (at most 2 per episode)
    }
    e = BatchedKeyToDoor(list(tasks), horizon=6)
    e.reset()
    acts = torch.tensor([a for a, _ in tasks.values()])
    got = torch.stack([e.step(acts[:, t])[1] for t in range(6)], 1)
    assert got.long().tolist() == [r for _, r in tasks.values()]
    assert e.phase().tolist() == [1, 2, 2, 2]
    with pytest.raises(RuntimeError, match="episode is over"):
        e.step(torch.zeros(4, dtype=torch.long))


def dp_optimal(task, G, H) -> float:
    """Dynamic programming over (cell, phase) for H steps with the env's moves: the reference optimum."""
    key, door = tuple(task[:2]), tuple(task[2:])
    cells = [(x, y) for x in range(G) for y in range(G)]
    value = {(c, p): 0.0 for c in cells for p in range(3)}
    for _ in range(H):
        new = {}
        for c in cells:
            for p in range(3):
                best = 0.0
                for dx, dy in ACTION_DELTAS:
                    n = (min(max(c[0] + dx, 0), G - 1), min(max(c[1] + dy, 0), G - 1))
                    if p == 0 and n == key:
                        r, q = 1.0, 1
                    elif p == 1 and n == door:
                        r, q = 1.0, 2
                    else:
                        r, q = 0.0, p
                    best = max(best, r + value[(n, q)])
                new[(c, p)] = best
        value = new
    return value[((G // 2, G // 2), 0)]


@pytest.mark.parametrize("G,H,values", [(3, 2, {1, 2}), (4, 3, {0, 1, 2}), (5, 3, {0, 1, 2}), (5, 12, {2})])
def test_optimal_return_equals_dynamic_programming(G, H, values):
    tasks = [(a, b, c, d) for a in range(G) for b in range(G) for c in range(G) for d in range(G)]
    got = [optimal_return(t, G, H) for t in tasks]
    assert got == [dp_optimal(t, G, H) for t in tasks]
    assert set(got) == values  # short horizons exercise 0 and 1 too


def test_family_dispatch_and_validation():
    cfg = env_cfg()
    assert task_dim(cfg) == 4 and task_dim({"reward_mode": "every_step"}) == 2
    e = make_batched_env(cfg, [(0, 0, 8, 8)])
    assert isinstance(e, BatchedKeyToDoor) and e.horizon == 50 and e.optimal_returns().tolist() == [2.0]
    assert task_optimal_return(cfg, (0, 0, 8, 8)) == 2.0
    assert task_optimal_return({"grid_size": 9, "horizon": 20, "reward_mode": "every_step"}, (0, 0)) == 13
    with pytest.raises(ValueError, match="shape"):
        BatchedKeyToDoor([(1, 2)])
    with pytest.raises(ValueError, match="lie in"):
        BatchedKeyToDoor([(1, 2, 3, 9)])
    with pytest.raises(ValueError, match="max_train_tasks=9999 must be in"):
        splits_from_cfg({**dict(cfg), "max_train_tasks": 9999})


# -- gymnasium view ----------------------------------------------------------------------------------------

def test_gym_view_passes_checker_and_agrees_with_batched_env():
    assert KEY_TO_DOOR_ENV_ID in gymnasium.registry
    g = gymnasium.make(KEY_TO_DOOR_ENV_ID, task=(4, 6, 4, 2))
    check_env(g.unwrapped, skip_render_check=True)
    ref = BatchedKeyToDoor([(4, 6, 4, 2)])
    obs, info = g.reset(seed=0)
    s = ref.reset()
    assert obs.tolist() == s[0].tolist() and info["task"] == (4, 6, 4, 2) and not info["has_key"]
    total = 0.0
    for t, a in enumerate([3, 3, 4, 4, 4, 4] + [0] * 44):
        obs, r, term, trunc, info = g.step(a)
        ns, rr, d = ref.step(torch.tensor([a]))
        assert obs.tolist() == ns[0].tolist() and r == rr.item() and trunc == bool(d[0]) == (t == 49)
        assert not term
        total += r
    assert total == 2.0 and info["has_key"] and info["door_opened"]
    g.reset(options={"task": (0, 0, 1, 1)})
    assert g.unwrapped.goal == (0, 0, 1, 1)


# -- pipeline ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_collect_train_evaluate(tmp_path, one_thread, tb_scalars):
    """env=dark_key_to_door through collect.py -> train.py (AD, a few steps) -> evaluate.py: [N, 4] tasks on
    disk, the source's key / door curves, and key / door fractions in eval.json, TensorBoard and the plot."""
    from conftest import TINY, compose

    import collect
    import evaluate
    import train

    env = ["env=dark_key_to_door", "env.max_train_tasks=6", "env.n_val_goals=2"]
    data = tmp_path / "data"
    s = collect.main(compose("collect", env + ["source.n_stream=2", "source.n_steps=150", "source.n_stream_eval=1",
                                               f"data_path={data}", "progress=false"]))
    assert s["n_train_histories"] == 12 and s["n_test_histories"] == 328
    assert {"key_found_first_episode", "door_found_last5"} <= s["train"].keys()
    meta = json.loads((data / "meta.json").read_text())
    assert len(meta["found_curves"]["test"]["key_found"]) == 3
    from histories import load_histories
    h = load_histories(data, meta["env"])
    assert h.goals.shape == (12 + 2 + 328, 4) and [tuple(g) for g in h.goals[::2][:6].tolist()] == \
        splits_from_cfg(meta["env"])["train"]

    run = tmp_path / "run"
    train.main(compose("train", TINY["train"] + env + ["model=ad_dr", f"data_path={data}", f"run_dir={run}",
                                                      "max_steps=2", "eval_every=2", "eval.n_train_goals=1"]))
    rep = evaluate.main(compose("evaluate", TINY["evaluate"] + [f"run_dir={run}", "device=cpu", "last_k=1",
                                                               "splits=[test]"]))
    s = rep["splits"]["test"]["summary"]
    assert s["n_goals"] == 328 and s["optimal_mean"] == 2.0
    r = np.asarray(rep["splits"]["test"]["returns"])
    for name, least in (("key_found", 1), ("door_found", 2)):  # the door pays only after the key
        assert s[f"{name}_curve"] == pytest.approx((r >= least).mean(axis=(0, 1)).tolist())
        assert rep["metrics"][f"eval/{name}_test"] == pytest.approx(s[f"{name}_last_k"])
    assert rep["splits"]["test"]["source"]["key_found_curve"] == meta["found_curves"]["test"]["key_found"]
    tags = tb_scalars(run)
    assert {"eval/key_found_test", "eval/door_found_test", "eval/key_found_val", "eval/return_val"} <= tags.keys()
    assert (run / "eval.png").stat().st_size > 1000
