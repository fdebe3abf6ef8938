"""One-command device check for a person with one GPU (`make gpu-check` / `bash benchmarks/gpu_check.sh`).

    python benchmarks/gpu_check.py                       # CUDA: the full check, designed for <= 8 min on one H100
    python benchmarks/gpu_check.py --device cpu --quick  # the same script end to end on a CPU (dry path, ~1 min)

Runs, each part in its own process, and prints ONE table at the end (also <out>/gpu_check.json):
  1. benchmarks/train_throughput.py: ms/step and labels/s of CompressedAD (cad_all) and AD (ad_all)
     - eager, fp32, batch 128 (the configuration of the first H100 measurement: 32.2 / 13.2 ms/step),
     - compile=reduce-overhead (CUDA graphs), bf16, static shapes, batch 128 (experiment=full's step),
     - the same at batch 512 (goal: <= 2x the batch-128 step time);
  2. benchmarks/rollout_cost.py: ms per env step of 64 envs at history 100 / 1k / 10k (KV cache, AD);
  3. a short experiment=full two-stage pipeline through `accelerate launch` (two_stage.py --accelerate):
     collect (reused if present) -> stage 1 -> stage 2 -> in-context evaluation on the held-out goals;
     reports stage-1 metrics, stage-2 labels/s and held-out loss, held-out return.
Every part that fails is reported as FAILED in the table (its log is in <out>/logs/) and the exit code is 1.
Needs only what `make install` installs. Outputs under --out (default runs/gpu-check, replaced each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# The CPU dry path's model: small enough that every part runs in seconds.
SMALL_ARCH = ["--d-model", "32", "--n-head", "2", "--n-layer", "1", "--enc-n-layer", "1", "--n-latent", "4",
              "--seg-len", "20"]
TINY_MODEL = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.enc_n_layer=1",
              "model.recon_n_layer=1", "model.n_latent=4", "model.seg_len=20", "sampler.min_seg_len=10"]


def plan(device: str, quick: bool, out: Path) -> dict:
    """name -> part. Parts: ('bench', script, args) or ('pipeline', two_stage argv)."""
    if device == "cuda" and not quick:
        tt = ["train_throughput.py", "--device", "cuda", "--steps", "10", "--inner", "10"]
        compiled = ["--dtype", "bf16", "--compile", "reduce-overhead", "--no-breakdown"]
        parts = {
            "train eager fp32 b128": ("bench", tt + ["--batch-size", "128"]),
            "train compiled bf16 b128": ("bench", tt + ["--batch-size", "128", *compiled]),
            "train compiled bf16 b512": ("bench", tt + ["--batch-size", "512", *compiled]),
            "rollout E=64": ("bench", ["rollout_cost.py", "--device", "cuda", "--n-envs", "64", "--repeats", "1",
                                       "--lengths", "100", "1000", "10000"]),
        }
        pipe = ["experiment=full", "model.pretrain_steps=600", "max_steps=1500", "warmup_steps=100",
                "log_every=100", "heldout_every=500", "eval_every=0", "checkpoint_every=1000", "diag_every=300",
                "evaluate:n_episodes=50", "evaluate:seeds_per_goal=8"]
    else:
        # The dry path: the same parts, quick and small, on `device` (cpu, or a quick look at a GPU).
        tt = ["train_throughput.py", "--device", device, "--quick", *SMALL_ARCH]
        parts = {
            "train eager fp32": ("bench", tt),
            # On a CPU: the debug backend (inductor's code generation takes minutes there) and fp32 (CPU
            # bf16 autocast is slow); the same code path otherwise.
            "train compiled": ("bench", tt + (["--compile", "aot_eager"] if device == "cpu" else
                                              ["--compile", "reduce-overhead", "--dtype", "bf16"]) + ["--no-breakdown"]),
            "rollout": ("bench", ["rollout_cost.py", "--device", device, "--quick", *SMALL_ARCH]),
        }
        pipe = ["experiment=quick", *TINY_MODEL, f"data_path={out / 'data'}", "collect:source.n_stream=2",
                "collect:source.n_steps=200", "collect:source.n_stream_eval=1", "model.pretrain_steps=20",
                "max_steps=30", "warmup_steps=5", "log_every=10", "heldout_every=10", "eval_every=0",
                "checkpoint_every=1000", "diag_every=10", "evaluate:n_episodes=4", "evaluate:seeds_per_goal=1",
                "evaluate:n_train_goals=1", "progress=false", "evaluate:progress=false"]
        if device == "cpu":
            pipe += ["cpu=true", "cpu_threads=1", "compile=false"]
    pipe += [f"pretrain:run_dir={out / 'pretrain'}", f"train:run_dir={out / 'train'}"]
    parts["pipeline"] = ("pipeline", ["--accelerate", "--num-processes", "1", "--force", *pipe])
    return parts


def run_part(name: str, kind: str, args: list[str], out: Path, env: dict) -> dict:
    """One part in its own process (its log: <out>/logs/<name>.log); its results, read from what it wrote."""
    d = out / "bench" / name.replace(" ", "_")
    if kind == "bench":
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(BENCH / args[0]), *args[1:], "--out-dir", str(d)]
    else:
        cmd = [sys.executable, str(ROOT / "two_stage.py"), *args]
    log = out / "logs" / f"{name.replace(' ', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] $ {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit code {rc} (log: {log}): " + " | ".join(tail))
    if kind == "bench":
        return json.loads((d / args[0].replace(".py", ".json")).read_text())
    files = {"pretrain": "pretrain/done.json", "train": "train/done.json", "eval": "train/eval.json"}
    return {k: json.loads((out / f).read_text()) for k, f in files.items()} | {
        "labels_per_s": _tb_median(out / "train", "train/labels_per_s")}


def _tb_median(run_dir: Path, tag: str) -> float | None:
    """Median of a logged scalar, without its first value (the first interval holds compile time)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags()["scalars"]:
        return None
    vals = sorted(e.value for e in ea.Scalars(tag)[1:]) or [e.value for e in ea.Scalars(tag)]
    return vals[len(vals) // 2]


def rows_of(name: str, res: dict) -> list[tuple[str, str, str]]:
    """(part, figure, value) rows of one part's results."""
    if "variants" in res:  # train_throughput
        r, v = res["run"], res["variants"]
        return [(name, "setting", f"{r['device_name']}, {r['dtype']}, compile={r['compile']}, batch {r['batch']}")] + [
            (name, f"{k} ms/step | labels/s", f"{v[k]['ms_per_step']:.2f} | {v[k]['labels_per_s']:,.0f}")
            for k in ("cad_all", "ad_all")]
    if "per_length" in res:  # rollout_cost
        return [(name, f"ms/env step at h={int(h):,} (cached | recompute | AD)",
                 f"{x['cad_cached_ms']:.2f} | {x['cad_recompute_ms']:.2f} | {x['ad_ms']:.2f}")
                for h, x in res["per_length"].items()]
    p, t, ev = res["pretrain"], res["train"], res["eval"]
    test = ev["splits"]["test"]["summary"]

    def fmt(x) -> str:
        return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)

    return [
        (name, "stage 1: steps | correlation | ablation gap",
         f"{p['global_step']} | {fmt(p.get('correlation'))} | {fmt(p.get('ablation_gap'))}"),
        (name, "stage 1: action acc. depth 1 | latent eff. rank",
         f"{fmt(p.get('acc_action_depth1'))} | {fmt(p.get('latent_effective_rank'))}"),
        (name, "stage 2: steps | labels/s | held-out loss",
         f"{t['global_step']} | {fmt(res['labels_per_s'])} | {fmt(t.get('heldout/loss_action'))}"),
        (name, "held-out return: first ep. | last 5 | optimal",
         f"{fmt(test['first_episode'])} | {fmt(test['last_k_mean'])} | {fmt(test['optimal_mean'])}"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small model, few steps (the CPU dry path; a quick look "
                                                        "on a GPU)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="output folder (replaced)")
    a = p.parse_args(argv)
    import torch
    from common import atomic_write_json, print_table  # common puts the repository on sys.path

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (torch.cuda.is_available() is False); run "
              "`python benchmarks/gpu_check.py --device cpu --quick` for the dry path", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ}
    if a.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate launch without a GPU (gloo)
        env.setdefault("OMP_NUM_THREADS", "1")
    t_all = time.perf_counter()
    rows = [("part", "figure", "value")]
    results, failed = {}, []
    for name, (kind, args) in plan(a.device, a.quick, out).items():
        t0 = time.perf_counter()
        try:
            results[name] = run_part(name, kind, args, out, env)
            rows += rows_of(name, results[name])
        except Exception as e:  # noqa: BLE001 -- one failed part must not hide the others' figures
            failed.append(name)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            rows.append((name, "FAILED", f"{type(e).__name__}: {str(e)[:300]}"))
        dt = results[name]["wall_s"] = time.perf_counter() - t0
        print(f"[{name}] {'FAILED' if name in failed else 'done'} in {dt:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    rows.append(("total", "wall time", f"{total:.0f} s (budget 480 s on one H100)" if a.device == "cuda"
                 and not a.quick else f"{total:.0f} s"))
    print(f"\n=== gpu_check: {dev}, torch {torch.__version__}, {'quick' if a.quick else 'full'} ===")
    print_table(rows[0], rows[1:], left=True)

    atomic_write_json(out / "gpu_check.json", {"device": dev, "torch": torch.__version__, "quick": a.quick,
                                                "argv": sys.argv, "total_s": total, "failed": failed,
                                                "parts": results})
    print(f"wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
