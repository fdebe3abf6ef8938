"""A sweep's out dir (docs/design.md §10, 17): what experiments/sweep.py writes there, and the rules that keep
one out dir one table. experiments/report.py reads it.

    <out>/sweep.json          the out dir's identity (check_identity) and dataset per env (check_dataset_identity),
                              claimed by the first sweep; the sweep commands and planned jobs (sweep.Report)
    <out>/jobs/<run>.json     a job's record (record): what it is, its identity, data fingerprint, status, wall s
    <out>/refused/<run>.json  a job refused before its run-state check passed (failed): its record left as it was
    <out>/runs/, <out>/logs/  the run dirs and the stages' output

Every write is atomic (atomic_io); a full or read-only disk is one line (SweepError); parallel jobs that need
one file or folder take turns through a lock beside it (held).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from hydra.errors import CompactHydraException

import rundir
from atomic_io import DISK_ERRNOS, PathLock, atomic_write_text, os_error_reason
from errors import UserError
from experiments.runs import DONE
from rundir import read_json


class SweepError(UserError, CompactHydraException):
    """Bad input or a run directory that cannot be reused as asked; Hydra prints it as one line."""


@contextlib.contextmanager
def held(path: Path):
    """PathLock beside `path` (<parent>/.<name>.sweep.lock), waited for: parallel jobs that need the same
    dataset or stage-1 run produce it once; the others wait here and then find it finished."""
    lock, said = PathLock(path.parent / f"{path.name}.sweep"), False
    while (holder := lock.acquire()) is not None:
        if not said:
            print(f"[wait]  {path.name} is being produced by {holder}", flush=True)
            said = True
        time.sleep(1.0)
    try:
        yield
    finally:
        lock.release()


def disk_error(e: OSError, path: Path) -> SweepError:
    """A full, read-only or forbidden disk as one line; any other OSError is re-raised (a bug)."""
    if e.errno not in DISK_ERRNOS:
        raise e
    return SweepError(f"cannot write {e.filename or path} ({os_error_reason(e)}): free space or fix the "
                      f"permissions, then run the same command again (finished runs are reused)")


def write_text(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise disk_error(e, path) from None


def check_out(out: Path) -> None:
    """out must be a folder this process can write (not a file, not on a read-only or full disk): one line
    before Hydra creates <out>/hydra/ or a job writes anything."""
    p = next(p for p in (out, *out.parents) if p.exists())
    if not p.is_dir():
        raise SweepError(f"out={out}: {p} is a file, not a folder: choose another out=")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SweepError(f"out={out} is not writable ({os_error_reason(e)}): choose another out= or fix its "
                         f"permissions") from None


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _same_but_later_keys(old: dict, new: dict) -> bool:
    """An identity recorded before a key existed (rundir.LATER_KEY_DEFAULTS: '<stage>.<group>.<key>' absent)
    equals a new one that has the key at its backward-compatible default, as for a run's own config."""
    later = rundir.LATER_KEY_DEFAULTS
    filled = {**old, **{k: v for k, v in new.items() if k not in old and "." in k
                        and k.split(".", 1)[1] in later and v == later[k.split(".", 1)[1]]}}
    return identity_hash(filled) == identity_hash(new)


def check_identity(out: Path, ident: dict, claim: bool) -> str:
    """The out dir's identity hash: the one <out>/sweep.json records when `ident` is that configuration (also
    when it only adds later keys at their defaults: with claim its own hash joins the aliases, so reports never
    split one configuration in two); SweepError if it records another. claim: record it when none is (under a
    lock: concurrent sweeps into one out agree on one identity)."""
    h = identity_hash(ident)

    def check(info: dict) -> bool:
        old = info.get("identity") or {}
        was = old.get("config") or {}
        if old and old.get("hash") != h and not _same_but_later_keys(was, ident):
            diff = rundir.differing_keys(was, ident)  # flat dicts: one "key (old -> new)" per dotted key
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise SweepError(f"{out} holds the runs of another sweep configuration ({'; '.join(diff[:6])}{more}): "
                             f"pass out={out}-{h[:8]} to run these settings in a folder of their own (or rerun "
                             f"with the old ones)")
        return bool(old)

    info = read_json(out / "sweep.json") or {}
    known = check(info)
    if not claim or (known and h in (info["identity"]["hash"], *(info["identity"].get("aliases") or []))):
        return info["identity"]["hash"] if known else h
    with held(out / "sweep.json"):
        info = read_json(out / "sweep.json") or {}
        ids = info["identity"] if check(info) else {"hash": h, "config": ident}
        if ids["hash"] != h:  # the same configuration spelled with later keys: its hash joins the aliases
            ids = {**ids, "aliases": sorted({*(ids.get("aliases") or []), h})}
        if ids != info.get("identity"):
            write_text(out / "sweep.json", json.dumps({**info, "identity": ids}, indent=1))
        return ids["hash"]


def check_dataset_identity(out: Path, env: str | None, data_path: Path, fp: str | None) -> None:
    """An out dir's runs of one env are all trained on one dataset (its fingerprint, in sweep.json): a
    re-collected dataset or another data_path= is refused, not mixed into the table."""
    if fp is None:
        return
    with held(out / "sweep.json"):
        info = read_json(out / "sweep.json") or {}
        was = (info.get("datasets") or {}).get(env or "-")
        if was and was["fingerprint"] != fp:
            raise SweepError(f"{out} holds runs trained on dataset {was['path']} (fingerprint {was['fingerprint']}) "
                             f"but {data_path} now holds fingerprint {fp} (re-collected, or another data_path=): "
                             f"choose another out= for this dataset, or restore that one")
        if not was:
            datasets = {**(info.get("datasets") or {}), env or "-": {"fingerprint": fp, "path": str(data_path)}}
            write_text(out / "sweep.json", json.dumps({**info, "datasets": datasets}, indent=1))


# A multirun's own start, which its callback (sweep.Report) puts in the environment for its end and its jobs (a
# launcher's worker processes inherit the environment, not the callback's state); sweep.json's is the last sweep's.
SWEEP_STARTED = "CAD_SWEEP_STARTED_UNIX"


def start(out: Path, command: str, planned: list[dict], **fields) -> float:
    """Record a sweep's start in <out>/sweep.json: `fields`, its command (`commands`: every sweep into this out
    dir, oldest first), its planned jobs (an earlier sweep's stay planned), when and where it started. Returns
    the start time, this sweep's own (sweep.json's is the last sweep's to start: two may run into one out dir)."""
    now = time.time()
    with held(out / "sweep.json"):
        old = read_json(out / "sweep.json") or {}
        jobs = {j["run"]: j for j in (old.get("planned") or []) + planned}
        commands = list(old.get("commands") or ([old["command"]] if old.get("command") else []))
        write_text(out / "sweep.json", json.dumps({
            **old, **fields, "command": command, "commands": commands + ([] if command in commands else [command]),
            "cwd": str(Path.cwd()), "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "started_unix": now, "planned": sorted(jobs.values(), key=lambda j: j["run"])}, indent=1))
    return now


def sweep_started(out: Path) -> float:
    """When the multirun running this process started: its own start, from the environment its callback set
    (sweep.json's is the last sweep's into `out`: another may have started since); sweep.json's only where a
    launcher did not pass the environment on."""
    own = os.environ.get(SWEEP_STARTED)
    return float(own) if own else (read_json(out / "sweep.json") or {}).get("started_unix", 0.0)


def record(out: Path, name: str, **fields) -> None:
    """Merge `fields` into <out>/jobs/<name>.json (wall_s entries add up over attempts)."""
    path = out / "jobs" / f"{name}.json"
    rec = read_json(path) or {}
    wall = rec.get("wall_s", {})
    for k, v in fields.pop("wall_s", {}).items():
        wall[k] = round(wall.get(k, 0.0) + v, 1)
    rec.update(fields, wall_s=wall, updated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               updated_unix=time.time())
    write_text(path, json.dumps(rec, indent=1, default=str))


def failed(out: Path, name: str, error: str, claimed: bool, status: str = "failed") -> None:
    """Say why a job failed; record it in its job record, or, for a job refused before its run-state check
    passed (its record and run left as they were), in <out>/refused/<name>.json for this multirun's end."""
    print(f"error: [{name}] {error}", file=sys.stderr, flush=True)
    try:
        if claimed:
            record(out, name, status=status, error=error)
        else:
            atomic_write_text(out / "refused" / f"{name}.json", json.dumps({"error": error, "unix": time.time()}))
    except (SweepError, OSError) as e:  # the disk that failed the job may fail its record too
        print(f"error: [{name}] {e}", file=sys.stderr, flush=True)


def failures(out: Path, since: float, planned: set[str]) -> tuple[set[str], list[str]]:
    """The runs of `planned` (a sweep's run names) that did not finish: their stage-2 job failed or was refused
    since `since` (unix time) and is not done now (another sweep into this out dir may have held it and finished
    it since), with their errors."""
    recs = {p.stem: r for p in sorted((out / "jobs").glob("*.json")) if (r := read_json(p))}
    failed = [(n, r["error"]) for n, r in recs.items() if n in planned and r.get("kind") == "train"
              and r.get("status") == "failed" and r.get("updated_unix", 0.0) >= since]
    refused = [(p.stem, r["error"]) for p in sorted((out / "refused").glob("*.json"))
               if p.stem in planned and (r := read_json(p)) and r.get("unix", 0.0) >= since
               and (recs.get(p.stem) or {}).get("status") != DONE]
    return {n for n, _ in failed + refused}, [e for _, e in failed + refused]
