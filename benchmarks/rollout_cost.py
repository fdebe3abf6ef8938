"""In-context rollout cost: ms per environment step (E envs batched) of the model's act + observe, at
history lengths 100 / 1k / 10k steps.

    .venv/bin/python benchmarks/rollout_cost.py                  # CPU defaults (E=32, a few minutes)
    .venv/bin/python benchmarks/rollout_cost.py --quick          # smoke run: lengths 100/300, E=8
    .venv/bin/python benchmarks/rollout_cost.py --device cuda --n-envs 256
    .venv/bin/python benchmarks/rollout_cost.py --keep-recent 40 --kept-seg-len 80 --seg-len 40
                                                 # + the kept window (model.keep_recent): seg_len 2w, keep w

Methods, stepped in lockstep on the same transitions (rotating order every step, so machine noise hits
all alike):
  cad_cached     CompressedAD, KV cache (init_rollout(use_cache=True)): one decoder token per step, the
                 latent prefix encoded once per compression
  cad_recompute  CompressedAD, use_cache=False: [latents ; whole window] recomputed every step
  ad             AD baseline: its context_len sliding window recomputed every step
  cad_kept       (--keep-recent K > 0 only) CompressedAD with the kept window, KV cache: raw window of
                 --kept-seg-len S2 (default seg_len), each fold takes the oldest S2 - K steps and keeps K,
                 whose K tokens are re-encoded after the new latent prefix. Results then go to
                 rollout_cost_kept.json (the default run's rollout_cost.json keeps its meaning).
  ad_long        (--ad-long-context N > 0 only) AD with a sliding window of N steps, e.g. 3w: the arm the
                 kept window must match in return at <= 1/2 its rollout cost (issue 22's moonshot)
Transitions come from the real BatchedDarkroom (random goals) driven by uniform random actions; only
model.act(...) + model.observe(...) under torch.inference_mode are timed.

Each history length h is timed over the window of steps [h - W/2, h + W/2) (shifted to start at 0 if
needed) with W = --cycles * C, i.e. whole compression cycles: C = seg_len (with cad_kept: the least common
multiple of seg_len and the kept model's fold length S2 - K) consecutive steps contain a whole number of
compressions (inside observe) of every model, so their cost is amortised fairly. The per-step cost of
one (method, h) is the median over the cycles of all --repeats rollouts of the cycle's mean ms/step;
ratios are taken per cycle (methods ran interleaved) and then the median.
Reported: the three costs at each h; flatness cad_cached(h_max) / cad_cached(h_min) (raw, and as the
ratio of cad_cached/ad at the two lengths, which cancels load drift between windows); cad_cached / ad
(goal <= 1.3); cad_recompute / cad_cached (what the cache buys). Writes benchmarks/out/rollout_cost.json.
Outside the timed windows the rollout fast-forwards with observe() only; the cached models switch their
cache on at the compression just before each window, so their state in it is that of a fully cached rollout.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import Parser, clock, print_table, run_info, save, train_cfg

from env.darkroom import BatchedDarkroom, goal_split
from loop import to_plain
from model import build_model

# method -> (model, use_cache of init_rollout; None: AD, which has none). The KV-cached CompressedADs switch
# the cache on before each window.
METHODS = {"cad_cached": ("cad", True), "cad_recompute": ("cad", False), "ad": ("ad", None),
           "cad_kept": ("kept", True), "ad_long": ("ad_long", None)}


def window_start(cfg, t: int) -> int:
    """The first step of the rollout window (between two folds) that holds step t: 0 before the first fold,
    then keep_recent + m * fold_len."""
    if t < cfg.seg_len:
        return 0
    return cfg.keep_recent + ((t - cfg.keep_recent) // cfg.fold_len) * cfg.fold_len


def rollout(models, env_cfg, a, dev, wins, seed: int) -> dict:
    """One lockstep rollout of all methods; returns {method: {h: per-step seconds [span]}}."""
    gen = torch.Generator().manual_seed(seed)
    train, test = goal_split(int(env_cfg.grid_size), float(env_cfg.train_frac), int(env_cfg.split_seed))
    goals_all = train + test
    goals = torch.tensor([goals_all[i] for i in torch.randint(0, len(goals_all), (a.n_envs,), generator=gen)])
    env = BatchedDarkroom.from_cfg(env_cfg, goals, dev)
    model_of = {m: models[k] for m, (k, _) in METHODS.items() if k in models}
    st = {m: model_of[m].init_rollout(a.n_envs, dev, **({} if c is None else {"use_cache": c}))
          for m, (_, c) in METHODS.items() if m in model_of}
    methods = tuple(st)
    times = {m: {h: np.zeros(w[1] - w[0]) for h, w in wins.items()} for m in methods}
    t_end = max(w[1] for w in wins.values())
    # A cached CompressedAD must act on every step from the start of the rollout window (between two folds)
    # that holds a timed window's first step on (its cache holds that window's tokens); before that step
    # it fast-forwards like the others.
    cached_from = {m: [(window_start(model_of[m].cfg, w[0]), w[1]) for w in wins.values()]
                   for m in methods if METHODS[m][1]}
    for m, spans in cached_from.items():
        st[m].use_cache = any(b == 0 for b, _ in spans)
    states = env.reset()
    for t in range(t_end):
        timed = [(h, t - w[0]) for h, w in wins.items() if w[0] <= t < w[1]]
        acts = torch.randint(0, int(env_cfg.n_actions), (a.n_envs,), generator=gen).to(dev)
        next_states, rewards, done = env.step(acts)
        trans = torch.cat([states, acts[:, None], rewards.long()[:, None], next_states], dim=1)
        k = t % len(methods)
        for m in methods[k:] + methods[:k]:
            model, s = model_of[m], st[m]
            cached = m in cached_from
            # The observe of step t compresses when the window is one short of full: switch the cache on
            # for that compression if step t+1 must act; off otherwise. (Set after this step's act.)
            switch = cached and s.n_win == model.cfg.seg_len - 1
            cache_next = cached and any(b <= t + 1 < e for b, e in cached_from[m])
            assert not (timed and cached) or s.use_cache, f"{m} reached a timed step without its cache"
            t0 = clock(dev) if timed else None
            # Untimed steps fast-forward with observe only (act is pure when nothing is cached), except that a
            # cached model acts from its rollout window's start on, filling the cache up to the timed steps.
            if timed or (cached and any(b <= t < e for b, e in cached_from[m])):
                logits = model.act(s, states)
            if switch:
                s.use_cache = cache_next
            model.observe(s, trans)
            if timed:
                dt = clock(dev) - t0
                assert logits.shape == (a.n_envs, int(env_cfg.n_actions))
                for h, i in timed:
                    times[m][h][i] = dt
        states = env.reset() if bool(done[0]) else next_states
    return times


def main() -> None:
    p = Parser(__doc__)  # --quick: lengths 100 300, 1 cycle, E=8, 1 repeat
    p.add_argument("--n-envs", type=int, default=None, help="E envs stepped as a batch (default 32; quick 8)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="history lengths h (default 100 1000 10000; quick 100 300)")
    p.add_argument("--cycles", type=int, default=None, help="whole seg_len cycles per timed window (default 2; "
                                                           "quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="independent rollouts (default 2; quick 1)")
    p.add_argument("--keep-recent", type=int, default=0,
                   help="> 0: also time cad_kept, CompressedAD with model.keep_recent=K (writes rollout_cost_kept.json)")
    p.add_argument("--kept-seg-len", type=int, default=None, help="cad_kept's raw window (default: seg_len)")
    p.add_argument("--ad-long-context", type=int, default=0,
                   help="> 0: also time ad_long, AD with this sliding window (e.g. 3w = 60 beside --seg-len 20)")
    a, dev = p.parse()
    a.n_envs = a.n_envs or (8 if a.quick else 32)
    a.lengths = a.lengths or ([100, 300] if a.quick else [100, 1000, 10_000])
    a.cycles = a.cycles or (1 if a.quick else 2)
    a.repeats = a.repeats or (1 if a.quick else 2)

    specs = {"cad": ("ad_compressed_dr", []), "ad": ("ad_dr", [])}  # model -> (config, overrides)
    if a.keep_recent:  # cad_kept's raw window defaults to seg_len
        s2 = [f"model.seg_len={a.kept_seg_len}"] if a.kept_seg_len else []
        specs["kept"] = ("ad_compressed_dr", [*s2, f"model.keep_recent={a.keep_recent}"])
    if a.ad_long_context:
        specs["ad_long"] = ("ad_dr", [f"model.context_len={a.ad_long_context}"])
    cfgs = {k: train_cfg(name, a, ov) for k, (name, ov) in specs.items()}
    env_cfg = cfgs["cad"].env
    # build_model validates keep_recent < seg_len
    models = {k: build_model(cfg.model, env_cfg).to(dev).eval() for k, cfg in cfgs.items()}
    kept, along = "kept" in models, "ad_long" in models
    methods = [m for m, (k, _) in METHODS.items() if k in models]
    cad_m, ad_m = cfgs["cad"].model, cfgs["ad"].model
    cycle = int(cad_m.seg_len)
    if kept:
        cycle = math.lcm(cycle, models["kept"].cfg.fold_len)
    span = a.cycles * cycle
    # h -> [start, stop) of `span` steps centred on h, shifted right to start at >= 0
    wins = {h: (max(0, h - span // 2), max(0, h - span // 2) + span) for h in sorted(a.lengths)}

    t_start = time.perf_counter()
    with torch.inference_mode():
        runs = [rollout(models, env_cfg, a, dev, wins, seed=r) for r in range(a.repeats)]
    wall = time.perf_counter() - t_start

    # Per-cycle mean ms/step (each cycle = `cycle` consecutive steps = whole compressions of every model).
    def cycles(m, h):
        return np.concatenate([run[m][h].reshape(-1, cycle).mean(1) * 1e3 for run in runs])

    lead = "cad_kept" if kept else "cad_cached"  # the arm measured against ad_long
    res = {}
    for h, win in wins.items():
        c = {m: cycles(m, h) for m in methods}
        res[h] = {"window": list(win), **{f"{m}_ms": np.median(c[m]) for m in methods},
                  "cad_cached_over_ad": np.median(c["cad_cached"] / c["ad"]),
                  "recompute_over_cached": np.median(c["cad_recompute"] / c["cad_cached"]),
                  "cycles_ms": {m: c[m].tolist() for m in methods}}
        if kept:
            res[h]["cad_kept_over_ad"] = np.median(c["cad_kept"] / c["ad"])
            res[h]["cad_kept_over_cad_cached"] = np.median(c["cad_kept"] / c["cad_cached"])
        if along:
            res[h] |= {f"{m}_over_ad_long": np.median(c[m] / c["ad_long"])
                       for m in ("cad_cached", "cad_kept") if m in c}
    h_lo, h_hi = min(wins), max(wins)
    summary = {"flatness_lengths": [h_lo, h_hi],
               **{f"flatness_{m}": np.median(cycles(m, h_hi) / cycles(m, h_lo))
                  for m in methods if m != "ad_long"},
               # The same, measured against AD in the same cycles: cancels load drift between the windows
               # (the two lengths are timed minutes apart on a shared machine).
               **{f"flatness_{m}_vs_ad": res[h_hi][f"{m}_over_ad"] / res[h_lo][f"{m}_over_ad"]
                  for m in ("cad_cached", "cad_kept") if m in methods},
               "cad_cached_over_ad_at_max_h": res[h_hi]["cad_cached_over_ad"],
               "cad_cached_over_ad_worst": max(r["cad_cached_over_ad"] for r in res.values()),
               "goal_cad_cached_over_ad": "<= 1.3"}
    if along:
        summary[f"{lead}_over_ad_long_worst"] = max(r[f"{lead}_over_ad_long"] for r in res.values())
        summary["goal_cad_kept_over_ad_long"] = "<= 0.5"

    print(f"rollout_cost: device={dev} threads={torch.get_num_threads()} E={a.n_envs} repeats={a.repeats} "
          f"window={span} steps ({a.cycles} x {cycle}-step cycles) per length; d_model={cad_m.d_model} "
          f"n_layer={cad_m.n_layer} enc_n_layer={cad_m.enc_n_layer} n_latent={cad_m.n_latent} "
          f"AD context_len={ad_m.context_len}; wall {wall:.0f} s")
    if along:
        print(f"ad_long: AD context_len={a.ad_long_context}")
    if kept:
        k_m = models["kept"].cfg
        print(f"cad_kept: seg_len={k_m.seg_len} keep_recent={k_m.keep_recent} (folds {k_m.fold_len} steps at a time)")
    print_table(["history h", "steps timed", "cad_cached ms", "cad_recompute ms", "ad ms", "cached/ad",
                 "recompute/cached"] + (["cad_kept ms", "kept/ad"] if kept else [])
                 + (["ad_long ms", lead.removeprefix("cad_") + "/ad_long"] if along else []),
                [[f"{h:,}", f"[{r['window'][0]}, {r['window'][1]})", r["cad_cached_ms"], r["cad_recompute_ms"],
                  r["ad_ms"], r["cad_cached_over_ad"], r["recompute_over_cached"]]
                 + ([r["cad_kept_ms"], r["cad_kept_over_ad"]] if kept else [])
                 + ([r["ad_long_ms"], r[f"{lead}_over_ad_long"]] if along else [])
                 for h, r in res.items()])
    worst = summary["cad_cached_over_ad_worst"]
    print(f"flatness cad_cached {h_hi:,}/{h_lo:,} = {summary['flatness_cad_cached']:.2f}x  "
          f"(cad_recompute {summary['flatness_cad_recompute']:.2f}x, ad {summary['flatness_ad']:.2f}x); "
          f"relative to AD (load drift cancelled): {summary['flatness_cad_cached_vs_ad']:.2f}x")
    print(f"cad_cached / ad (worst length) = {worst:.2f}x  (goal <= 1.3x: {'met' if worst <= 1.3 else 'MISSED'})")
    if kept:
        print(f"flatness cad_kept {h_hi:,}/{h_lo:,} = {summary['flatness_cad_kept']:.2f}x; relative to AD: "
              f"{summary['flatness_cad_kept_vs_ad']:.2f}x")
    if along:
        worst = summary[f"{lead}_over_ad_long_worst"]
        print(f"{lead} / ad_long (worst length) = {worst:.2f}x  (goal <= 0.5x: {'met' if worst <= 0.5 else 'MISSED'})")
    save("rollout_cost_kept" if kept else "rollout_cost", a, run_info(dev, "fp32", a.n_envs, None), {
        "model": {k: to_plain(cfg.model) for k, cfg in cfgs.items()},
        "per_length": {str(h): r for h, r in res.items()},
        "summary": summary, "wall_seconds": wall})


if __name__ == "__main__":
    main()
