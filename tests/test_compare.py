"""experiments/compare_pretraining.py end to end on a tiny problem: two arms (scratch, pretrained_ft), one
seed, a handful of steps. Checks the outputs (table.json structure, table.md, curves.png), that stage 1
feeds stage 2, and that a second invocation reuses every finished run instead of redoing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "experiments" / "compare_pretraining.py"

# Free overrides, routed by the runner like two_stage.py: model.* -> pretrain + train, source.* -> collect,
# n_episodes / seeds_per_goal / n_train_goals -> evaluate, log_every -> pretrain + train.
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.enc_n_layer=1", "model.recon_n_layer=1",
        "model.n_latent=4", "model.seg_len=20", "model.min_seg_len=10",
        "batch_size=8", "max_steps=8", "warmup_steps=2", "log_every=2",
        "model.pretrain_steps=6", "model.pretrain_batch_size=8", "diag_batches=1",
        "n_episodes=3", "seeds_per_goal=1", "n_train_goals=1", "progress=false"]


def run_runner(tmp_path: Path, data_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(RUNNER), "--arms", "scratch", "pretrained_ft", "--seeds", "0", "--jobs", "2",
            "--long-episodes", "4", "--out", str(tmp_path / "out"), *TINY, f"data_path={data_path}", *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_compare_end_to_end_and_reuse(tmp_path, tiny):
    # The session's tiny dataset (tests/conftest.py) saves a collect process; that a missing dataset is
    # collected first is checked by the planning test below.
    r = run_runner(tmp_path, tiny.data_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert "[collect] dataset exists" in r.stdout

    rep = json.loads((out / "table.json").read_text())
    assert rep["arms"] == ["scratch", "pretrained_ft"] and rep["seeds"] == [0]
    assert rep["experiment"] == "quick" and rep["complete"] and not rep["missing"]
    assert rep["dataset"]["path"] == str(tiny.data_path)
    assert "compare_pretraining.py" in rep["command"] and rep["date"]
    assert rep["long_eval"]["n_episodes"] == 4 and rep["eval"]["n_episodes"] == 3
    for arm in ("scratch", "pretrained_ft"):
        res = rep["results"][arm]
        assert set(res["mean"]) == set(rep["metrics"]) == set(res["std"])
        seed0 = res["per_seed"]["0"]
        assert seed0["complete"], seed0["metrics"]
        assert all(isinstance(v, float) for v in seed0["metrics"].values()), seed0["metrics"]
        assert res["mean"] == seed0["metrics"]  # one seed: the mean is that seed's number
        assert len(seed0["curve"]) == 3 and len(seed0["long_curve"]) == 4
        assert seed0["train_loss_steps"] == {"25%": 2, "50%": 4, "100%": 8}  # log_every=2, max_steps=8
        assert 0 <= seed0["metrics"]["return_last5_normalized"] <= 1.0 + 1e-9
    # stage 1 ran once and its encoder fed the pretrained arm
    pre = out / "runs" / "pretrain-seed0"
    assert (pre / "encoder-pretrained-final.pt").is_file()
    cfg = json.loads((out / "runs" / "pretrained_ft-seed0" / "config.json").read_text())
    assert cfg["model"]["pretrained_encoder_path"] == str(pre / "encoder-pretrained-final.pt")
    assert json.loads((out / "runs" / "scratch-seed0" / "config.json").read_text())["model"][
        "pretrained_encoder_path"] is None
    assert "Loading pretrained encoder" in (out / "logs" / "train-pretrained_ft-seed0.log").read_text()
    # the long eval really ran past the standard one, on the held-out goals only
    long = json.loads((out / "runs" / "scratch-seed0" / "eval_long.json").read_text())
    assert set(long["splits"]) == {"test"} and long["splits"]["test"]["summary"]["n_episodes"] == 4

    md = (out / "table.md").read_text()
    for s in ("`scratch`", "`pretrained_ft`", "experiment=quick", "compare_pretraining.py", "Date",
              str(tiny.data_path), "held-out return, last 3 episodes", "long rollout: return, last 4"):
        assert s in md, s
    png = out / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files

    # Second invocation: everything is reused, nothing is retrained or re-evaluated.
    watched = [pre / "done.json"] + [out / "runs" / f"{arm}-seed0" / f for arm in ("scratch", "pretrained_ft")
                                     for f in ("done.json", "model.pt", "eval.json", "eval_long.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    r2 = run_runner(tmp_path, tiny.data_path)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "reusing" in r2.stdout and "[start]" not in r2.stdout, r2.stdout
    for name in ("pretrain:seed0", "train:scratch-seed0", "eval_long:pretrained_ft-seed0"):
        assert f"[reuse] {name}" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    rep2 = json.loads((out / "table.json").read_text())
    assert rep2["results"] == rep["results"]  # the same numbers, read back from the same runs


@pytest.mark.slow
def test_interrupted_run_is_resumed_and_bad_input_fails_fast(tmp_path):
    """A run dir with checkpoints but no done.json is resumed with resume=true; changing a training key
    under the same --out is refused instead of silently reusing the old run. Plans only (--dry-run)."""
    sys.path.insert(0, str(REPO))
    from experiments import compare_pretraining as cp

    out = tmp_path / "out"
    base = ["--arms", "scratch", "--seeds", "0", "--out", str(out), "--dry-run", *TINY, "source.n_stream=4",
            f"data_path={tmp_path / 'data'}"]
    a = cp.parse_args(base)
    routed = cp.route_overrides([f"experiment={a.experiment}", *a.overrides])
    assert "model.d_model=32" in routed["pretrain"] and "model.d_model=32" in routed["train"]
    assert "n_episodes=3" in routed["evaluate"] and "n_episodes=3" not in routed["train"]
    assert "source.n_stream=4" in routed["collect"] and "source.n_stream=4" not in routed["train"]
    plan = cp.make_plan(a, routed)
    assert plan.collect is not None  # no dataset yet: collect first
    train = next(j for j in plan.jobs if j.name == "train:scratch-seed0")
    assert train.note == "fresh" and "resume=true" not in train.overrides

    # fake an interrupted run: the same config saved, one complete checkpoint, no done.json
    rd = out / "runs" / "scratch-seed0"
    (rd / "checkpoints" / "step-00000003").mkdir(parents=True)
    (rd / "checkpoints" / "step-00000003" / "loop_state.json").write_text('{"step": 3}')
    for name in ("model.safetensors", "optimizer.bin"):  # what rundir.checkpoints() needs to call it complete
        (rd / "checkpoints" / "step-00000003" / name).write_bytes(b"")
    (rd / "config.json").write_text(json.dumps(plan.train_cfgs[("scratch", 0)]))
    plan = cp.make_plan(cp.parse_args(base), routed)
    train = next(j for j in plan.jobs if j.name == "train:scratch-seed0")
    assert train.note == "resume" and train.overrides[-1] == "resume=true"

    with pytest.raises(cp.CompareError, match="another config"):
        a2 = cp.parse_args(base + ["lr=0.01"])
        cp.make_plan(a2, cp.route_overrides([f"experiment={a2.experiment}", *a2.overrides]))
    with pytest.raises(cp.CompareError, match="sets seed itself"):
        cp.route_overrides(["seed=3"])
    with pytest.raises(cp.CompareError, match="matches no stage"):
        cp.route_overrides(["no_such_key=1"])
