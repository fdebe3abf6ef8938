"""rundir.py: the run directory, its lock, its identity and its leftovers.

- One training per run directory: a second one fails in one line naming the first's pid (a held lock leaves
  nothing behind); Ctrl-C names the last checkpoint and how to resume.
- A run's identity is its config and the fingerprint of its data, not how run_dir / data_path are spelled or
  where the folders moved; resuming on re-collected data is refused unless allow_data_change=true.
- Leftovers of a killed process (temp files and folders, a half-pruned checkpoint) are removed and reported;
  pruning renames before it deletes, so an interrupted prune never leaves a half step-N.
- A full or read-only disk is one line that says what is intact, whatever library raised it.
- run_state and check_dataset, shared by experiments/sweep.py and two_stage.py, reuse a run or a dataset on
  its content only.

Bit-identical resume after SIGKILL: tests/test_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import collect_small, compose, oserror, raises_one_line, raises_one_line_in_cli

import evaluate
import loop
import rundir
import train
from atomic_io import PathLock
from histories import DatasetError


def test_training_refuses_a_locked_run_dir(tiny, tmp_path):
    held = PathLock(tmp_path / "r")
    assert held.acquire() is None
    try:
        raises_one_line(rundir.RunDirError, rf"run_dir .*r is in use by another training \(pid {os.getpid()} on .*wait for "
                rf"it to finish", train.main, tiny.compose("train", run_dir=tmp_path / "r"))
        assert not (tmp_path / "r").exists()
        raises_one_line(DatasetError, rf"is being written by another collect \(pid {os.getpid()} ", collect_small, tmp_path / "r")
    finally:
        held.release()


@pytest.mark.slow
def test_second_training_on_a_run_dir_fails_and_ctrl_c_says_how_to_resume(tiny, tmp_path):
    """Two `train.py` on one run_dir: the second fails in one line naming the first's pid, the first is
    untouched. Then Ctrl-C (SIGINT) on the first: one line naming its last checkpoint and resume=true."""
    run = tmp_path / "race"
    # The first run's output goes to a file, not a pipe nobody reads while it trains: under a loaded CI
    # machine its logging could fill a pipe and stall it (a 120 s timeout after Ctrl-C was seen once).
    out, log = (tmp_path / "first.out").open("w"), (tmp_path / "first.err").open("w+")
    first = tiny.start("train.py", *tiny.args("train", "max_steps=100000", "checkpoint_every=3", "keep_last=1",
                                             "lr=0.001", "log_every=1000", run_dir=run), stdout=out, stderr=log)
    try:
        deadline = time.time() + 240
        while not rundir.checkpoints(run):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.2)
        r = tiny.cli("train.py", *tiny.args("train", "lr=0.002", run_dir=run))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"is in use by another training (pid {first.pid} on" in lines[0], lines[0]
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    out.close()
    log.seek(0)
    err = log.read()
    log.close()
    lines = err.strip().splitlines()
    assert first.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    last = rundir.checkpoints(run)[-1][1]
    assert lines[0] == (f"error: interrupted; the last checkpoint is {last} (step {int(last.name[5:])}): "
                        f"continue with the same command plus resume=true")
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001  # the second run wrote nothing
    assert not (tmp_path / ".race.lock").exists()


def test_resume_on_recollected_data_is_refused_unless_allowed(tiny, tmp_path, one_thread):
    data, run = tmp_path / "kc", tmp_path / "run"
    collect_small(data)
    train.main(tiny.compose("train", "max_steps=2", data_path=data, run_dir=run))
    assert json.loads((run / "config.json").read_text())[rundir.FINGERPRINT_KEY]
    collect_small(data, "overwrite=true", "seed=7", "source.n_stream=3")  # other data under the same path
    before = (run / "config.json").read_text()
    msg = raises_one_line(rundir.RunDirError, r"was trained on other data: it records data fingerprint \w+ but data_path=",
                  train.main, tiny.compose("train", "max_steps=3", "resume=true", data_path=data, run_dir=run))
    assert "allow_data_change=true" in msg and "overwrite" not in msg
    assert (run / "config.json").read_text() == before
    s = train.main(tiny.compose("train", "max_steps=3", "resume=true", "allow_data_change=true", data_path=data,
                                run_dir=run))
    assert s["resumed_from_step"] == 2 and s["global_step"] == 3


def test_run_dir_and_data_path_spelled_or_moved_differently_are_the_same_run(tiny, finished, monkeypatch,
                                                                              one_thread):
    monkeypatch.chdir(finished)
    moved = finished / "moved"
    shutil.copytree(finished / "runs" / "done", moved)
    os.symlink(finished / "data", finished / "data-link")
    for run_dir, data in (("./runs/done", "data"), (str(finished / "runs" / "done"), "./data"),
                          (str(moved), "data-link")):
        plan = rundir.plan_run_dir(Path(run_dir).resolve(), loop.to_plain(tiny.compose(
            "train", "max_steps=4", data_path=data, run_dir=run_dir)), loop.LoopSettings(4, 8, 1e-3, resume=True))
        assert plan.start_step == 2, run_dir
    s = train.main(tiny.compose("train", "max_steps=3", "resume=true", data_path="data-link", run_dir=moved))
    assert s["resumed_from_step"] == 2
    # A real difference still names the key; a path-only one is never a "different run".
    saved = json.loads((moved / "config.json").read_text())
    assert rundir.differing_keys(saved, {**saved, "run_dir": "/x", "data_path": "/y", "run_name": "z"}) == []
    assert rundir.differing_keys(saved, {**saved, "lr": 0.5}) == [f"lr ({saved['lr']!r} -> 0.5)"]
    # A key added after a run was saved: absent equals the default that keeps the old behaviour, and only that
    old = {**saved, "model": {k: v for k, v in saved["model"].items() if k != "keep_recent"},
           "sampler": {k: v for k, v in saved["sampler"].items() if k != "memory"}}
    assert saved["model"]["keep_recent"] == 0 and saved["sampler"]["memory"] == "exact"
    assert rundir.differing_keys(old, saved) == [] and rundir.differing_keys(saved, old) == []
    kept = {**saved, "model": {**saved["model"], "keep_recent": 2}}
    assert rundir.differing_keys(old, kept) == ["model.keep_recent (0 -> 2)"]  # absent reads as its default


def test_run_dir_leftovers_are_removed_and_reported(tiny, finished, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    (run / ".encoder-pretrained-final.pt.k2j3.tmp").write_bytes(b"torn")
    (run / "checkpoints" / ".tmp-step-00000004").mkdir()
    half = run / "checkpoints" / "step-00000001"  # a prune cut short: only loop_state.json left
    half.mkdir()
    (half / "loop_state.json").write_text('{"step": 1}')
    assert [s for s, _ in rundir.checkpoints(run)] == [2]  # the half-deleted one does not count
    train.main(tiny.compose("train", "max_steps=3", "resume=true", data_path=finished / "data", run_dir=run))
    out = capsys.readouterr().out
    assert "note: removed 3 leftover(s) of an interrupted run" in out and ".encoder-pretrained-final" in out
    assert not list(run.rglob(".*")) and not half.exists()


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """An interrupted prune may leave a .old-step-N folder (cleaned next start), never a half step-N."""
    acc = loop.make_accelerator(loop.LoopSettings(10, 1, 1e-3, cpu=True))
    model = acc.prepare(torch.nn.Linear(2, 2))
    acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))  # save_state writes optimizer.bin
    run = tmp_path / "run"
    for step in (1, 2):
        rundir.save_checkpoint(acc, run, step, keep_last=2)
    deleted = []
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda p, **kw: deleted.append(Path(p).name))
    rundir.save_checkpoint(acc, run, 3, keep_last=2)
    assert deleted[-1] == ".old-step-00000001"  # the pruned step-1 went through a rename
    assert [s for s, _ in rundir.checkpoints(run)] == [2, 3] and rundir.leftovers(run)[0].name == ".old-step-00000001"


def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoint(tiny, tmp_path, monkeypatch, one_thread):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    raises_one_line(rundir.RunDirError, r"cannot write checkpoint .*step-00000004 \(no space left on device\); the earlier "
            r"checkpoints are intact.*resume=true", train.main,
            tiny.compose("train", "max_steps=6", "checkpoint_every=2", run_dir=tmp_path / "r"))
    assert [s for s, _ in rundir.checkpoints(tmp_path / "r")] == [2]
    assert not rundir.leftovers(tmp_path / "r")


def test_read_only_run_dir_is_one_line(tiny, finished, tmp_path, monkeypatch, one_thread):
    """As root a chmod does not stop writes, so the read-only file system is simulated where we write."""
    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    monkeypatch.setattr(rundir, "atomic_write_text", oserror(errno.EROFS))
    raises_one_line_in_cli(rundir.RunDirError, r"\(read-only file system\); nothing complete was lost", train.main,
                tiny.compose("train", "max_steps=3", "resume=true", data_path=finished / "data", run_dir=run))
    monkeypatch.setattr(rundir, "_remove", oserror(errno.EACCES))
    raises_one_line_in_cli(rundir.RunDirError, r"\(permission denied\)", train.main,
                tiny.compose("train", "max_steps=3", "overwrite=true", data_path=finished / "data", run_dir=run))
    import tempfile

    monkeypatch.setattr(tempfile, "TemporaryFile", oserror(errno.EROFS))
    raises_one_line(evaluate.EvalError, r"cannot write into run_dir .* \(read-only file system\): evaluate writes eval.json",
            evaluate.main, compose("evaluate", [f"run_dir={run}"]))


def test_run_state_reuses_on_content_only(finished, tmp_path):
    """rundir.run_state, shared by experiments/sweep.py and two_stage.py: a finished run is reused only with
    the same config identity, steps, data fingerprint and (stage 2) an encoder no newer than the run."""
    from histories import dataset_fingerprint

    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    want = json.loads((run / "config.json").read_text())
    fp = dataset_fingerprint(finished / "data")
    assert fp == want[rundir.FINGERPRINT_KEY]
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp) == "reuse"
    assert rundir.run_state(run, want, 2, "stage-2", True, "FIX", fp) == "overwrite"
    raises_one_line(rundir.RunDirError, r"holds a stage-2 run with another config \(lr \(.* -> 0.5\)\): FIX",
            rundir.run_state, run, {**want, "lr": 0.5}, 2, "stage-2", False, "FIX", fp)
    raises_one_line(rundir.RunDirError, r"trained on other data \(data fingerprint [0-9a-f]+ -> ffff: the dataset was "
            r"re-collected or data_path points elsewhere\): FIX", rundir.run_state, run, want, 2, "stage-2", False,
            "FIX", "ffff")
    raises_one_line(rundir.RunDirError, r"finished a stage-2 run at step 2, not the 3 steps asked: FIX",
            rundir.run_state, run, want, 3, "stage-2", False, "FIX", fp)
    enc = tmp_path / "encoder-pretrained-final.pt"
    enc.write_bytes(b"x")
    os.utime(enc, (time.time() + 5, time.time() + 5))  # stage 1 redone after this run started
    raises_one_line(rundir.RunDirError, r"from an older encoder-pretrained-final.pt \(stage 1 was redone after it started\)",
            rundir.run_state, run, want, 2, "stage-2", False, "FIX", fp, enc)
    os.utime(enc, (time.time() - 3600, time.time() - 3600))
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp, enc) == "reuse"
    (run / "done.json").unlink()
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp) == "resume"  # its step-2 checkpoint


def test_check_dataset_refuses_asked_settings_and_notes_a_dataset_given_by_hand(tmp_path):
    """rundir.check_dataset, the one dataset check of two_stage.py and experiments/sweep.py: a setting
    the command line asks for that the dataset lacks is refused; so is any difference at the config's own
    data_path; a dataset given by hand (data_path=...) that differs from the defaults only is a note."""
    meta = {"env": {"name": "darkroom", "horizon": 20}, "source": {"n_stream": 4}, "seed": 0, "data_seed": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    want = {**meta, "source": {"n_stream": 20}}
    msg = raises_one_line(DatasetError, r"the dataset at .* was collected with other settings than asked \(source.n_stream: "
                  r"4 -> 20\): pass collect:overwrite=true", rundir.check_dataset, tmp_path, want, {"source.n_stream"},
                  True)
    assert msg == raises_one_line(DatasetError, "other settings", rundir.check_dataset, tmp_path, want, set(), False)
    assert rundir.check_dataset(tmp_path, want, {"data_path"}, True).startswith(
        f"the dataset at {tmp_path} differs from collect's config (source.n_stream: 4 -> 20); using it as it is")
    assert rundir.check_dataset(tmp_path, meta, {"source.n_stream"}, False) is None
    # a group on the command line (env=...) asks for all its keys; a key the dataset does not record is not compared
    env = {"name": "darkroom", "horizon": 25, "key_added_later": 1}
    raises_one_line(DatasetError, r"\(env.horizon: 20 -> 25\)", rundir.check_dataset, tmp_path, {**meta, "env": env}, {"env"},
            True)
    raises_one_line(DatasetError, r"\(seed: 0 -> 1\)", rundir.check_dataset, tmp_path, {**meta, "seed": 1}, {"seed"}, True)


def test_checkpoint_save_on_a_full_disk_is_one_line_whatever_the_library_raises(tmp_path):
    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True)
            raise self.error

    # what torch.save and safetensors raise on a full disk (measured on a full tmpfs), not OSError
    from safetensors import SafetensorError

    for err, why in ((RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                      "write failed"),
                     (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                      "no space left on device")):
        acc = Acc()
        acc.error = err
        raises_one_line(rundir.RunDirError, rf"cannot write checkpoint .*step-00000004 \({why}\); the earlier checkpoints "
                r"are intact", rundir.save_checkpoint, acc, tmp_path, 4, 2)
        assert not rundir.leftovers(tmp_path)

    acc.error = RuntimeError("CUDA error: an illegal memory access")  # a bug, not a disk: keeps its traceback
    with pytest.raises(RuntimeError, match="illegal memory"):
        rundir.save_checkpoint(acc, tmp_path, 6, 2)
