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


def test_a_finished_runs_record_is_kept_and_reported_once_its_run_dir_is_gone(killed):
    """records/<run> keeps what the report reads of a finished run (runs/ is not committed): a sweep filled
    over several sessions reports every run; an unfinished run is not kept; a kept file the run dir no longer
    has goes too."""
    first = report.write(killed)
    kept = killed / "records" / "b4-scratch-seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "done.json", "eval.json"]
    (killed / "runs" / "b4-ad-seed0").mkdir()  # started, not finished: nothing to keep
    (killed / "runs" / "b4-ad-seed0" / "config.json").write_text("{}")
    _record(killed, "b4-ad-seed0", "ad", 0, 4, status="running")
    assert report.write(killed)["rows"] == first["rows"] and not (killed / "records" / "b4-ad-seed0").exists()
    shutil.rmtree(killed / "runs" / "b4-scratch-seed0")
    rep = report.write(killed)
    row = next(r for r in rep["rows"] if r["arm"] == "scratch")
    assert row["seeds"] == [0, 1] and row["per_seed"]["0"]["run_dir"] == str(kept) and not rep["carried"]
    assert row == next(r for r in first["rows"] if r["arm"] == "scratch") | {"per_seed": row["per_seed"]}
    (killed / "runs" / "b4-scratch-seed1" / "eval.json").unlink()  # a re-evaluation under way
    report.write(killed)
    assert not (killed / "records" / "b4-scratch-seed1" / "eval.json").exists()


def _memory_out(out: Path) -> None:
    """A memory sweep (AD w vs AD 3w, seeds 0 1 2), every run finished."""
    (out / "sweep.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"sweep": "memory", "experiment": "quick", "command": "x",
                                                "evals": ["eval"], "identity": {"hash": "abc"}}))
    for arm, ret in (("ad", 3.0), ("ad_3w", 5.0)):
        for s in (0, 1, 2):
            name = f"darkroom-w20-{arm}-seed{s}"
            _run(out, name, ret=ret + s / 4, loss=0.5 - s / 100)
            _record(out, name, arm, s, None, sweep="memory", env="darkroom", window=20)


def test_a_memory_run_with_neither_run_dir_nor_record_is_carried_from_the_summary(tmp_path):
    """A sweep filled before records/ existed, on a machine since returned: its runs are reported from the
    previous summary.json's per-seed numbers (named as carried), never dropped, and a new seed joins them."""
    out = tmp_path / "O"
    _memory_out(out)
    first = report.write(out)
    for s in (0, 1):
        for arm in ("ad", "ad_3w"):
            shutil.rmtree(out / "runs" / f"darkroom-w20-{arm}-seed{s}")
            shutil.rmtree(out / "records" / f"darkroom-w20-{arm}-seed{s}")
    rep = report.write(out)
    assert rep["complete"] and rep["carried"] == sorted(f"darkroom-w20-{a}-seed{s}" for a in ("ad", "ad_3w")
                                                        for s in (0, 1))
    for new, old in zip(rep["rows"], first["rows"]):
        assert new["stats"] == old["stats"] and new["paired"] == old["paired"], new["arm"]
        assert new["paired_3w"] == old["paired_3w"] and new["seeds"] == [0, 1, 2]
    assert "Carried:** 4 runs reported from this file's previous per-seed numbers" in (out / "table.md").read_text()
    assert report.write(out)["rows"] == rep["rows"]  # carried again from the report that carried them
    # a job recorded unfinished is not carried, whatever an older summary said of it
    _record(out, "darkroom-w20-ad-seed0", "ad", 0, None, sweep="memory", env="darkroom", window=20,
            status="running")
    again = report.write(out)
    assert not again["complete"] and again["missing"] == ["darkroom-w20-ad-seed0"]


def test_a_budget_report_with_runs_gone_refuses_and_keeps_its_record(killed):
    """The budget report also reads stage-1 runs its per-seed numbers do not hold: with a finished run's dir
    and record gone it says so in one line and leaves its summary.json as it was."""
    report.write(killed)
    before = (killed / "summary.json").read_bytes()
    shutil.rmtree(killed / "runs" / "b4-scratch-seed0")
    shutil.rmtree(killed / "records" / "b4-scratch-seed0")
    with pytest.raises(report.ReportError, match=r"1 finished runs have neither a run dir nor a kept record "
                                                 r"\(b4-scratch-seed0\); .*summary.json holds their numbers"):
        report.write(killed)
    assert (killed / "summary.json").read_bytes() == before


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


# ---- what stage 1 keeps: the stage-1 runs' final diagnostics across seeds --------------------------------
MAJORITY, SHUFFLED, COPY_PREVIOUS = (0.5, 0.6, 0.4), (0.55, 0.5, 0.45), 0.95


def _stage1_run(out: Path, seed: int, done: bool = True) -> None:
    """Stage 1 of one seed as pretrain_encoder.py leaves it (done.json's diagnostic keys, model/losses.py),
    with its job record: the encoder scores 0.9 - 0.1 x seed on the test goals (0.05 less on the validation
    goals), every field and depth."""
    rd = out / "runs" / f"pretrain-seed{seed}"
    rd.mkdir(parents=True)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "jobs" / f"pretrain-seed{seed}.json").write_text(json.dumps(
        {"kind": "pretrain", "seed": seed, "run_dir": str(rd), "status": "done"}))
    if not done:
        return

    def diag(enc):
        return {f"{k}_{f}_depth{d}": v for d in (1, 2, 3) for f in ("state", "action", "reward", "next_state", "exact")
                for k, v in (("acc", enc), ("baseline_acc", MAJORITY[seed]), ("ablation_acc", SHUFFLED[seed]))
                } | {f"copyprev_acc_state_depth{d}": COPY_PREVIOUS for d in (1, 2, 3)}

    enc = 0.9 - 0.1 * seed
    (rd / "done.json").write_text(json.dumps({"global_step": 6, "diagnostics_split": "val", **diag(enc - 0.05),
                                              "r2": 0.1, "test": diag(enc)}))


def test_stage1_diagnostics_per_seed_mean_and_paired_interval(killed):
    for s in (0, 1, 2):
        _stage1_run(killed, s)
    _stage1_run(killed, 3, done=False)  # a seed whose stage 1 has not finished
    rep = report.write(killed)
    assert json.loads((killed / "summary.json").read_text())["stage1_diagnostics"] == json.loads(
        json.dumps(rep["stage1_diagnostics"]))
    block = rep["stage1_diagnostics"]
    assert block["runs"] == {str(s): str(killed / "runs" / f"pretrain-seed{s}") for s in range(4)}
    assert block["missing"] == ["3"] and set(block["splits"]) == {"test", "val"}
    rows = {(r["depth"], r["field"]): r for r in block["splits"]["test"]}
    assert list(rows) == [(d, f) for d in (1, 2, 3) for f in ("state", "action", "reward", "next_state", "exact")]
    action = rows[(2, "action")]
    assert action["per_seed"]["1"] == {"encoder": pytest.approx(0.8), "majority": 0.6, "shuffled": 0.5,
                                       "best_baseline": "majority"}
    assert action["encoder"] == {"mean": pytest.approx(0.8), "sd": pytest.approx(0.1), "n": 3}
    assert action["majority"]["mean"] == pytest.approx(0.5) and action["copy_previous"]["n"] == 0
    # encoder − the seed's best baseline: 0.9 − 0.55, 0.8 − 0.6, 0.7 − 0.45; t(0.975, df 2) = 4.302653
    diffs = [0.35, 0.2, 0.25]
    mean = sum(diffs) / 3
    half = 4.302653 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    p = action["encoder_minus_best"]
    assert (p["diff"], p["lo"], p["hi"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-6)
    assert p["n"] == 3 and p["pairs"] == ["0", "1", "2"] and p["verdict"] == "better"
    # the state's bar is the copied previous next state: 0.9, 0.8, 0.7 − 0.95 → an interval around −0.15
    state = rows[(1, "state")]
    assert {s: v["best_baseline"] for s, v in state["per_seed"].items()} == {"0": "copy_previous", "1": "copy_previous",
                                                                             "2": "copy_previous"}
    assert state["copy_previous"] == {"mean": pytest.approx(0.95), "sd": pytest.approx(0.0), "n": 3}
    assert state["encoder_minus_best"]["diff"] == pytest.approx(-0.15)
    assert state["encoder_minus_best"]["verdict"] == "no difference detected"
    assert block["splits"]["val"][0]["encoder"]["mean"] == pytest.approx(0.75)  # done.json's top level
    md = (killed / "table.md").read_text()
    assert "**What stage 1 keeps** (test goals, exact accuracy per field; no diagnostics (done.json) in the " \
           "stage-1 run of seed 3):" in md
    assert (f"| 2 | action | 0.800 ± 0.100 (n=3) | 0.500 ± 0.100 (n=3) | 0.500 ± 0.050 (n=3) | – | "
            f"+{mean:.3f} [+{mean - half:.3f}, +{mean + half:.3f}], better (n=3) |") in md
    assert "| 1 | state | 0.800 ± 0.100 (n=3) | 0.500 ± 0.100 (n=3) | 0.500 ± 0.050 (n=3) | 0.950 ± 0.000 (n=3) |" in md


def test_a_sweep_without_stage1_runs_has_no_stage1_block(killed):
    """No stage-1 job: no block, and the report is what it was; with stage-1 runs the section is added after it."""
    import re

    rep = report.write(killed)
    md = (killed / "table.md").read_text()
    assert "stage1_diagnostics" not in rep and "What stage 1 keeps" not in md
    _stage1_run(killed, 1, done=False)  # a stage-1 job that has not finished: the section says so
    blk = report.write(killed)["stage1_diagnostics"]
    assert (blk["runs"], blk["missing"], blk["splits"]) == ({"1": str(killed / "runs" / "pretrain-seed1")}, ["1"], {})
    assert "\n**What stage 1 keeps:** no diagnostics (done.json) in the stage-1 run of seed 1.\n" in (
        killed / "table.md").read_text()
    _stage1_run(killed, 0)
    with_s1 = report.write(killed)
    new_md = (killed / "table.md").read_text()
    assert {k: v for k, v in with_s1.items() if k not in ("stage1_diagnostics", "date")} == {
        k: v for k, v in rep.items() if k != "date"}
    undated = [re.sub(r"\*\*Date:\*\* .*", "", m) for m in (md, new_md)]
    assert undated[1].startswith(undated[0]) and "\n**What stage 1 keeps**" in undated[1][len(undated[0]):]


def test_a_compare_sweep_with_pretrained_arms_reports_stage1(tmp_path):
    out = tmp_path / "O"
    _run(out, "scratch-seed0")
    _record(out, "scratch-seed0", "scratch", 0, None, sweep="compare")
    _stage1_run(out, 0)
    (out / "sweep.json").write_text(json.dumps({"sweep": "compare", "evals": ["eval"]}))
    rep = report.write(out)
    assert json.loads((out / "table.json").read_text())["stage1_diagnostics"]["splits"]["test"][0]["per_seed"] == {
        "0": {"encoder": 0.9, "majority": 0.5, "shuffled": 0.55, "copy_previous": 0.95, "best_baseline": "copy_previous"}}
    assert rep["stage1_diagnostics"]["splits"]["test"][0]["encoder_minus_best"]["lo"] is None  # one seed: no interval
    assert "| 1 | state | 0.900 (n=1) |" in (out / "table.md").read_text()


@pytest.mark.parametrize("done, wall", [
    ({"compute": {"train_wall_s": 50.0, "run_train_wall_s": 80.0}, "resumed_from_step": 300}, 80.0),
    ({"compute": {"train_wall_s": 50.0, "run_train_wall_s": 50.0}, "resumed_from_step": 0}, 50.0),
    ({"compute": {"train_wall_s": 50.0}, "resumed_from_step": 0}, 50.0),  # a record from before the sum
    ({"compute": {"train_wall_s": 50.0}, "resumed_from_step": 300}, None),  # its last process's share only
    ({"compute": {"train_wall_s": 50.0, "run_train_wall_s": None}, "resumed_from_step": 300}, None),
])
def test_training_wall_is_the_whole_runs_or_none(done, wall):
    """What a run paid in training time covers all its steps: a resumed run's last process alone would undercount
    it, so without the run-wide sum a resumed run has no training time in the tables."""
    from experiments.runs import run_train_wall_s

    assert run_train_wall_s(done) == wall
