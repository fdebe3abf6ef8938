"""experiments/runs.py: the table of runs the reports read, the arm declarations it orders and colours them
by, and the provenance a report records."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import runs

ARM_FILES = sorted((REPO / "experiments" / "conf" / "arm").glob("*.yaml"))


@pytest.mark.parametrize("arm_file", ARM_FILES, ids=lambda p: p.stem)
def test_every_arm_file_declares_its_label_order_and_colour(arm_file):
    from matplotlib.colors import is_color_like

    arm = runs.arm_file(arm_file.stem)
    assert isinstance(arm["label"], str) and arm["label"]
    assert isinstance(arm["order"], int) and is_color_like(arm["color"]), arm
    assert runs.arm_color(arm_file.stem) == arm["color"]


def test_an_arm_is_paired_only_with_an_arm_that_exists():
    """`pair_with` (the arm one design choice away, e.g. the kept window's K = 0 twin) names an arm file."""
    pairs = {p.stem: runs.arm_file(p.stem).get("pair_with") for p in ARM_FILES}
    assert pairs["rollout_gated_kept_carry"] == ["rollout_gated_carry", "rollout_gated_kept"]
    named = [o for v in pairs.values() if v for o in ([v] if isinstance(v, str) else v)]
    assert named and all((REPO / "experiments" / "conf" / "arm" / f"{o}.yaml").is_file() for o in named)


def test_arm_order_is_declared_once_per_arm_and_unknown_arms_come_last():
    orders = [runs.arm_file(p.stem)["order"] for p in ARM_FILES]
    assert len(set(orders)) == len(orders), "two arm files declare the same order"
    ranked = sorted(["zz_local", "scratch", "ad", "aa_local"], key=runs.arm_rank)
    assert ranked == ["ad", "scratch", "aa_local", "zz_local"]  # declared by order, then the rest by name
    assert runs.arm_file("aa_local") == {} and runs.arm_color("aa_local") == "tab:brown"


def test_describe_groups_the_table_in_first_seen_order_dropping_missing_values():
    df = pd.DataFrame({"arm": ["b", "a", "b", "b"], "x": [1.0, None, 3.0, math.nan]})
    d = runs.describe(df, "arm", ["x"])
    assert list(d.index) == ["b", "a"]
    assert d.loc["b", "x"] == {"mean": 2.0, "sd": math.sqrt(2.0), "n": 2}
    assert d.loc["a", "x"] == {"mean": None, "sd": None, "n": 0}
    assert runs.describe(df.iloc[:0], "arm", ["x"]).empty  # no runs: no groups, no error


def test_the_report_names_every_sweep_command_that_filled_the_out_dir():
    assert runs.sweep_commands({"commands": ["python a arm=ad", "python a arm=kept"], "command": "python a arm=kept"}
                               ) == "python a arm=ad ; python a arm=kept"
    assert runs.sweep_commands({"command": "python a"}) == "python a"  # sweep.json written before `commands`
    assert runs.sweep_commands({}) == "?"


def test_a_run_record_holds_the_first_episode_and_key_to_door_progress(tmp_path):
    """The memory table's in-context improvement (episode 1 vs the last 5) and, on Dark Key-to-Door, the key /
    door found fractions come from eval.json's test summary; absent fields stay None."""
    import json

    summary = {"first_episode_normalized": 0.16, "last_k_normalized": 0.2, "key_found_last_k": 0.35,
               "door_found_last_k": 0.05}
    (tmp_path / "eval.json").write_text(json.dumps({"splits": {"test": {"summary": summary}}}))
    rec = runs.run_record(tmp_path)
    assert (rec["return_first_norm"], rec["return_last5_norm"]) == (0.16, 0.2)
    assert (rec["key_found_last_k"], rec["door_found_last_k"]) == (0.35, 0.05)
    (tmp_path / "eval.json").write_text(json.dumps({"splits": {"test": {"summary": {"last_k_normalized": 0.5}}}}))
    assert runs.run_record(tmp_path)["key_found_last_k"] is None


def test_a_report_names_its_dataset_relative_to_the_checkout_it_was_run_from(tmp_path):
    # A sweep run from a second worktree (whose .git is a file) names data/<name>, not the worktree's absolute path.
    worktree = tmp_path / "research6"
    (worktree / "data" / "darkroom-quick-seed0").mkdir(parents=True)
    (worktree / ".git").write_text("gitdir: /elsewhere/.git/worktrees/research6\n")
    data = worktree / "data" / "darkroom-quick-seed0"
    assert runs.checkout_path(str(data)) == "data/darkroom-quick-seed0"
    assert runs.dataset_info(str(data))["path"] == "data/darkroom-quick-seed0"
    outside = tmp_path / "elsewhere" / "d"
    assert runs.checkout_path(str(outside)) == str(outside)  # in no checkout: as given
