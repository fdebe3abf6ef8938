"""Training cost vs where a window sits in its history: ms per CompressedAD training step (forward + backward
+ grad clip + AdamW, as loop.fit takes it) on rollout-schedule batches whose every row is window m, for
several m, with the memory folded exactly from step 0 (sampler.memory=exact) or carried from the previous
batch (sampler.memory=carry, model.compressed_ad.LatentCarry).

    .venv/bin/python benchmarks/train_position_cost.py                  # CPU defaults (a minute or two)
    .venv/bin/python benchmarks/train_position_cost.py --quick          # smoke run
    .venv/bin/python benchmarks/train_position_cost.py --seg-len 40 --keep-recent 20 --positions 1 10 24

exact  the sample holds all m segments before its window: m - bptt_segments folds without a graph, then
       bptt_segments with gradients; its cost grows with m
carry  the sample holds the newest min(m, bptt_segments) segments and starts from the lane's carried memory
       (attached before the timed steps, as in steady state: every memory is carried)

Batches come from synthetic random-walk histories through schedules.window_specs / HistoryBatches (the same
gather as training). The variants run interleaved, round by round; the reported figure is the median over
the timed rounds. Writes benchmarks/out/train_position_cost.json (train_position_cost_kept.json with
--keep-recent > 0). Several --bptt values run interleaved in one run (each its own model, same init), e.g. what
one fold of gradients saves against three at steady state:

    .venv/bin/python benchmarks/train_position_cost.py --seg-len 40 --keep-recent 20 --bptt 1 3 --positions 1 10 \
        --batch-size 64        # -> train_position_cost_kept_bptt1-3.json
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import Parser, clock, history_batches, print_table, run_info, save, train_cfg, train_step

import loop
from dataset import HistoryBatches, gather_batch
from model import build_model
from model.compressed_ad import LatentCarry
from schedules import n_rollout_windows, window_specs

MODES = ("exact", "carry")


def position_batch(ds: HistoryBatches, m: int, n_slots: int, batch_size: int, seed: int) -> dict:
    """batch_size rows, every one window m of a random history, with its newest n_slots segments (all m
    when n_slots >= m), plus the keys sampler.memory=carry adds."""
    hist = np.random.default_rng([seed, m]).choice(ds.pool, size=batch_size)
    depth = np.full(batch_size, min(m, n_slots), dtype=np.int64)
    window = np.full(batch_size, m, dtype=np.int64)
    specs = window_specs(hist, window, depth, max(n_slots, 1), ds.seg_len, ds.keep_recent)
    batch = gather_batch(ds.flat, ds.n_steps, specs, int(depth.max()), ds.fold_len, ds.seg_len)
    batch["hist"], batch["window"] = torch.from_numpy(hist), torch.from_numpy(window)
    return batch


def main() -> None:
    p = Parser(__doc__)
    p.add_argument("--positions", type=int, nargs="+", default=None,
                   help="window indices m (default 1 3 10 25 49; quick 1 8)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default 16; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 5; quick 1)")
    p.add_argument("--bptt", type=int, nargs="+", default=[3],
                   help="model.bptt_segments (folds with gradients per sample); several: compared in one run")
    p.add_argument("--keep-recent", type=int, default=0, help="model.keep_recent")
    p.add_argument("--n-steps", type=int, default=1000, help="transitions per synthetic history")
    a, dev = p.parse()
    a.seg_len = a.seg_len or 20  # the short-window memory setting (w = 20)
    a.positions = a.positions or ([1, 8] if a.quick else [1, 3, 10, 25, 49])
    a.batch_size = a.batch_size or (4 if a.quick else 16)
    a.steps = a.steps or (1 if a.quick else 5)

    cfgs = {bptt: train_cfg("ad_compressed_dr", a, ["sampler.schedule=rollout", f"model.bptt_segments={bptt}",
                                                      f"model.keep_recent={a.keep_recent}"]) for bptt in a.bptt}
    arms, batches = {}, {}  # bptt -> (model, optimizer, carry); (mode, m, bptt) -> batch
    for bptt, ds in history_batches(cfgs, 16, a.n_steps, a.batch_size).items():  # one dataset for every bptt
        n_win = n_rollout_windows(a.n_steps, ds.seg_len, ds.keep_recent)
        if max(a.positions) >= n_win:
            p.error(f"--positions: the histories hold windows 0..{n_win - 1}")
        torch.manual_seed(0)  # the same initial weights for every bptt
        cfg = cfgs[bptt]
        model = build_model(cfg.model, cfg.env).to(dev)
        opt = loop.make_optimizer(model, loop.LoopSettings(max_steps=1, batch_size=a.batch_size, lr=3e-4).validate())
        arms[bptt] = (model, opt, LatentCarry(ds))
        for m in a.positions:
            batches[("exact", m, bptt)] = {k: v.to(dev) for k, v in position_batch(ds, m, m, a.batch_size, 0).items()}
            b = {k: v.to(dev) for k, v in position_batch(ds, m, bptt, a.batch_size, 0).items()}
            batches[("carry", m, bptt)] = arms[bptt][2].attach(model, b)  # carried, as every later batch has it

    keys = [(mode, m, b) for b in a.bptt for m in a.positions for mode in MODES]
    times = {k: [] for k in keys}
    t_start = time.perf_counter()
    for r in range(a.steps + 1):  # round 0 warms up
        for i in range(len(keys)):
            key = keys[(i + r) % len(keys)]  # rotate the order: machine noise hits all alike
            model, opt, carry = arms[key[2]]
            t0 = clock(dev)
            out, _ = train_step(model, opt, batches[key])
            if key[0] == "carry":
                carry.update(batches[key], out)
            dt = clock(dev) - t0
            if r:
                times[key].append(dt * 1e3)
    wall = time.perf_counter() - t_start

    # one bptt: {m: {exact_ms, carry_ms, exact_over_carry}}; several: each figure per bptt (…_bptt<b>_ms)
    tag = (lambda b: "") if len(a.bptt) == 1 else (lambda b: f"_bptt{b}")
    res = {str(m): {f"{mode}{tag(b)}_ms": np.median(times[(mode, m, b)]) for b in a.bptt for mode in MODES}
           for m in a.positions}
    for r in res.values():
        r.update({f"exact_over_carry{tag(b)}": r[f"exact{tag(b)}_ms"] / r[f"carry{tag(b)}_ms"] for b in a.bptt})
    lo, hi = str(min(a.positions)), str(max(a.positions))
    summary = {f"{mode}{tag(b)}_growth_{hi}_over_{lo}": res[hi][f"{mode}{tag(b)}_ms"] / res[lo][f"{mode}{tag(b)}_ms"]
               for b in a.bptt for mode in MODES}
    summary.update({f"carry_bptt{b}_over_bptt{a.bptt[0]}_at_{hi}": res[hi][f"carry{tag(b)}_ms"]
                    / res[hi][f"carry{tag(a.bptt[0])}_ms"] for b in a.bptt[1:]})
    print(f"train_position_cost: device={dev} threads={torch.get_num_threads()} batch={a.batch_size} "
          f"seg_len={ds.seg_len} keep_recent={ds.keep_recent} bptt_segments={a.bptt} d_model={cfg.model.d_model} "
          f"n_layer={cfg.model.n_layer} n_latent={cfg.model.n_latent}; {a.steps} timed rounds; wall {wall:.0f} s")
    print_table(["window m", "bptt", "exact ms/step", "carry ms/step", "exact/carry"],
                [[m, b, r[f"exact{tag(b)}_ms"], r[f"carry{tag(b)}_ms"], r[f"exact_over_carry{tag(b)}"]]
                 for m, r in res.items() for b in a.bptt])
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    name = "train_position_cost_kept" if a.keep_recent else "train_position_cost"
    save(name + ("" if a.bptt == [3] else "_bptt" + "-".join(map(str, a.bptt))), a,
         run_info(dev, "fp32", a.batch_size, None), {
             "model": loop.to_plain(cfg.model), "per_position": res, "summary": summary,
             "times_ms": {f"{mode}_{m}{tag(b)}": t for (mode, m, b), t in times.items()}, "wall_seconds": wall})


if __name__ == "__main__":
    main()
