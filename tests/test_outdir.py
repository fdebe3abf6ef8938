"""experiments/outdir.py: a sweep's out dir holds one configuration and one dataset per env, its records are
written atomically, and a disk that cannot take them is one line (experiments/sweep.py writes through it)."""

from __future__ import annotations

import json
import time

import pytest

from experiments import outdir as od
from experiments import sweep as sw


@pytest.mark.slow
def test_one_identity_per_out_dir(tmp_path):
    """A rerun with other stage settings (lr, experiment, stage-1 budget, another sweep) into the same out is
    refused in one line naming the keys and an out= to use, and writes nothing; seed, arm, budget, window and
    env are not part of it (they name the runs)."""
    out = tmp_path / "O"

    def ident(user=(), experiment="quick", env=None, name="compare", evals=None):
        routed = sw.route(list(user), [], experiment, env)
        return sw.out_identity(name, experiment, evals or {"eval": {}}, routed, env)

    base = ident()
    h = od.check_identity(out, base, claim=True)
    before = (out / "sweep.json").read_text()
    assert json.loads(before)["identity"] == {"hash": h, "config": base}
    assert od.check_identity(out, ident(env="darkroom_hard"), claim=True) == h  # env: a run name, not the out's
    cases = ((ident(["train:lr=1e-4"]), r"train.lr \(0.001 -> 0.0001\)"),
             (ident(["pretrain:pretrain_steps=40"]), r"pretrain.pretrain_steps \(\d+ -> 40\)"),
             (ident(experiment="full"), r"experiment \('quick' -> 'full'\)"),
             (ident(name="memory", evals={"eval": {"n_episodes": 100}}), r"sweep \('compare' -> 'memory'\)"))
    for new, keys in cases:
        with pytest.raises(od.SweepError, match=rf"{out} holds the runs of another sweep configuration \(.*{keys}.*\): "
                           rf"pass out={out}-[0-9a-f]{{8}} to run these settings in a folder of their own"):
            od.check_identity(out, new, claim=True)
    assert (out / "sweep.json").read_text() == before
    # an identity recorded before a key existed (rundir.LATER_KEY_DEFAULTS) is the same one when the key
    # comes at its backward-compatible default, and only then
    older = tmp_path / "older"
    recorded = {k: v for k, v in base.items() if not k.endswith(("sampler.memory", "model.keep_recent",
                                                                  "max_heldout_goals"))}
    assert base["evaluate.max_heldout_goals"] is None and "evaluate.max_heldout_goals" not in recorded
    assert recorded != base and base["train.sampler.memory"] == "exact"
    was = od.identity_hash(recorded)
    od.write_text(older / "sweep.json", json.dumps({"identity": {"hash": was, "config": recorded}}))
    # the out dir's own hash comes back (the jobs record it, so a report never splits the configuration in
    # two), and the newer spelling's hash is kept as its alias (for jobs that recorded it)
    assert od.check_identity(older, base, claim=True) == was != h
    assert json.loads((older / "sweep.json").read_text())["identity"]["aliases"] == [h]
    assert od.check_identity(older, base, claim=True) == was
    from experiments.runs import report_jobs

    for name, hsh in (("a", was), ("b", h)):  # a job recorded under the alias joins the out dir's identity
        od.write_text(older / "jobs" / f"{name}.json", json.dumps({
            "kind": "train", "arm": "ad", "seed": 0 if name == "a" else 1, "budget": None, "window": 20,
            "env": "darkroom", "run_dir": str(older / "runs" / name), "status": "done", "identity": hsh}))
    jobs = report_jobs(older, "memory", json.loads((older / "sweep.json").read_text()))
    assert [(j["arm"], j["identity"]) for j in jobs] == [("ad", was), ("ad", was)]
    with pytest.raises(od.SweepError, match=r"train.sampler.memory \('<absent>' -> 'carry'\)"):
        od.check_identity(older, {**base, "train.sampler.memory": "carry"}, claim=True)


def test_one_dataset_per_out_dir(tmp_path):
    """A re-collected dataset (or another data_path=) behind an out dir's runs is refused, not mixed in."""
    out = tmp_path / "O"
    od.check_dataset_identity(out, None, tmp_path / "d", "aaaa")
    od.check_dataset_identity(out, None, tmp_path / "d", "aaaa")
    od.check_dataset_identity(out, "darkroom_hard", tmp_path / "h", "cccc")  # another env: its own dataset
    with pytest.raises(od.SweepError, match=r"trained on dataset .*d \(fingerprint aaaa\) but .*d2 now holds "
                                            r"fingerprint bbbb .*choose another out="):
        od.check_dataset_identity(out, None, tmp_path / "d2", "bbbb")


def test_disk_full_in_a_job_record_is_one_line(tmp_path, monkeypatch):
    import errno


    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(od, "atomic_write_text", full)
    with pytest.raises(od.SweepError, match=r"cannot write .*jobs/x.json \(no space left on device\)"):
        od.record(tmp_path, "x", status="running")


def test_unwritable_out_is_one_line(tmp_path, monkeypatch):
    """A read-only or full disk under out= (simulated: as root a chmod does not stop writes)."""
    import errno
    import tempfile


    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", ro)
    with pytest.raises(od.SweepError, match=r"out=.*O is not writable \(read-only file system\): choose another out="):
        od.check_out(tmp_path / "O")


def test_start_keeps_every_command_once_and_every_planned_job(tmp_path):
    """sweep.json lists every sweep command that filled the out dir (oldest first, each once) and the planned jobs
    of every sweep into it; experiments/report.py reads both."""
    out = tmp_path / "O"
    job = {"arm": "ad", "seed": 0, "budget": None, "window": None, "env": None}
    od.start(out, "python experiments/sweep.py -m a", [{**job, "run": "ad-seed0"}], sweep="compare")
    od.start(out, "python experiments/sweep.py -m b", [{**job, "seed": 1, "run": "ad-seed1"}], sweep="compare")
    od.start(out, "python experiments/sweep.py -m a", [{**job, "run": "ad-seed0"}], sweep="compare")
    info = json.loads((out / "sweep.json").read_text())
    assert info["commands"] == ["python experiments/sweep.py -m a", "python experiments/sweep.py -m b"]
    assert info["command"] == "python experiments/sweep.py -m a" and info["sweep"] == "compare"
    assert [j["run"] for j in info["planned"]] == ["ad-seed0", "ad-seed1"] and info["started_unix"] > 0


def test_failures_are_this_sweeps_failed_and_refused_runs(tmp_path):
    out = tmp_path / "O"
    od.record(out, "old", kind="train", run_dir=str(out / "runs" / "old"), status="failed", error="then")
    time.sleep(0.01)
    since = time.time()  # this sweep's start
    od.record(out, "a", kind="train", run_dir=str(out / "runs" / "a"), status="failed", error="boom")
    od.record(out, "pretrain-seed0", kind="pretrain", status="failed", error="stage 1")  # its runs fail too
    od.failed(out, "b", "holds another run", claimed=False)  # refused: its record stays as it was
    assert not (out / "jobs" / "b.json").exists()
    planned = {"old", "a", "b", "c"}
    assert od.failures(out, since, planned) == ({"a", "b"}, ["boom", "holds another run"])
    # Two sweeps of one seed into one out dir (they share its jobs): "c" was refused here while the other sweep
    # held it, and the other sweep finished it since: it finished. "d", refused by the other sweep, is not ours.
    od.failed(out, "c", "is being run by another sweep", claimed=False)
    od.record(out, "c", kind="train", run_dir=str(out / "runs" / "c"), status="done", error=None)
    od.failed(out, "d", "is being run by another sweep", claimed=False)
    assert od.failures(out, since, planned) == ({"a", "b"}, ["boom", "holds another run"])
    assert od.failures(out, since, planned | {"d"})[0] == {"a", "b", "d"}


def test_each_sweep_knows_its_own_start_when_two_run_into_one_out(tmp_path):
    """sweep.json's start is the last sweep's to start; each sweep's end looks at failures since its own start,
    which start() returns (a sweep that began earlier used to miss its own early refusals or take the other's)."""
    out = tmp_path / "O"
    job = {"arm": "ad", "seed": 0, "budget": None, "window": None, "env": None, "run": "ad-seed0"}
    first = od.start(out, "python experiments/sweep.py -m a", [job], sweep="memory")
    time.sleep(0.01)
    second = od.start(out, "python experiments/sweep.py -m a", [job], sweep="memory")
    assert first < second == json.loads((out / "sweep.json").read_text())["started_unix"]
