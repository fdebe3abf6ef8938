"""experiments/report.py on run dirs written by hand (no training): what the report covers and how it marks
what is not there. The report expands the planned jobs from sweep.json, reads run dirs relative to the out
dir, trusts no job record for a run's state, and never merges runs of another budget or sweep identity."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atomic_io import PathLock
from experiments import report


def _run(out: Path, name: str, loss: float = 0.5, ret: float = 3.0, steps: int = 4) -> Path:
    """A finished stage-2 run dir as train.py + evaluate.py leave it (the fields the reports read)."""
    rd = out / "runs" / name
    rd.mkdir(parents=True)
    (rd / "config.json").write_text(json.dumps({"max_steps": steps, "batch_size": 8, "lr": 1e-3,
                                                "data_path": str(out / "data"), "model": {"name": "ad"}}))
    (rd / "done.json").write_text(json.dumps({"global_step": steps, "tf_loss_test": loss}))
    summary = {"last_k_mean": ret, "episodes_to_0.8": 2.0, "optimal_mean": 10.0, "n_episodes": 3, "last_k": 2,
               "curve": [1.0, 2.0, ret], "first_episode": 1.0, "last_k_normalized": ret / 10, "n_goals": 2}
    (rd / "eval.json").write_text(json.dumps({"config": {"n_episodes": 3, "seeds_per_goal": 1}, "device": "cpu",
                                              "splits": {"test": {"summary": summary}}}))
    return rd


def _record(out: Path, name: str, arm: str, seed: int, budget: int | None, status: str = "done", **kw) -> None:
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    rec = {"kind": "train", "sweep": "pretrain-budget", "arm": arm, "label": arm, "encoder": None, "seed": seed,
           "budget": budget, "window": None, "env": None, "experiment": "quick", "identity": "abc",
           "run_dir": str(out / "runs" / name), "status": status, **kw}
    (out / "jobs" / f"{name}.json").write_text(json.dumps(rec))


def _sweep(out: Path, planned: list[tuple[str, int, int]]) -> None:
    jobs = [{"arm": a, "seed": s, "budget": b, "window": None, "env": None, "run": f"b{b}-{a}-seed{s}"}
            for a, s, b in planned]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"sweep": "pretrain-budget", "experiment": "quick", "command": "x",
                                                "evals": ["eval"], "planned": jobs, "identity": {"hash": "abc"}}))


@pytest.fixture
def killed(tmp_path):
    """A budget sweep of scratch / ad x seeds 0 1 2 at budget 4 killed after 2 jobs: the records of those 2."""
    out = tmp_path / "O"
    _sweep(out, [(a, s, 4) for a in ("scratch", "ad") for s in (0, 1, 2)])
    for s in (0, 1):
        _run(out, f"b4-scratch-seed{s}")
        _record(out, f"b4-scratch-seed{s}", "scratch", s, 4)
    return out


def test_killed_sweep_is_incomplete_with_the_unrun_jobs_named(killed):
    rep = report.write(killed)
    assert not rep["complete"] and rep["arms"] == ["ad", "scratch"]
    assert rep["missing"] == ["b4-ad-seed0", "b4-ad-seed1", "b4-ad-seed2", "b4-scratch-seed2"]
    assert set(rep["run_status"].values()) == {"missing"}
    md = (killed / "table.md").read_text()
    assert "Status:** INCOMPLETE: b4-ad-seed0 (missing)" in md and "b4-scratch-seed2 (missing)" in md


def test_deleted_or_truncated_record_keeps_its_run(killed):
    (killed / "jobs" / "b4-scratch-seed0.json").unlink()
    (killed / "jobs" / "b4-scratch-seed1.json").write_text('{"kind": "tra')
    rep = report.write(killed)
    row = next(r for r in rep["rows"] if r["arm"] == "scratch")
    assert row["seeds"] == [0, 1] and "b4-scratch-seed0" not in rep["missing"]


def test_failed_running_interrupted_and_non_finite_runs_are_marked(killed):
    done = killed / "runs" / "b4-scratch-seed1" / "done.json"
    done.write_text(json.dumps({"global_step": 4, "tf_loss_test": math.nan}))
    _run(killed, "b4-ad-seed0")
    _record(killed, "b4-ad-seed0", "ad", 0, 4, status="failed", error="x")
    _record(killed, "b4-ad-seed1", "ad", 1, 4, status="running")  # SIGKILLed: nobody holds its lock
    _record(killed, "b4-ad-seed2", "ad", 2, 4, status="running")
    lock = PathLock(killed / "jobs" / "b4-ad-seed2")  # a job of a sweep still running
    assert lock.acquire() is None
    try:
        rep = report.write(killed)
    finally:
        lock.release()
    assert rep["run_status"] == {"b4-ad-seed0": "failed", "b4-ad-seed1": "interrupted", "b4-ad-seed2": "running",
                                 "b4-scratch-seed1": "non-finite", "b4-scratch-seed2": "missing"}
    assert "b4-scratch-seed1 (non-finite)" in (killed / "table.md").read_text()


def test_a_moved_out_dir_reports_its_own_runs(killed, tmp_path):
    good = report.write(killed)
    moved = tmp_path / "O2"
    shutil.move(killed, moved)
    rep = report.write(moved)
    assert rep["rows"] == [{**r, "per_seed": {s: {**p, "run_dir": p["run_dir"].replace(str(killed), str(moved))}
                                              for s, p in r["per_seed"].items()}} for r in good["rows"]]
    # a new sweep writing other numbers into the old path does not leak into O2's report
    _run(killed, "b4-scratch-seed0", ret=9.0)
    assert report.write(moved)["rows"] == rep["rows"]


def test_runs_of_another_budget_or_identity_never_share_a_cell(tmp_path):
    """compare keeps arms apart only: a budget-20 and a budget-30 sweep into one out dir are two columns, each
    with its own budget line, not one column labelled with the first run's steps."""
    out = tmp_path / "O"
    for b in (20, 30):
        _run(out, f"b{b}-scratch-seed0", steps=b, ret=b / 10)
        _record(out, f"b{b}-scratch-seed0", "scratch", 0, b, sweep="compare")
    (out / "sweep.json").write_text(json.dumps({"sweep": "compare", "evals": ["eval"]}))  # made by hand
    rep = report.write(out)
    assert rep["arms"] == ["b20-scratch", "b30-scratch"]
    assert rep["results"]["b30-scratch"]["per_seed"]["0"]["metrics"]["return_last5"] == 3.0
    assert "`b20-scratch`: 20 optimizer steps" in rep["budget"] and "`b30-scratch`: 30 optimizer" in rep["budget"]
    # a record of another sweep identity is a column of its own too
    _run(out, "scratch-seed1")
    _record(out, "scratch-seed1", "scratch", 1, 20, sweep="compare", identity="other")
    arms = report.write(out)["arms"]
    assert "b20-scratch-idother" in arms and "b20-scratch-idabc" in arms


def test_disk_full_while_writing_the_report_is_one_line(killed, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(killed / "summary.json"))

    monkeypatch.setattr(report, "atomic_write_text", full)
    with pytest.raises(report.ReportError, match=r"cannot write the report into .*O \(no space left on device"):
        report.write(killed)


def test_arms_are_in_their_files_order_and_an_arm_without_a_file_still_reports(tmp_path):
    """Table order is the arm files' `order` (ad before scratch), whatever the jobs' order; an arm with no
    file in experiments/conf/arm (a renamed or local one) is reported after them, in the plot's fallback colour."""
    out = tmp_path / "O"
    arms = ("my_arm", "scratch", "ad")
    _sweep(out, [(a, s, 4) for a in arms for s in (0, 1)])
    for a in arms:
        for s in (0, 1):
            _run(out, f"b4-{a}-seed{s}", ret=3.0 + s)
            _record(out, f"b4-{a}-seed{s}", a, s, 4)
    rep = report.write(out)
    assert rep["complete"] and rep["arms"] == ["ad", "scratch", "my_arm"]
    assert [r["arm"] for r in rep["rows"]] == ["ad", "scratch", "my_arm"]
    assert rep["rows"][2]["return_last5"] == 3.5 and rep["rows"][2]["return_last5_n"] == 2
    md = (out / "table.md").read_text()
    assert md.index("`ad`") < md.index("`scratch`") < md.index("`my_arm`")
    assert (out / "budget.png").stat().st_size > 0


def test_every_table_is_one_unpadded_pipe_table():
    """md_table renders every report table: a committed table.md changes only where a number does."""
    assert report.md_table([{"arm": "`ad`", "n": "1"}, {"arm": "`scratch`", "n": "–"}]) == (
        "| arm | n |\n|---|---|\n| `ad` | 1 |\n| `scratch` | – |")
