"""Shared helpers of the model benchmarks (train_throughput.py, rollout_cost.py).

- `train_cfg` / `model_cfgs`: the exact composed Hydra configs (config/train.yaml with model=ad_compressed_dr and
  model=ad_dr), so a benchmark measures what train.py would build, plus optional overrides.
- `synthetic_histories`: valid Darkroom learning histories (uniform random walks of BatchedDarkroom),
  written with `histories.save_histories` and read back with `load_histories`, i.e. through the same
  validation a real dataset goes through. Only shapes and the depth mixture matter for timing.
- timing / output helpers: `sync`, `machine_info`, `run_info`, `write_json` (atomic), `print_table`.
- `add_common_args`: --device, --quick, --out-dir, shared by every benchmark (tests/test_benchmarks.py
  runs each one with --quick --out-dir <tmp>, so a config change that breaks a benchmark fails the suite).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from atomic_io import atomic_write_json

OUT_DIR = Path(__file__).resolve().parent / "out"


def train_cfg(model: str, overrides: list[str] | None = None):
    """config/train.yaml composed with model=<model> (+ Hydra overrides such as 'model.d_model=128'; its
    sampler group follows the model), resolved."""
    from omegaconf import OmegaConf

    from hydra_cli import compose_config

    cfg = compose_config("train", [f"model={model}"] + list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


def model_cfgs(model: str, overrides: list[str] | None = None):
    """(model_cfg, env_cfg) of train_cfg(model, overrides)."""
    cfg = train_cfg(model, overrides)
    return cfg.model, cfg.env


def arch_overrides(args) -> list[str]:
    """Hydra overrides for the architecture flags every benchmark shares (None = keep the yaml value)."""
    keys = ("d_model", "n_head", "n_layer", "enc_n_layer", "n_latent", "seg_len")
    out = [f"model.{k}={getattr(args, k)}" for k in keys if getattr(args, k, None) is not None]
    if getattr(args, "seg_len", None) is not None:  # AD's window follows CompressedAD's raw window
        out.append(f"model.context_len={args.seg_len}")
        out.append(f"sampler.min_seg_len={max(1, args.seg_len // 2)}")  # the yaml's ratio (40 of 80)
    return out


def add_arch_args(p) -> None:
    p.add_argument("--d-model", type=int, default=None, help="default: config/model/ad_compressed_dr.yaml")
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--enc-n-layer", type=int, default=None)
    p.add_argument("--n-latent", type=int, default=None)
    p.add_argument("--seg-len", type=int, default=None, help="also sets AD's context_len, and min_seg_len to half")


def synthetic_histories(env_cfg, n_hist: int, n_steps: int, tmp_dir: str, seed: int = 0,
                        test_frac: float = 0.1):
    """n_hist valid Darkroom histories of n_steps uniform-random-action transitions, goals drawn from
    the train/test goal split; saved to and loaded (memory-mapped, validated) from tmp_dir/hist."""
    from env.darkroom import BatchedDarkroom, goal_splits_from_cfg
    from histories import FORMAT_VERSION, load_histories, save_histories

    g, h = int(env_cfg.grid_size), int(env_cfg.horizon)
    splits = goal_splits_from_cfg(env_cfg)
    train, test = splits["train"], splits["test"]
    n_test = max(1, round(n_hist * test_frac))
    n_train = n_hist - n_test
    rng = np.random.default_rng(seed)
    goals = np.concatenate([np.asarray(train)[rng.integers(0, len(train), n_train)],
                            np.asarray(test)[rng.integers(0, len(test), n_test)]]).astype(np.int64)
    env = BatchedDarkroom(torch.from_numpy(goals), grid_size=g, horizon=h, reward_mode=env_cfg.reward_mode)
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, int(env_cfg.n_actions), (n_steps, n_hist), generator=gen)
    s_all, r_all, ns_all = [], [], []
    s = env.reset()
    for t in range(n_steps):
        ns, r, done = env.step(acts[t])
        s_all.append(s)
        r_all.append(r)
        ns_all.append(ns)
        s = env.reset() if bool(done[0]) else ns
    arrays = {
        "states": torch.stack(s_all, 1).numpy().astype(np.uint8),
        "actions": acts.T.contiguous().numpy().astype(np.uint8),
        "rewards": torch.stack(r_all, 1).numpy().astype(np.uint8),
        "next_states": torch.stack(ns_all, 1).numpy().astype(np.uint8),
        "goals": goals.astype(np.uint8),
    }
    env_plain = {k: env_cfg[k] for k in env_cfg}
    meta = {"format_version": FORMAT_VERSION, "env": env_plain,
            "split": {"train_goals": [list(x) for x in train], "val_goals": [list(x) for x in splits["val"]],
                      "test_goals": [list(x) for x in test]},
            "source": {"name": "benchmark-random-walk"}, "seed": seed, "n_stream": 1, "n_steps": n_steps,
            "histories": {"train": {"start": 0, "stop": n_train}, "val": {"start": n_train, "stop": n_train},
                          "test": {"start": n_train, "stop": n_hist}}}
    path = Path(tmp_dir) / "hist"
    save_histories(path, arrays, meta)
    return load_histories(path, env_plain)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def add_common_args(p, devices=("cpu", "cuda")) -> None:
    p.add_argument("--device", default="cpu", choices=list(devices))
    p.add_argument("--quick", action="store_true", help="smoke run (seconds on a CPU; what the tests run)")
    p.add_argument("--out-dir", default=None, help=f"where <name>.json goes (default {OUT_DIR})")


def run_info(device, dtype: str = "fp32", batch: int | None = None, compile_mode: str | None = None) -> dict:
    """What a result depends on, recorded in every results JSON: device name, torch version, dtype, batch,
    compile mode (None = eager)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "dtype": dtype, "batch": batch,
            "compile": compile_mode, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


def machine_info(device) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    return torch.device(name)


def write_json(name: str, data: dict, out_dir: Path | str | None = None) -> Path:
    """Atomically write benchmarks/out/<name>.json (temp file in the same folder, then os.replace)."""
    out = Path(out_dir or OUT_DIR) / f"{name}.json"
    atomic_write_json(out, data)
    return out


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def fmt(x) -> str:
    """Table cell: floats with 3 significant digits (thousands separated when large)."""
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x)


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def plain(cfg) -> dict:
    """An OmegaConf node as JSON-able Python containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
