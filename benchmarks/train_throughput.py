"""Stage-2 training throughput: action labels/s of full optimizer steps (forward + backward + grad clip
+ AdamW), on real HistoryBatches over synthetic (random-walk) Darkroom histories.

    .venv/bin/python benchmarks/train_throughput.py                 # CPU defaults (a few minutes)
    .venv/bin/python benchmarks/train_throughput.py --quick         # smoke run (seconds)
    .venv/bin/python benchmarks/train_throughput.py --device cuda   # GPU, batch 128

Three variants, stepped round-robin (rotating order every round) so machine noise hits all alike:
  cad_all   CompressedAD, cross-entropy at every window position (the training loss, docs/design.md §4.2)
  cad_last  CompressedAD, same model and the SAME batches, loss on each window's last position only
            (model.losses.action_loss(last_only=True)): same compute, 1 label per sample
  ad_all    AD baseline (context_len window, depth-0 batches), every-position loss
Model config: config/model/ad_compressed_dr.yaml / ad_dr.yaml (arch flags override both). The batch
includes the real depth mixture (depth_weights, min_seg_len..seg_len segments), so the encoder cost of
the hierarchical compressions is in the CompressedAD numbers.

Reported (medians over rounds; ratios are per-round ratios of interleaved steps, then the median):
  ms/step, samples/s, labels/s per variant;
  labels/s cad_all / cad_last   (goal >= 20x: what the every-position loss buys per step)
  cost per label cad_all / ad_all (goal <= 1.5x: what the compressor costs over AD in training)
Writes benchmarks/out/train_throughput.json. Timings, not assertions.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import (
    add_arch_args,
    arch_overrides,
    machine_info,
    median,
    model_cfgs,
    pick_device,
    plain,
    print_table,
    sync,
    synthetic_histories,
    write_json,
)

from dataset import HistoryBatches
from model import build_model
from model.losses import action_loss


def make_dataset(hist, m, batch_size: int, seed: int) -> HistoryBatches:
    """HistoryBatches exactly as train.py builds them from a model config node."""
    return HistoryBatches(hist, "train", batch_size=batch_size, seg_len=m.seg_len,
                          min_seg_len=m.get("min_seg_len", m.seg_len), max_depth=m.max_compression_depth,
                          depth_weights=m.get("depth_weights"), win_len_min=m.get("win_len_min"),
                          win_len_max=m.get("win_len_max"), seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 64 cpu, 128 cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (each steps every variant once); "
                                                          "default 12 cpu, 50 cuda")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on cpu: on a shared, oversubscribed CPU extra threads "
                        "spin against other jobs and make every op ~10x slower; torch's default on cuda)")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the extra cad_compress variant (encoder share of the CompressedAD step)")
    p.add_argument("--n-hist", type=int, default=64, help="synthetic histories")
    p.add_argument("--n-steps", type=int, default=1000, help="transitions per synthetic history")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 timed rounds")
    add_arch_args(p)
    a = p.parse_args()
    dev = pick_device(a.device)
    if a.threads or dev.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    cuda = dev.type == "cuda"
    a.batch_size = a.batch_size or (8 if a.quick else 128 if cuda else 64)
    a.steps = a.steps or (2 if a.quick else 50 if cuda else 10)
    if a.quick:
        a.warmup = min(a.warmup, 1)
    torch.manual_seed(0)

    cad_m, env = model_cfgs("ad_compressed_dr", arch_overrides(a))
    ad_m, _ = model_cfgs("ad_dr", arch_overrides(a))
    n_batches = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as tmp:
        hist = synthetic_histories(env, a.n_hist, a.n_steps, tmp)
        cad_ds = make_dataset(hist, cad_m, a.batch_size, seed=0)
        ad_ds = make_dataset(hist, ad_m, a.batch_size, seed=0)
        # Batches are sampled before timing (train.py's loader samples them in ~1 ms, see dataset_speed.py).
        cad_batches = [{k: v.to(dev) for k, v in cad_ds[k].items()} for k in range(n_batches)]
        ad_batches = [{k: v.to(dev) for k, v in ad_ds[k].items()} for k in range(n_batches)]

    models = {"cad": build_model(cad_m, env).to(dev), "ad": build_model(ad_m, env).to(dev)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.01) for k, m in models.items()}
    variants = {  # name -> (model key, batches, last_only)
        "cad_all": ("cad", cad_batches, False),
        "cad_last": ("cad", cad_batches, True),
        "ad_all": ("ad", ad_batches, False),
    }
    if not a.no_breakdown:
        # Diagnostic, not a training step: model.compress alone (forward + backward of sum(latents), no
        # optimizer) on the cad batches -> the encoder's share of a cad_all step.
        variants["cad_compress"] = ("cad", cad_batches, None)

    def train_step(name: str, k: int) -> tuple[float, int]:
        key, batches, last_only = variants[name]
        model, opt, batch = models[key], opts[key], batches[k]
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if last_only is None:  # cad_compress diagnostic
            latents, _ = model.compress(batch["seg"], batch["seg_len"], detach_old=model.cfg.detach_old_latents)
            if latents is not None:
                latents.float().sum().backward()
            sync(dev)
            return time.perf_counter() - t0, 0
        fwd = model(batch)  # CompressedAD also labels its compressed segments (model.label_segments)
        out = action_loss(fwd["logits"], batch, last_only=last_only, seg_logits=fwd.get("seg_logits"))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_labels = int(out["n_labels"])  # .item() syncs, like train.py's logging would
        sync(dev)
        return time.perf_counter() - t0, n_labels

    names = list(variants)
    times = {n: [] for n in names}
    labels = {n: [] for n in names}
    for m in models.values():
        m.train()
    for k in range(n_batches):
        order = names[k % len(names):] + names[:k % len(names)]  # rotate: no variant always goes first
        for n in order:
            dt, nl = train_step(n, k)
            if k >= a.warmup:
                times[n].append(dt)
                labels[n].append(nl)

    t = {n: np.asarray(times[n]) for n in names}
    lab = {n: np.asarray(labels[n], dtype=np.float64) for n in names}
    res = {}
    for n in names:
        ms = median(t[n]) * 1e3
        if n == "cad_compress":
            res[n] = {"ms_per_step": ms, "ms_per_step_all": (t[n] * 1e3).tolist()}
            continue
        res[n] = {"ms_per_step": ms, "ms_per_step_all": (t[n] * 1e3).tolist(),
                  "samples_per_s": a.batch_size / (ms / 1e3), "labels_per_step": float(lab[n].mean()),
                  "labels_per_s": float(lab[n].mean()) / (ms / 1e3),
                  "ms_per_1k_labels": ms / lab[n].mean() * 1e3}
    # Per-round ratios (the variants of one round ran back to back), then the median.
    lps = {n: lab[n] / t[n] for n in names if n != "cad_compress"}
    ratio_loss = lps["cad_all"] / lps["cad_last"]
    ratio_cost = lps["ad_all"] / lps["cad_all"]  # cost per label = 1 / labels_per_s
    depth = np.concatenate([b["depth"].cpu().numpy() for b in cad_batches[a.warmup:]])
    slots = [tuple(b["seg_len"].shape) for b in cad_batches[a.warmup:]]
    mix = {"mean_depth": float(depth.mean()),
           "depth_hist": np.bincount(depth, minlength=int(cad_m.max_compression_depth) + 1).tolist(),
           "mean_padded_slots_D": float(np.mean([s[1] for s in slots])),
           # Compress runs the encoder on all B x D slots (unused ones are discarded by torch.where).
           "encoder_rows_used_fraction": float(depth.sum() / sum(s[0] * s[1] for s in slots))}
    summary = {
        "labels_per_s_ratio_all_vs_last": median(ratio_loss), "goal_all_vs_last": ">= 20",
        "cost_per_label_ratio_cad_vs_ad": median(ratio_cost), "goal_cad_vs_ad": "<= 1.5",
        "ratio_all_vs_last_per_round": ratio_loss.tolist(), "ratio_cad_vs_ad_per_round": ratio_cost.tolist(),
    }
    if "cad_compress" in t:
        summary["compress_share_of_cad_step"] = median(t["cad_compress"] / t["cad_all"])

    print(f"train_throughput: device={dev} threads={torch.get_num_threads()} batch={a.batch_size} "
          f"timed rounds={a.steps} (+{a.warmup} warm-up)  d_model={cad_m.d_model} n_layer={cad_m.n_layer} "
          f"enc_n_layer={cad_m.enc_n_layer} n_latent={cad_m.n_latent} seg_len={cad_m.seg_len} "
          f"AD context_len={ad_m.context_len}")
    print(f"depth mixture: weights {list(cad_m.depth_weights)}, mean depth {mix['mean_depth']:.2f}, "
          f"padded slots D {mix['mean_padded_slots_D']:.2f}, encoder rows used "
          f"{mix['encoder_rows_used_fraction']:.0%}")
    print_table(["variant", "ms/step", "samples/s", "labels/step", "labels/s", "ms/1k labels"],
                [[n, r["ms_per_step"], r["samples_per_s"], r["labels_per_step"], r["labels_per_s"],
                  r["ms_per_1k_labels"]] for n, r in res.items() if n != "cad_compress"])
    ok1 = summary["labels_per_s_ratio_all_vs_last"] >= 20
    ok2 = summary["cost_per_label_ratio_cad_vs_ad"] <= 1.5
    print(f"labels/s cad_all / cad_last     = {summary['labels_per_s_ratio_all_vs_last']:.1f}x  "
          f"(goal >= 20x: {'met' if ok1 else 'MISSED'})")
    print(f"cost/label cad_all / ad_all     = {summary['cost_per_label_ratio_cad_vs_ad']:.2f}x  "
          f"(goal <= 1.5x: {'met' if ok2 else 'MISSED'})")
    out = write_json("train_throughput", {
        "settings": vars(a), "model": {"cad": plain(cad_m), "ad": plain(ad_m)}, "machine": machine_info(dev),
        "variants": res, "summary": summary, "depth_mixture": mix})
    if "compress_share_of_cad_step" in summary:
        print(f"breakdown: model.compress fwd+bwd alone = {res['cad_compress']['ms_per_step']:,.0f} ms = "
              f"{summary['compress_share_of_cad_step']:.0%} of a cad_all step (encoder on B x D slots)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
