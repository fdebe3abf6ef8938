"""experiments/sweep.py (Hydra multirun, one process per run) and experiments/report.py on a tiny problem.

- the compare sweep with the basic launcher: outputs (table.json / table.md / curves.png), stage 1 once
  for the arms that need it, and a second invocation reuses every finished run (nothing rewritten);
- the budget sweep with the joblib launcher (2 parallel jobs): runs killed mid-training (CAD_TEST_KILL_AT)
  fail the sweep with one line and an INCOMPLETE report; the same command again resumes them from their
  checkpoints and reuses the runs that had finished;
- the memory sweep with submitit's local executor (what hydra/launcher=submitit_slurm runs on a cluster);
- the command line: stage overrides, reserved keys, typos, in one line before any job starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "experiments" / "sweep.py"
REPORT = REPO / "experiments" / "report.py"

# Stage overrides, routed like two_stage.py: model.* -> pretrain + train, n_episodes / seeds_per_goal /
# n_train_goals -> evaluate, log_every / checkpoint_every -> pretrain + train.
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.enc_n_layer=1", "model.recon_n_layer=1",
        "model.n_latent=4", "model.seg_len=20", "sampler.min_seg_len=10",
        "batch_size=8", "warmup_steps=2", "log_every=2", "checkpoint_every=1000",
        "model.pretrain_steps=6", "model.pretrain_batch_size=8", "diag_batches=1",
        "n_episodes=3", "seeds_per_goal=1", "n_train_goals=1", "progress=false"]
LONG = ["sweep.evals.eval_long.n_episodes=4", "sweep.evals.eval_long.seeds_per_goal=1"]


def sweep(tmp_path: Path, data_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH: the launchers' worker processes (joblib, submitit) import this checkout's modules
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    for k in ("CAD_TEST_KILL_AT", "HYDRA_FULL_ERROR", "CAD_SWEEP_STARTED_UNIX"):
        if k not in (env or {}):
            full_env.pop(k, None)
    cmd = [sys.executable, str(SWEEP), "-m", f"out={tmp_path / 'out'}", *TINY, f"data_path={data_path}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=900, check=False)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_compare_sweep_basic_launcher_and_reuse(tmp_path, tiny):
    r = sweep(tmp_path, tiny.data_path, "arm=scratch,pretrained_ft", "seed=0", "max_steps=8", *LONG)
    _ok(r)
    out = tmp_path / "out"
    rep = json.loads((out / "table.json").read_text())
    assert rep["arms"] == ["scratch", "pretrained_ft"] and rep["seeds"] == [0]
    assert rep["experiment"] == "quick" and rep["complete"] and not rep["missing"]
    assert rep["dataset"]["path"] == str(tiny.data_path)
    assert "experiments/sweep.py -m" in rep["command"] and "arm=scratch,pretrained_ft" in rep["command"]
    assert "max_steps=8" in rep["command"] and rep["date"]
    assert rep["long_eval"]["n_episodes"] == 4 and rep["eval"]["n_episodes"] == 3
    for arm in ("scratch", "pretrained_ft"):
        res = rep["results"][arm]
        assert set(res["mean"]) == set(rep["metrics"]) == set(res["std"])
        seed0 = res["per_seed"]["0"]
        assert seed0["complete"] and all(isinstance(v, float) for v in seed0["metrics"].values()), seed0
        assert res["mean"] == seed0["metrics"]  # one seed: the mean is that seed's number
        assert len(seed0["curve"]) == 3 and len(seed0["long_curve"]) == 4
        assert seed0["train_loss_steps"] == {"25%": 2, "50%": 4, "100%": 8}  # log_every=2, max_steps=8
        assert set(rep["timings_s"]) >= {f"train:{arm}-seed0", f"eval:{arm}-seed0", f"eval_long:{arm}-seed0"}
    # stage 1 ran once, in its own process, and its encoder fed the pretrained arm only
    pre = out / "runs" / "pretrain-seed0"
    assert (pre / "encoder-pretrained-final.pt").is_file()
    assert (out / "logs" / "pretrain-seed0.log").read_text().count("$ ") == 1
    assert r.stdout.count("[start] pretrain:seed0") == 1
    cfg = json.loads((out / "runs" / "pretrained_ft-seed0" / "config.json").read_text())
    assert cfg["model"]["pretrained_encoder_path"] == str(pre / "encoder-pretrained-final.pt")
    assert json.loads((out / "runs" / "scratch-seed0" / "config.json").read_text())["model"][
        "pretrained_encoder_path"] is None
    log = (out / "logs" / "pretrained_ft-seed0.log").read_text()
    assert "Loading pretrained encoder" in log and "train.py" in log and "evaluate.py" in log
    long = json.loads((out / "runs" / "scratch-seed0" / "eval_long.json").read_text())
    assert set(long["splits"]) == {"test"} and long["splits"]["test"]["summary"]["n_episodes"] == 4
    md = (out / "table.md").read_text()
    for s in ("`scratch`", "`pretrained_ft`", "experiment=quick", "sweep.py", str(tiny.data_path),
              "held-out return, last 3 episodes", "long rollout: return, last 4", "Status:** complete"):
        assert s in md, s
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*.lock"))  # no temp files, locks released

    # Second invocation: everything is reused, nothing is retrained or re-evaluated.
    watched = [p for p in (out / "runs").rglob("*") if p.name in ("done.json", "model.pt", "eval.json",
                                                                  "eval_long.json", "encoder-pretrained-final.pt")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    r2 = sweep(tmp_path, tiny.data_path, "arm=scratch,pretrained_ft", "seed=0", "max_steps=8", *LONG)
    _ok(r2)
    assert "[start]" not in r2.stdout, r2.stdout
    for name in ("train:scratch-seed0", "train:pretrained_ft-seed0", "eval_long:pretrained_ft-seed0"):
        assert f"[reuse] {name}" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "table.json").read_text())["results"] == rep["results"]

    # the report is a reader of the run dirs: the CLI writes the same numbers again
    r3 = subprocess.run([sys.executable, str(REPORT), str(out)], capture_output=True, text=True, check=False)
    assert r3.returncode == 0 and "Does pretraining help?" in r3.stdout, r3.stderr
    assert json.loads((out / "table.json").read_text())["results"] == rep["results"]

    # the same out with another training config is refused up front, in one line, and rewrites nothing: not the
    # records, sweep.json or the report (issue 25: they used to show the new command and lr over the old runs)
    kept = {p: p.read_bytes() for p in [out / "sweep.json", out / "table.json", out / "table.md",
                                        *(out / "jobs").glob("*.json")]}
    r4 = sweep(tmp_path, tiny.data_path, "arm=scratch", "seed=0", "max_steps=8", "lr=0.01", *LONG)
    assert r4.returncode == 2 and len(r4.stderr.strip().splitlines()) == 1, r4.stderr
    assert "another sweep configuration (train.lr (0.001 -> 0.01)): pass out=" in r4.stderr
    assert {p: p.read_bytes() for p in kept} == kept

    # stage 1 redone behind the sweep's back (other weights in the encoder file): the finished pretrained run
    # is not reused as if it had been trained from them (it used to be, checked on config identity alone)
    import torch

    ck = torch.load(pre / "encoder-pretrained-final.pt", weights_only=False)
    for t in ck["encoder_state_dict"].values():
        t.add_(1.0)
    torch.save(ck, pre / "encoder-pretrained-final.pt")
    r5 = sweep(tmp_path, tiny.data_path, "arm=scratch,pretrained_ft", "seed=0", "max_steps=8", *LONG)
    assert r5.returncode == 1 and "[reuse] train:scratch-seed0" in r5.stdout, r5.stdout[-2000:] + r5.stderr
    assert ("pretrained_ft-seed0 was trained from another encoder-pretrained-final.pt than" in r5.stderr
            and "(stage 1 was redone since): pass force=true" in r5.stderr), r5.stderr
    # a record without the encoder's hash (written before the hashes, or lost): the file dates decide
    rec = out / "jobs" / "pretrained_ft-seed0.json"
    rec.write_text(json.dumps({k: v for k, v in json.loads(rec.read_text()).items() if k != "encoder_sha256"}))
    r6 = sweep(tmp_path, tiny.data_path, "arm=pretrained_ft", "seed=0", "max_steps=8", *LONG)
    assert r6.returncode == 1 and "from an older encoder-pretrained-final.pt (stage 1 was redone after it " \
        "started): pass force=true" in r6.stderr, r6.stdout[-2000:] + r6.stderr


@pytest.mark.slow
def test_budget_sweep_joblib_interrupted_runs_resume(tmp_path, tiny):
    args = ["sweep=pretrain_budget", "arm=scratch,pretrained_ft", "budget=3,6", "seed=0", "checkpoint_every=2",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    # Every training process SIGKILLs itself at step 5 (after the checkpoint of step 4), as a pre-empted
    # node would: stage 1 (6 steps) and the 6-step runs die, the 3-step scratch run finishes.
    # a stale sweep start in the environment: the callback replaces it before loky starts its workers
    r = sweep(tmp_path, tiny.data_path, *args, env={"CAD_TEST_KILL_AT": "5", "CAD_SWEEP_STARTED_UNIX": "1.0"})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    started = json.loads((tmp_path / "out" / "sweep.json").read_text())["started_unix"]
    for rec in (tmp_path / "out" / "jobs").glob("b*.json"):  # the workers knew this sweep's start
        assert json.loads(rec.read_text())["sweep_started_unix"] == started, rec.name
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 run(s) did not finish") and "killed by signal 9" in last, last
    out = tmp_path / "out"
    rep = json.loads((out / "summary.json").read_text())
    assert not rep["complete"] and sorted(rep["missing"]) == ["b3-pretrained_ft-seed0", "b6-pretrained_ft-seed0",
                                                              "b6-scratch-seed0"]
    assert "INCOMPLETE" in (out / "table.md").read_text()
    # stage 1 was produced once for both pretrained jobs (the second one waited on its lock)
    assert (out / "logs" / "pretrain-seed0.log").read_text().count("$ ") == 1
    done3 = out / "runs" / "b3-scratch-seed0" / "done.json"
    t3 = done3.stat().st_mtime_ns

    r2 = sweep(tmp_path, tiny.data_path, *args)
    _ok(r2)
    assert "[start] pretrain:seed0 (resume)" in r2.stdout and "[start] train:b6-scratch-seed0 (resume)" in r2.stdout
    assert "[reuse] train:b3-scratch-seed0" in r2.stdout and done3.stat().st_mtime_ns == t3
    for name, what in (("b6-scratch-seed0", "train:b6-scratch-seed0"), ("pretrain-seed0", "pretrain:seed0")):
        log = (out / "logs" / f"{name}.log").read_text()
        assert log.count(f"{what} (fresh)") == 1 and log.count(f"{what} (resume)") == 1, log
        command = log.split(f"{what} (resume)\n", 1)[1].splitlines()[0]
        assert command.startswith("$ ") and command.endswith(" resume=true"), command
    rep = json.loads((out / "summary.json").read_text())
    assert rep["complete"] and rep["budgets"] == [3, 6] and rep["arms"] == ["scratch", "pretrained_ft"]
    rows = {(row["arm"], row["stage2_steps"]): row for row in rep["rows"]}
    assert set(rows) == {(a, n) for a in ("scratch", "pretrained_ft") for n in (3, 6)}
    for (arm, n), row in rows.items():
        assert {"arm", "stage2_steps", "stage1_steps", "seeds", "heldout_loss_same_position", "return_last5",
                "episodes_to_0.8"} <= set(row)
        assert row["seeds"] == [0] and row["stage1_steps"] == (0 if arm == "scratch" else 6)
        assert math.isfinite(row["heldout_loss_same_position"]) and isinstance(row["return_last5"], float)
        run = Path(row["per_seed"]["0"]["run_dir"])
        assert run.name == f"b{n}-{arm}-seed0"
        done = json.loads((run / "done.json").read_text())
        assert done["global_step"] == n and done["tf_loss_test"] == row["heldout_loss_same_position"]
        assert json.loads((run / "config.json").read_text())["model"]["pretrained_encoder_path"] == (
            None if arm == "scratch" else str(out / "runs" / "pretrain-seed0" / "encoder-pretrained-final.pt"))
    ratio = rep["stage1_cost_per_step_vs_stage2"]
    assert ratio > 0 and rows[("scratch", 6)]["compute_stage2_step_equiv"] == 6
    assert rows[("pretrained_ft", 6)]["compute_stage2_step_equiv"] == pytest.approx(6 + 6 * ratio)
    # what stage 1 keeps: read from the stage-1 run's own done.json (its test-goal diagnostics)
    s1 = json.loads((out / "runs" / "pretrain-seed0" / "done.json").read_text())["test"]
    row = rep["stage1_diagnostics"]["splits"]["test"][0]
    cell = f"{row['field']}_depth{row['depth']}"
    assert row["per_seed"]["0"]["encoder"] == s1[f"acc_{cell}"] and row["encoder"]["n"] == 1
    assert row["per_seed"]["0"]["shuffled"] == s1[f"ablation_acc_{cell}"]
    md = (out / "table.md").read_text()
    for s in ("What the data says", "`pretrained_ft` vs `scratch`", "sweep=pretrain_budget", "Status:** complete",
              "What stage 1 keeps"):
        assert s in md, s
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs/ (checkpoints, TensorBoard) is not committed; records/ is: the same report from it alone
    from experiments import report

    shutil.rmtree(out / "runs")
    again = report.write(out)
    assert again["complete"] and not again["carried"]
    for key in ("rows", "stage1_diagnostics", "stage1_cost_per_step_vs_stage2", "stage1"):
        assert json.dumps(again[key]).replace("/records/", "/runs/") == json.dumps(rep[key]), key
    assert sorted(p.name for p in (out / "records").iterdir()) == sorted(
        ["pretrain-seed0"] + [f"b{n}-{a}-seed0" for a in ("scratch", "pretrained_ft") for n in (3, 6)])
    # the same sweep in a later session (runs/ gone): its finished jobs are kept, nothing is redone, stage 1
    # included; a job whose kept record misses an evaluation asked for is redone
    (out / "records" / "b6-scratch-seed0" / "eval.json").unlink()
    r3 = sweep(tmp_path, tiny.data_path, *args)
    _ok(r3)
    assert r3.stdout.count("[kept] ") == 3 and "[start] pretrain" not in r3.stdout, r3.stdout
    assert "[start] train:b6-scratch-seed0 (fresh)" in r3.stdout and "[start] train:b3" not in r3.stdout
    assert json.loads((out / "summary.json").read_text())["complete"]


@pytest.mark.slow
def test_memory_sweep_submitit_local(tmp_path, tiny, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = sweep(tmp_path, tiny.data_path, "sweep=memory", "arm=ad,ad_3w,scratch", "seed=0", "window=20", "env=darkroom",
              "max_steps=4", "sweep.evals.eval.n_episodes=3", *LONG, "hydra/launcher=submitit_local",
              "hydra.launcher.timeout_min=10", env={"CAD_SWEEP_STARTED_UNIX": "1.0"})
    _ok(r)
    out = tmp_path / "out"
    started = json.loads((out / "sweep.json").read_text())["started_unix"]  # submitit's processes knew it
    assert {json.loads(p.read_text())["sweep_started_unix"] for p in (out / "jobs").glob("*.json")} == {started}
    rep = json.loads((out / "summary.json").read_text())
    assert rep["complete"]
    rows = {row["arm"]: row for row in rep["rows"]}
    assert set(rows) == {"ad", "ad_3w", "scratch"}
    assert {a: rows[a]["window"] for a in rows} == {"ad": 20, "ad_3w": 60, "scratch": 20}
    stat_keys = {"return_last5_norm", "episodes_to_0.8", "found_goal_frac", "episodes_to_first_goal",
                 "return_after_found", "tf_loss_test", "tf_loss_val", "return_last5_norm_val", "labels_per_step",
                 "train_wall_s", "labels_total", "rollout_ms_per_step"}
    for arm, row in rows.items():
        assert {"env", "arm", "window", "seeds", "stats", "memory_probe", "steps", "device", "paired"} <= set(row)
        assert stat_keys <= set(row["stats"]) and row["env"] == "darkroom" and row["seeds"] == [0]
        assert row["steps"] == 4
        st = row["stats"]
        assert isinstance(st["return_last5_norm"]["mean"], float) and st["rollout_ms_per_step"]["mean"] > 0
        assert st["return_last5_norm"]["n"] == 1 and st["return_last5_norm"]["sd"] is None  # one seed: no sd
        done = json.loads((Path(row["per_seed"]["0"]["run_dir"]) / "done.json").read_text())
        assert st["tf_loss_test"]["mean"] == pytest.approx(done["tf_loss_test"])
        # what the arm paid: done.json's compute record (4 steps of batch `tiny`)
        assert st["labels_per_step"]["mean"] == pytest.approx(done["compute"]["labels_trained"] / 4)
        assert st["train_wall_s"]["mean"] > 0
        run = Path(row["per_seed"]["0"]["run_dir"])
        assert run.name == f"darkroom-w20-{arm}-seed0" and (run / "eval_long.json").is_file()
    # paired differences against AD with the same window; one seed gives a difference but no interval
    assert rows["ad"]["paired"] == {} and rows["ad"]["paired_vs"] is None
    pr = rows["scratch"]["paired"]["return_last5_norm"]
    assert pr["n"] == 1 and pr["lo"] is None and pr["verdict"] == "n < 2"
    assert pr["diff"] == pytest.approx(rows["scratch"]["stats"]["return_last5_norm"]["mean"]
                                       - rows["ad"]["stats"]["return_last5_norm"]["mean"])
    # ... and against AD with 3x the window (the moonshot bar); AD itself is compared with neither
    assert rows["ad"]["paired_3w"] == {} and rows["ad_3w"]["paired_3w"] == {}
    p3 = rows["scratch"]["paired_3w"]["return_last5_norm"]
    assert p3["diff"] == pytest.approx(rows["scratch"]["stats"]["return_last5_norm"]["mean"]
                                       - rows["ad_3w"]["stats"]["return_last5_norm"]["mean"])
    assert rows["ad_3w"]["paired"]["return_last5_norm"]["n"] == 1
    assert rows["ad"]["memory_probe"] is None  # AD has no compressed memory to probe
    probe = rows["scratch"]["memory_probe"]
    assert math.isfinite(probe["k1"]["mean"]) and math.isfinite(probe["all"]["mean"])
    assert probe["all_minus_k1"]["diff"] == pytest.approx(probe["all"]["mean"] - probe["k1"]["mean"])
    assert list((out / "hydra").rglob("*_submitted.pkl"))  # the jobs went through submitit
    md = (out / "table.md").read_text()
    assert "Memory table" in md and "| darkroom | `ad_3w` | 60 |" in md
    # episode 1 beside the last 5 (in-context improvement); no Key-to-Door column on Darkroom (no run has one)
    assert "return / optimal, episode 1" in md and "Key-to-Door" not in md
    assert "Paired differences" in md and "What each arm paid" in md and "3x the window" in md
    # the source's own search vs use, scored on the dataset's test histories
    src = rep["datasets"]["darkroom"]["source_search_use_test"]
    assert 0 < src["found_goal_frac"] <= 1 and src["episodes_to_first_goal"] >= 1
    assert "| darkroom | source (its own histories) |" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an arm file's `pair_with` pairs the arm with the one it changes (here: scratch declared as AD 3w's variant)
    from experiments import report, runs

    arm_file = runs.arm_file
    monkeypatch.setattr(runs, "arm_file", lambda a: {**arm_file(a), **({"pair_with": "ad_3w"} if a == "scratch" else {})})
    rows = {row["arm"]: row for row in report.write(out)["rows"]}
    [pw] = rows["scratch"]["paired_with"]
    assert pw["vs"] == "ad_3w" and rows["ad"]["paired_with"] == []
    assert pw["return_last5_norm"]["diff"] == pytest.approx(rows["scratch"]["stats"]["return_last5_norm"]["mean"]
                                                            - rows["ad_3w"]["stats"]["return_last5_norm"]["mean"])
    assert "the arm each one changes" in (out / "table.md").read_text()


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from experiments import sweep as sw

    # stage overrides join overrides=[...], quoted for Hydra; the sweep's own keys stay as they are
    argv = sw.sweep_argv(["-m", "arm=ad,scratch", "seed=0,1", "hydra/launcher=joblib", "sweep.evals.eval.n_episodes=3",
                          "train:lr=1e-4", "model.d_model=32", 'source.x="a"'])
    assert argv[:5] == ["-m", "arm=ad,scratch", "seed=0,1", "hydra/launcher=joblib", "sweep.evals.eval.n_episodes=3"]
    assert argv[5] == 'overrides=["train:lr=1e-4","model.d_model=32","source.x=\\"a\\""]'
    with pytest.raises(sw.SweepError, match="not both"):
        sw.sweep_argv(["overrides=[]", "lr=1"])

    routed = sw.route(["model.d_model=32", "n_episodes=3", "source.n_stream=4", "train:lr=1e-4"], [], "quick", None)
    assert "model.d_model=32" in routed["pretrain"] and "model.d_model=32" in routed["train"]
    assert "n_episodes=3" in routed["evaluate"] and "n_episodes=3" not in routed["train"]
    assert "source.n_stream=4" in routed["collect"] and routed["train"][-1] == "lr=1e-4"
    for args, match in ((["seed=3"], "sets seed itself"), (["no_such_key=1"], "matches no stage"),
                        (["max_steps=5"], "budget=7, not max_steps")):
        with pytest.raises(sw.SweepError, match=match):
            sw.route(args, [], "quick", None, budget=7 if "max_steps" in args[0] else None)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, msg in ((["no_such_key=1"], "matches no stage"), (["arm=nope"], "nope"),
                      (["train:run_dir=x"], "sets run_dir itself")):
        r = subprocess.run([sys.executable, str(SWEEP), "-m", f"out={tmp_path}", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "runs").exists()
    # an out= that names a file, or a folder under one, was a NotADirectoryError traceback from Hydra
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/sub"):
        r = subprocess.run([sys.executable, str(SWEEP), "-m", f"out={tmp_path / out}", "arm=ad"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and r.stderr.strip() == (f"error: out={tmp_path / out}: {tmp_path / 'afile'} is a "
                                                          f"file, not a folder: choose another out="), r.stderr
    # `--cfg job` (results/README.md) prints the job's config: its value is no override to parse
    r = subprocess.run([sys.executable, str(SWEEP), "--cfg", "job", "arm=ad", "seed=1", "train:lr=1e-4"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "seed: 1" in r.stdout and "train:lr=1e-4" in r.stdout, r.stderr
    assert not (tmp_path / "results").exists()
    r = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no sweep runs" in r.stderr, r.stderr


def test_data_seed_picks_one_dataset_for_every_stage_and_seed_is_the_jobs(monkeypatch):
    """The sweep routes like two_stage.py (issue 24): data_seed=2 reaches collect and both training stages (the job
    then gives them collect's data_path); no stage gets a seed from the overrides (the job sets the training seed;
    collect's follows data_seed, evaluate keeps its own)."""
    sw = _sw()
    routed = sw.route(["data_seed=2"], [], "quick", None)
    assert not any(sw.override_key(o) == "seed" for ov in routed.values() for o in ov)
    c = {s: sw.compose(s, routed[s]) for s in ("collect", "pretrain", "train")}
    assert (c["collect"]["seed"], c["collect"]["data_path"]) == (2, "data/darkroom-quick-seed2")
    assert all(c[s]["data_seed"] == 2 and c[s]["data_path"] == "data/darkroom-quick-seed2" for s in ("pretrain", "train"))
    assert routed["evaluate"] == ["experiment=quick"]  # evaluate reads the run's own data_path, keeps its own seed
    with pytest.raises(sw.SweepError, match="sets seed itself"):
        sw.route(["train:seed=1"], [], "quick", None)
    monkeypatch.setattr(sw.two_stage, "split_overrides", lambda overrides: overrides)  # the refusal alone
    assert sw.route(["collect:seed=1", "collect:overwrite=true"], [], "quick", None)[-2:] == [
        "collect:seed=1", "collect:overwrite=true"]  # no collect key is the job's


def test_split_seed_routes_the_goal_split_to_every_stage_and_names_its_dataset_and_out():
    """split_seed=1 is the other-split check in one word: every stage gets env.split_seed=1, the dataset and the
    out dir their own -split1 folders, and the identity equals the four prefixed overrides + data_path that
    the committed split-1 records were made with (so they are reused, not redone)."""
    from hydra_cli import compose_config

    sw = _sw()
    assert sw.two_stage.dataset_for_split("data/darkroom-quick-seed0", 1) == "data/darkroom-quick-split1-seed0"
    assert sw.two_stage.dataset_for_split("data/mine", 2) == "data/mine-split2"
    assert sw.two_stage.dataset_for_split("data/x-seedling", 0) == "data/x-seedling-split0"
    routed = sw.route([], ["train:eval_every=0"], "mid", "darkroom", split_seed=1)
    c = {s: sw.compose(s, routed[s] + (["run_dir=x"] if s == "evaluate" else [])) for s in routed}
    assert all(c[s]["env"]["split_seed"] == 1 for s in c)
    assert {c[s]["data_path"] for s in ("collect", "pretrain", "train")} == {"data/darkroom-quick-split1-seed0"}
    long = ["collect:env.split_seed=1", "pretrain:env.split_seed=1", "train:env.split_seed=1",
            "evaluate:env.split_seed=1", "data_path=data/darkroom-quick-split1-seed0"]
    evals = {"eval": {"n_episodes": 100}}
    assert sw.out_identity("memory", "mid", evals, routed, "darkroom") == sw.out_identity(
        "memory", "mid", evals, sw.route(long, ["train:eval_every=0"], "mid", "darkroom"), "darkroom")
    assert sw.out_identity("memory", "mid", evals, routed, "darkroom") != sw.out_identity(
        "memory", "mid", evals, sw.route([], ["train:eval_every=0"], "mid", "darkroom"), "darkroom")
    mine = sw.route(["data_path=data/mine"], [], "quick", None, split_seed=1)  # the user's folder wins
    assert sw.compose("train", mine["train"])["data_path"] == "data/mine"

    conf = str(REPO / "experiments" / "conf")
    for sweep_name, out in (("memory", "results/memory-mid"), ("memory_darkroom_hard", "results/memory-mid-darkroom_hard"),
                            ("pretrain_budget_kept", "results/pretrain-budget-kept-mid")):
        cfg = compose_config("sweep", [f"sweep={sweep_name}", "experiment=mid"], config_dir=conf)
        assert cfg.out == out
        assert compose_config("sweep", [f"sweep={sweep_name}", "experiment=mid", "split_seed=1"],
                              config_dir=conf).out == out + "-split1"
    with pytest.raises(sw.SweepError, match="split_seed takes one value per multirun"):
        sw.precheck(["-m", "split_seed=0,1"])


def test_a_job_collects_the_dataset_once_and_checks_it_like_two_stage(tmp_path, tiny, monkeypatch):
    """ensure_dataset: a missing dataset is collected; an existing one passes rundir.check_dataset (a setting asked
    for that it lacks is refused; a dataset given by hand that differs from the preset only is used with a
    note); collect:overwrite=true re-collects it once per sweep, not in every job."""
    import shutil

    from omegaconf import OmegaConf

    from experiments import outdir
    from histories import DatasetError

    sw = _sw()
    monkeypatch.delenv(outdir.SWEEP_STARTED, raising=False)  # no multirun callback here: sweep.json's start counts
    cfg = OmegaConf.create({"accelerate": False, "accelerate_config": None, "num_processes": None, "omp_threads": None})
    collected = []

    def job(num=None):
        j = sw.Job(cfg, tmp_path, tmp_path, num)

        def fake_collect(name, stage, overrides, log_name, note, expect):
            collected.append(note)
            shutil.copytree(tiny.data_path, expect.parent, dirs_exist_ok=True)
            return 0.0

        j.run = fake_collect
        return j

    data = tmp_path / "d"
    routed = sw.route([f"data_path={data}"], [], "quick", None)
    assert sw.ensure_dataset(job(), routed) == data and collected == ["no dataset yet"]
    assert sw.ensure_dataset(job(), routed) == data and collected == ["no dataset yet"]  # reused, with a note
    asked = {**routed, "collect": routed["collect"] + ["source.n_stream=3"]}  # as route puts collect:source...=3
    with pytest.raises(DatasetError, match=r"other settings than asked \(source.n_stream: 4 -> 3\)"):
        sw.ensure_dataset(job(), asked)
    again = {**routed, "collect": routed["collect"] + ["overwrite=true"]}
    assert sw.ensure_dataset(job(), again) == data and collected == ["no dataset yet", "overwrite"]
    (tmp_path / "sweep.json").write_text(json.dumps({"started_unix": 0.0}))  # a multirun that started before it
    sw.ensure_dataset(job(num=1), again)
    assert collected == ["no dataset yet", "overwrite"]  # already re-collected in this sweep


def test_a_job_takes_its_own_sweeps_start_when_another_sweep_starts_into_the_same_out(tmp_path, monkeypatch):
    """Job.started decides whether collect:overwrite=true already re-collected, and whether stage 1 was redone or
    failed, in this sweep. It is the start the sweep's callback handed on in the environment, not sweep.json's,
    which another sweep into the same out dir rewrites when it starts (it used to be sweep.json's)."""
    from omegaconf import OmegaConf

    from experiments import outdir

    sw = _sw()
    cfg = OmegaConf.create({"accelerate": False, "accelerate_config": None, "num_processes": None, "omp_threads": None})
    job = {"arm": "ad", "seed": 0, "budget": None, "window": None, "env": None, "run": "ad-seed0"}
    mine = outdir.start(tmp_path, "python experiments/sweep.py -m a", [job], sweep="memory")
    monkeypatch.setenv(outdir.SWEEP_STARTED, repr(mine))  # what on_multirun_start sets before its jobs start
    time.sleep(0.01)
    later = outdir.start(tmp_path, "python experiments/sweep.py -m a", [job], sweep="memory")  # the other sweep
    assert sw.Job(cfg, tmp_path, tmp_path, 0).started == mine < later
    monkeypatch.delenv(outdir.SWEEP_STARTED)  # a launcher that drops the environment: sweep.json's start
    assert sw.Job(cfg, tmp_path, tmp_path, 0).started == later
    assert time.time() - sw.Job(cfg, tmp_path, tmp_path, None).started < 5  # a single run is a sweep of its own


def test_accelerate_launch_per_job(tmp_path):
    """accelerate=true: pretrain / train go through `accelerate launch` with the repository's config (or
    the given one), --num_processes, and a rendezvous port of their own per job (parallel jobs on one
    node); collect and evaluate stay plain processes."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO))
    from experiments import sweep as sw

    cfg = OmegaConf.create({"accelerate": True, "accelerate_config": None, "num_processes": 4, "omp_threads": 2})
    job = sw.Job(cfg, tmp_path, tmp_path, num=3)
    cmd = job.command("train", ["seed=0"])
    i = cmd.index("accelerate.commands.launch")
    assert cmd[i + 1:i + 3] == ["--main_process_port", "29603"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "accelerate_config.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[-2:] == [str(REPO / "train.py"), "seed=0"]
    assert job.command("evaluate", ["run_dir=x"]) == [sys.executable, str(REPO / "evaluate.py"), "run_dir=x"]
    assert job.env["OMP_NUM_THREADS"] == "2"
    assert sw.Job(cfg, tmp_path, tmp_path, num=4).command("pretrain", [])[i + 2] == "29604"


@pytest.mark.parametrize("arm_file", sorted((REPO / "experiments" / "conf" / "arm").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_arm_composes_into_a_valid_training_config(arm_file):
    """An arm's stage-2 overrides must name real keys with allowed values (train.TrainConfig), under both
    presets: a typo in an arm file would otherwise surface only when its sweep job starts."""
    from omegaconf import OmegaConf

    import train
    from tests.conftest import compose

    arm = OmegaConf.load(arm_file)
    assert {"label", "encoder", "train", "window_key", "window_mult"} <= set(arm)
    for preset in ("none", "quick"):
        cfg = compose("train", [f"experiment={preset}", *arm.train, f"{arm.window_key}=20"])
        train.TrainConfig.check(cfg)
        assert OmegaConf.select(cfg, arm.window_key) == 20


@pytest.mark.parametrize("name, memory, slots", [("rollout_gated_kept", "exact", 3),
                                                 ("rollout_gated_kept_carry", "carry", 3),
                                                 ("rollout_gated_kept_carry_bptt1", "carry", 1)])
def test_kept_window_arm_keeps_the_window_and_folds_as_much(name, memory, slots):
    """experiments/conf/arm/rollout_gated_kept*.yaml: the sweep's window w sets model.keep_recent = w and
    model.seg_len follows at 2w, so the decoder always sees the last w raw transitions (issue 22); the _carry
    arms train with the carried memory (_bptt1: one fold with gradients per sample)."""
    from omegaconf import OmegaConf

    from dataset import HistoryBatches
    from model.config import ModelConfig
    from tests.conftest import compose

    arm = OmegaConf.load(REPO / "experiments" / "conf" / "arm" / f"{name}.yaml")
    for w in (20, 7):
        cfg = compose("train", ["experiment=quick", *arm.train, f"{arm.window_key}={w * int(arm.window_mult)}"])
        mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
        assert (mcfg.seg_len, mcfg.keep_recent, mcfg.fold_len) == (2 * w, w, w)
        assert cfg.sampler.schedule == "rollout" and mcfg.latent_update == "gated"
        opts = HistoryBatches._cfg_options(cfg, cfg.sampler)
        assert opts["schedule"] == "rollout" and opts["memory"] == memory and opts["carry_slots"] == slots


# ---- issue 25: a sweep never reuses, mixes or mislabels results ------------------------------------------
def _sw():
    sys.path.insert(0, str(REPO))
    from experiments import sweep as sw

    return sw


def test_memory_sweep_takes_its_own_defaults():
    """sweep/memory.yaml's env and window were overridden by sweep.yaml's nulls (_self_ came last): AD w and
    3w trained with the same window and gave identical results."""
    from hydra_cli import compose_config

    conf = str(REPO / "experiments" / "conf")
    cfg = compose_config("sweep", ["sweep=memory"], config_dir=conf)
    assert (cfg.env, cfg.window) == ("darkroom", 40)
    cfg = compose_config("sweep", ["sweep=memory", "window=20", "env=darkroom_hard"], config_dir=conf)
    assert (cfg.env, cfg.window) == ("darkroom_hard", 20)  # the command line still wins
    assert compose_config("sweep", [], config_dir=conf).window is None


def test_eval_reuse_compares_every_setting_env_included(tmp_path):
    """EVAL_KEYS lacked env.*: an eval with reward_mode=once reused the every_step one."""
    from tests.conftest import compose as hydra_compose

    sw = _sw()
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "model.pt").write_bytes(b"x")
    (rd / "done.json").write_text(json.dumps({"global_step": 4}))
    from omegaconf import OmegaConf

    def want(*ov):
        return OmegaConf.to_container(hydra_compose("evaluate", ["run_dir=x", "n_episodes=3", *ov]), resolve=True)

    had = {**want("env_from_run=false"), "run_dir": str(rd), "progress": False}  # paths / cadence do not count
    (rd / "eval.json").write_text(json.dumps({"global_step": 4, "config": had}))
    assert sw.eval_reusable(rd, "eval", want("env_from_run=false"))
    assert not sw.eval_reusable(rd, "eval", want("env_from_run=false", "env.reward_mode=once"))
    assert not sw.eval_reusable(rd, "eval", want("env_from_run=false", "teacher_forced=false"))


def test_planned_jobs_are_the_sweepers_product():
    from omegaconf import OmegaConf

    sw = _sw()
    cfg = OmegaConf.create({"seed": 0, "budget": None, "window": 40, "env": "darkroom", "hydra": {
        "sweeper": {"params": {"arm": "ad,ad_3w,scratch", "seed": "0,1,2"}},
        "overrides": {"task": ["arm=ad,ad_3w", "seed=0,1", "overrides=[\"train:lr=1\"]"]}, "runtime": {"choices": {"arm": "scratch"}}}})
    jobs = sw.planned_jobs(cfg)
    assert [j["run"] for j in jobs] == ["darkroom-w40-ad-seed0", "darkroom-w40-ad-seed1", "darkroom-w40-ad_3w-seed0",
                                        "darkroom-w40-ad_3w-seed1"]
    assert jobs[0] == {"arm": "ad", "seed": 0, "budget": None, "window": 40, "env": "darkroom",
                       "run": "darkroom-w40-ad-seed0"}


def test_report_error_at_the_end_of_a_sweep_fails_it(tmp_path, monkeypatch):
    """A ReportError in the multirun-end callback used to become a Hydra warning: exit 0, no report."""
    from omegaconf import OmegaConf

    sw = _sw()
    out = tmp_path / "O"
    (out / "jobs").mkdir(parents=True)
    for name, sweep in (("a", "compare"), ("b", "memory")):
        (out / "jobs" / f"{name}.json").write_text(json.dumps({"kind": "train", "sweep": sweep, "run_dir": name}))
    monkeypatch.setattr(sw, "STATUS", {})
    sw.Report().on_multirun_end(OmegaConf.create({"out": str(out), "report": True}))
    assert "the report failed" in sw.STATUS["error"] and "runs of several sweeps" in sw.STATUS["error"]


@pytest.mark.slow
def test_ctrl_c_of_a_sweep_is_one_line_and_recorded(tmp_path, tiny):
    """SIGINT (Ctrl-C) mid-training: exit 130 with one line, the job's record says interrupted, the report
    marks it so, and the same command resumes it."""
    import signal
    import time

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    full_env.pop("CAD_TEST_KILL_AT", None)
    args = ["arm=scratch", "seed=0", "max_steps=150", "checkpoint_every=2", *LONG]
    cmd = [sys.executable, str(SWEEP), "-m", f"out={tmp_path / 'out'}", *TINY, f"data_path={tiny.data_path}", *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    ck = tmp_path / "out" / "runs" / "scratch-seed0" / "checkpoints"
    deadline = time.time() + 300
    while not (ck.is_dir() and any(ck.glob("step-*"))) and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)") and "Traceback" not in err, err
    rec = json.loads((tmp_path / "out" / "jobs" / "scratch-seed0.json").read_text())
    assert rec["status"] == "interrupted"
    sys.path.insert(0, str(REPO))
    from experiments import report

    rep = report.write(tmp_path / "out")
    assert rep["run_status"] == {"scratch-seed0": "interrupted"}
    r = sweep(tmp_path, tiny.data_path, *args[:2], "max_steps=150", "checkpoint_every=200", *LONG)
    assert r.returncode == 0 and "[start] train:scratch-seed0 (resume)" in r.stdout, r.stdout[-2000:] + r.stderr


@pytest.mark.slow
def test_two_concurrent_sweeps_into_one_out(tmp_path, tiny):
    """Two sweeps with other lrs started together into one out: one claims it, the other is refused in one
    line before writing anything; the report shows the winner's command and lr only (both used to exit 0, one
    printing the other's command and lr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    full_env.pop("CAD_TEST_KILL_AT", None)
    procs = {lr: subprocess.Popen([sys.executable, str(SWEEP), "-m", f"out={tmp_path / 'out'}", *TINY,
                                   f"data_path={tiny.data_path}", "arm=scratch", "seed=0", "max_steps=4", *LONG,
                                   f"train:lr={lr}"], cwd=tmp_path, env=full_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for lr in ("0.001", "0.002")}
    res = {lr: (p.communicate(timeout=600), p.returncode) for lr, p in procs.items()}
    won = [lr for lr, (_, rc) in res.items() if rc == 0]
    lost = [lr for lr, (_, rc) in res.items() if rc == 2]
    assert len(won) == 1 and len(lost) == 1, res
    err = res[lost[0]][0][1]
    assert "another sweep configuration (train.lr" in err and len(err.strip().splitlines()) == 1, err
    rep = json.loads((tmp_path / "out" / "table.json").read_text())
    assert f"train:lr={won[0]}" in rep["command"] and rep["complete"]
    rec = json.loads((tmp_path / "out" / "jobs" / "scratch-seed0.json").read_text())
    assert rec["overrides"]["train"][-1] == f"lr={won[0]}"
    assert json.loads((tmp_path / "out" / "runs" / "scratch-seed0" / "config.json").read_text())["lr"] == float(won[0])


@pytest.mark.slow
def test_two_sweeps_of_one_seed_share_its_jobs(tmp_path, tiny):
    """The same sweep started twice shares its jobs: a job the other sweep holds (its lock taken here, as a
    running sweep holds it) is refused in one line and left alone, the next job runs; the same command once
    the holder is done runs the refused job and reuses the rest."""
    from atomic_io import PathLock

    out = tmp_path / "out"
    held = PathLock(out / "jobs" / "scratch-seed0")
    assert held.acquire() is None
    try:
        r = sweep(tmp_path, tiny.data_path, "arm=scratch", "seed=0,1", "max_steps=4")
    finally:
        held.release()
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"scratch-seed0 is being run by another sweep into {out} (pid {os.getpid()} on " in r.stderr, r.stderr
    assert "[start] train:scratch-seed1" in r.stdout and "train:scratch-seed0" not in r.stdout, r.stdout
    assert not (out / "jobs" / "scratch-seed0.json").exists()  # the holder's record is its own to write
    assert json.loads((out / "jobs" / "scratch-seed1.json").read_text())["status"] == "done"
    assert "is being run by another sweep" in json.loads((out / "refused" / "scratch-seed0.json").read_text())["error"]

    r2 = sweep(tmp_path, tiny.data_path, "arm=scratch", "seed=0,1", "max_steps=4")
    _ok(r2)
    assert "[start] train:scratch-seed0 (fresh)" in r2.stdout and "[reuse] train:scratch-seed1" in r2.stdout, r2.stdout
    assert json.loads((out / "table.json").read_text())["complete"]


def test_the_kept_budget_curve_trains_the_bptt1_arm_on_a_stage_1_that_folds_as_much():
    """sweep=pretrain_budget_kept: stage 2 is rollout_gated_kept_carry_bptt1 at w = 20 (the arm of
    results/memory-mid), stage 1 folds what it folds (seg_len - keep_recent) with the same gated latents, and
    its out dir is its own while its report is the budget curve's."""
    from omegaconf import OmegaConf

    from experiments import sweep as sw
    from model.config import ModelConfig
    from tests.conftest import compose

    conf = REPO / "experiments" / "conf"
    sweep = OmegaConf.load(conf / "sweep" / "pretrain_budget_kept.yaml")
    assert sweep.sweep.name == "pretrain-budget" and "kept" in OmegaConf.to_container(sweep)["out"]
    routed = sw.route([], list(sweep.sweep.overrides), "mid", None, 500)
    arm = OmegaConf.load(conf / "arm" / "rollout_gated_kept_carry_bptt1.yaml")
    want = compose("train", ["experiment=mid", *arm.train, "model.keep_recent=20"])
    got = compose("train", routed["train"])
    for key in ("model", "sampler"):
        assert OmegaConf.to_container(got[key], resolve=True) == OmegaConf.to_container(want[key], resolve=True), key
    s1 = compose("pretrain", routed["pretrain"])
    m1, m2 = ModelConfig.from_cfg(s1.model, s1.env), ModelConfig.from_cfg(got.model, got.env)
    assert (m1.fold_len, m1.keep_recent, m1.latent_update) == (m2.fold_len, m2.keep_recent, "gated") == (20, 20, "gated")


@pytest.mark.parametrize("sweep_file", sorted((REPO / "experiments" / "conf" / "sweep").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_sweep_preset_composes_every_stage_of_its_arms_at_mid(sweep_file):
    """A sweep file's stage defaults, env and window, with each arm it sweeps, compose into valid configs of
    every stage at experiment=mid (a typo would otherwise surface only when its jobs start)."""
    from omegaconf import OmegaConf

    import train
    from experiments import sweep as sw

    conf = OmegaConf.to_container(OmegaConf.load(sweep_file))
    params = conf["hydra"]["sweeper"]["params"]
    routed = sw.route([], conf["sweep"]["overrides"], "mid", conf.get("env"), 5 if "budget" in params else None)
    for stage in ("collect", "pretrain", "evaluate"):
        sw.compose(stage, routed[stage] + (["run_dir=x"] if stage == "evaluate" else []))
    for arm_name in str(params["arm"]).split(","):
        arm = OmegaConf.load(REPO / "experiments" / "conf" / "arm" / f"{arm_name}.yaml")
        window = [f"{arm.window_key}={int(conf['window']) * int(arm.window_mult)}"] if conf.get("window") else []
        train.TrainConfig.check(OmegaConf.create(sw.compose("train", routed["train"] + list(arm.train) + window)))
