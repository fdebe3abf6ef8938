"""Stage-2 training throughput: action labels/s of full optimizer steps (forward + backward + grad clip
+ AdamW), on real HistoryBatches over synthetic (random-walk) Darkroom histories.

    .venv/bin/python benchmarks/train_throughput.py                 # CPU defaults (a few minutes)
    .venv/bin/python benchmarks/train_throughput.py --quick         # smoke run (seconds)
    .venv/bin/python benchmarks/train_throughput.py --device cuda   # GPU, batch 128
    .venv/bin/python benchmarks/train_throughput.py --device cuda --dtype bf16 --compile reduce-overhead

Three variants, stepped round-robin (rotating order every round) so machine noise hits all alike:
  cad_all   CompressedAD, cross-entropy at every window position (the training loss, docs/design.md §4.2)
  cad_last  CompressedAD, same model and the SAME batches, loss on each window's last position only
            (model.losses.action_loss(last_only=True)): same compute, 1 label per sample
  ad_all    AD baseline (context_len window, depth-0 batches), every-position loss
Model config: config/model/ad_compressed_dr.yaml / ad_dr.yaml (arch flags override both). Batches and step
are train.py's (the real depth mixture, so the encoder cost of the hierarchical compressions is in the
CompressedAD numbers; fused AdamW on CUDA; --dtype, --compile, --static-shapes as train.py's keys), with no
host sync inside the step; each variant runs --inner steps back to back per round, timed between two device
synchronisations, so on a GPU the figure is throughput, not launch latency.

Reported (medians over rounds; ratios are per-round ratios of interleaved steps, then the median):
  ms/step, samples/s, labels/s per variant;
  labels/s cad_all / cad_last   (goal >= 20x: what the every-position loss buys per step)
  cost per label cad_all / ad_all (goal <= 1.5x: what the compressor costs over AD in training)
Writes benchmarks/out/train_throughput.json. Timings, not assertions.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import Parser, clock, history_batches, print_table, run_info, save, train_cfg, train_step

import loop
from model import build_model
from schema import COMPILE_BACKENDS, COMPILE_MODES

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    p = Parser(__doc__)
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 64 cpu, 128 cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (each steps every variant --inner "
                                                          "times); default 10 cpu, 30 cuda")
    p.add_argument("--inner", type=int, default=None, help="steps per variant per round, timed together "
                                                          "(default 1 cpu, 10 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 3 with --compile)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (train.py's "
                                                                         "mixed_precision=bf16)")
    p.add_argument("--compile", default=None, choices=list(COMPILE_MODES + COMPILE_BACKENDS),
                   help="torch.compile both models with this mode (train.py's compile=...)")
    p.add_argument("--static-shapes", default=None, action=argparse.BooleanOptionalAction,
                   help="model.static_shapes (default: on with --compile, else the yaml's value)")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the extra cad_compress variant (encoder share of the CompressedAD step)")
    p.add_argument("--n-hist", type=int, default=None, help="synthetic histories (default 64; quick 16)")
    p.add_argument("--n-steps", type=int, default=1000, help="transitions per synthetic history")
    p.add_argument("--lr", type=float, default=3e-4)
    a, dev = p.parse()
    cuda = dev.type == "cuda"
    a.batch_size = a.batch_size or (8 if a.quick else 128 if cuda else 64)
    a.steps = a.steps or (2 if a.quick else 30 if cuda else 10)
    a.inner = a.inner or (1 if a.quick or not cuda else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3 if a.compile else 2)
    a.n_hist = a.n_hist or (16 if a.quick else 64)
    if a.static_shapes is None and a.compile:
        a.static_shapes = True

    static = [f"model.static_shapes={str(a.static_shapes).lower()}"] if a.static_shapes is not None else []
    cfgs = {"cad": train_cfg("ad_compressed_dr", a, static), "ad": train_cfg("ad_dr", a, static)}
    cad_m, ad_m, env = cfgs["cad"].model, cfgs["ad"].model, cfgs["cad"].env
    n_rounds = a.warmup + a.steps
    ds = history_batches(cfgs, a.n_hist, a.n_steps, a.batch_size)
    # A pool of distinct batches, cycled through, sampled before timing (train.py's loader samples them in
    # ~1 ms, see dataset_speed.py).
    batches = {k: [{n: v.to(dev) for n, v in d[i].items()} for i in range(min(n_rounds * a.inner, 32))]
               for k, d in ds.items()}

    models = {k: build_model(cfg.model, env).to(dev) for k, cfg in cfgs.items()}
    settings = loop.LoopSettings(max_steps=1, batch_size=a.batch_size, lr=a.lr, compile=a.compile or False).validate()
    opts = {k: loop.make_optimizer(m, settings) for k, m in models.items()}  # fused AdamW on CUDA
    if settings.compile_mode():
        for m in models.values():
            m.compile(**settings.compile_kwargs())
    autocast = torch.autocast(dev.type, dtype=DTYPES[a.dtype], enabled=DTYPES[a.dtype] is not None)
    variants = {"cad_all": ("cad", False), "cad_last": ("cad", True), "ad_all": ("ad", False)}  # -> (model, last_only)
    if not a.no_breakdown:
        # Diagnostic, not a training step: model.compress alone (forward + backward of sum(latents), no
        # optimizer, eager even with --compile) on the cad batches -> the encoder's share of a cad_all step.
        variants["cad_compress"] = ("cad", None)

    def one_step(key: str, batch: dict, last_only) -> torch.Tensor:
        """One step of a variant; returns the label count as a device tensor (no sync)."""
        model, opt = models[key], opts[key]
        if last_only is not None:
            return train_step(model, opt, batch, autocast, last_only=last_only)[1]["n_labels"]
        opt.zero_grad(set_to_none=True)  # cad_compress diagnostic
        with autocast:
            latents, _ = model.compress(batch["seg"], batch["seg_len"], detach_old=model.cfg.detach_old_latents)
        if latents is not None:
            latents.float().sum().backward()
        return torch.zeros((), device=dev)

    names = list(variants)
    times = {n: [] for n in names}
    labels = {n: [] for n in names}
    for k in range(n_rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:  # rotate: no variant always goes first
            key, last_only = variants[name]
            # --inner steps of one variant back to back, timed together
            t0 = clock(dev)
            n = torch.zeros((), device=dev)
            for j in range(a.inner):
                n = n + one_step(key, batches[key][(k * a.inner + j) % len(batches[key])], last_only)
            dt = clock(dev) - t0
            if k >= a.warmup:
                times[name].append(dt / a.inner)
                labels[name].append(float(n) / a.inner)

    t = {n: np.asarray(times[n]) for n in names}
    res, lps = {}, {}  # lps: labels/s of each round
    for n in names:
        ms = np.median(t[n]) * 1e3
        res[n] = {"ms_per_step": ms, "ms_per_step_all": (t[n] * 1e3).tolist()}
        if n != "cad_compress":
            lab = np.asarray(labels[n], dtype=np.float64)
            lps[n] = lab / t[n]
            res[n] |= {"samples_per_s": a.batch_size / (ms / 1e3), "labels_per_step": float(lab.mean()),
                       "labels_per_s": float(lab.mean()) / (ms / 1e3), "ms_per_1k_labels": ms / lab.mean() * 1e3}
    # Per-round ratios (the variants of one round ran back to back), then the median.
    ratio_loss = lps["cad_all"] / lps["cad_last"]
    ratio_cost = lps["ad_all"] / lps["cad_all"]  # cost per label = 1 / labels_per_s
    depth = np.concatenate([b["depth"].cpu().numpy() for b in batches["cad"]])
    slots = [tuple(b["seg_len"].shape) for b in batches["cad"]]
    mix = {"mean_depth": float(depth.mean()),
           "depth_hist": np.bincount(depth, minlength=int(cad_m.max_compression_depth) + 1).tolist(),
           "mean_padded_slots_D": float(np.mean([s[1] for s in slots])),
           # Compress runs the encoder on all B x D slots (unused ones are discarded by torch.where).
           "encoder_rows_used_fraction": float(depth.sum() / sum(s[0] * s[1] for s in slots))}
    summary = {
        "labels_per_s_ratio_all_vs_last": np.median(ratio_loss), "goal_all_vs_last": ">= 20",
        "cost_per_label_ratio_cad_vs_ad": np.median(ratio_cost), "goal_cad_vs_ad": "<= 1.5",
        "ratio_all_vs_last_per_round": ratio_loss.tolist(), "ratio_cad_vs_ad_per_round": ratio_cost.tolist(),
    }
    if "cad_compress" in t:
        summary["compress_share_of_cad_step"] = np.median(t["cad_compress"] / t["cad_all"])

    run = run_info(dev, a.dtype, a.batch_size, a.compile)
    run["static_shapes"] = bool(cad_m.get("static_shapes", False))
    print(f"train_throughput: device={dev} ({run['device_name']}) torch {torch.__version__} dtype={a.dtype} "
          f"compile={a.compile} static_shapes={run['static_shapes']} threads={torch.get_num_threads()} "
          f"batch={a.batch_size} timed rounds={a.steps} x {a.inner} steps (+{a.warmup} warm-up)  d_model={cad_m.d_model} n_layer={cad_m.n_layer} "
          f"enc_n_layer={cad_m.enc_n_layer} n_latent={cad_m.n_latent} seg_len={cad_m.seg_len} "
          f"AD context_len={ad_m.context_len}")
    print(f"depth mixture: weights {ds['cad'].depth_weights}, mean depth {mix['mean_depth']:.2f}, "
          f"padded slots D {mix['mean_padded_slots_D']:.2f}, encoder rows used "
          f"{mix['encoder_rows_used_fraction']:.0%}")
    print_table(["variant", "ms/step", "samples/s", "labels/step", "labels/s", "ms/1k labels"],
                [[n, r["ms_per_step"], r["samples_per_s"], r["labels_per_step"], r["labels_per_s"],
                  r["ms_per_1k_labels"]] for n, r in res.items() if n != "cad_compress"])
    r1, r2 = summary["labels_per_s_ratio_all_vs_last"], summary["cost_per_label_ratio_cad_vs_ad"]
    print(f"labels/s cad_all / cad_last     = {r1:.1f}x  (goal >= 20x: {'met' if r1 >= 20 else 'MISSED'})")
    print(f"cost/label cad_all / ad_all     = {r2:.2f}x  (goal <= 1.5x: {'met' if r2 <= 1.5 else 'MISSED'})")
    if "compress_share_of_cad_step" in summary:
        print(f"breakdown: model.compress fwd+bwd alone = {res['cad_compress']['ms_per_step']:,.0f} ms = "
              f"{summary['compress_share_of_cad_step']:.0%} of a cad_all step (encoder on B x D slots)")
    save("train_throughput", a, run, {"model": {k: loop.to_plain(cfg.model) for k, cfg in cfgs.items()},
                                      "variants": res, "summary": summary, "depth_mixture": mix})

if __name__ == "__main__":
    main()
