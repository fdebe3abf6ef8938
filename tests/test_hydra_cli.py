"""hydra_cli.py, the command-line error layer: a user's mistake is one line, a bug keeps its traceback.

Every project error class derives from errors.UserError, the one class the CLI catches; Ctrl-C and a full
disk during training become one line that says what was kept and how to continue; an interrupt that a
library swallows on its way up is raised again. The one-line checks through the real command line:
tests/test_bad_input.py.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
from conftest import compose

import collect
import evaluate
import hydra_cli
import rundir
from errors import UserError
from histories import DatasetError
from model.config import ConfigError


def test_a_swallowed_ctrl_c_is_raised_again(monkeypatch):
    """The CLI's SIGINT handler raises KeyboardInterrupt again until the CLI has caught one, so an interrupt that
    a library drops on its way up still stops the run."""
    monkeypatch.setattr(hydra_cli, "CTRL_C_RETRY_S", 0.5)
    previous = signal.signal(signal.SIGINT, hydra_cli._on_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):  # the first one, swallowed below as a library might
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            time.sleep(10)
        assert time.perf_counter() - t0 < 5
    finally:
        hydra_cli._stop_retrying()
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_and_disk_errors_become_one_line_in_the_cli(tiny, tmp_path):
    """hydra_cli.as_user_error: where a training run's last checkpoint is, or that there is none yet; the plain
    line for other scripts; a full disk in training; anything else keeps its traceback (None)."""
    cfg = tiny.compose("train", "checkpoint_every=3", run_dir=tmp_path / "r")
    err = hydra_cli.as_user_error(KeyboardInterrupt(), cfg)
    assert isinstance(err, hydra_cli.Interrupted) and err.exit_code == 130
    assert str(err) == ("interrupted before the first checkpoint (checkpoint_every=3), nothing to resume: run the "
                        "same command again to start over")
    ck = tmp_path / "r" / "checkpoints" / "step-00000003"
    ck.mkdir(parents=True)
    for name in ("loop_state.json", "optimizer.bin", "model.safetensors"):  # what rundir counts as complete
        (ck / name).write_text("{}")
    assert str(hydra_cli.as_user_error(KeyboardInterrupt(), cfg)) == (
        f"interrupted; the last checkpoint is {ck} (step 3): continue with the same command plus resume=true")
    ev = compose("evaluate", [f"run_dir={tmp_path / 'r'}"])
    assert str(hydra_cli.as_user_error(KeyboardInterrupt(), ev)).startswith("interrupted; outputs are written")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "x"))
    assert isinstance(hydra_cli.as_user_error(full, cfg), rundir.RunDirError)
    assert hydra_cli.as_user_error(full, ev) is None and hydra_cli.as_user_error(ValueError("bug"), cfg) is None


def test_only_project_errors_become_one_line():
    """A ValueError / FileNotFoundError from a library (or a bug) keeps its traceback."""
    from experiments.report import ReportError
    from experiments.sweep import SweepError
    from loop import NonFiniteLossError, RunDirError
    from model.checkpoint import EncoderCheckpointError
    from two_stage import PipelineError

    errs = hydra_cli.user_errors()
    assert errs == (UserError,)
    assert not any(issubclass(e, UserError) for e in (ValueError, FileNotFoundError, OSError, RuntimeError))
    # every project error class is a UserError (so the CLI catches it without naming it)
    for cls in (DatasetError, EncoderCheckpointError, ConfigError, RunDirError, NonFiniteLossError,
                hydra_cli.UnknownKeyError, hydra_cli.Interrupted, evaluate.EvalError, ReportError, SweepError,
                PipelineError):
        assert issubclass(cls, UserError), cls
    assert issubclass(evaluate.TrainedModelNotFoundError, evaluate.EvalError)
    assert collect.ConfigError is ConfigError


@pytest.mark.parametrize(("typed", "hint"), [("model.schedule=rollout", "did you mean sampler.schedule?"),
                                             ("sampler.n_latent=4", "did you mean model.n_latent?"),
                                             ("env.lr=0.1", "did you mean lr?")])
def test_a_key_in_the_wrong_group_is_refused_naming_where_it_lives(typed, hint):
    """Only the original notes' spellings are aliases (KEY_ALIASES); a key typed in another group than its own
    (e.g. the sampler keys that once sat in the model group) is refused in one line that names where it lives."""
    with pytest.raises(hydra_cli.UnknownKeyError) as e:
        hydra_cli.rewrite_overrides("train", [typed])
    assert hint in str(e.value) and "\n" not in str(e.value)
    assert not any(k.startswith(("model.schedule", "model.min_seg_len")) for k in hydra_cli.KEY_ALIASES)
