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

import tempfile
import time
from pathlib import Path
from statistics import median

from common import Parser, print_table, run_info, save

QUICK = ["source.n_stream=2", "source.n_steps=200", "source.n_stream_eval=1"]


def main() -> None:
    p = Parser(__doc__, model=False)
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU threads (num_threads=)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of config/collect.yaml")
    args = p.parse_args()  # not Parser.parse: collect sets its own threads (num_threads=)
    if args.quick:
        args.overrides = QUICK + list(args.overrides)

    import torch

    import collect
    from hydra_cli import compose_config

    results = []
    with tempfile.TemporaryDirectory(prefix="collect_speed-") as tmp:
        for threads in args.threads:
            for rep in range(args.repeats):
                ov = [f"num_threads={threads}", f"device={args.device}", *args.overrides]
                path = Path(tmp) / f"t{threads}-r{rep}"
                cfg = compose_config("collect", [*ov, f"data_path={path}", "progress=false"])
                t0 = time.perf_counter()
                s = collect.main(cfg)
                results.append({"threads": threads, "repeat": rep, "overrides": ov, "wall_s": s["wall_s"],
                                "total_s": time.perf_counter() - t0, "transitions": s["n_transitions"],
                                **{k: s[k] for k in ("transitions_per_s", "train", "test", "n_histories",
                                                     "n_steps")}})
    print()

    def returns(x: dict) -> str:
        return f"{x['first_episode']:.2f} / {x['last5']:.2f} / {x['optimal']:.2f}"

    print_table(["run", "collect s", "total s", "transitions/s", "train first/last5/opt", "test first/last5/opt"],
                [[f"threads={r['threads']} #{r['repeat']}", r["wall_s"], r["total_s"],
                  f"{r['transitions_per_s'] / 1e6:.2f} M/s", returns(r["train"]), returns(r["test"])]
                 for r in results])
    by_threads = {t: median([r["wall_s"] for r in results if r["threads"] == t]) for t in args.threads}
    print(f"\nmedian collection wall time by threads: {by_threads} (budget 120 s)")
    save("collect_speed", args, run_info(args.device, "uint8", None, None), {
        "quick": args.quick, "torch_threads_default": torch.get_num_threads(), "budget_s": 120,
        "median_wall_s_by_threads": by_threads, "runs": results})


if __name__ == "__main__":
    main()
