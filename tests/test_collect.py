"""collect.py on a tiny problem (68 train goals x 3 streams + 5 val and 8 test goals x 2, 200 steps: < 1 s).

Composed with Hydra's compose API from config/, run through main(cfg), read back with
histories.load_histories. Checks the arrays against the env's dynamics, that the source learns, the
meta.json contents, determinism, overwrite refusal (before any work), bad source and env values in one line,
a warning when the source does not learn, and the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import collect_small, raises_one_line
from hydra import compose, initialize_config_dir

import collect
from env import goal_split, optimal_return
from histories import DatasetError, load_histories
from model.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["source.n_stream=3", "source.n_steps=200", "source.n_stream_eval=2",
        "source.eps_decay_steps=100", "progress=false"]
N_TRAIN, N_VAL, N_TEST, T = 68 * 3, 5 * 2, 8 * 2, 200
N_ALL = N_TRAIN + N_VAL + N_TEST
MOVES = np.array([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)])


def cfg_for(data_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return compose("collect", overrides=[*TINY, f"data_path={data_path}", *overrides])


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    path = tmp_path_factory.mktemp("collect") / "ds"
    cfg = cfg_for(path)
    summary = collect.main(cfg)
    return path, cfg, summary, load_histories(path, cfg.env)


def test_default_config():
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose("collect")
    assert cfg.data_path == "data/darkroom-seed0" and cfg.seed == cfg.data_seed == 0
    assert (cfg.source.n_stream, cfg.source.n_steps, cfg.source.n_stream_eval) == (100, 1000, 10)
    assert cfg.overwrite is False and cfg.device == "cpu" and cfg.env.name == "darkroom"
    # an env's own source settings (config/source/<env>.yaml) come before the preset's collect slice
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        kd = compose("collect", overrides=["env=dark_key_to_door"]).source
        quick = compose("collect", overrides=["env=dark_key_to_door", "experiment=quick"]).source
    assert (kd.n_steps, kd.q_init, kd.gamma, kd.n_stream, kd.eps_decay_steps) == (2500, 1.0, 0.95, 100, 500)
    assert (quick.n_steps, quick.q_init, quick.n_stream, quick.eps_decay_steps) == (2500, 1.0, 20, 200)
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        hard = compose("collect", overrides=["env=darkroom_hard", "experiment=mid"]).source
    assert (hard.n_steps, hard.q_init, hard.gamma, hard.eps_start, hard.n_stream, hard.eps_decay_steps) == (
        2500, 1.0, 0.95, 0.5, 20, 200)


def test_darkroom_hard_source_learns_with_its_own_settings(tmp_path):
    """env=darkroom_hard with config/source/darkroom_hard.yaml at the presets' epsilon decay (what the mid sweep
    collects): from about a random policy in episode 1 to finding the goal in most of the last 5 of 50."""
    cfg = cfg_for(tmp_path / "dh", "env=darkroom_hard", "source.n_stream=2", "source.n_stream_eval=0",
                  "source.n_steps=2500", "source.eps_decay_steps=200")  # (TINY's are darkroom's)
    assert (cfg.source.q_init, cfg.source.gamma, cfg.source.eps_start) == (1.0, 0.95, 0.5)  # the env's file
    tr = collect.main(cfg)["train"]
    assert abs(tr["first_episode"] - tr["random"]) < 0.1 and tr["last5_frac_optimal"] >= 0.85


def test_arrays_shapes_dtypes_and_layout(collected):
    h = collected[3]
    assert (h.n_histories, h.n_steps) == (N_ALL, T)
    for k, shape in [("states", (N_ALL, T, 2)), ("actions", (N_ALL, T)),
                     ("rewards", (N_ALL, T)), ("next_states", (N_ALL, T, 2)),
                     ("goals", (N_ALL, 2))]:
        arr = getattr(h, k)
        assert arr.shape == shape and arr.dtype == np.uint8, k
    train, test = goal_split(9)
    assert h.goals[:N_TRAIN].tolist() == [list(g) for g in train[:-5] for _ in range(3)]   # goal-major
    assert h.goals[N_TRAIN:N_TRAIN + N_VAL].tolist() == [list(g) for g in train[-5:] for _ in range(2)]
    assert h.goals[N_TRAIN + N_VAL:].tolist() == [list(g) for g in test for _ in range(2)]
    assert h.split_indices("train").tolist() == list(range(N_TRAIN))
    assert h.split_indices("val").tolist() == list(range(N_TRAIN, N_TRAIN + N_VAL))
    assert h.split_indices("test").tolist() == list(range(N_TRAIN + N_VAL, N_ALL))
    assert set(np.unique(h.actions)) == set(range(5)) and set(np.unique(h.rewards)) == {0, 1}


def test_histories_follow_the_env_dynamics(collected):
    """Every stored transition is a legal Darkroom step; episodes chain and restart at the centre."""
    _, _, _, h = collected
    s, a, r, ns, g = (np.asarray(x).astype(np.int64) for x in (h.states, h.actions, h.rewards,
                                                                h.next_states, h.goals))
    assert np.array_equal(ns, np.clip(s + MOVES[a], 0, 8))
    assert np.array_equal(r, (ns == g[:, None, :]).all(-1))
    starts = np.arange(0, T, 20)
    assert (s[:, starts] == 4).all()                                    # every episode starts at (4, 4)
    within = np.setdiff1d(np.arange(1, T), starts)
    assert np.array_equal(s[:, within], ns[:, within - 1])              # and continues where it was


def test_source_learns_from_random_toward_optimal(collected):
    _, _, summary, h = collected
    # (the 5 validation goals x 2 streams are too few for these bounds; they only have to improve)
    assert summary["val"]["last5"] > summary["val"]["first_episode"] + 1
    for split in ("train", "test"):
        sm = summary[split]
        assert abs(sm["first_episode"] - sm["random"]) < 0.3      # first episode ~ random policy
        assert sm["last5"] > 10 * sm["first_episode"]             # ... and it clearly improves
        assert sm["last5"] > 0.25 * sm["optimal"]                 # (tiny run: only 10 episodes)
    assert summary["train"]["optimal"] == pytest.approx(np.mean([optimal_return(g) for g in goal_split(9)[0][:-5]]))
    assert summary["test"]["optimal"] == 17.25
    curve = np.array(h.meta["return_curve"])
    assert len(curve) == T // 20 and curve[-3:].mean() > curve[:3].mean() + 2
    # the curve is the per-episode mean of the stored rewards (train histories)
    ret = np.asarray(h.rewards[:N_TRAIN]).reshape(N_TRAIN, -1, 20).sum(-1).mean(0)
    assert np.allclose(curve, ret)
    assert summary["n_transitions"] == N_ALL * T and summary["wall_s"] > 0


def test_meta_json_round_trip(collected):
    path, cfg, summary, h = collected
    meta = json.loads((path / "meta.json").read_text())
    assert meta == h.meta and meta["format_version"] == 2
    assert meta["env"] == {"name": "darkroom", "grid_size": 9, "horizon": 20, "n_actions": 5,
                           "reward_mode": "every_step", "train_frac": 0.9, "split_seed": 0, "n_val_goals": 5}
    train, test = goal_split(9)
    # validation goals are the last 5 of DICP's train goals; the test goals are DICP's, untouched
    assert meta["split"] == {"train_goals": [list(g) for g in train[:-5]],
                             "val_goals": [list(g) for g in train[-5:]],
                             "test_goals": [list(g) for g in test]}
    assert meta["source"]["name"] == "qlearning" and meta["source"]["n_stream"] == 3
    for k in ("lr", "gamma", "q_init", "eps_start", "eps_end", "eps_decay_steps", "replay_passes"):
        assert meta["source"][k] == cfg.source[k]
    assert (meta["seed"], meta["data_seed"], meta["n_steps"], meta["n_stream_eval"]) == (0, 0, T, 2)
    assert len(meta["return_curve_test"]) == T // 20
    assert meta["summary"]["train"] == summary["train"] and meta["summary"]["test"] == summary["test"]


def test_same_seed_same_data_other_seed_other_data(collected, tmp_path):
    h = collected[3]
    again = collect.main(cfg_for(tmp_path / "again"))
    h2 = load_histories(again["data_path"], h.meta["env"])
    assert np.array_equal(h.actions, h2.actions) and np.array_equal(h.states, h2.states)
    other = collect.main(cfg_for(tmp_path / "other", "data_seed=1"))
    h3 = load_histories(other["data_path"], h.meta["env"])
    assert not np.array_equal(h.actions, h3.actions) and h3.meta["seed"] == 1


def test_refuses_to_overwrite_before_doing_any_work(tmp_path, monkeypatch):
    target = tmp_path / "ds"
    collect.main(cfg_for(target))
    before = (target / "actions.npy").read_bytes()

    def must_not_run(*a, **kw):
        raise AssertionError("collection started although the dataset exists")

    monkeypatch.setitem(collect.SOURCES, "qlearning", must_not_run)
    with pytest.raises(DatasetError, match=r"already exists at .*overwrite=true") as ei:
        collect.main(cfg_for(target, "data_seed=1"))
    assert "\n" not in str(ei.value)
    monkeypatch.undo()
    assert (target / "actions.npy").read_bytes() == before
    collect.main(cfg_for(target, "data_seed=1", "overwrite=true"))    # explicit overwrite replaces it
    assert (target / "actions.npy").read_bytes() != before
    assert json.loads((target / "meta.json").read_text())["data_seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]        # no temp folders left behind


@pytest.mark.parametrize("override,match", [
    ("source.n_steps=210", r"source.n_steps=210 must be a positive multiple of env.horizon=20"),
    ("source.name=ppo", r"source.name='ppo' must be one of qlearning"),
    ("source.n_stream=0", r"source.n_stream=0 must be an integer in \[1, 100000\]")])
def test_bad_config_is_one_line_error(tmp_path, override, match):
    with pytest.raises(collect.ConfigError, match=match) as ei:
        collect.main(cfg_for(tmp_path / "ds", override))
    assert "\n" not in str(ei.value) and not (tmp_path / "ds").exists()


def test_cli_resolves_relative_paths_and_refuses_existing_dataset(collected, tmp_path):
    """`python collect.py data_path=<relative>` under Hydra: relative to the launch directory; an
    existing dataset -> exit 2 with one `error:` line (no traceback), the dataset untouched."""
    path, _, _, _ = collected
    (tmp_path / "data").mkdir()
    os.symlink(path, tmp_path / "data" / "ds")  # an existing dataset at the relative path data/ds
    before = (path / "actions.npy").read_bytes()
    r = subprocess.run([sys.executable, str(REPO / "collect.py"), *TINY, "data_path=data/ds",
                        f"hydra.run.dir={tmp_path / 'hydra'}"], check=False, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == (f"error: a dataset already exists at {tmp_path / 'data' / 'ds'}: pass overwrite=true "
                        f"to replace it, or choose another data_path / data_seed")
    assert (path / "actions.npy").read_bytes() == before


def test_key_to_door_source_learns_every_task_and_its_histories_follow_the_rules(tmp_path, capsys):
    """env=dark_key_to_door with its own source settings (config/source/dark_key_to_door.yaml): 30 train tasks
    x 2 streams x 50 episodes. Its histories are legal key-to-door episodes (the door pays only after the
    key, each at most once), positions only, and the source reaches >= 0.9 of every task's optimum."""
    from env import BatchedKeyToDoor

    cfg = cfg_for(tmp_path / "kd", "env=dark_key_to_door", "env.max_train_tasks=30", "env.n_val_goals=2",
                  "source.n_stream=2", "source.n_stream_eval=0", "source.eps_decay_steps=500", "source.n_steps=2500")
    assert (cfg.source.q_init, cfg.source.gamma) == (1.0, 0.95)  # from the env's source file
    s = collect.main(cfg)
    out = capsys.readouterr().out
    assert "key ep 1" in out and "train return by episode: 1:" in out
    h = load_histories(tmp_path / "kd", cfg.env)
    tr = s["train"]
    assert tr["optimal"] == 2.0 and abs(tr["first_episode"] - tr["random"]) < 0.2
    assert tr["last5_frac_optimal"] >= 0.9 and tr["key_found_last5"] >= 0.95 and tr["door_found_first_episode"] < 0.2
    ret = collect.episode_returns(np.asarray(h.rewards), 50)             # [60, 50]
    per_task = ret[:, -5:].reshape(30, 2, 5).mean(axis=(1, 2))
    assert per_task.min() >= 1.5                                         # every task is learnt, not just most
    assert np.allclose(h.meta["found_curves"]["train"]["door_found"], (ret >= 2).mean(0))
    # replay every history's actions in the env: the stored states and rewards are exactly its own
    a = np.asarray(h.actions).astype(np.int64)
    env = BatchedKeyToDoor(np.asarray(h.goals).astype(np.int64))
    for ep in range(a.shape[1] // 50):
        env.reset()
        for t in range(ep * 50, ep * 50 + 50):
            ns, r, _ = env.step(torch.from_numpy(a[:, t]))
            assert np.array_equal(ns.numpy(), h.next_states[:, t]) and np.array_equal(r.numpy(), h.rewards[:, t])


@pytest.mark.parametrize("override, match", [
    ("env.horizon=0", r"env.horizon=0 must be an integer in \[1, 100000\]"),
    ("env.grid_size=1", r"env.grid_size=1 must be an integer in \[2, 256\] \(.*a 1x1 grid has nothing to learn"),
    ("source.lr=nan", r"source.lr=nan must be a finite number > 0 and <= 1"),
    ("source.gamma=1", r"source.gamma=1 must be a finite number >= 0 and < 1"),
    ("source.eps_end=2", r"source.eps_end=2 must be a finite number >= 0 and <= 1"),
    ("num_threads=-2", r"num_threads=-2 must be an integer in \[0, 1024\]"),
])
def test_collect_rejects_bad_source_and_env_values(tmp_path, override, match):
    raises_one_line(ConfigError, match, collect_small, tmp_path / "ds", override)
    assert not list(tmp_path.iterdir())


def test_collect_warns_when_the_source_does_not_learn(tmp_path, capsys):
    collect_small(tmp_path / "ok", "source.n_stream=1", "source.n_steps=1000", "source.n_stream_eval=0")
    assert "did not learn" not in capsys.readouterr().out
    collect_small(tmp_path / "flat", "source.n_stream=1", "source.n_steps=1000", "source.n_stream_eval=0",
             "source.lr=1e-9")
    assert "warning: the source did not learn: its last-5-episode return" in capsys.readouterr().out
