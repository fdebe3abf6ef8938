"""Benchmarks that cannot rot: every script in benchmarks/ runs in its --quick mode on the current configs
(a config change that breaks one fails here), exits 0, and writes its results JSON with what the figures
depend on (device name, torch version, dtype, batch, compile mode). Timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SMALL_ARCH = ["--d-model", "32", "--n-head", "2", "--n-layer", "1", "--enc-n-layer", "1", "--n-latent", "4",
              "--seg-len", "20"]
RUNS = {  # results name -> command line after `python benchmarks/<script>`
    "train_throughput": ["train_throughput.py", "--quick"],
    "rollout_cost": ["rollout_cost.py", "--quick"],
    "rollout_cost_kept": ["rollout_cost.py", "--quick", "--keep-recent", "10", "--kept-seg-len", "40",
                          "--ad-long-context", "60"],
    "dataset_speed": ["dataset_speed.py", "--quick"],
    "train_position_cost": ["train_position_cost.py", "--quick"],
    "collect_speed": ["collect_speed.py", "--quick"],
}


def _start(args: list[str], out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(BENCH / args[0]), *args[1:], "--out-dir", str(out_dir)],
                            cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def test_every_benchmark_has_a_test():
    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py", "gpu_check.py"}
    assert scripts == {args[0] for args in RUNS.values()}, "add the new benchmark to RUNS"


@pytest.mark.slow
def test_benchmarks_quick_mode(tmp_path):
    procs = {}
    for name, args in RUNS.items():
        d = tmp_path / name
        d.mkdir()
        procs[name] = (_start(args, d), d)
    for name, (p, d) in procs.items():
        out = _finish(p)
        assert f"wrote {d / (name + '.json')}" in out, out[-2000:]
        res = json.loads((d / f"{name}.json").read_text())
        run = res["run"]
        assert {"device", "device_name", "torch", "dtype", "batch", "compile"} <= run.keys(), name
        assert run["device"] == "cpu" and run["torch"]
    tt = json.loads((tmp_path / "train_throughput" / "train_throughput.json").read_text())
    assert tt["variants"]["cad_all"]["labels_per_s"] > 0 and tt["run"]["batch"] == 8
    assert len(tt["depth_mixture"]["depth_hist"]) == 4  # depths 0..3 of the default model config
    rc = json.loads((tmp_path / "rollout_cost" / "rollout_cost.json").read_text())
    assert set(rc["per_length"]) == {"100", "300"}
    tp = json.loads((tmp_path / "train_position_cost" / "train_position_cost.json").read_text())
    assert set(tp["per_position"]) == {"1", "8"} and all(r["carry_ms"] > 0 for r in tp["per_position"].values())
    kept = json.loads((tmp_path / "rollout_cost_kept" / "rollout_cost_kept.json").read_text())
    assert kept["model"]["kept"]["keep_recent"] == 10 and kept["model"]["kept"]["seg_len"] == 40
    assert all(r["cad_kept_ms"] > 0 for r in kept["per_length"].values())
    assert len(kept["per_length"]["100"]["cycles_ms"]["cad_kept"]) == 1  # one lcm(80, 30)-step cycle
    assert kept["model"]["ad_long"]["context_len"] == 60  # AD 3w, timed in the same cycles
    assert all(r["ad_long_ms"] > 0 and r["cad_kept_over_ad_long"] > 0 for r in kept["per_length"].values())
    assert kept["summary"]["cad_kept_over_ad_long_worst"] == max(
        r["cad_kept_over_ad_long"] for r in kept["per_length"].values())


@pytest.mark.slow
def test_train_throughput_fast_path_options(tmp_path):
    """The GPU options of train_throughput.py (compile, bf16 autocast, static shapes) on a small model."""
    out = _finish(_start(["train_throughput.py", "--quick", "--compile", "aot_eager", "--dtype", "bf16",
                          "--no-breakdown", *SMALL_ARCH], tmp_path))
    assert "compile=aot_eager static_shapes=True" in out
    run = json.loads((tmp_path / "train_throughput.json").read_text())["run"]
    assert run["compile"] == "aot_eager" and run["dtype"] == "bf16" and run["static_shapes"] is True


def test_train_position_cost_compares_bptt_depths_in_one_run(tmp_path):
    """--bptt 1 3: both depths timed interleaved in one run, each figure per depth and their ratio."""
    _finish(_start(["train_position_cost.py", "--quick", "--bptt", "1", "3", "--keep-recent", "10", *SMALL_ARCH],
                   tmp_path))
    rec = json.loads((tmp_path / "train_position_cost_kept_bptt1-3.json").read_text())
    assert rec["settings"]["bptt"] == [1, 3]
    for r in rec["per_position"].values():
        assert {"exact_bptt1_ms", "carry_bptt1_ms", "exact_bptt3_ms", "carry_bptt3_ms"} <= set(r)
        assert r["carry_bptt1_ms"] > 0 and r["carry_bptt3_ms"] > 0
    assert rec["summary"]["carry_bptt3_over_bptt1_at_8"] == pytest.approx(
        rec["per_position"]["8"]["carry_bptt3_ms"] / rec["per_position"]["8"]["carry_bptt1_ms"])


@pytest.mark.parametrize("flag", ["--compile fastest", "--dtype fp8"])
def test_bad_benchmark_flags_fail_clearly(tmp_path, flag):
    p = _start(["train_throughput.py", "--quick", *flag.split()], tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "invalid choice" in err


@pytest.mark.slow
def test_gpu_check_dry_path(tmp_path):
    """`make gpu-check`'s script end to end on the CPU (--device cpu --quick): every part runs (benchmarks,
    accelerate-launched two-stage pipeline, evaluation) and lands in the one table and gpu_check.json."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                        str(tmp_path / "gc")], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert res["failed"] == [] and set(res["parts"]) == {"train eager fp32", "train compiled", "rollout", "pipeline"}
    table = r.stdout[r.stdout.index("=== gpu_check"):]
    for figure in ("cad_all ms/step | labels/s", "ms/env step at h=300", "stage 1: steps | correlation",
                   "held-out return: first ep. | last 5 | optimal"):
        assert figure in table, table
    pipe = res["parts"]["pipeline"]
    assert pipe["pretrain"]["global_step"] == 20 and pipe["train"]["global_step"] == 30
    assert pipe["eval"]["splits"]["test"]["summary"]["optimal_mean"] > 0


def test_gpu_check_without_cuda_says_what_to_do(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this checks the message on a machine without one")
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path / "gc")],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA device") and "--device cpu --quick" in r.stderr
