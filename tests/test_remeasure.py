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


def test_remeasure_cli_prints_one_line_per_run(finished, one_thread, capsys):
    run = finished / "runs" / "done"
    remeasure.main([str(run)])
    out = capsys.readouterr().out.strip().splitlines()
    done = json.loads((run / "done.json").read_text())
    assert len(out) == 1 and f"test NLL {done['tf_loss_test']:.4f}" in out[0] and "goal readout after find" in out[0]
    assert done["remeasured"]["command"] == f"python remeasure.py {run}"


def test_remeasure_a_run_without_done_json_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        remeasure.main([str(tmp_path / "nowhere")])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no done.json" in err and err.count("\n") == 1
