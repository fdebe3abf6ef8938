"""The run directory: what a run is, what its folder holds, and its resume checkpoints (docs/design.md §6).

Atomicity: leftovers of a killed process (.tmp-/.old- checkpoint folders, .<file>.*.tmp files, incomplete
step-N folders) are never read, and are removed, and reported, by the next start; a pruned checkpoint is
first renamed to .old-step-N, so an interrupted prune never leaves a half-deleted step-N.

One process per run directory: the main process holds an exclusive lock (atomic_io.PathLock) on run_dir
for the whole of fit; a second launch fails at once naming the holder's pid. The other ranks of the same
launch rely on the main process's lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from atomic_io import PathLock, atomic_write_text, fsync_dir, os_error_reason, write_failure_reason
from errors import UserError


class RunDirError(UserError, RuntimeError):
    """The output run directory cannot be used as asked (holds another run, or nothing to resume), or a
    checkpoint cannot be resumed from."""


# Keys that may change between a run and its resumption without making it "a different run".
# (Logging/eval cadence and performance knobs; not the data, model, optimisation or seed.) Dotted keys
# name nested ones.
_VOLATILE_KEYS = {"resume", "resume_from", "overwrite", "max_steps", "num_workers", "cpu_threads", "progress",
                  "log_every", "eval_every", "eval", "heldout_every", "diag_every",
                  "diag_batches", "checkpoint_every", "keep_last", "allow_data_change", "save_every",
                  "data_on_device"}  # data_on_device: identical batches either way
# Paths say where things are, not what the run is: a run dir moved or spelled differently (./runs/x, an
# absolute path) is the same run. Different data behind the same or another data_path is caught by
# data_fingerprint instead; on resume the encoder weights come from the checkpoint, not from its path.
_PATH_KEYS = {"run_dir", "run_name", "data_path", "model.pretrained_encoder_path"}
FINGERPRINT_KEY = "data_fingerprint"  # histories.fingerprint of the training data, set by the scripts
_NOT_IDENTITY = _VOLATILE_KEYS | _PATH_KEYS | {FINGERPRINT_KEY}
# Keys added after runs existed, with the value that is what a run saved before the key did: an absent key
# and this value are the same run (a new option's default keeps old runs' meaning, and they stay reusable).
LATER_KEY_DEFAULTS = {"model.keep_recent": 0, "sampler.memory": "exact", "eval.max_heldout_goals": None,
                      "max_heldout_goals": None}  # the last: evaluate.py's (an eval json's config, an out identity)

# checkpoints/step-N: a complete checkpoint (half-written ones are .tmp-step-N, pruned ones .old-step-N)
CHECKPOINT_RE = re.compile(r"step-(\d+)")
# Test-only fault injection (tests/test_resume.py): CAD_TEST_KILL_AT=<step>[:<where>] makes the process
# SIGKILL itself at that point, exactly like an OOM killer or a pre-empted node would.
KILL_ENV = "CAD_TEST_KILL_AT"


def with_later_defaults(cfg: dict) -> dict:
    """cfg with every LATER_KEY_DEFAULTS key its group lacks set to its default (a copy where one is added)."""
    out = dict(cfg)
    for key, default in LATER_KEY_DEFAULTS.items():
        group, _, name = key.rpartition(".")  # a top-level key is evaluate.py's: not in a training run's config
        if group and isinstance(out.get(group), dict) and name not in out[group]:
            out[group] = {**out[group], name: default}
    return out


def identity(cfg: dict, ignore: Iterable[str] = ()) -> dict:
    """The config minus volatile keys, paths and the data fingerprint (dotted names reach nested keys); keys
    added later count with their default where absent."""
    skip = _NOT_IDENTITY | set(ignore)

    def strip(d: dict, prefix: str) -> dict:
        return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in d.items() if f"{prefix}{k}" not in skip}

    return strip(with_later_defaults(cfg), "")


def differing_keys(a: dict, b: dict) -> list[str]:
    """Dotted paths where two configs differ (keys that are not part of a run's identity ignored; keys added
    later count with their default where absent)."""
    out = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if f"{prefix}{k}" in _NOT_IDENTITY:
                    continue
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]} ({x!r} -> {y!r})")

    walk(with_later_defaults(a), with_later_defaults(b), "")
    return out


def run_state(run_dir: Path, want: dict, want_steps: int, what: str, force: bool, fix: str,
              fingerprint: str | None = None, encoder: Path | None = None) -> str:
    """What a driver (experiments/sweep.py, two_stage.py) does with a stage's run dir before launching it:
    'reuse', 'resume', 'fresh' or 'overwrite' (force), or RunDirError ending in `fix` (the driver's way to redo
    it); the rule is docs/design.md §6's (`fingerprint`: the dataset's now). Pure: reads only."""
    run_dir = Path(run_dir)
    if force:  # overwrite=true whatever the run dir holds (also what a dry run prints)
        return "overwrite"
    saved = _saved_config(run_dir, fix, f"the {what} run's config")
    if saved is not None and identity(saved) != identity(want):
        diff = "; ".join(differing_keys(saved, want)[:6])
        raise RunDirError(f"{run_dir} holds a {what} run with another config ({diff}): {fix}")
    was = (saved or {}).get(FINGERPRINT_KEY)
    if fingerprint and was and was != fingerprint:
        raise RunDirError(f"{run_dir} holds a {what} run trained on other data (data fingerprint {was} -> "
                          f"{fingerprint}: the dataset was re-collected or data_path points elsewhere): {fix}")
    if (run_dir / "done.json").exists():
        done = _read_json(run_dir / "done.json", f"the {what} run's summary", f"remove it, or {fix}")
        if saved is None:
            raise RunDirError(f"{run_dir} has a done.json but no config.json (not a finished run): {fix}")
        if int(done.get("global_step", -1)) != want_steps:
            raise RunDirError(f"{run_dir} finished a {what} run at step {done.get('global_step')}, not the "
                              f"{want_steps} steps asked: {fix}")
        enc = Path(encoder) if encoder else None
        if enc is not None and enc.is_file() and enc.stat().st_mtime > (run_dir / "config.json").stat().st_mtime:
            raise RunDirError(f"{run_dir} finished a {what} run from an older {enc.name} (stage 1 was redone "
                              f"after it started): {fix}")
        return "reuse"
    return "resume" if checkpoints(run_dir) else "fresh"


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing, unreadable or no object (a record a driver may find
    half-written by a killed process: a missing record, not an error)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_dataset(data_path: Path, want: dict, asked: set[str], by_hand: bool) -> str | None:
    """The drivers' one check before they reuse the dataset at data_path for the plain collect config `want`
    (docs/design.md §6; `asked`: the keys or groups the command line gives): histories.DatasetError, or the note
    to print for a dataset given by hand (data_path=...) that differs from the defaults only."""
    from histories import DatasetError

    # env, source settings and seeds ("key: dataset -> asked"); keys a dataset does not record (collected
    # before they existed) are not compared
    meta = read_json(Path(data_path) / "meta.json") or {}
    diff = []
    for g in ("env", "source"):
        have, ask = meta.get(g) or {}, want.get(g) or {}
        diff += [f"{g}.{k}: {have[k]!r} -> {ask.get(k)!r}" for k in sorted(have, key=str) if have[k] != ask.get(k)]
    diff += [f"{k}: {meta.get(k)!r} -> {want.get(k)!r}" for k in ("seed", "data_seed") if meta.get(k) != want.get(k)]
    refused = [d for d in diff if d.split(":")[0] in asked or d.split(".")[0] in asked] or ([] if by_hand else diff)
    if refused:
        raise DatasetError(f"the dataset at {data_path} was collected with other settings than asked "
                           f"({'; '.join(refused)}): pass collect:overwrite=true to re-collect it with these, "
                           f"or choose another data_path / data_seed")
    return (f"the dataset at {data_path} differs from collect's config ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); using it as it is (collect:overwrite=true re-collects it)"
            if diff else None)


def _is_complete(ck: Path) -> bool:
    """A checkpoint folder holds our step counter, the optimizer and the model weights. loop_state.json
    alone is what an interrupted prune or copy can leave; it must not count."""
    return ((ck / "loop_state.json").is_file() and any(ck.glob("optimizer*.bin"))
            and (any(ck.glob("model*.safetensors")) or any(ck.glob("pytorch_model*.bin"))))


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, dir), oldest first. Half-written ones live under .tmp-* names."""
    d = Path(run_dir) / "checkpoints"
    found = [(CHECKPOINT_RE.fullmatch(p.name), p) for p in d.iterdir()] if d.is_dir() else []
    return sorted((int(m.group(1)), p) for m, p in found if m and p.is_dir() and _is_complete(p))


def _read_json(path: Path, what: str, fix: str) -> dict:
    data = read_json(path)
    if data is None:
        raise RunDirError(f"{path} ({what}) is unreadable (torn, not a JSON object, or no permission): {fix}")
    return data


def _loop_state(ck: Path) -> tuple[int, dict | None]:
    """A checkpoint's step and the run config saved with it (None in checkpoints from before it was)."""
    st = _read_json(ck / "loop_state.json", "checkpoint state", "resume from another checkpoint "
                    "(resume_from=<run_dir>/checkpoints/step-N) or start over with overwrite=true")
    try:
        step = int(st["step"])
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{ck}/loop_state.json has no integer 'step': resume from another checkpoint") from None
    return step, st["config"] if isinstance(st.get("config"), dict) else None


@dataclass
class RunPlan:
    """What fit will do with the run directory, decided identically on every rank before any write."""

    run_dir: Path
    resume_ckpt: Path | None = None  # checkpoint to load
    start_step: int = 0
    wipe: bool = False  # overwrite=true on an existing run: delete its contents first
    restart: bool = False  # same run, killed before its first checkpoint: clear its partial outputs


def _saved_config(run_dir: Path, fix: str, what: str = "the run's config") -> dict | None:
    """The config.json of the run run_dir holds, None where it holds none; refused (ending in `fix`) if run_dir is a
    file or its config unreadable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a folder: remove it, or {fix}")
    cfg = run_dir / "config.json"
    return _read_json(cfg, what, f"remove that run dir, or {fix}") if cfg.is_file() else None


def plan_run_dir(run_dir: Path, cfg: dict, s) -> RunPlan:
    """Decide (per `s`, loop.LoopSettings) whether to start fresh, start over or resume; refuse to clobber
    anything that is not this run. Pure (reads only), so every rank reaches the same decision before the main
    process writes."""
    run_dir = Path(run_dir)
    saved = _saved_config(run_dir, "choose another run_dir=...")
    if saved is None and run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise RunDirError(f"run_dir {run_dir} is not empty and holds no run (no config.json); refusing to "
                          f"write into it: choose a new or empty run_dir=...")
    if s.overwrite:
        return RunPlan(run_dir, wipe=saved is not None)
    if saved is not None and identity(saved) != identity(cfg):
        raise RunDirError(
            f"run_dir {run_dir} already holds a different run (config differs in: "
            f"{'; '.join(differing_keys(saved, cfg))}); choose another run_dir=..., or pass overwrite=true to "
            f"replace it")
    existing = checkpoints(run_dir)
    if s.resume_from:
        ck = Path(s.resume_from).expanduser().resolve()
        if not (ck / "loop_state.json").is_file() and checkpoints(ck):
            ck = checkpoints(ck)[-1][1]  # a run directory was given: take its latest checkpoint
        if not (ck / "loop_state.json").is_file():
            raise RunDirError(f"resume_from={s.resume_from} is not a checkpoint (no {ck}/loop_state.json): pass a "
                              f"run directory that has checkpoints/step-* folders, or one of those folders")
        where = f"checkpoint {ck}"
    elif s.resume:
        if saved is None:
            raise RunDirError(f"resume=true but there is no run in {run_dir}: start it without resume, or fix "
                              f"run_dir=... (or pass resume_from=<checkpoint>)")
        if not existing:
            raise RunDirError(f"resume=true but {run_dir} has no complete checkpoint yet (it was stopped "
                              f"before checkpoint_every={s.checkpoint_every} steps): run it without resume")
        ck, where = existing[-1][1], f"run_dir {run_dir}"
    else:
        if saved is not None and (existing or (run_dir / "done.json").exists()):
            state = f"checkpoint step {existing[-1][0]}" if existing else "finished"
            raise RunDirError(f"run_dir {run_dir} already holds this run ({state}); pass resume=true to "
                              f"continue it, or overwrite=true to start over")
        return RunPlan(run_dir, restart=saved is not None)  # same run, killed before its first checkpoint
    start, ck_cfg = _loop_state(ck)
    # resume_from: the data the checkpoint was trained on (the run dir's config where it predates saving it)
    check_same_data(ck_cfg if s.resume_from and ck_cfg is not None else saved, cfg, where)
    return RunPlan(run_dir, ck, start)


def check_same_data(saved: dict | None, cfg: dict, where: str) -> None:
    """Refuse to continue training on data other than the data `saved` (a run's config) was trained on,
    unless cfg says allow_data_change=true. Configs from before fingerprints existed are not checked."""
    was = (saved or {}).get(FINGERPRINT_KEY)
    now = cfg.get(FINGERPRINT_KEY)
    if was and now and was != now and not cfg.get("allow_data_change"):
        raise RunDirError(
            f"{where} was trained on other data: it records data fingerprint {was} but data_path="
            f"{cfg.get('data_path')} holds data with fingerprint {now} (re-collected with other settings?): "
            f"point data_path at the data it was trained on, or pass allow_data_change=true to continue on "
            f"the new data")


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def leftovers(run_dir: Path) -> list[Path]:
    """What killed processes leave in a run dir: atomic_write temp files (.<name>.*.tmp), checkpoint
    saves or prunes that were cut short (checkpoints/.tmp-*, .old-*) and step-N folders that are not
    complete checkpoints. None of them is ever read."""
    d = Path(run_dir)
    out = sorted(p for p in d.glob(".*.tmp") if p.is_file()) if d.is_dir() else []
    ck_root = d / "checkpoints"
    if ck_root.is_dir():
        out += sorted(p for p in ck_root.iterdir() if p.name.startswith((".tmp-", ".old-"))
                      or (CHECKPOINT_RE.fullmatch(p.name) and p.is_dir() and not _is_complete(p)))
    return out


def apply_run_dir(plan: RunPlan, cfg: dict) -> None:
    """Main process only: carry out the plan (saying what it removes), then write config.json."""
    d = plan.run_dir
    if plan.wipe:
        for p in d.iterdir():
            _remove(p)
    if plan.restart:  # partial outputs of the same run; nothing to continue from
        for name in ("tb", "checkpoints", "done.json", "model.pt"):
            _remove(d / name)
    d.mkdir(parents=True, exist_ok=True)
    junk = leftovers(d)
    for p in junk:
        _remove(p)
    if junk:
        print(f"note: removed {len(junk)} leftover(s) of an interrupted run in {d}: "
              f"{', '.join(str(p.relative_to(d)) for p in junk)}", flush=True)
    atomic_write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True))


def lock_run_dir(acc, run_dir: Path) -> PathLock | None:
    """The main process locks run_dir; every rank learns whether that worked (and fails together)."""
    lock, err = None, None
    if acc.is_main_process:
        lock = PathLock(run_dir)
        try:
            holder = lock.acquire()
        except OSError as e:
            holder, err = None, (f"cannot create the lock file {lock.file} ({os_error_reason(e)}): make "
                                 f"{run_dir.parent} writable or choose another run_dir=...")
        if holder:
            err = (f"run_dir {run_dir} is in use by another training ({holder}, lock file {lock.file}): wait "
                   f"for it to finish or stop it, or choose another run_dir=...")
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        err = broadcast_object_list([err])[0]
    if err:
        raise RunDirError(err)
    return lock


def kill_point(step: int, where: str) -> None:
    """Fault injection for the kill/resume tests (CAD_TEST_KILL_AT=<step>[:step|save]); no-op otherwise."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        at, _, w = spec.partition(":")
        if int(at) == step and (w or "step") == where:
            os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(acc, ck: Path) -> None:
    """accelerate load_state with one-line errors. Accelerate silently skips a missing RNG file, so say it."""
    rng = ck / f"random_states_{acc.process_index}.pkl"
    if not rng.is_file():
        print(f"warning: {ck} has no RNG state for process {acc.process_index} (saved with fewer processes?); "
              f"continuing, but the run will not be bit-identical to an uninterrupted one", flush=True)
    try:
        acc.load_state(str(ck))
    except Exception as e:  # noqa: BLE001 -- size mismatch, torn file, foreign folder: name it instead of a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunDirError(f"cannot resume from {ck}: {type(e).__name__}: {first[:300]} -- the checkpoint "
                          f"is damaged or from another model config; resume_from=<an older "
                          f"checkpoints/step-N>, or start over with overwrite=true") from None


def save_checkpoint(acc, run_dir: Path, step: int, keep_last: int, config: dict | None = None) -> Path:
    """save_state on every rank into checkpoints/.tmp-step-N; the main process fsyncs it, renames it to step-N,
    then prunes checkpoints newer than N (an abandoned timeline after resume_from an older one) and all but
    the keep_last newest. Assumes a filesystem shared by all ranks (multi-node: a shared run_dir)."""
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{step:08d}"
    tmp = ck_root / f".tmp-step-{step:08d}"
    old = ck_root / f".old-step-{step:08d}"
    if acc.is_main_process:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        ck_root.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except Exception as e:  # disk full / read-only: torch and safetensors raise their own exception types
        why = write_failure_reason(e)
        if why is None:  # not the disk: a bug, with its traceback
            raise
        if acc.is_main_process:  # drop the partial save, keep every complete checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"cannot write checkpoint {final} ({why}); the earlier checkpoints "
                          f"are intact: free space or fix the permissions, then continue with resume=true") from None
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "loop_state.json").write_text(json.dumps(
            {"step": step, "world_size": acc.num_processes, "config": config}, indent=1, default=str))
        for dirpath, _, files in os.walk(tmp):  # every file, then its folder (fsync_dir syncs either)
            for p in [*(os.path.join(dirpath, name) for name in files), dirpath]:
                fsync_dir(p)
        kill_point(step, "save")
        if final.exists():  # same step saved again (resume_from an older checkpoint): swap, then delete
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(ck_root)
        shutil.rmtree(old, ignore_errors=True)
        complete = checkpoints(run_dir)
        kept = [p for st, p in complete if st <= step][-max(1, keep_last):]
        for p in (p for _, p in complete if p not in kept):
            gone = p.with_name(f".old-{p.name}")  # one rename: a kill mid-delete leaves no half step-N
            shutil.rmtree(gone, ignore_errors=True)
            os.rename(p, gone)
            shutil.rmtree(gone, ignore_errors=True)
    acc.wait_for_everyone()
    return final
