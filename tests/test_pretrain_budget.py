"""experiments/pretrain_budget.py end to end on a tiny problem: two budgets, scratch + fine-tuned + frozen, one
seed. Checks that stage 1 runs once and feeds every pretrained run, that each budget is its own stage-2 run,
the outputs (summary.json rows, table.md verdict, budget.png), and that a second call reuses everything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "experiments" / "pretrain_budget.py"
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.enc_n_layer=1", "model.recon_n_layer=1",
        "model.n_latent=4", "model.seg_len=20", "model.min_seg_len=10",
        "batch_size=8", "warmup_steps=2", "log_every=2",
        "model.pretrain_steps=6", "model.pretrain_batch_size=8", "diag_batches=1",
        "n_episodes=3", "seeds_per_goal=1", "progress=false"]


def run_runner(tmp_path: Path, data_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(RUNNER), "--budgets", "3", "6", "--seeds", "0", "--jobs", "2",
            "--out", str(tmp_path / "out"), *TINY, f"data_path={data_path}", *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_budget_curve_end_to_end_and_reuse(tmp_path, tiny):
    r = run_runner(tmp_path, tiny.data_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert r.stdout.count("[start] pretrain:seed0") == 1  # one stage 1 for both budgets and both arms
    rep = json.loads((out / "summary.json").read_text())
    assert rep["complete"] and rep["budgets"] == [3, 6]
    rows = {(row["arm"], row["stage2_steps"]): row for row in rep["rows"]}
    assert set(rows) == {(a, n) for a in ("scratch", "pretrained_ft", "pretrained_frozen") for n in (3, 6)}
    for (arm, n), row in rows.items():
        assert {"arm", "stage2_steps", "stage1_steps", "seeds", "heldout_loss_same_position", "return_last5",
                "episodes_to_0.8"} <= set(row)
        assert row["seeds"] == [0]
        assert row["stage1_steps"] == (0 if arm == "scratch" else 6)
        assert isinstance(row["return_last5"], float) and isinstance(row["heldout_loss_same_position"], float)
        assert math.isfinite(row["heldout_loss_same_position"])
        run = Path(row["per_seed"]["0"]["run_dir"])
        assert run.name == f"b{n}-{arm}-seed0"
        done = json.loads((run / "done.json").read_text())
        assert done["global_step"] == n and done["tf_loss_test"] == row["heldout_loss_same_position"]
        cfg = json.loads((run / "config.json").read_text())
        want = None if arm == "scratch" else str(out / "runs" / "pretrain-seed0" / "encoder-pretrained-final.pt")
        assert cfg["model"]["pretrained_encoder_path"] == want
        assert cfg["model"]["freeze_encoder"] is (arm == "pretrained_frozen")
        ev = json.loads((run / "eval.json").read_text())
        assert row["return_last5"] == ev["splits"]["test"]["summary"]["last_k_mean"]
    # compute counts stage 1 for the pretrained arms only, at its measured cost per step
    ratio = rep["stage1_cost_per_step_vs_stage2"]
    assert ratio > 0
    assert rows[("scratch", 6)]["compute_stage2_step_equiv"] == 6
    assert rows[("pretrained_ft", 6)]["compute_stage2_step_equiv"] == pytest.approx(6 + 6 * ratio)
    md = (out / "table.md").read_text()
    for s in ("What the data says", "`pretrained_ft` vs `scratch`", "pretrain_budget.py", "experiment=quick"):
        assert s in md, s
    png = out / "budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    watched = [p for p in (out / "runs").rglob("done.json")] + list((out / "runs").rglob("eval.json"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    r2 = run_runner(tmp_path, tiny.data_path)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "[start]" not in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "summary.json").read_text())["rows"] == rep["rows"]


def test_max_steps_is_refused_and_verdict_words():
    sys.path.insert(0, str(REPO))
    from experiments import compare_pretraining as cp
    from experiments import pretrain_budget as pb

    a = pb.parse_args(["--dry-run", "train:max_steps=5"])
    routed = cp.route_overrides([f"experiment={a.experiment}", *a.overrides])
    with pytest.raises(cp.CompareError, match="--budgets"):
        pb.make_plans(a, routed)

    def row(arm, loss, sd):
        return {"arm": arm, "stage2_steps": 10, "heldout_loss_same_position": loss,
                "heldout_loss_same_position_std": sd, "heldout_loss_same_position_n": 3,
                "return_last5": 5.0, "return_last5_std": 1.0, "return_last5_n": 3}

    rep = {"budgets": [10], "arms": ["scratch", "pretrained_ft"],
           "rows": [row("scratch", 0.80, 0.01), row("pretrained_ft", 0.70, 0.01)]}
    assert "(better)" in pb.verdict(rep)[0].split(";")[0]
    rep["rows"][1] = row("pretrained_ft", 0.79, 0.05)
    assert "within seed noise" in pb.verdict(rep)[0].split(";")[0]
    rep["rows"][1] = row("pretrained_ft", 0.95, 0.01)
    assert "(worse)" in pb.verdict(rep)[0].split(";")[0]
