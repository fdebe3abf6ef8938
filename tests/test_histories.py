"""histories.py: atomic save, memory-mapped load, and every validation error of load_histories.

Datasets here are small and synthetic (one random-but-valid history per goal), built in milliseconds,
so each failure mode is tested on its own copy. Every DatasetError must be ONE line that names the
problem and the fix. A dataset's fingerprint follows its settings, not the time it was collected; what an
interrupted collect leaves behind is cleaned or restored, and a full disk replaces nothing.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import conftest
import numpy as np
import pytest
from conftest import collect_small, oserror, raises_one_line
from hydra import compose, initialize_config_dir

import histories
from env import goal_split
from histories import (
    ARRAY_SPECS,
    FORMAT_VERSION,
    DatasetError,
    Histories,
    check_can_write,
    load_histories,
    save_histories,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")
ENV = {"name": "darkroom", "grid_size": 9, "horizon": 20, "n_actions": 5, "reward_mode": "every_step",
       "train_frac": 0.9, "split_seed": 0, "n_val_goals": 0}
T = 40


def make_dataset(n_per_goal=2, t_len=T, seed=0):
    """Valid arrays + meta: train goals first (n_per_goal each), then test goals (1 each)."""
    train, test = goal_split(9, 0.9, 0)
    goals = np.array([g for g in train for _ in range(n_per_goal)] + test, dtype=np.uint8)
    n = len(goals)
    rng = np.random.default_rng(seed)
    arrays = {"states": rng.integers(0, 9, (n, t_len, 2), dtype=np.uint8),
              "actions": rng.integers(0, 5, (n, t_len), dtype=np.uint8),
              "rewards": rng.integers(0, 2, (n, t_len), dtype=np.uint8),
              "next_states": rng.integers(0, 9, (n, t_len, 2), dtype=np.uint8),
              "goals": goals}
    n_train = len(train) * n_per_goal
    meta = {"format_version": FORMAT_VERSION, "env": dict(ENV),
            "split": {"train_goals": [list(g) for g in train], "val_goals": [],
                      "test_goals": [list(g) for g in test]},
            "source": {"name": "synthetic"}, "seed": seed, "n_steps": t_len,
            "histories": {"train": {"start": 0, "stop": n_train}, "val": {"start": n_train, "stop": n_train},
                          "test": {"start": n_train, "stop": n}}}
    return arrays, meta


@pytest.fixture
def saved(tmp_path):
    arrays, meta = make_dataset()
    path = save_histories(tmp_path / "ds", arrays, meta)
    return path, arrays, meta


def one_line_error(match, path, env=None):
    with pytest.raises(DatasetError, match=match) as ei:
        load_histories(path, env or ENV)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


# -- round trip --------------------------------------------------------------------------------------------

def test_round_trip_memory_mapped(saved):
    path, arrays, meta = saved
    h = load_histories(path, ENV)
    assert isinstance(h, Histories) and h.path == path
    for k in ARRAY_SPECS:
        arr = getattr(h, k)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and not arr.flags.writeable
        assert np.array_equal(arr, arrays[k])
    assert h.meta == json.loads(json.dumps(meta))  # meta.json round-trips exactly
    assert (h.n_histories, h.n_steps) == (73 * 2 + 8, T)
    assert h.split_indices("train").tolist() == list(range(146))
    assert h.split_indices("test").tolist() == list(range(146, 154))
    assert h.split_indices("test").dtype == np.int64
    assert h.split_indices("val").tolist() == []   # this env config has no validation goals
    with pytest.raises(ValueError, match="split"):
        h.split_indices("validation")


def test_transitions_pack_six_ints(saved):
    path, arrays, _ = saved
    h = load_histories(path, ENV)
    tr = h.transitions(5, 3, 10)
    assert tr.shape == (7, 6) and tr.dtype == np.uint8
    assert np.array_equal(tr[:, 0:2], arrays["states"][5, 3:10])
    assert np.array_equal(tr[:, 2], arrays["actions"][5, 3:10])
    assert np.array_equal(tr[:, 3], arrays["rewards"][5, 3:10])
    assert np.array_equal(tr[:, 4:6], arrays["next_states"][5, 3:10])
    assert h.transitions(np.array([1, 4])).shape == (2, T, 6)


def test_load_accepts_the_composed_env_config(saved):
    path, _, _ = saved
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        env = compose("collect", overrides=["env.n_val_goals=0"]).env
    assert load_histories(str(path), env).n_histories == 154


# -- atomic save / overwrite -------------------------------------------------------------------------------

def test_save_refuses_to_overwrite_and_overwrites_atomically(saved):
    path, arrays, _ = saved
    other, meta2 = make_dataset(seed=1)
    with pytest.raises(DatasetError, match="already exists.*overwrite=true"):
        save_histories(path, other, meta2)
    assert np.array_equal(load_histories(path, ENV).actions, arrays["actions"])
    save_histories(path, other, meta2, overwrite=True)
    assert np.array_equal(load_histories(path, ENV).actions, other["actions"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]  # no temp / old folders left


def test_interrupted_overwrite_keeps_the_old_dataset(saved, monkeypatch):
    path, arrays, _ = saved
    other, meta2 = make_dataset(seed=1)
    real_save, calls = np.save, []

    def failing_save(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*a, **kw)

    monkeypatch.setattr(histories.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_histories(path, other, meta2, overwrite=True)
    monkeypatch.undo()
    assert np.array_equal(load_histories(path, ENV).actions, arrays["actions"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]


def test_failure_during_the_swap_restores_the_old_dataset(saved, monkeypatch):
    path, arrays, _ = saved
    other, meta2 = make_dataset(seed=1)
    real_rename = histories.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # the second rename (new dataset into place) fails
            raise OSError("interrupted")
        return real_rename(src, dst)

    monkeypatch.setattr(histories.os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        save_histories(path, other, meta2, overwrite=True)
    monkeypatch.undo()
    assert np.array_equal(load_histories(path, ENV).actions, arrays["actions"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ds"]


def test_save_validates_before_writing(tmp_path):
    arrays, meta = make_dataset()
    arrays["actions"] = arrays["actions"].astype(np.int64)
    with pytest.raises(DatasetError, match="dtype int64, expected uint8"):
        save_histories(tmp_path / "ds", arrays, meta)
    arrays, meta = make_dataset()
    arrays["actions"][0, 0] = 7
    with pytest.raises(DatasetError, match="value 7, must be < 5"):
        save_histories(tmp_path / "ds", arrays, meta)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_a_folder_that_is_not_a_dataset(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    arrays, meta = make_dataset()
    with pytest.raises(DatasetError, match="not a dataset"):
        save_histories(d, arrays, meta, overwrite=True)
    assert (d / "thesis.tex").read_text() == "precious"
    check_can_write(tmp_path / "new", overwrite=False)  # a fresh path is always fine


# -- every validation error of load_histories --------------------------------------------------------------

def test_missing_dataset_says_how_to_collect(tmp_path):
    msg = one_line_error("no dataset at", tmp_path / "nope")
    assert f"python collect.py env=darkroom data_path={tmp_path / 'nope'}" in msg


def test_missing_or_corrupt_meta(saved):
    path, _, _ = saved
    (path / "meta.json").write_text("{not json")
    one_line_error(r"meta.json is not valid JSON.*re-collect.*overwrite=true", path)
    (path / "meta.json").unlink()
    one_line_error(r"has no meta.json.*re-collect", path)


@pytest.mark.parametrize("version", [1, 3, 0, None, "2"])
def test_bad_format_version(saved, version):
    path, _, meta = saved
    meta = dict(meta, format_version=version)
    (path / "meta.json").write_text(json.dumps(meta))
    one_line_error(rf"format_version {version!r}.* but this code reads format_version {FORMAT_VERSION}.*re-collect", path)


def test_meta_missing_keys(saved):
    path, _, meta = saved
    del meta["histories"]
    (path / "meta.json").write_text(json.dumps(meta))
    one_line_error(r"lacks the key 'histories'", path)


def test_wrong_env_config_names_every_differing_key(saved):
    path, _, _ = saved
    run_env = dict(ENV, horizon=25, reward_mode="once")
    msg = one_line_error("collected with a different env config", path, run_env)
    assert "horizon=20 (dataset) vs 25 (run)" in msg
    assert "reward_mode='every_step' (dataset) vs 'once' (run)" in msg
    assert "grid_size" not in msg and "re-collect" in msg
    msg = one_line_error("different env config", path, dict(ENV, name="darkroom_hard", split_seed=1))
    assert "name='darkroom' (dataset) vs 'darkroom_hard' (run)" in msg and "split_seed=0 (dataset) vs 1" in msg


def test_split_in_meta_must_match_the_runs_split(saved):
    path, _, meta = saved
    meta["split"]["test_goals"] = meta["split"]["test_goals"][::-1]
    (path / "meta.json").write_text(json.dumps(meta))
    one_line_error("goal splits that differ", path)


@pytest.mark.parametrize("name", list(ARRAY_SPECS))
def test_wrong_dtype(saved, name):
    path, arrays, _ = saved
    np.save(path / f"{name}.npy", arrays[name].astype(np.int64))
    one_line_error(rf"{name}.npy has dtype int64, expected uint8.*re-collect", path)


@pytest.mark.parametrize("name,index,value,limit", [
    ("states", (0, 0, 1), 9, 9), ("next_states", (3, 5, 0), 200, 9), ("goals", (0, 0), 9, 9),
    ("actions", (2, 7), 5, 5), ("rewards", (1, 1), 2, 2)])
def test_out_of_range_value(saved, name, index, value, limit):
    path, arrays, _ = saved
    bad = arrays[name].copy()
    bad[index] = value
    np.save(path / f"{name}.npy", bad)
    one_line_error(rf"{name}.npy holds value {value}, must be < {limit}.*re-collect", path)


@pytest.mark.parametrize("cut", ["half", "header", "empty", "one_byte_short"])
@pytest.mark.parametrize("name", ["actions", "states"])
def test_truncated_npy(saved, name, cut):
    path, _, _ = saved
    f = path / f"{name}.npy"
    data = f.read_bytes()
    keep = {"half": len(data) // 2, "header": 60, "empty": 0, "one_byte_short": len(data) - 1}[cut]
    f.write_bytes(data[:keep])
    one_line_error(rf"{name}.npy is truncated or corrupt.*re-collect.*overwrite=true", path)


def test_trailing_garbage_and_non_npy_file(saved):
    path, _, _ = saved
    with open(path / "rewards.npy", "ab") as f:
        f.write(b"\0" * 10)
    one_line_error(r"rewards.npy has 10 trailing bytes", path)
    (path / "rewards.npy").write_bytes(b"this is not an npy file at all" * 10)
    one_line_error(r"rewards.npy is truncated or corrupt", path)


def test_missing_npy(saved):
    path, _, _ = saved
    (path / "next_states.npy").unlink()
    one_line_error(r"has no next_states.npy.*re-collect", path)


def test_inconsistent_shapes(saved):
    path, arrays, _ = saved
    np.save(path / "rewards.npy", arrays["rewards"][:, :-1])
    one_line_error(r"rewards.npy has shape \(154, 39\), expected \(154, 40\)", path)


def test_n_steps_and_history_ranges_must_agree_with_arrays(saved):
    path, _, meta = saved
    (path / "meta.json").write_text(json.dumps(dict(meta, n_steps=50)))
    one_line_error(r"40 steps per history but meta.json says n_steps=50", path)
    bad = dict(meta, histories={"train": {"start": 0, "stop": 100}, "val": {"start": 100, "stop": 100}, "test": {"start": 100, "stop": 154}})
    (path / "meta.json").write_text(json.dumps(bad))
    one_line_error(r"46 test histories have goals outside the test split", path)
    bad = dict(meta, histories={"train": {"start": 0, "stop": 147}, "val": {"start": 147, "stop": 147}, "test": {"start": 147, "stop": 154}})
    (path / "meta.json").write_text(json.dumps(bad))
    one_line_error(r"1 train histories have goals outside the train split \(e.g. \(4, 2\)\)", path)
    bad = dict(meta, histories={"train": {"start": 0, "stop": 146}, "val": {"start": 146, "stop": 146}, "test": {"start": 146, "stop": 150}})
    (path / "meta.json").write_text(json.dumps(bad))
    one_line_error(r"do not tile the 154 histories", path)


def test_errors_do_not_modify_the_dataset(saved, tmp_path):
    """Validation is read-only: a failed load leaves every byte in place."""
    path, _, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    load_histories(path, ENV)
    one_line_error("different env config", path, dict(ENV, horizon=7))
    for f in copy.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes()


def test_fingerprint_follows_the_settings_not_the_time(tmp_path):
    a = load_histories(collect_small(tmp_path / "a")["data_path"], conftest.compose("collect", []).env)
    b = load_histories(collect_small(tmp_path / "b")["data_path"], conftest.compose("collect", []).env)
    c = load_histories(collect_small(tmp_path / "c", "source.n_stream=3")["data_path"], conftest.compose("collect", []).env)
    assert a.meta["created"] and a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 16


def test_collect_cleans_temp_folders_and_restores_a_hidden_dataset(tiny, tmp_path, capsys):
    data = tmp_path / "ds"
    (tmp_path / ".ds.tmp-123-abc").mkdir()
    (tmp_path / ".ds.tmp-123-abc" / "states.npy").write_bytes(b"partial")
    shutil.copytree(tiny.data_path, tmp_path / ".ds.old-456-def")  # killed between the overwrite's two renames
    before = (tmp_path / ".ds.old-456-def" / "actions.npy").read_bytes()
    raises_one_line(DatasetError, r"no dataset at .*ds, but an interrupted collect left the previous one in .*\.ds\.old-456"
            r"-def: run `python collect.py", load_histories, data, conftest.compose("collect", []).env)
    raises_one_line(DatasetError, r"a dataset already exists at", collect_small, data)  # restored first, then not replaced
    out = capsys.readouterr().out
    assert "note: restored the previous dataset at" in out and "note: removed .ds.tmp-123-abc" in out
    assert (data / "actions.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_disk_full_in_collect_keeps_the_old_dataset(tiny, tmp_path, monkeypatch):
    import histories

    data = tmp_path / "ds"
    shutil.copytree(tiny.data_path, data)
    before = (data / "actions.npy").read_bytes()
    monkeypatch.setattr(histories.np, "save", oserror(errno.ENOSPC))
    raises_one_line(DatasetError, r"cannot write the dataset .*ds \(no space left on device\); nothing was replaced",
            collect_small, data, "overwrite=true")
    assert (data / "actions.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_split_indices_at_most_spreads_over_the_goals():
    """Histories are goal-major (several per goal): a capped selection takes every k-th history, so 8 of 40
    test histories (8 goals x 5) cover all 8 goals, not the first two."""
    from types import SimpleNamespace

    from histories import Histories

    h = SimpleNamespace(meta={"histories": {"train": {"start": 0, "stop": 10}, "val": {"start": 10, "stop": 10},
                                            "test": {"start": 10, "stop": 50}}})
    assert Histories.split_indices(h, "test").tolist() == list(range(10, 50))
    assert Histories.split_indices(h, "test", 8).tolist() == list(range(10, 50, 5))  # one per goal
    assert Histories.split_indices(h, "test", 7).tolist() == list(range(10, 50, 6))[:7]
    assert len(Histories.split_indices(h, "train", 100)) == 10 and len(Histories.split_indices(h, "val", 3)) == 0
