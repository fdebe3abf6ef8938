"""Every generated table in the docs equals what its committed record renders (experiments/docs_tables.py)."""

import json
import shutil

import pytest

from experiments import docs_tables


def test_the_docs_tables_match_their_records():
    assert docs_tables.sync(check=True) == [], "run: python experiments/docs_tables.py"


def test_every_interval_the_prose_quotes_is_in_a_record():
    assert docs_tables.unrecorded_intervals() == []


def test_an_interval_no_record_shows_is_named(tmp_path):
    """A quoted interval counts when a table.md or a generated block shows it, at the quoted precision or
    finer (rounded); a changed figure, or one quoted finer than its record, is named with its file."""
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "table.md").write_text("| a | -0.1323 [-0.1471, -0.1176], better (n=3) |\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text(
        "<!-- generated: memory-probe results/x/summary.json -->\n| +0.089 [+0.045, +0.133] |\n"
        "<!-- end generated -->\n")
    ok = "kept − AD w: −0.132 [−0.147, −0.118], better; at 5,000 steps +0.089 [+0.045, +0.133] of optimal"
    (tmp_path / "README.md").write_text(ok)
    assert docs_tables.unrecorded_intervals(tmp_path) == []
    (tmp_path / "README.md").write_text(ok + "; n = 2: −0.019 [−0.035, −0.003]; finer: +0.0890 [+0.0450, +0.1330]")
    assert docs_tables.unrecorded_intervals(tmp_path) == [
        "README.md: -0.019 [-0.035, -0.003]", "README.md: +0.0890 [+0.0450, +0.1330]"]


def _memory_record() -> dict:
    row = {"env": "darkroom", "window": 20, "memory_probe": None, "goal_readout": {}, "paired": {},
           "stats": {k: {"mean": 0.5, "sd": 0.1, "n": 5} for k in (
               "return_last5_norm", "episodes_to_0.8", "return_after_found", "return_last5_norm_val",
               "tf_loss_test", "labels_per_step", "train_wall_s", "rollout_ms_per_step", "goal_acc_after")}}
    return {"date": "2026-12-06", "machine": "m", "command": "c", "seeds": [0, 1], "complete": True,
            "rows": [{**row, "arm": "ad"}]}


def test_a_hand_edited_table_is_found_and_re_rendered(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(_memory_record()))
    block = "<!-- generated: memory-headline results/x/summary.json -->\n{}<!-- end generated -->\n"
    good = docs_tables.render("memory-headline", "results/x/summary.json", tmp_path)
    assert "0.500 ± 0.100 (n=5)" in good and "(reference)" in good and "Record: [`results/x/summary.json`]" in good
    (tmp_path / "README.md").write_text("# t\n\n" + block.format(good.replace("0.500", "0.900", 1)))
    assert docs_tables.sync(check=True, root=tmp_path) == ["README.md: memory-headline results/x/summary.json"]
    assert "0.900" in (tmp_path / "README.md").read_text()  # --check changes nothing
    assert docs_tables.sync(check=False, root=tmp_path) != []
    assert docs_tables.sync(check=True, root=tmp_path) == []
    assert (tmp_path / "README.md").read_text() == "# t\n\n" + block.format(good)


def test_a_block_naming_a_missing_record_fails_in_one_line(tmp_path):
    (tmp_path / "README.md").write_text("<!-- generated: memory-headline results/nope.json -->\nx\n"
                                        "<!-- end generated -->\n")
    with pytest.raises(SystemExit, match="cannot read the record"):
        docs_tables.sync(check=True, root=tmp_path)
    shutil.rmtree(tmp_path)


def test_every_relative_link_in_the_docs_resolves():
    import re

    from experiments.docs_tables import ROOT

    docs = ["README.md", "results/README.md", *(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
            "benchmarks/README.md"]
    broken = []
    for doc in docs:
        for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / doc).read_text()):
            if not m.group(1).startswith(("http://", "https://")) and not (ROOT / doc).parent.joinpath(m.group(1)).exists():
                broken.append(f"{doc}: {m.group(1)}")
    assert broken == []


def test_the_readme_stays_a_front_door():
    """README.md is what a new user reads first: what it is, the two commands, a map, links (issue 24: <= 200
    lines); measurements and their discussion belong in results/README.md, mechanics in docs/."""
    from experiments.docs_tables import ROOT

    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines: move detail into docs/ or results/README.md"


def test_the_stage1_table_is_rendered_from_its_record(tmp_path):
    """stage1-fields renders the record's stage1_diagnostics (test goals) with report.py's own table; a block
    whose record has none says so rather than showing an empty table."""
    from experiments.stage1 import stage1_table

    cell = {"mean": 0.8, "sd": 0.1, "n": 3}
    row = {"depth": 1, "field": "exact", "encoder": cell, "majority": {**cell, "mean": 0.2},
           "shuffled": {**cell, "mean": 0.3}, "copy_previous": {"mean": None, "sd": None, "n": 0},
           "encoder_minus_best": {"diff": 0.5, "lo": 0.3, "hi": 0.7, "n": 3, "verdict": "better"}}
    rec = {**_memory_record(), "stage1_diagnostics": {"splits": {"test": [row], "val": [{**row, "depth": 2}]}}}
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(rec))
    out = docs_tables.render("stage1-fields", "results/x/summary.json", tmp_path)
    assert out.startswith(stage1_table(rec) + "\n\nRecord: [`results/x/summary.json`]")
    assert ("| 1 | whole transition | 0.800 ± 0.100 (n=3) | 0.200 ± 0.100 (n=3) | 0.300 ± 0.100 (n=3) | – | "
            "+0.500 [+0.300, +0.700], better (n=3) |") in out and "| 2 |" not in out
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(_memory_record()))
    assert docs_tables.render("stage1-fields", "results/x/summary.json", tmp_path).startswith(
        "(no stage-1 diagnostics in this record)\n\nRecord:")


def test_the_key_to_door_table_shows_episode_one_beside_the_last_five(tmp_path):
    """key-to-door: does the arm learn in context (episode 1 vs the last 5) and does it open the door; a record
    written before these figures existed renders them as '–'."""
    (tmp_path / "results" / "x").mkdir(parents=True)
    rec = _memory_record()
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(rec))
    old = docs_tables.render("key-to-door", "results/x/summary.json", tmp_path)
    assert "| `ad` | 20 | – | 0.500 ± 0.100 (n=5) | (reference) | – | – | – |" in old
    rec["rows"][0]["stats"] |= {"return_first_norm": {"mean": 0.16, "sd": 0.02, "n": 3},
                                "door_found_last_k": {"mean": 0.53, "sd": 0.05, "n": 3}}
    diff = {"diff": 0.1, "lo": 0.05, "hi": 0.15, "sd": 0.02, "n": 3, "verdict": "better"}
    rec["rows"] += [{**rec["rows"][0], "arm": "ad_3w", "window": 60},
                    {**rec["rows"][0], "arm": "kept", "paired": {"return_last5_norm": diff},
                     "paired_3w": {"return_last5_norm": diff | {"diff": -0.02, "lo": -0.05, "hi": 0.01,
                                                                "verdict": "no difference detected"}}}]
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(rec))
    new = docs_tables.render("key-to-door", "results/x/summary.json", tmp_path)
    assert "| `ad` | 20 | 0.160 ± 0.020 (n=3) | 0.500 ± 0.100 (n=5) | (reference) | – | – | 0.53 ± 0.05 (n=3) |" in new
    # the paired differences to AD w and to AD 3w, each "(reference)" on its own row
    assert "| `ad_3w` | 60 | 0.160 ± 0.020 (n=3) | 0.500 ± 0.100 (n=5) | – | (reference) |" in new
    assert ("| `kept` | 20 | 0.160 ± 0.020 (n=3) | 0.500 ± 0.100 (n=5) | +0.100 [+0.050, +0.150], better (n=3) | "
            "-0.020 [-0.050, +0.010], no difference detected (n=3) |") in new
    # training minutes name their n where fewer seeds have them than have a return (a resumed older run)
    rec["rows"][0]["stats"]["train_wall_s"] = {"mean": 120.0, "sd": 0.0, "n": 2}
    (tmp_path / "results" / "x" / "summary.json").write_text(json.dumps(rec))
    assert "| 2.0 (n=2) |" in docs_tables.render("key-to-door", "results/x/summary.json", tmp_path)
