"""Learning histories on disk: the one loading/saving API every stage uses (docs/design.md §3).

A dataset is a folder (default `data/${env.name}-seed${data_seed}`) of memory-mappable uint8 .npy arrays:

    states.npy       [N, T, 2]   (x, y) before the step
    actions.npy      [N, T]      0 stay, 1 +x, 2 -x, 3 +y, 4 -y
    rewards.npy      [N, T]      0 / 1
    next_states.npy  [N, T, 2]   (x, y) after the step
    goals.npy        [N, 2]      the goal of history i (Dark Key-to-Door: [N, 4], its task
                                 (key_x, key_y, door_x, door_y); env.task_dim)

plus meta.json (format_version, env config, goal splits, source algorithm + settings, seeds, history
layout, per-episode return curves, summary). History i is one stream of the source algorithm on one
goal, T transitions long. The train-goal histories come first, goal-major (n_stream per goal), then the
validation- and test-goal histories (n_stream_eval per goal each: only scored, never trained on);
meta["histories"] records the half-open range of each split (`Histories.split_indices`).

Every refusal is one DatasetError line that says how to fix it; writes are atomic (`save_histories`,
`recover_leftovers`); runs record a dataset's `fingerprint` (rundir.check_same_data, model/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import transition
from atomic_io import DISK_ERRNOS, fsync_dir, os_error_reason
from errors import UserError

FORMAT_VERSION = 2  # 2: validation goal split (meta split.val_goals, histories.val)
SPLITS = ("train", "val", "test")
# name -> shape after (N, T); goals.npy is [N, env.task_dim] instead (2, or 4 for Dark Key-to-Door). All uint8.
ARRAY_SPECS = {"states": (2,), "actions": (), "rewards": (), "next_states": (2,), "goals": None}
# Env config keys that must agree between a dataset and the run that reads it (an env without
# max_train_tasks, e.g. Darkroom, reads None on both sides).
ENV_KEYS = ("name", "grid_size", "horizon", "n_actions", "reward_mode", "train_frac", "split_seed", "n_val_goals",
            "max_train_tasks")


def env_differences(dataset_env: dict, env_cfg, other: str) -> list[str]:
    """'key=<dataset's> (dataset) vs <env_cfg's> (<other>)' for each ENV_KEYS key on which they differ."""
    return [f"{k}={dataset_env.get(k)!r} (dataset) vs {env_cfg.get(k)!r} ({other})"
            for k in ENV_KEYS if dataset_env.get(k) != env_cfg.get(k)]


class DatasetError(UserError, ValueError):
    """A dataset is missing, malformed or incompatible. The message is one actionable line."""


def _recollect_hint(path: Path, env_name: str, overwrite: bool = True) -> str:
    return f"`python collect.py env={env_name} data_path={path}" + (" overwrite=true`" if overwrite else "`")


@dataclass
class Histories:
    """A loaded dataset. Arrays are read-only np.memmap views (no data is read until indexed)."""

    path: Path
    states: np.ndarray       # uint8 [N, T, 2]
    actions: np.ndarray      # uint8 [N, T]
    rewards: np.ndarray      # uint8 [N, T]
    next_states: np.ndarray  # uint8 [N, T, 2]
    goals: np.ndarray        # uint8 [N, 2] (Darkroom goal) or [N, 4] (key-to-door task)
    meta: dict = field(repr=False)

    @property
    def n_histories(self) -> int:
        return self.actions.shape[0]

    @property
    def n_steps(self) -> int:
        return self.actions.shape[1]

    def split_indices(self, split: str, at_most: int | None = None) -> np.ndarray:
        """int64 indices of the histories whose goal is in `split` ('train', 'val' or 'test'); at_most: no
        more than that many, evenly spread (every k-th): the histories are goal-major, several per goal, so
        a prefix would cover few goals."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        r = self.meta["histories"][split]
        idx = np.arange(r["start"], r["stop"], dtype=np.int64)
        return idx if at_most is None else idx[:: max(1, -(-len(idx) // int(at_most)))][: int(at_most)]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.meta, {k: getattr(self, k) for k in ARRAY_SPECS})

    def transitions(self, idx, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Packed transitions uint8 [..., L, 6] (transition.py: sx, sy, a, r, nsx, nsy) of histories `idx`,
        steps [start, stop). `idx` may be an int or an index array (one fancy-index read per array)."""
        sl = slice(start, stop)
        return transition.pack(np.asarray(self.states[idx, sl]), self.actions[idx, sl], self.rewards[idx, sl],
                               self.next_states[idx, sl])


def split_layout(splits: dict, per_goal: dict) -> tuple[np.ndarray, dict, dict]:
    """The on-disk layout of a dataset: (goals int64 [N, task_dim] of every history, in order; meta["split"];
    meta["histories"]) from the goal lists of env.splits_from_cfg and the histories per goal of each split.
    Splits come in SPLITS order, goal-major, so each split's histories are one contiguous range."""
    goals, ranges = [], {}
    for split in SPLITS:
        start = len(goals)
        goals += [x for x in splits.get(split, []) for _ in range(int(per_goal.get(split, 0)))]
        ranges[split] = {"start": start, "stop": len(goals)}
    split_meta = {f"{k}_goals": [list(x) for x in splits.get(k, [])] for k in SPLITS}
    width = len(goals[0]) if goals else 2
    return np.asarray(goals, dtype=np.int64).reshape(-1, width), split_meta, ranges


# The meta.json keys that say what a dataset holds (not when or how fast it was made).
_FINGERPRINT_META = ("format_version", "env", "split", "source", "seed", "data_seed", "n_stream", "n_stream_eval",
                     "n_steps", "histories")


def fingerprint(meta: dict, arrays: dict | None = None) -> str:
    """16 hex digits identifying a dataset: a hash of meta.json's identity (env, goal split, source
    algorithm and settings, seeds, layout) and the arrays' shapes. Collection is deterministic given
    these, so re-collecting with the same settings gives the same fingerprint and other settings another
    one. (Arrays edited by hand with the same shapes are not detected: that would mean hashing the data.)"""
    ident = {k: meta.get(k) for k in _FINGERPRINT_META}
    ident["shapes"] = {k: list(v.shape) for k, v in sorted((arrays or {}).items())}
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dataset_fingerprint(path) -> str | None:
    """The fingerprint of the dataset at `path` without validating or reading its data (meta.json and the
    arrays' .npy headers); None if there is no readable dataset there. What a driver (sweep, two_stage)
    compares with a finished run's recorded data_fingerprint before reusing the run."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in ARRAY_SPECS}
    except (OSError, ValueError):
        return None
    return fingerprint(meta, arrays) if isinstance(meta, dict) else None


def _hidden_copies(path: Path, kind: str) -> list[Path]:
    """The .<name>.<kind>-* entries save_histories makes beside `path`, oldest first."""
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"), key=lambda p: p.lstat().st_mtime)


def recover_leftovers(path) -> list[str]:
    """Clean up after a killed save_histories at `path` (call it holding the dataset lock): delete its temp
    folders; if the kill came between an overwrite's two renames (no dataset at `path`, the previous one
    hidden as .<name>.old-*), rename the previous dataset back. Returns what was done, one line each."""
    path = Path(path)
    notes = []
    olds = _hidden_copies(path, "old")
    if not path.exists() and not path.is_symlink():
        good = [p for p in olds if (p / "meta.json").is_file()]
        if good:
            os.rename(good[-1], path)
            olds.remove(good[-1])
            notes.append(f"restored the previous dataset at {path} from {good[-1].name} (a collect was "
                         f"interrupted while replacing it)")
    for p in olds + _hidden_copies(path, "tmp"):
        p.unlink() if p.is_symlink() or not p.is_dir() else shutil.rmtree(p)
        notes.append(f"removed {p.name} beside {path} (left by an interrupted collect)")
    return notes


def _check_meta(meta, where: Path, env_name: str) -> None:
    hint = _recollect_hint(where, env_name)
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}/meta.json is not a JSON object: re-collect with {hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        why = " (format 1 has no validation goal split)" if meta.get("format_version") == 1 else ""
        raise DatasetError(
            f"dataset {where} has format_version {meta.get('format_version')!r}{why} but this code reads "
            f"format_version {FORMAT_VERSION}: re-collect with {hint}")
    for key in ("env", "split", "histories", "n_steps"):
        if key not in meta:
            raise DatasetError(f"{where}/meta.json lacks the key {key!r}: re-collect with {hint}")
    split = meta["split"]
    if not isinstance(meta["env"], dict) or not isinstance(split, dict) or \
            not all(isinstance(split.get(f"{k}_goals"), list) for k in SPLITS):
        raise DatasetError(f"{where}/meta.json needs 'env' as an object and 'split' as {{train_goals: "
                           f"[...], val_goals: [...], test_goals: [...]}}: re-collect with {hint}")


def _check_arrays(arrays: dict, meta: dict, where: Path) -> None:
    """Shapes, dtypes, value ranges and split consistency. Shared by load (memmaps) and save (arrays)."""
    env = meta["env"]
    hint = _recollect_hint(where, env.get("name"))
    G, n_act = int(env["grid_size"]), int(env["n_actions"])
    for name in ARRAY_SPECS:
        if name not in arrays:
            raise DatasetError(f"dataset {where} has no {name}.npy: re-collect with {hint}")
        if arrays[name].dtype != np.uint8:
            raise DatasetError(f"{where}/{name}.npy has dtype {arrays[name].dtype}, expected uint8: "
                               f"re-collect with {hint}")
    from env.tasks import task_dim  # local: keep `import histories` light for tools

    N, T = arrays["actions"].shape[:2] if arrays["actions"].ndim == 2 else (-1, -1)
    for name, tail in ARRAY_SPECS.items():
        want = (N, task_dim(env)) if name == "goals" else (N, T, *tail)
        if arrays[name].shape != want or N < 0:
            raise DatasetError(f"{where}/{name}.npy has shape {arrays[name].shape}, expected {want} "
                               f"(from actions.npy [N, T]): re-collect with {hint}")
    h = meta["histories"]
    try:
        ranges = {k: (int(h[k]["start"]), int(h[k]["stop"])) for k in SPLITS}
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{where}/meta.json 'histories' must be {{train: {{start, stop}}, val: {{start, "
                           f"stop}}, test: {{start, stop}}}}: re-collect with {hint}") from None
    (tr, va, te) = (ranges[k] for k in SPLITS)
    if tr[0] != 0 or tr[1] != va[0] or va[1] != te[0] or te[1] != N or any(a > b for a, b in ranges.values()):
        raise DatasetError(f"{where}/meta.json histories ranges train={tr} val={va} test={te} do not tile "
                           f"the {N} histories in the arrays: re-collect with {hint}")
    if T != int(meta["n_steps"]):
        raise DatasetError(f"{where} arrays hold {T} steps per history but meta.json says n_steps="
                           f"{meta['n_steps']}: re-collect with {hint}")
    if N == 0 or T == 0:
        raise DatasetError(f"dataset {where} is empty (N={N}, T={T}): re-collect with {hint}")
    # Value ranges. On memmaps this reads each file once (tens of MB for the default dataset).
    limits = {"states": G, "next_states": G, "goals": G, "actions": n_act, "rewards": 2}
    for name, limit in limits.items():
        hi = int(np.max(arrays[name]))
        if hi >= limit:
            raise DatasetError(f"{where}/{name}.npy holds value {hi}, must be < {limit} "
                               f"(grid_size={G}, n_actions={n_act}, rewards in {{0,1}}): "
                               f"re-collect with {hint}")
    # Every history's goal must belong to the split its index range claims.
    goals = np.asarray(arrays["goals"]).astype(np.int64)
    for split, (a, b) in ranges.items():
        allowed = {tuple(g) for g in meta["split"][f"{split}_goals"]}
        bad = [tuple(g) for g in goals[a:b].tolist() if tuple(g) not in allowed]
        if bad:
            raise DatasetError(f"{where}: {len(bad)} {split} histories have goals outside the "
                               f"{split} split (e.g. {bad[0]}): re-collect with {hint}")


def _load_npy(file: Path, hint: str) -> np.ndarray:
    if not file.is_file():
        raise DatasetError(f"dataset {file.parent} has no {file.name}: re-collect with {hint}")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except PermissionError:
        raise DatasetError(f"cannot read {file} (permission denied): fix its permissions") from None
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{file} is truncated or corrupt ({msg}): re-collect with {hint}") from None
    if not isinstance(arr, np.memmap):  # np.load returns a plain array for 0-size payloads
        return arr
    if arr.offset + arr.nbytes != file.stat().st_size:
        raise DatasetError(f"{file} has {file.stat().st_size - arr.offset - arr.nbytes} trailing bytes "
                           f"(corrupt): re-collect with {hint}")
    return arr


def load_histories(path, env_cfg) -> Histories:
    """Open the dataset at `path` (memory-mapped, read-only) and validate everything a run relies on against
    `env_cfg`: format, env config, goal splits, files, dtypes, shapes, value ranges. Raises DatasetError."""
    from omegaconf import DictConfig, OmegaConf

    from env.tasks import splits_from_cfg  # local: keep `import histories` light for tools

    path = Path(path)
    env_cfg = OmegaConf.to_container(env_cfg, resolve=True) if isinstance(env_cfg, DictConfig) else dict(env_cfg)
    name = env_cfg.get("name")
    hint = _recollect_hint(path, name)
    if not path.is_dir():
        hidden = [p for p in _hidden_copies(path, "old") if (p / "meta.json").is_file()]
        if hidden:
            raise DatasetError(f"no dataset at {path}, but an interrupted collect left the previous one in "
                               f"{hidden[-1]}: run {_recollect_hint(path, name, overwrite=False)} to restore it "
                               f"(or rename it back by hand)")
        raise DatasetError(f"no dataset at {path}: run {_recollect_hint(path, name, overwrite=False)}")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise DatasetError(f"{path} has no meta.json (not a dataset, or an interrupted write): "
                           f"re-collect with {hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DatasetError(f"{meta_file} is not valid JSON ({e}): re-collect with {hint}") from None
    _check_meta(meta, path, name)
    diffs = env_differences(meta["env"], env_cfg, "run")
    if diffs:
        raise DatasetError(f"dataset {path} was collected with a different env config: {', '.join(diffs)}: run "
                           f"with the dataset's env (env=...), point data_path at a matching dataset, or "
                           f"re-collect with {hint}")
    want = splits_from_cfg(env_cfg)
    if any([tuple(g) for g in meta["split"][f"{k}_goals"]] != want[k] for k in SPLITS):
        raise DatasetError(f"dataset {path} lists goal splits that differ from the run's (env.splits_from_cfg: "
                           f"grid_size, train_frac, split_seed, n_val_goals, max_train_tasks): re-collect with {hint}")
    arrays = {k: _load_npy(path / f"{k}.npy", hint) for k in ARRAY_SPECS}
    _check_arrays(arrays, meta, path)
    return Histories(path=path, meta=meta, **arrays)


def check_can_write(path, overwrite: bool = False) -> None:
    """Raise DatasetError unless `path` may be (over)written. Call it before doing expensive work.

    Overwriting is refused unless overwrite=True, and always refused for a non-empty folder that is not
    a dataset (no meta.json), so a typo in data_path can never delete unrelated files.
    """
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise DatasetError(f"a dataset already exists at {path}: pass overwrite=true to replace it, or "
                           f"choose another data_path / data_seed")
    if not path.is_dir():
        raise DatasetError(f"{path} exists and is not a folder: remove it or choose another data_path")
    if any(path.iterdir()) and not (path / "meta.json").is_file():
        raise DatasetError(f"refusing to overwrite {path}: it is not a dataset (no meta.json); remove it "
                           f"by hand or choose another data_path")


def save_histories(path, arrays: dict, meta: dict, overwrite: bool = False) -> Path:
    """Write a dataset atomically, validated with the loader's checks so a bad dataset is never written; returns
    the final path. Files go to a temp folder beside `path`, each fsync'd, meta.json last; then the folder is
    renamed onto `path`. With overwrite=True an existing dataset is first renamed aside and deleted only after
    the new one is in place: an interruption leaves the old dataset, or the new one, or (between the two
    renames) none under the final name; never a mix."""
    path = Path(path)
    env_name = (meta.get("env") or {}).get("name") if isinstance(meta, dict) else None
    check_can_write(path, overwrite)
    _check_meta(meta, path, env_name)
    _check_arrays(arrays, meta, path)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise DatasetError(f"cannot write a dataset beside {path} ({os_error_reason(e)}): choose another "
                           f"data_path or fix the folder's permissions") from None
    try:
        for name in ARRAY_SPECS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
            fsync_dir(tmp / f"{name}.npy")  # a file's contents alike
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        fsync_dir(tmp / "meta.json")
        fsync_dir(tmp)
        if path.exists():  # overwrite=True was checked above
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # put the previous dataset back
            os.rename(old, path)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise DatasetError(f"cannot write the dataset {path} ({os_error_reason(e)}); nothing was replaced "
                               f"(a previous dataset there is intact): free space or fix the permissions, "
                               f"then collect again") from None
        raise
    if old.is_symlink():  # data_path was a symlink to a dataset: drop the link, not its target
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
    return path
