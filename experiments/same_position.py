"""Compare trained stage-2 runs on identical label positions (teacher_forced.py, docs/design.md §7.1).

    python experiments/same_position.py runs/ad_compressed-darkroom-seed0 runs/ad-darkroom-seed0 \
        [--split test val] [--data data/darkroom-quick-seed0] [--out results/same-position-quick]

Every run is scored on every step of the same held-out histories with its own rollout schedule; the table
gives each run's mean action NLL (± standard error over histories) overall and per history-step bucket,
the paired difference to the FIRST run (per-history differences, so the noise shared by both models on a
history cancels) with its 95 % t-interval and verdict (experiments/stats.py), and CompressedAD's memory probe. Runs of different datasets or splits are never compared:
the dataset is each run's own unless --data names one (then all runs must have been trained for its env).
Writes <out>/summary.json and <out>/table.md when --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import teacher_forced
from atomic_io import atomic_write_json, atomic_write_text
from errors import UserError
from evaluate import load_trained_model, resolve_device, run_histories
from experiments import stats
from experiments.stats import md_table


def score_runs(run_dirs: list[str], splits: list[str], data: str | None, device) -> list[dict]:
    rows = []
    for rd in run_dirs:
        model, cfg, step = load_trained_model(rd, device)
        hist = run_histories(cfg, cfg["env"], data)  # the run's own dataset only if it still holds its data
        rows.append({"run_dir": str(rd), "model": cfg["model"].get("name"), "global_step": step,
                     "data_path": str(hist.path),
                     "reports": teacher_forced.heldout_reports(model, hist, splits, device, probe=True)})
    return rows


def table(rows: list[dict], split: str) -> list[str]:
    base = rows[0]["reports"].get(split)
    if base is None:
        return [f"(no {split} histories)"]
    out = []
    for r in rows:
        rep = r["reports"].get(split)
        if rep is None:
            continue
        if r is rows[0]:
            vs = "—"
        elif r["data_path"] != rows[0]["data_path"]:
            vs = "other dataset: not compared"
        else:
            # per-history differences (same histories, same steps): the paired t-interval and its verdict
            teacher_forced.paired_difference(base, rep)  # refuses reports of different histories
            vs = stats.fmt_paired(stats.paired(dict(enumerate(rep["per_history"])),
                                               dict(enumerate(base["per_history"])), "lower"), ".4f")
        out.append({"run": Path(r["run_dir"]).name, "model": str(r["model"]),
                    "NLL ± se": f"{rep['loss']:.4f} ± {rep['loss_se']:.4f}",
                    **{f"steps {b}": f"{rep['buckets'][b]:.4f}" for b in base["buckets"]}, "acc": f"{rep['acc']:.3f}",
                    f"− {Path(rows[0]['run_dir']).name} [95 % CI over histories], verdict": vs})
    out = [md_table(out)]
    probes = [(r, r["reports"][split]["memory_probe"]) for r in rows
              if split in r["reports"] and "memory_probe" in r["reports"][split]]
    if probes:
        ks = [k for k in probes[0][1] if k.startswith("k") or k == "all"]
        out += ["", f"Memory probe ({split}): NLL with latents rebuilt from the last k segments only", "",
                md_table([{"run": Path(r["run_dir"]).name, **{k: f"{p[k]:.4f}" for k in ks},
                           "all − k1": f"{p['all_minus_k1']:+.4f} ± {p['all_minus_k1_se']:.4f}",
                           "verdict": p["verdict"]} for r, p in probes])]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="stage-2 run directories (model.pt); the first is the reference")
    p.add_argument("--split", nargs="+", default=["test"], choices=["test", "val", "train"])
    p.add_argument("--data", default=None, help="dataset to score on (default: each run's own data_path)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="folder for summary.json and table.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    device = resolve_device(a.device)
    try:
        rows = score_runs(a.run_dirs, a.split, a.data, device)
    except UserError as e:  # a missing or re-collected dataset, a file that is no model.pt: one line
        p.exit(2, f"error: {e}\n")
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    cmd = "python experiments/same_position.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Same-position held-out action loss", "", f"Command: `{cmd}`  ", f"Date: {when}; device: {dev}", ""]
    for split in a.split:
        lines += [f"## {split} histories", "", *table(rows, split), ""]
    text = "\n".join(lines)
    print(text)
    summary = {"command": cmd, "date": when, "device": dev, "runs": rows}
    if a.out:  # atomic_write makes the folder
        atomic_write_json(Path(a.out) / "summary.json", summary, indent=1)
        atomic_write_text(Path(a.out) / "table.md", text + "\n")
    return summary


if __name__ == "__main__":
    main()
