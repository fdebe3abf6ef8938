"""Tables in the docs are rendered from the committed records, never typed (docs/design.md §7).

A block `<!-- generated: <kind> <record> -->` ... `<!-- end generated -->` in one of DOCS is what KINDS[kind]
renders from <record>, a report's JSON under results/ (relative to the repository root).

    python experiments/docs_tables.py            # re-render every block
    python experiments/docs_tables.py --check    # change nothing; exit 1 naming each block that differs

The prose around the blocks quotes paired intervals ("+0.089 [+0.045, +0.133]"); `unrecorded_intervals` lists
each one that no record renders (a results/*/table.md or a generated block), at the precision quoted, so a
sentence that outlived its record is caught like a stale table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write_text
from experiments import stats
from experiments.report import MEMORY_REFERENCE, MEMORY_REFERENCE_3W, memory_paired_table, window_label
from experiments.stage1 import stage1_table
from experiments.stats import md_table

DOCS = ("README.md", "results/README.md", "docs/design.md")
BLOCK = re.compile(r"(<!-- generated: (\S+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)


def _f(d: dict | None, fmt: str) -> str:  # "–" where no run has the figure
    return stats.fmt_describe(d, fmt) if d else "–"


def _vs(r: dict, field: str = "paired", reference: str = MEMORY_REFERENCE) -> str:
    """A row's paired difference on the test return to a reference arm (row[field]: "paired" = AD with the same
    window, "paired_3w" = AD with 3x the window), or "(reference)" on the reference's own row."""
    pr = (r.get(field) or {}).get("return_last5_norm")
    return stats.fmt_paired(pr, ".3f") if pr else "(reference)" if r["arm"] == reference else "–"


def _paid(s: dict) -> dict:
    """What a row's arm paid: training minutes and rollout ms per step (means over seeds). The training minutes
    name their n where fewer seeds have them than have a return (a run resumed before run-wide training time
    was recorded has none: runs.run_train_wall_s)."""
    wall, n = (s.get("train_wall_s") or {}).get("mean"), (s.get("train_wall_s") or {}).get("n", 0)
    short = f" (n={n})" if n < (s.get("return_last5_norm") or {}).get("n", 0) else ""
    return {"training min": "–" if wall is None else f"{wall / 60:.1f}{short}",
            "rollout ms / step": "–" if not s["rollout_ms_per_step"]["n"] else f"{s['rollout_ms_per_step']['mean']:.1f}"}


def memory_headline(rep: dict) -> str:
    """The memory table's headline: one row per arm, its columns from the record's per-arm stats."""
    return md_table([{
        "env": r["env"], "arm": f"`{r['arm']}`", "window": window_label(r),
        "return / optimal, last 5 (test)": _f(s["return_last5_norm"], ".3f"),
        f"− `{MEMORY_REFERENCE}` [95 % CI], verdict": _vs(r),
        "episodes to 0.8 (seeds reaching it)": _f(s["episodes_to_0.8"], ".0f"),
        "return after found": _f(s["return_after_found"], ".2f"),
        "val: return / optimal": _f(s["return_last5_norm_val"], ".3f"), "test NLL": _f(s["tf_loss_test"], ".3f"),
        "labels / step": "–" if not s["labels_per_step"]["n"] else f"{s['labels_per_step']['mean']:.0f}",
        **_paid(s)} for r in rep["rows"] for s in [r["stats"]]])


def key_to_door(rep: dict) -> str:
    """Dark Key-to-Door's memory table: episode 1 beside the last 5 (does an arm learn in context?)."""
    return md_table([{
        "arm": f"`{r['arm']}`", "window": window_label(r),
        "return / optimal, episode 1": _f(s.get("return_first_norm"), ".3f"),
        "last 5": _f(s["return_last5_norm"], ".3f"), f"last 5 − `{MEMORY_REFERENCE}` [95 % CI], verdict": _vs(r),
        f"last 5 − `{MEMORY_REFERENCE_3W}` [95 % CI], verdict": _vs(r, "paired_3w", MEMORY_REFERENCE_3W),
        "key found, last 5": _f(s.get("key_found_last_k"), ".2f"),
        "door opened, last 5": _f(s.get("door_found_last_k"), ".2f"),
        "episodes to 0.8 (seeds reaching it)": _f(s["episodes_to_0.8"], ".0f"), **_paid(s)}
        for r in rep["rows"] for s in [r["stats"]]])


# The readout columns of memory_probe: report.GOAL_READOUT_GAPS's names, headed for the docs
READOUT_HEADS = {"after_minus_constant": "goal readout: after find − constant",
                 "after_minus_before": "after find − before find",
                 "door_after_minus_constant": "door: after opened − constant", "door_after_minus_before": "door: after − before"}


def memory_probe(rep: dict) -> str:
    """What the memory holds, per compressed arm: the NLL probe and the goal-cell readout, with intervals; where a
    row reads Key-to-Door's door too, its door columns, and the first cell is named the key."""
    shown = [r for r in rep["rows"] if r.get("memory_probe") is not None or r.get("goal_readout")]
    door = any(k.startswith("door") for r in shown for k in (r.get("goal_readout") or {}))
    cell = "key" if door else "goal"
    cols = [k for k in READOUT_HEADS if door or not k.startswith("door")]
    return md_table([{
        "env": r["env"], "arm": f"`{r['arm']}`", "window": window_label(r),
        "NLL probe: all − k1 (nats)": stats.fmt_paired(mp["all_minus_k1"], ".4f") if mp else "–",
        **{READOUT_HEADS[k].replace("goal", cell): stats.fmt_paired(g[k], ".3f") if k in g else "–" for k in cols},
        f"{cell} readout acc. after find": _f(r["stats"].get("goal_acc_after"), ".3f")}
        for r in shown for mp, g in [(r.get("memory_probe"), r.get("goal_readout") or {})]])


def budget_paired(rep: dict) -> str:
    """The budget curve as paired differences: per stage-2 budget, each arm minus scratch (same seed)."""
    by = {(r["arm"], r["stage2_steps"]): r for r in rep["rows"]}
    keys = (("heldout_loss_same_position", "test NLL, same positions", "lower", ".3f"),
            ("return_last5", "return, last 5 episodes", "higher", ".2f"))
    rows = []
    for (arm, n), r in by.items():
        ref = by.get(("scratch", n))
        pr = stats.paired_records(r["per_seed"], ref["per_seed"], {k: b for k, _, b, _ in keys}) if ref else {}
        rows.append({"stage-2 steps": n, "arm": f"`{arm}`", "stage-1 steps": r["stage1_steps"]})
        for k, lab, better, fmt in keys:
            rows[-1][f"{lab}: mean ± sd (n)"] = _f(stats.describe(p.get(k) for p in r["per_seed"].values()), fmt)
            rows[-1][f"− scratch [95 % CI], verdict ({better} is better)"] = (
                "(reference)" if arm == "scratch" else "–" if ref is None else stats.fmt_paired(pr[k], fmt))
    return md_table(rows)


KINDS = {"memory-headline": memory_headline, "memory-probe": memory_probe, "budget-paired": budget_paired,
         "key-to-door": key_to_door,
         # each memory arm against AD with 3x the window (the moonshot bar), and against the arm it changes in one
         # design choice (its arm file's `pair_with`): paired differences, same seed
         "memory-vs-3w": lambda rep: memory_paired_table(rep["rows"], "paired_3w"),
         "memory-pairs": lambda rep: memory_paired_table(rep["rows"], "paired_with"),
         "stage1-fields": lambda rep: stage1_table(rep) or "(no stage-1 diagnostics in this record)"}


def render(kind: str, record: str, root: Path = ROOT, doc: str = "README.md") -> str:
    """The block `kind` rendered from `record` (a path relative to the repository root) for document `doc`, with
    its provenance: the record's path (linked relative to the document), date, machine, command, seeds."""
    if kind not in KINDS:
        raise SystemExit(f"error: unknown generated-block kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        rep = json.loads((root / record).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {record}: cannot read the record a generated block names ({e})") from None
    link = os.path.relpath(record, os.path.dirname(doc) or ".")
    return (KINDS[kind](rep).rstrip("\n") + f"\n\nRecord: [`{record}`]({link}) — {rep.get('date', '?')}, "
            f"{rep.get('machine') or 'machine not recorded'}; command: `{rep.get('command', '?')}`; seeds "
            f"{', '.join(map(str, rep.get('seeds', [])))}"
            + ("" if rep.get("complete") else f"; **INCOMPLETE**: {', '.join(rep.get('missing', []))}") + ".\n")


def sync(check: bool, root: Path = ROOT) -> list[str]:
    """Re-render every block of DOCS (check=True: only compare). Returns 'file: kind record' of each block
    that differed."""
    stale = []
    for doc in DOCS:
        p = root / doc
        if not p.is_file():
            continue
        text = p.read_text()

        def sub(m, doc=doc):
            new = render(m.group(2), m.group(3), root, doc)
            if new != m.group(4):
                stale.append(f"{doc}: {m.group(2)} {m.group(3)}")
            return m.group(1) + new + m.group(5)

        out = BLOCK.sub(sub, text)
        if out != text and not check:
            atomic_write_text(p, out)
    return stale


INTERVAL = re.compile(r"([+-]?\d+\.(\d+)) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")


def _intervals(text: str):
    """(as quoted, with ASCII minus signs; decimals of the estimate; (estimate, lo, hi)) of each interval in text."""
    for m in INTERVAL.finditer(text.replace("\u2212", "-")):
        yield m.group(0), len(m.group(2)), tuple(float(m.group(i)) for i in (1, 3, 4))


def unrecorded_intervals(root: Path = ROOT) -> list[str]:
    """'file: interval' for each "d [lo, hi]" in the prose of DOCS that no record shows; a record's figure
    rounded to the prose's decimals counts (the prose may quote -0.1323 [-0.1471, -0.1176] as -0.132 [...])."""
    docs = {doc: (root / doc).read_text() for doc in DOCS if (root / doc).is_file()}
    records = [m.group(4) for t in docs.values() for m in BLOCK.finditer(t)]
    records += [f.read_text() for f in sorted(root.glob("results/**/table.md"))]
    shown = [(d, vals) for text in records for _, d, vals in _intervals(text)]
    return [f"{doc}: {quoted}" for doc, text in docs.items() for quoted, d, vals in _intervals(BLOCK.sub("", text))
            if not any(dr >= d and all(abs(q - v) <= 0.5 * 10 ** -d + 1e-9 for q, v in zip(vals, rv))
                       for dr, rv in shown)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its record "
                   "(a prose interval no record shows fails with or without --check)")
    a = p.parse_args(argv)
    stale = sync(a.check)
    for s in stale:
        print(("stale: " if a.check else "re-rendered: ") + s)
    unrecorded = unrecorded_intervals()
    for s in unrecorded:
        print(f"no record shows the interval the prose quotes: {s}")
    return 1 if (a.check and stale) or unrecorded else 0


if __name__ == "__main__":
    sys.exit(main())
