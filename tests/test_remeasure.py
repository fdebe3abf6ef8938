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


def test_a_run_whose_dataset_was_recollected_is_refused_in_one_line(finished, one_thread, tmp_path, capsys):
    """remeasure (and evaluate's same-position loss) read the run's data_path: a dataset re-collected there since
    the run trained would have been measured silently, other histories under the run's name."""
    import shutil

    import torch

    import evaluate

    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    ckpt = torch.load(run / "model.pt", weights_only=False)
    ckpt["config"]["data_fingerprint"] = "0" * 16  # what the run trained on: not what data_path holds now
    torch.save(ckpt, run / "model.pt")
    done = (run / "done.json").read_bytes()
    with pytest.raises(SystemExit):
        remeasure.main([str(run)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was re-collected since the run trained on it (data fingerprint 0000000000000000" \
        in err and "pass data_path=<the data it trained on>" in err, err
    assert (run / "done.json").read_bytes() == done  # nothing written
    from conftest import compose

    with pytest.raises(evaluate.EvalError, match="re-collected since the run trained"):
        evaluate.main(compose("evaluate", [f"run_dir={run}", "n_episodes=1", "seeds_per_goal=1", "progress=false"]))
    # a dataset named by hand is the user's choice: no refusal
    evaluate.main(compose("evaluate", [f"run_dir={run}", "n_episodes=1", "seeds_per_goal=1", "progress=false",
                                       f"data_path={finished / 'data'}"]))
