"""Shared helpers of the benchmarks: train.py's composed configs, samplers and optimizer step (so a benchmark
measures what training runs; only shapes and the depth mixture of the synthetic histories matter for
timing), the flags every benchmark takes (tests/test_benchmarks.py runs each one with --quick --out-dir <tmp>,
so a config change that breaks a benchmark fails the suite), and the results JSON with what its figures
depend on."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from atomic_io import atomic_write_json

OUT_DIR = Path(__file__).resolve().parent / "out"
ARCH_KEYS = ("d_model", "n_head", "n_layer", "enc_n_layer", "n_latent", "seg_len")
ARCH_HELP = {"d_model": "default: config/model/ad_compressed_dr.yaml",
             "seg_len": "also sets AD's context_len, and min_seg_len to half"}


def train_cfg(model: str, a, overrides: list[str] | None = None):
    """config/train.yaml composed with model=<model>, the architecture flags of `a` (None = keep the yaml
    value) and further Hydra overrides (such as 'model.keep_recent=20'; its sampler group follows the model),
    resolved."""
    from omegaconf import OmegaConf

    from hydra_cli import compose_config

    arch = [f"model.{k}={getattr(a, k)}" for k in ARCH_KEYS if getattr(a, k) is not None]
    if a.seg_len is not None:  # AD's window follows CompressedAD's raw window; the yaml's ratio (40 of 80)
        arch += [f"model.context_len={a.seg_len}", f"sampler.min_seg_len={max(1, a.seg_len // 2)}"]
    cfg = compose_config("train", [f"model={model}", *arch, *(overrides or [])])
    OmegaConf.resolve(cfg)
    return cfg


def history_batches(cfgs: dict, n_hist: int, n_steps: int, batch_size: int, seed: int = 0) -> dict:
    """{key: HistoryBatches exactly as train.py builds them from cfgs[key] (from_cfg)}, all over one set of
    n_hist valid Darkroom histories of n_steps uniform-random-action transitions (goals drawn from the train
    split, a tenth from the test split), saved to and loaded (validated) from a temp folder."""
    from dataset import HistoryBatches
    from env import BatchedDarkroom, splits_from_cfg
    from histories import FORMAT_VERSION, load_histories, save_histories
    from loop import to_plain

    env_cfg = next(iter(cfgs.values())).env
    splits = splits_from_cfg(env_cfg)
    n_test = max(1, round(n_hist * 0.1))
    n_train = n_hist - n_test
    rng = np.random.default_rng(seed)
    goals = np.concatenate([np.asarray(splits[k])[rng.integers(0, len(splits[k]), n)]
                            for k, n in (("train", n_train), ("test", n_test))]).astype(np.int64)
    env = BatchedDarkroom.from_cfg(env_cfg, torch.from_numpy(goals))
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, int(env_cfg.n_actions), (n_steps, n_hist), generator=gen)
    steps = []  # (state, reward, next state) of every step
    s = env.reset()
    for t in range(n_steps):
        ns, r, done = env.step(acts[t])
        steps.append((s, r, ns))
        s = env.reset() if bool(done[0]) else ns
    arrays = dict(zip(("states", "rewards", "next_states"), (torch.stack(x, 1).numpy() for x in zip(*steps))),
                  actions=acts.T.numpy(), goals=goals)
    env_plain = to_plain(env_cfg)
    meta = {"format_version": FORMAT_VERSION, "env": env_plain,
            "split": {f"{k}_goals": [list(x) for x in splits[k]] for k in ("train", "val", "test")},
            "source": {"name": "benchmark-random-walk"}, "seed": seed, "n_stream": 1, "n_steps": n_steps,
            "histories": {"train": {"start": 0, "stop": n_train}, "val": {"start": n_train, "stop": n_train},
                          "test": {"start": n_train, "stop": n_hist}}}
    with tempfile.TemporaryDirectory() as tmp:
        save_histories(Path(tmp) / "hist", {k: v.astype(np.uint8) for k, v in arrays.items()}, meta)
        hist = load_histories(Path(tmp) / "hist", env_plain)
        return {k: HistoryBatches.from_cfg(hist, c, batch_size=batch_size, seed=seed) for k, c in cfgs.items()}


def clock(device) -> float:
    """time.perf_counter() once the device's queued work is done: every timing starts and ends here."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def train_step(model, opt, batch: dict, autocast=None, **loss_kw) -> tuple[dict, dict]:
    """One optimizer step as loop.fit / train.py take it (forward, action loss, backward, grad clip, AdamW),
    without a host sync; returns (model output, action_loss output)."""
    from model.losses import action_loss

    opt.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        out = model(batch)  # CompressedAD also labels its compressed segments (model.label_segments)
        loss = action_loss(out["logits"], batch, seg_logits=out.get("seg_logits"), labels=out, **loss_kw)
    loss["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return out, loss


class Parser(argparse.ArgumentParser):
    """The flags every benchmark takes; with `model`, also --threads and the architecture flags (None = the
    yaml's value)."""

    def __init__(self, doc: str, model: bool = True):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        self.add_argument("--quick", action="store_true", help="smoke run (seconds on a CPU; what the tests run)")
        self.add_argument("--out-dir", default=None, help=f"where <name>.json goes (default {OUT_DIR})")
        if model:
            self.add_argument("--threads", type=int, default=None,
                              help="torch CPU threads (default 1 on cpu: on a shared, oversubscribed CPU extra "
                                   "threads spin against other jobs and make every op ~10x slower; torch's "
                                   "default on cuda)")
            for k in ARCH_KEYS:
                self.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=ARCH_HELP.get(k))

    def parse(self) -> tuple[argparse.Namespace, torch.device]:
        """The flags and the device; 1 torch thread on a CPU unless --threads says otherwise; torch seeded."""
        a = self.parse_args()
        if a.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False; use --device cpu")
        dev = torch.device(a.device)
        threads = getattr(a, "threads", None)
        if threads or dev.type == "cpu":
            torch.set_num_threads(threads or 1)
        torch.manual_seed(0)
        return a, dev


def run_info(device, dtype: str = "fp32", batch: int | None = None, compile_mode: str | None = None) -> dict:
    """What a result depends on, recorded in every results JSON: device name, torch version, dtype, batch,
    compile mode (None = eager)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "dtype": dtype, "batch": batch,
            "compile": compile_mode, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


def save(name: str, a, run: dict, fields: dict) -> None:
    """Atomically write <out-dir>/<name>.json: `run` (run_info), `settings` (the flags), `machine`, then
    `fields` (which may replace settings); says where."""
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "numpy": np.__version__, "threads": torch.get_num_threads(), "device": run["device"]}
    with contextlib.suppress(OSError):  # no load average on this platform
        machine["loadavg_at_start"] = os.getloadavg()
    if run["device"].startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    out = Path(a.out_dir or OUT_DIR) / f"{name}.json"
    atomic_write_json(out, {"run": run, "settings": vars(a), "machine": machine, **fields})
    print(f"wrote {out}")


def print_table(header: list[str], rows: list[list], left: bool = False) -> None:
    """Floats with 3 significant digits (thousands separated when large); first column left-aligned, the others
    right-aligned (left-aligned too with `left`)."""
    def fmt(x) -> str:
        if isinstance(x, float):
            return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
        return str(x)

    cells = [[str(c) for c in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        line = "  ".join(c.ljust(w) if left or not i else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print(line.rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
