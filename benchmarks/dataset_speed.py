"""Throughput of the stage-1/2 batch samplers on synthetic histories the size of the real dataset.

    .venv/bin/python benchmarks/dataset_speed.py [--n-hist 7300 --n-steps 1000 --batch-size 128 ...]
    .venv/bin/python benchmarks/dataset_speed.py --quick            # smoke run (seconds)
    .venv/bin/python benchmarks/dataset_speed.py --device cuda      # + gathering on the GPU (data_on_device)

Prints samples/s for the vectorised path (stage 2 and stage 1, single process), for the loop-based
collate reference (what the vectorisation buys), through a DataLoader with workers, and gathered on the
device from a device-resident copy (train.py's data_on_device; `--device cuda`, or the CPU itself);
writes the numbers to benchmarks/out/dataset_speed.json (atomically). Timings, not assertions.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import Parser, clock, run_info, save

from dataset import HistoryBatches, batch_loader
from dataset_pretrain import PretrainBatches


class SyntheticHistories:
    """Random uint8 transitions with the attributes the samplers use (Darkroom-like value ranges)."""

    def __init__(self, n_hist: int, n_steps: int, grid_size: int = 9, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.states = rng.integers(0, grid_size, (n_hist, n_steps, 2), dtype=np.uint8)
        self.next_states = rng.integers(0, grid_size, (n_hist, n_steps, 2), dtype=np.uint8)
        self.actions = rng.integers(0, 5, (n_hist, n_steps), dtype=np.uint8)
        self.rewards = rng.integers(0, 2, (n_hist, n_steps), dtype=np.uint8)
        self._n = n_hist

    def split_indices(self, split: str) -> np.ndarray:
        return np.arange(self._n, dtype=np.int64)


def rate(fn, n_batches: int, batch_size: int) -> dict:
    fn(0)                                            # warm-up (page-in, allocator; a DataLoader's worker start-up)
    t0 = time.perf_counter()
    for k in range(1, 1 + n_batches):
        fn(k)
    dt = time.perf_counter() - t0
    return {"batches": n_batches, "seconds": dt, "batches_per_s": n_batches / dt,
            "samples_per_s": n_batches * batch_size / dt}


def main() -> None:
    p = Parser(__doc__, model=False)
    p.add_argument("--n-hist", type=int, default=None, help="default 7300 (the default dataset); quick 200")
    p.add_argument("--n-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seg-len", type=int, default=80)
    p.add_argument("--min-seg-len", type=int, default=20)
    p.add_argument("--max-depth", type=int, default=3)
    p.add_argument("--n-batches", type=int, default=None, help="default 200; quick 5")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2; quick 0 = skip)")
    a, dev = p.parse()
    torch.set_num_threads(1)
    a.n_hist = a.n_hist or (200 if a.quick else 7300)
    a.n_batches = a.n_batches or (5 if a.quick else 200)
    a.workers = a.workers if a.workers is not None else (0 if a.quick else 2)

    hist = SyntheticHistories(a.n_hist, a.n_steps)
    common = {"split": "train", "batch_size": a.batch_size, "seg_len": a.seg_len,
              "min_seg_len": a.min_seg_len, "max_depth": a.max_depth, "seed": 0}
    t0 = time.perf_counter()
    ds = HistoryBatches(hist, **common)               # default weights 1:2:3:4, full windows
    build_s = time.perf_counter() - t0
    pre = PretrainBatches(hist, **common)            # default weights 2:3:4

    results = {
        "construct_seconds": build_s,
        "stage2_vectorised": rate(ds.__getitem__, a.n_batches, a.batch_size),
        "stage1_vectorised": rate(pre.__getitem__, a.n_batches, a.batch_size),
        "stage2_collate_reference": rate(ds.collate_items, max(a.n_batches // 20, 3), a.batch_size),
    }
    if a.workers > 0:  # steady state: the clock starts when the first batch arrives (worker start-up excluded)
        loader = iter(batch_loader(ds, 10_000, 10_000 + a.n_batches + 1, num_workers=a.workers))
        t_startup = time.perf_counter()
        r = rate(lambda k: next(loader), a.n_batches, a.batch_size)
        results["stage2_dataloader"] = r | {"workers": a.workers,
                                            "startup_seconds": time.perf_counter() - t_startup - r["seconds"]}

    # Device-resident gather (data_on_device): same batches, built where the model runs. Synchronised per
    # batch so the figure includes the device work.
    dds = HistoryBatches(hist, **common).to_device(dev)
    results["stage2_on_device"] = rate(lambda k: (dds[k], clock(dev)), a.n_batches, a.batch_size) | {"device": str(dev)}

    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:28s} {r['samples_per_s']:>12,.0f} samples/s  ({r['batches_per_s']:.1f} batches/s "
                  f"of {a.batch_size})")
    print(f"{'construct (pack arrays)':28s} {build_s:12.2f} s")

    save("dataset_speed", a, run_info(dev, "uint8->int64", a.batch_size, None), {
        "settings": vars(a) | {"depth_weights": ds.depth_weights, "win_len": [ds.win_len_min, ds.win_len_max]},
        **results})


if __name__ == "__main__":
    main()
