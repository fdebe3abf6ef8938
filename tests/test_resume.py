"""Resume and atomicity (rundir.py, loop.py): a run SIGKILLed at any moment and resumed ends bit-identical to an
uninterrupted one (CPU, dropout on); half-written checkpoints are never read; pruning keeps the newest;
files are replaced atomically.

The kill tests use loop's fault injection: CAD_TEST_KILL_AT=<step> SIGKILLs the process right after
optimizer step <step> (after its logging, held-out loss and eval, before its checkpoint);
CAD_TEST_KILL_AT=<step>:save SIGKILLs it in the middle of saving checkpoint <step> (complete temp folder
written, not yet renamed).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import loop
import rundir
from optim import lr_lambda

KILLED = -9  # subprocess returncode of a SIGKILLed child


def _tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert torch.equal(x, b[k]), f"{k} differs (max abs diff {(x - b[k]).abs().max().item()})"


def _ok(r) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _communicate(p) -> None:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"


# -- kill -9 and resume: bit-identical ---------------------------------------------------------------------

@pytest.mark.slow
def test_train_killed_mid_save_resumes_bit_identical(tiny, tmp_path, tb_scalars):
    """Stage 2: SIGKILLed while saving checkpoint 8 (checkpoint 4 complete, steps 5-8 already logged),
    then resumed to the end: model.pt, the checkpoints kept and the TensorBoard curves match a run that
    was never interrupted. Held-out loss and in-context eval run during training (they must not move the
    training RNG), dropout is on."""
    args = tiny.args("train", "max_steps=12", "checkpoint_every=4", "keep_last=2", "log_every=2",
                     "heldout_every=4", "eval_every=6")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = tiny.start("train.py", *args, f"run_dir={ref_dir}")  # overlaps with the killed run below

    r = tiny.cli("train.py", *args, f"run_dir={run_dir}", env={rundir.KILL_ENV: "8:save"})
    assert r.returncode == KILLED, r.stderr[-3000:]
    assert (run_dir / "checkpoints" / ".tmp-step-00000008").is_dir()  # the torn save, under a temp name
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [4]  # ...which nobody reads
    assert not (run_dir / "model.pt").exists() and not (run_dir / "done.json").exists()

    out = _ok(tiny.cli("train.py", *args, f"run_dir={run_dir}", "resume=true"))
    assert "step-00000004 at step 4" in out
    _communicate(ref)

    a = torch.load(ref_dir / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    _tensors_equal(a["model_state_dict"], b["model_state_dict"])
    # keep_last=2: the newest two survive; no temp folders are left behind.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    done = json.loads((run_dir / "done.json").read_text())
    assert done["resumed_from_step"] == 4 and done["global_step"] == 12
    # What the run paid counts the killed process's steps 1-4 too (saved with checkpoint 4), not only the last
    # process's 8 steps; a run never interrupted paid what its one process did.
    ref_c, c = json.loads((ref_dir / "done.json").read_text())["compute"], done["compute"]
    assert ref_c["run_train_wall_s"] == ref_c["train_wall_s"] and c["steps_trained"] == 8
    assert c["run_train_wall_s"] > c["train_wall_s"] > 0
    assert done["tf_loss_test"] == json.loads((ref_dir / "done.json").read_text())["tf_loss_test"]
    # TensorBoard continues at the right step: same steps, same values, no duplicates from the killed runs.
    for tag in ("train/loss", "heldout/loss_val", "heldout/loss_test", "eval/return_val"):
        assert tb_scalars(run_dir)[tag] == tb_scalars(ref_dir)[tag], tag
    assert [s for s, _ in tb_scalars(run_dir)["train/loss"]] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
def test_pretrain_killed_resumes_bit_identical(tiny, tmp_path, tb_scalars):
    """Stage 1: killed after step 5 (checkpoint 3 exists) and resumed: encoder-pretrained-final.pt (and the
    periodic encoder file written after the resume) match an uninterrupted run exactly."""
    args = tiny.args("pretrain", "pretrain_steps=9", "checkpoint_every=3", "save_every=6",
                     "diag_every=3", "log_every=1")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = tiny.start("pretrain_encoder.py", *args, f"run_dir={ref_dir}")

    r = tiny.cli("pretrain_encoder.py", *args, f"run_dir={run_dir}", env={rundir.KILL_ENV: "5"})
    assert r.returncode == KILLED, r.stderr[-3000:]
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [3]
    out = _ok(tiny.cli("pretrain_encoder.py", *args, f"run_dir={run_dir}", "resume=true"))
    assert "step-00000003 at step 3" in out
    _communicate(ref)

    for name in ("encoder-pretrained-final.pt", "encoder-pretrained-6.pt"):
        a = torch.load(ref_dir / name, weights_only=True)
        b = torch.load(run_dir / name, weights_only=True)
        assert a["global_step"] == b["global_step"]
        for part in ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"):
            _tensors_equal(a[part], b[part])
    assert tb_scalars(run_dir)["pretrain/loss"] == tb_scalars(ref_dir)["pretrain/loss"]
    assert [s for s, _ in tb_scalars(run_dir)["pretrain/loss"]] == list(range(1, 10))


def test_periodic_eval_does_not_perturb_training_rng(tiny, tmp_path, one_thread, tb_scalars):
    """Held-out loss and in-context rollouts between steps leave the training trajectory untouched (they
    use model.eval(), inference mode and private generators), so runs with and without them agree."""
    import train

    with_eval = train.main(tiny.compose("train", "max_steps=4", "eval_every=2", "heldout_every=2",
                                        run_dir=tmp_path / "a"))
    without = train.main(tiny.compose("train", "max_steps=4", "eval_every=0", "heldout_every=0",
                                      run_dir=tmp_path / "b"))
    assert with_eval["global_step"] == without["global_step"] == 4
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model_state_dict"]
    _tensors_equal(a, b)
    assert tb_scalars(tmp_path / "a")["eval/return_val"]  # the eval really ran


# -- checkpoint folder mechanics (no training) ---------------------------------------------------------------

@pytest.fixture
def acc_state():
    """A real Accelerator (1 process) with a tiny model/optimizer/scheduler and the loop's step counter."""
    s = loop.LoopSettings(max_steps=10, batch_size=1, lr=1e-3)
    acc = loop.make_accelerator(s)
    model = torch.nn.Linear(3, 2)
    opt = loop.make_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s))
    model, opt, sched = acc.prepare(model, opt, sched)
    state = loop._LoopState()
    acc.register_for_checkpointing(state)
    yield acc, model, state
    acc._custom_objects.clear()


def test_pruning_keeps_newest_and_stale_tmp_is_ignored(acc_state, tmp_path):
    acc, model, state = acc_state
    run_dir = tmp_path / "run"
    cfg = {"seed": 0, "lr": 1e-3}
    rundir.apply_run_dir(rundir.plan_run_dir(run_dir, cfg, loop.LoopSettings(10, 1, 1e-3)), cfg)
    for step in range(1, 6):
        state.step = step
        rundir.save_checkpoint(acc, run_dir, step, keep_last=2, config=cfg)
        kept = [s for s, _ in rundir.checkpoints(run_dir)]
        assert kept[-1] == step and len(kept) == min(step, 2)  # the newest is always there
    # A save killed before its rename leaves .tmp-step-6 (here: complete-looking but never renamed).
    shutil.copytree(run_dir / "checkpoints" / "step-00000005", run_dir / "checkpoints" / ".tmp-step-00000006")
    (run_dir / "checkpoints" / "step-00000007").mkdir()  # and a folder without loop_state.json
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [4, 5]
    plan = rundir.plan_run_dir(run_dir, cfg, loop.LoopSettings(10, 1, 1e-3, resume=True))
    assert plan.resume_ckpt.name == "step-00000005" and plan.start_step == 5
    rundir.apply_run_dir(plan, cfg)  # the main process clears the stale temp folder and the incomplete step-7
    assert not (run_dir / "checkpoints" / ".tmp-step-00000006").exists()
    assert not (run_dir / "checkpoints" / "step-00000007").exists()

    # Resuming from an older checkpoint (resume_from) abandons the newer ones once the next one is saved.
    with torch.no_grad():
        model.weight.fill_(0.5)
    rundir.load_checkpoint(acc, run_dir / "checkpoints" / "step-00000004")
    assert state.step == 4 and not torch.all(model.weight == 0.5)
    state.step = 5
    rundir.save_checkpoint(acc, run_dir, 5, keep_last=3, config=cfg)  # replaces step 5 (swap, then delete)
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [4, 5]
    state.step = 3
    rundir.save_checkpoint(acc, run_dir, 3, keep_last=3, config=cfg)
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003"]


# -- atomic file writes ------------------------------------------------------------------------------------

def test_atomic_write_text_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "done.json"
    rundir.atomic_write_text(p, "old")
    monkeypatch.setattr(rundir.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        rundir.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["done.json"]  # no temp file left behind


def test_atomic_torch_save_keeps_old_file_when_serialisation_fails(tmp_path):
    from atomic_io import atomic_torch_save

    p = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, p)
    with pytest.raises(Exception):  # noqa: B017 -- pickling a lambda fails midway through the write
        atomic_torch_save({"w": torch.zeros(1000), "bad": lambda: 0}, p)
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.ones(3))
    assert [q.name for q in tmp_path.iterdir()] == ["model.pt"]


def test_interrupted_dataset_overwrite_keeps_old_dataset(tiny, tmp_path, monkeypatch):
    import histories

    data = tmp_path / "data"
    shutil.copytree(tiny.data_path, data)
    env = json.loads((data / "meta.json").read_text())["env"]
    h = histories.load_histories(data, env)
    arrays = {k: np.array(getattr(h, k)) for k in histories.ARRAY_SPECS}
    arrays["actions"] = np.zeros_like(arrays["actions"])  # a visibly different "new" dataset
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("killed mid-write")
        return real_save(*a, **kw)

    monkeypatch.setattr(histories.np, "save", failing_save)
    with pytest.raises(OSError):
        histories.save_histories(data, arrays, h.meta, overwrite=True)
    monkeypatch.undo()
    old = histories.load_histories(data, env)
    assert np.array_equal(old.actions, h.actions) and old.actions.any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
