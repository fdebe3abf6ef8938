"""A finished stage-2 run's end-of-training measurements, recomputed from its model.pt without retraining.

    python remeasure.py results/memory-mid-key_to_door/runs/dark_key_to_door-w50-ad-seed0 [<run_dir> ...]

What train.py measures once its last step is taken (goal_readout.end_of_training) computed again with today's
code, the run's own settings and dataset, and written into its done.json (atomically) with `remeasured`
(docs/design.md §7): for a measurement whose definition changed after runs were trained, so that old and new
runs of one table are measured alike. One process, any device the model fits (CPU here); the weights and
everything else in done.json stay as they were.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import goal_readout
from atomic_io import atomic_write_json
from errors import UserError


def remeasure(run_dir, command: str | None = None) -> dict:
    """The run's done.json with its end-of-training measurements recomputed (and written back)."""
    from evaluate import load_trained_model, run_histories

    run_dir = Path(run_dir).expanduser()
    done_path = run_dir / "done.json"
    if not done_path.is_file():
        raise UserError(f"{run_dir} has no done.json: only a finished run can be remeasured (finish it with the "
                        f"command that started it)")
    done = json.loads(done_path.read_text())
    model, cfg, _ = load_trained_model(run_dir)
    new = goal_readout.end_of_training(model, run_histories(cfg, cfg["env"]), cfg, "cpu")
    new["remeasured"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "command": command or shlex.join(["python", "remeasure.py", str(run_dir)]),
                         "machine": platform.node(), "fields": sorted(new)}
    done = {**done, **new}
    atomic_write_json(done_path, done, indent=2)
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="finished stage-2 run directories (done.json and model.pt)")
    a = p.parse_args(argv)
    command = shlex.join(["python", "remeasure.py", *(argv if argv is not None else sys.argv[1:])])
    for rd in a.run_dirs:
        try:
            d = remeasure(rd, command)
        except UserError as e:
            p.exit(2, f"error: {e}\n")
        gr = d.get("goal_readout") or {}
        print(f"{rd}: " + "; ".join([f"{s} NLL {d[f'tf_loss_{s}']:.4f}" for s in ("test", "val") if f"tf_loss_{s}" in d]
                                    + [f"{t['target']} readout after find {t['test']['after_find']['acc']}"
                                       for t in [gr, gr.get("door")] if t]))


if __name__ == "__main__":
    main()
