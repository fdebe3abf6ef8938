"""Speed and quality of the default collection (collect.py, config/collect.yaml as shipped).

    .venv/bin/python benchmarks/collect_speed.py                 # default: 73 goals x 100 streams x 1000 steps
    .venv/bin/python benchmarks/collect_speed.py --threads 1 2   # compare torch thread counts
    .venv/bin/python benchmarks/collect_speed.py --repeats 3 --overrides source.n_stream=20
    .venv/bin/python benchmarks/collect_speed.py --quick         # smoke run: 2 streams x 200 steps (seconds)

Runs collect.main on the composed default config into a temp dir (deleted afterwards), --repeats times
per thread setting, and reports: the collection's wall time (source loop only: `wall_s` of the summary)
and the end-to-end time including saving, transitions/s, and the source's mean return in the first
episode vs the last 5 episodes vs optimal, for train and test goals. The budget is <= 120 s on 2 CPU
cores. Writes benchmarks/out/collect_speed.json. The machine's load average is recorded: other jobs on
the same cores slow the loop (multi-threaded torch far more than single-threaded).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import add_common_args, machine_info, median, print_table, run_info, write_json

QUICK = ["source.n_stream=2", "source.n_steps=200", "source.n_stream_eval=1"]


def run_once(overrides: list[str], data_path: Path) -> tuple[dict, float]:
    import collect
    from hydra_cli import compose_config

    cfg = compose_config("collect", [*overrides, f"data_path={data_path}", "progress=false"])
    t0 = time.perf_counter()
    summary = collect.main(cfg)
    return summary, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU threads (num_threads=)")
    p.add_argument("--repeats", type=int, default=1)
    add_common_args(p)
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of config/collect.yaml")
    args = p.parse_args()
    if args.quick:
        args.overrides = QUICK + list(args.overrides)

    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="collect_speed-") as tmp:
        for threads in args.threads:
            for rep in range(args.repeats):
                ov = [f"num_threads={threads}", f"device={args.device}", *args.overrides]
                s, total = run_once(ov, Path(tmp) / f"t{threads}-r{rep}")
                results.append({"threads": threads, "repeat": rep, "overrides": ov, "wall_s": s["wall_s"],
                                "total_s": total, "transitions": s["n_transitions"],
                                "transitions_per_s": s["transitions_per_s"], "train": s["train"],
                                "test": s["test"], "n_histories": s["n_histories"], "n_steps": s["n_steps"]})
    print()
    rows = []
    for r in results:
        rows.append([f"threads={r['threads']} #{r['repeat']}", r["wall_s"], r["total_s"],
                     f"{r['transitions_per_s'] / 1e6:.2f} M/s",
                     f"{r['train']['first_episode']:.2f} / {r['train']['last5']:.2f} / {r['train']['optimal']:.2f}",
                     f"{r['test']['first_episode']:.2f} / {r['test']['last5']:.2f} / {r['test']['optimal']:.2f}"])
    print_table(["run", "collect s", "total s", "transitions/s", "train first/last5/opt",
                 "test first/last5/opt"], rows)
    by_threads = {t: median([r["wall_s"] for r in results if r["threads"] == t]) for t in args.threads}
    out = write_json("collect_speed", {
        "run": run_info(args.device, "uint8", None, None), "quick": args.quick, "machine": machine_info(args.device), "torch_threads_default": torch.get_num_threads(),
        "budget_s": 120, "median_wall_s_by_threads": by_threads, "runs": results}, args.out_dir)
    print(f"\nmedian collection wall time by threads: {by_threads} (budget 120 s); wrote {out}")


if __name__ == "__main__":
    main()
