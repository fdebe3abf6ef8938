"""What does stage 1 keep? The `stage1_diagnostics` block of a sweep's record, its table.md section and the
docs_tables kind stage1-fields (docs/design.md §5, "What stage 1 keeps")."""

from __future__ import annotations

import itertools
from pathlib import Path

from experiments import runs, stats
from experiments.runs import read_json
from experiments.stats import md_table

STAGE1_SCORES = {  # done.json key of each score (model/losses.py reconstruction_metrics); {f}: a field
    "encoder": "acc_{f}", "majority": "baseline_acc_{f}", "shuffled": "ablation_acc_{f}",
    "copy_previous": "copyprev_acc_{f}"}  # the last for the state only: what the teacher-forced prefix gives
STAGE1_FIELDS = ("state", "action", "reward", "next_state", "exact")  # exact: the whole transition
STAGE1_DEPTHS = (1, 2, 3)


def stage1_diagnostics(jobs: list[dict]) -> dict:
    """{"stage1_diagnostics": ...} as docs/design.md §5 describes it when the sweep has stage-1 runs ({} if
    none); done.json's top level is its `diagnostics_split` (validation goals), its "test" the test goals."""
    _, rds = runs.stage1(jobs)
    if not rds:
        return {}
    diags = {}  # split -> {seed: that split's diagnostics}
    for seed, rd in sorted(rds.items(), key=lambda kv: int(kv[0])):
        done = read_json(Path(rd) / "done.json") or {}
        for split, diag in ((done.get("diagnostics_split"), done), ("test", done.get("test"))):
            if split and diag:
                diags.setdefault(split, {})[seed] = diag
    splits = {}
    for split, by_seed in diags.items():
        for depth, f in itertools.product(STAGE1_DEPTHS, STAGE1_FIELDS):
            ps, best = {}, {}  # {seed: its scores and the name of its best baseline}, {seed: that baseline's score}
            for seed, diag in by_seed.items():
                v = {k: diag[key] for k, t in STAGE1_SCORES.items() if (key := f"{t.format(f=f)}_depth{depth}") in diag}
                if "encoder" in v:
                    best[seed], name = max(((x, k) for k, x in v.items() if k != "encoder"), default=(None, None))
                    ps[seed] = {**v, "best_baseline": name}
            if ps:
                splits.setdefault(split, []).append(
                    {"depth": depth, "field": f, **{k: stats.describe(v.get(k) for v in ps.values())
                                                    for k in STAGE1_SCORES},
                     "encoder_minus_best": stats.paired({s: v["encoder"] for s, v in ps.items()}, best, "higher"),
                     "per_seed": ps})
    have = {s for rows in splits.values() for r in rows for s in r["per_seed"]}
    return {"stage1_diagnostics": {
        "source": "done.json of each stage-1 run (pretrain_encoder.py's diagnostics at its last step)",
        "runs": rds, "missing": [s for s in rds if s not in have], "splits": splits}}


def stage1_markdown(rep: dict) -> list[str]:
    """table.md's stage-1 section: the test goals' table (stage1_table), or which seeds have no diagnostics."""
    d = rep.get("stage1_diagnostics")
    if d is None:
        return []
    miss = f"no diagnostics (done.json) in the stage-1 run of seed {', '.join(d['missing'])}" if d["missing"] else ""
    table = stage1_table(rep)
    if not table:
        return [f"**What stage 1 keeps:** {miss}.", ""]
    return [f"**What stage 1 keeps** (test goals, exact accuracy per field{'; ' + miss if miss else ''}):", "",
            table, "", (
        "Each cell: mean ± sample sd (n = seeds) of the stage-1 runs' final held-out diagnostics (done.json). "
        "Majority: the most common value of the field on the same transitions; shuffled latents: the same "
        "decoder fed another sample's latents; copy previous: the state copied from the previous transition's "
        "next state, which the teacher-forced prefix hands the decoder. Encoder − best baseline: per seed, minus "
        "that seed's best baseline, with the 95 % t-interval over seeds. Validation-goal figures and per-seed "
        "numbers: the record's stage1_diagnostics."), ""]


def stage1_table(rep: dict) -> str:
    """The depth x field table of a record's stage1_diagnostics on the test goals ("" when it has none)."""
    rows = ((rep.get("stage1_diagnostics") or {}).get("splits") or {}).get("test")
    return md_table([{"depth": r["depth"], "field": "whole transition" if r["field"] == "exact" else r["field"].replace("_", " "),
                      **{h: stats.fmt_describe(r[k], ".3f") for k, h in (
                          ("encoder", "encoder"), ("majority", "majority class"), ("shuffled", "shuffled latents"),
                          ("copy_previous", "copy previous (state)"))},
                      "encoder − best baseline [95 % CI], verdict": stats.fmt_paired(r["encoder_minus_best"], ".3f")}
                     for r in rows]) if rows else ""
