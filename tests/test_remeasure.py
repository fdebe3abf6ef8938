"""remeasure.py: a finished run's end-of-training measurements recomputed from its model.pt into done.json."""

import json

import pytest

import remeasure


def test_remeasure_reproduces_a_finished_runs_measurements_and_says_how(finished, one_thread):
    run = finished / "runs" / "done"
    before = json.loads((run / "done.json").read_text())
    after = remeasure.remeasure(run, "python remeasure.py x")
    assert after == json.loads((run / "done.json").read_text())
    # same model, same data, same settings: the same numbers
    for k in ("tf_loss_val", "tf_loss_test"):
        assert after[k] == pytest.approx(before[k], rel=1e-6)
    assert after["heldout_test"]["per_history"] == pytest.approx(before["heldout_test"]["per_history"], rel=1e-6)
    assert after["goal_readout"]["test"] == before["goal_readout"]["test"]
    assert after["remeasured"]["command"] == "python remeasure.py x"
    assert set(after["remeasured"]["fields"]) == {"tf_loss_val", "tf_loss_test", "heldout_val", "heldout_test",
                                                  "goal_readout"}
    untouched = set(before) - set(after["remeasured"]["fields"])
    assert untouched and all(after[k] == before[k] for k in untouched)  # compute, steps, ...


def test_remeasure_a_run_without_done_json_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        remeasure.main([str(tmp_path / "nowhere")])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no done.json" in err and err.count("\n") == 1
