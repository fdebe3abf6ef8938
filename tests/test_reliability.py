"""Reliability, round 2 (issue 14): locked run directories and datasets, data fingerprints, paths not part
of a run's identity, every config key validated, loaded weights checked, settings that would be silently
ignored refused or reported, leftovers of killed processes recovered or cleaned, disk/permission failures
and Ctrl-C in one line. The one-line command-line checks live in tests/test_bad_input.py (CLI_CASES).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import compose

import collect
import config_check as cc
import evaluate
import hydra_cli
import loop
import pretrain_encoder
import rundir
import train
from atomic_io import PathLock
from errors import UserError
from histories import DatasetError, load_histories
from model.checkpoint import EncoderCheckpointError, save_encoder_checkpoint
from model.config import ConfigError


def _raises(exc, match, fn, *a):
    with pytest.raises(exc, match=match) as ei:
        fn(*a)
    assert "\n" not in str(ei.value), str(ei.value)
    return str(ei.value)


def _raises_cli(exc, match, fn, cfg) -> str:
    """As _raises, for the line the CLI layer prints: a disk error during training becomes one line in
    hydra_cli.as_user_error, not in the loop."""
    with pytest.raises(BaseException) as ei:
        fn(cfg)
    err = hydra_cli.as_user_error(ei.value, cfg) if not isinstance(ei.value, UserError) else ei.value
    assert isinstance(err, exc) and re.search(match, str(err)) and "\n" not in str(err), (ei.value, err)
    return str(err)


def _collect(path: Path, *overrides: str, capsys=None) -> dict:
    """A tiny dataset at `path` (4 streams x 200 steps per train goal unless overridden)."""
    return collect.main(compose("collect", ["source.n_stream=4", "source.n_steps=200", "source.n_stream_eval=1",
                                            "progress=false", f"data_path={path}", *overrides]))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 2-step stage-2 run (checkpoint at step 2) on a private copy of the tiny dataset."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rel")
    shutil.copytree(tiny.data_path, root / "data")
    train.main(tiny.compose("train", "max_steps=2", data_path=root / "data", run_dir=root / "runs" / "done"))
    return root


# -- 1. one process per run directory / dataset ------------------------------------------------------------

def test_path_lock_names_the_holder_and_cleans_up(tmp_path):
    a, b = PathLock(tmp_path / "run"), PathLock(tmp_path / "." / "run")  # spelled differently: same lock
    assert a.acquire() is None
    assert a.file == tmp_path / ".run.lock" and not (tmp_path / "run").exists()
    assert b.acquire() == f"pid {os.getpid()} on {os.uname().nodename}"  # flock: per open file, even in-process
    a.release()
    assert not a.file.exists()  # a clean release leaves nothing behind
    assert b.acquire() is None
    b.release()


def test_training_refuses_a_locked_run_dir(tiny, tmp_path):
    held = PathLock(tmp_path / "r")
    assert held.acquire() is None
    try:
        _raises(rundir.RunDirError, rf"run_dir .*r is in use by another training \(pid {os.getpid()} on .*wait for "
                rf"it to finish", train.main, tiny.compose("train", run_dir=tmp_path / "r"))
        assert not (tmp_path / "r").exists()
        _raises(DatasetError, rf"is being written by another collect \(pid {os.getpid()} ", _collect, tmp_path / "r")
    finally:
        held.release()


@pytest.mark.slow
def test_second_training_on_a_run_dir_fails_and_ctrl_c_says_how_to_resume(tiny, tmp_path):
    """Two `train.py` on one run_dir: the second fails in one line naming the first's pid, the first is
    untouched. Then Ctrl-C (SIGINT) on the first: one line naming its last checkpoint and resume=true."""
    run = tmp_path / "race"
    # The first run's output goes to a file, not a pipe nobody reads while it trains: under a loaded CI
    # machine its logging could fill a pipe and stall it (a 120 s timeout after Ctrl-C was seen once).
    out, log = (tmp_path / "first.out").open("w"), (tmp_path / "first.err").open("w+")
    first = tiny.start("train.py", *tiny.args("train", "max_steps=100000", "checkpoint_every=3", "keep_last=1",
                                             "lr=0.001", "log_every=1000", run_dir=run), stdout=out, stderr=log)
    try:
        deadline = time.time() + 240
        while not rundir.checkpoints(run):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.2)
        r = tiny.cli("train.py", *tiny.args("train", "lr=0.002", run_dir=run))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"is in use by another training (pid {first.pid} on" in lines[0], lines[0]
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    out.close()
    log.seek(0)
    err = log.read()
    log.close()
    lines = err.strip().splitlines()
    assert first.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    last = rundir.checkpoints(run)[-1][1]
    assert lines[0] == (f"error: interrupted; the last checkpoint is {last} (step {int(last.name[5:])}): "
                        f"continue with the same command plus resume=true")
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001  # the second run wrote nothing
    assert not (tmp_path / ".race.lock").exists()



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


@pytest.mark.slow
def test_two_process_launch_on_a_locked_run_dir_fails_on_every_rank(tiny, tmp_path):
    """accelerate launch (2 gloo ranks): only the main process takes the lock (tests/test_distributed.py
    shows the ranks of one launch share it); against a lock held elsewhere every rank stops, the error is
    printed once, and nothing hangs."""
    from test_distributed import _launch

    held = PathLock(tmp_path / "r")
    assert held.acquire() is None
    try:
        p = _launch(tiny, "train.py", tiny.args("train", run_dir=tmp_path / "r"), nproc=2)
        _, err = p.communicate(timeout=300)
    finally:
        held.release()
    assert p.returncode != 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"is in use by another training (pid {os.getpid()} on" in errors[0], err[-3000:]
    assert not (tmp_path / "r").exists()


# -- 2. data fingerprints ----------------------------------------------------------------------------------

def test_fingerprint_follows_the_settings_not_the_time(tmp_path):
    a = load_histories(_collect(tmp_path / "a")["data_path"], compose("collect", []).env)
    b = load_histories(_collect(tmp_path / "b")["data_path"], compose("collect", []).env)
    c = load_histories(_collect(tmp_path / "c", "source.n_stream=3")["data_path"], compose("collect", []).env)
    assert a.meta["created"] and a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 16


def test_resume_on_recollected_data_is_refused_unless_allowed(tiny, tmp_path, one_thread):
    data, run = tmp_path / "kc", tmp_path / "run"
    _collect(data)
    train.main(tiny.compose("train", "max_steps=2", data_path=data, run_dir=run))
    assert json.loads((run / "config.json").read_text())[rundir.FINGERPRINT_KEY]
    _collect(data, "overwrite=true", "seed=7", "source.n_stream=3")  # other data under the same path
    before = (run / "config.json").read_text()
    msg = _raises(rundir.RunDirError, r"was trained on other data: it records data fingerprint \w+ but data_path=",
                  train.main, tiny.compose("train", "max_steps=3", "resume=true", data_path=data, run_dir=run))
    assert "allow_data_change=true" in msg and "overwrite" not in msg
    assert (run / "config.json").read_text() == before
    s = train.main(tiny.compose("train", "max_steps=3", "resume=true", "allow_data_change=true", data_path=data,
                                run_dir=run))
    assert s["resumed_from_step"] == 2 and s["global_step"] == 3


def test_encoder_pretrained_on_other_data_is_refused_unless_allowed(tiny, tmp_path, one_thread):
    pre = tmp_path / "pre"
    pretrain_encoder.main(tiny.compose("pretrain", "pretrain_steps=2", run_dir=pre))
    ckpt = torch.load(pre / "encoder-pretrained-final.pt", weights_only=True)
    assert ckpt["config"]["data_fingerprint"] == load_histories(tiny.data_path, compose("collect", []).env).fingerprint
    other = tmp_path / "other"
    _collect(other, "source.n_stream=3")
    enc = f"model.pretrained_encoder_path={pre / 'encoder-pretrained-final.pt'}"
    _raises(EncoderCheckpointError, r"was pretrained on other data \(fingerprint \w+\) than this run's data_path.*"
            r"allow_data_change=true", train.main,
            tiny.compose("train", enc, "max_steps=1", data_path=other, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    train.main(tiny.compose("train", enc, "max_steps=1", "allow_data_change=true", data_path=other,
                            run_dir=tmp_path / "r"))
    train.main(tiny.compose("train", enc, "max_steps=1", run_dir=tmp_path / "same"))  # same data: fine


# -- 3. paths are not part of a run's identity ------------------------------------------------------------

def test_run_dir_and_data_path_spelled_or_moved_differently_are_the_same_run(tiny, finished, monkeypatch,
                                                                              one_thread):
    monkeypatch.chdir(finished)
    moved = finished / "moved"
    shutil.copytree(finished / "runs" / "done", moved)
    os.symlink(finished / "data", finished / "data-link")
    for run_dir, data in (("./runs/done", "data"), (str(finished / "runs" / "done"), "./data"),
                          (str(moved), "data-link")):
        plan = rundir.plan_run_dir(Path(run_dir).resolve(), loop.to_plain(tiny.compose(
            "train", "max_steps=4", data_path=data, run_dir=run_dir)), loop.LoopSettings(4, 8, 1e-3, resume=True))
        assert plan.start_step == 2, run_dir
    s = train.main(tiny.compose("train", "max_steps=3", "resume=true", data_path="data-link", run_dir=moved))
    assert s["resumed_from_step"] == 2
    # A real difference still names the key; a path-only one is never a "different run".
    saved = json.loads((moved / "config.json").read_text())
    assert rundir.differing_keys(saved, {**saved, "run_dir": "/x", "data_path": "/y", "run_name": "z"}) == []
    assert rundir.differing_keys(saved, {**saved, "lr": 0.5}) == [f"lr ({saved['lr']!r} -> 0.5)"]
    # A key added after a run was saved: absent equals the default that keeps the old behaviour, and only that
    old = {**saved, "model": {k: v for k, v in saved["model"].items() if k != "keep_recent"},
           "sampler": {k: v for k, v in saved["sampler"].items() if k != "memory"}}
    assert saved["model"]["keep_recent"] == 0 and saved["sampler"]["memory"] == "exact"
    assert rundir.differing_keys(old, saved) == [] and rundir.differing_keys(saved, old) == []
    kept = {**saved, "model": {**saved["model"], "keep_recent": 2}}
    assert rundir.differing_keys(old, kept) == ["model.keep_recent (0 -> 2)"]  # absent reads as its default


# -- 4. every key validated at startup --------------------------------------------------------------------

SCRIPTS = {"train": train.KEY_RULES, "pretrain": pretrain_encoder.KEY_RULES, "collect": collect.KEY_RULES,
           "evaluate": evaluate.KEY_RULES}


@pytest.mark.parametrize("name, groups", [("train", []), ("train", ["model=ad_dr"]), ("pretrain", []),
                                          ("collect", []), ("collect", ["env=darkroom_hard"]), ("evaluate", [])])
def test_every_config_key_has_a_rule_and_the_defaults_pass(name, groups):
    """A new config key must come with its rule in the script's KEY_RULES table (config_check)."""
    from omegaconf import OmegaConf

    cfg = compose(name, groups + (["run_dir=x"] if name == "evaluate" else []))
    plain = OmegaConf.to_container(cfg, resolve=True)
    missing = [k for k in cc.leaf_keys(plain) if k not in SCRIPTS[name]]
    assert not missing, f"config/{name}.yaml keys without a rule in {name}'s KEY_RULES: {missing}"
    cc.check(cfg, SCRIPTS[name])


@pytest.mark.parametrize("script, override, match", [
    ("train", "heldout_every=-1", r"heldout_every=-1 must be an integer >= 0"),
    ("train", "cpu_threads=-1", r"cpu_threads=-1 must be null or an integer in \[1, 1024\]"),
    ("train", "eval.n_episodes=0", r"eval.n_episodes=0 must be an integer >= 1"),
    ("train", "num_workers=-1", r"num_workers=-1 must be an integer in \[0, 256\]"),
    ("train", "keep_last=0", r"keep_last=0 must be an integer >= 1"),
    ("train", "mixed_precision=fp8", r"mixed_precision='fp8' must be one of no, fp16, bf16"),
    ("train", "progress=3", r"progress=3 must be true or false"),
    ("train", "model.n_latent=5000", r"model.n_latent=5000 must be an integer in \[1, 1024\]"),
    ("train", "model.n_latent=30", r"model.n_latent=30 must be <= model.seg_len=20"),
    ("train", "model.dropout=1.5", r"model.dropout=1.5 must be a finite number >= 0 and < 1"),
    ("train", "adam_beta2=1.0", r"adam_beta2=1.0 must be a finite number >= 0 and < 1"),
    ("train", "env.reward_mode=sometimes", r"env.reward_mode='sometimes' must be one of every_step, once"),
    ("pretrain", "diag_batches=0", r"diag_batches=0 must be an integer >= 1"),
    ("pretrain", "save_every=-5", r"save_every=-5 must be an integer >= 1"),
    ("pretrain", "save_every=0", r"save_every=0 must be an integer >= 1"),
    ("pretrain", "pretrain_lr=0", r"pretrain_lr=0 must be a finite number > 0"),
])
def test_bad_value_names_the_key_and_allowed_values(tiny, tmp_path, script, override, match):
    main = train.main if script == "train" else pretrain_encoder.main
    _raises(ConfigError, match, main, tiny.compose(script, override, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # refused before a run dir existed (save_every=0 used to leave one)


@pytest.mark.parametrize("override, match", [
    ("env.horizon=0", r"env.horizon=0 must be an integer in \[1, 100000\]"),
    ("env.grid_size=1", r"env.grid_size=1 must be an integer in \[2, 256\] \(.*a 1x1 grid has nothing to learn"),
    ("source.lr=nan", r"source.lr=nan must be a finite number > 0 and <= 1"),
    ("source.gamma=1", r"source.gamma=1 must be a finite number >= 0 and < 1"),
    ("source.eps_end=2", r"source.eps_end=2 must be a finite number >= 0 and <= 1"),
    ("num_threads=-2", r"num_threads=-2 must be an integer in \[0, 1024\]"),
])
def test_collect_rejects_bad_source_and_env_values(tmp_path, override, match):
    _raises(ConfigError, match, _collect, tmp_path / "ds", override)
    assert not list(tmp_path.iterdir())


def test_evaluate_rejects_bad_values_and_names_a_missing_gpu(tmp_path, finished):
    run = finished / "runs" / "done"
    _raises(evaluate.EvalError, r"last_k=0 must be an integer >= 1", evaluate.main,
            compose("evaluate", [f"run_dir={run}", "last_k=0"]))
    _raises(evaluate.EvalError,
            r"splits=\[.test., .holdout.\] must be a non-empty list of distinct values among test, val, train",
            evaluate.main, compose("evaluate", [f"run_dir={run}", "splits=[test,holdout]"]))
    if not torch.cuda.is_available():  # used to say "not a model.pt ... retrain"
        msg = _raises(evaluate.EvalError, r"device=cuda but this machine has 0 CUDA GPU\(s\): use device=cpu",
                      evaluate.main, compose("evaluate", [f"run_dir={run}", "device=cuda"]))
        assert "retrain" not in msg


# -- 5. loaded weights are checked ------------------------------------------------------------------------

def _encoder_ckpt(tiny, path: Path, mutate) -> Path:
    from model import EncoderPretrainer, ModelConfig

    cfg = tiny.compose("pretrain")
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    torch.manual_seed(0)
    save_encoder_checkpoint(path, EncoderPretrainer(mcfg), 5, {"model": mcfg.to_dict()})
    ck = torch.load(path, weights_only=True)
    mutate(ck)
    torch.save(ck, path)
    return path


def _first_key(ck, part="encoder_state_dict"):
    return next(iter(ck[part]))


@pytest.mark.parametrize("mutate, match", [
    (lambda ck: ck["encoder_state_dict"][_first_key(ck)].fill_(float("nan")),
     r"'encoder_state_dict\.\S+' holds NaN or infinite values"),
    (lambda ck: ck["embed_ln_state_dict"].update(weight=torch.ones(32, dtype=torch.int64)),
     r"'embed_ln_state_dict.weight' has dtype torch.int64, the model needs torch.float32"),
    (lambda ck: ck["embed_ln_state_dict"].update(weight=torch.ones(7)),
     r"'embed_ln_state_dict.weight' has shape \[7\], the model needs \[32\]"),
    (lambda ck: ck.update(encoder_state_dict=list(ck["encoder_state_dict"].values())),
     r"'encoder_state_dict' is a list, not a dict of tensors"),
    (lambda ck: ck.update(config=None), r"has a NoneType as 'config' instead of the dict"),
    (lambda ck: ck.update(config="ad_compressed"), r"has a str as 'config' instead of the dict"),
    (lambda ck: ck.update(config={"model": "x"}), r"has a str as config\['model'\]"),
])
def test_bad_encoder_weights_name_the_first_bad_key(tiny, tmp_path, mutate, match):
    p = _encoder_ckpt(tiny, tmp_path / "enc.pt", mutate)
    _raises(EncoderCheckpointError, match, train.main,
            tiny.compose("train", f"model.pretrained_encoder_path={p}", run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sample", ["true", "false"])
def test_evaluate_refuses_a_nan_model(finished, tmp_path, sample):
    """Sampling from NaN logits used to crash in torch.multinomial; argmax wrote an all-zero eval.json."""
    run = tmp_path / "nan"
    shutil.copytree(finished / "runs" / "done", run)
    ck = torch.load(run / "model.pt", weights_only=True)
    key = min(ck["model_state_dict"])
    ck["model_state_dict"][key].fill_(float("nan"))
    torch.save(ck, run / "model.pt")
    _raises(evaluate.EvalError, rf"'model_state_dict.{key}' holds NaN or infinite values", evaluate.main,
            compose("evaluate", [f"run_dir={run}", f"sample={sample}", "n_episodes=2", "progress=false"]))
    assert not (run / "eval.json").exists()


# -- 6. settings that would be silently ignored ------------------------------------------------------------

def test_fp16_on_cpu_is_refused_and_warmup_beyond_the_run_is_reported(tiny, tmp_path, capsys, one_thread):
    if not torch.cuda.is_available():
        _raises(ConfigError, r"mixed_precision=fp16 needs a CUDA GPU but this run is on the CPU", train.main,
                tiny.compose("train", "mixed_precision=fp16", "cpu=true", run_dir=tmp_path / "fp16"))
        assert not (tmp_path / "fp16").exists()
    train.main(tiny.compose("train", "max_steps=2", "warmup_steps=10", run_dir=tmp_path / "w"))
    assert "warning: warmup_steps=10 > max_steps=2: the learning rate is still warming up" in capsys.readouterr().out


def test_collect_warns_when_the_source_does_not_learn(tmp_path, capsys):
    _collect(tmp_path / "ok", "source.n_stream=1", "source.n_steps=1000", "source.n_stream_eval=0")
    assert "did not learn" not in capsys.readouterr().out
    _collect(tmp_path / "flat", "source.n_stream=1", "source.n_steps=1000", "source.n_stream_eval=0",
             "source.lr=1e-9")
    assert "warning: the source did not learn: its last-5-episode return" in capsys.readouterr().out


@pytest.mark.slow
def test_two_stage_refuses_a_dataset_collected_with_other_settings(tiny, tmp_path, monkeypatch, capsys):
    import two_stage

    monkeypatch.chdir(tmp_path)
    base = ["--dry-run", f"data_path={tiny.data_path}"]
    _raises(DatasetError, r"was collected with other settings than asked \(source.n_stream: 4 -> 3\): "
            r"pass collect:overwrite=true", two_stage.main, [*base, "collect:source.n_stream=3", "source.n_steps=200"])
    two_stage.main([*base, "--pretrain-only"])  # defaults differ from the tiny data: reused, but said
    assert "[collect] note: the dataset at" in capsys.readouterr().out
    for n in ("-1", "0"):
        _raises(two_stage.PipelineError, rf"--num-processes {n} must be an integer >= 1", two_stage.main,
                ["--accelerate", "--num-processes", n, *base])


# -- 7. leftovers of killed processes ----------------------------------------------------------------------

def test_collect_cleans_temp_folders_and_restores_a_hidden_dataset(tiny, tmp_path, capsys):
    data = tmp_path / "ds"
    (tmp_path / ".ds.tmp-123-abc").mkdir()
    (tmp_path / ".ds.tmp-123-abc" / "states.npy").write_bytes(b"partial")
    shutil.copytree(tiny.data_path, tmp_path / ".ds.old-456-def")  # killed between the overwrite's two renames
    before = (tmp_path / ".ds.old-456-def" / "actions.npy").read_bytes()
    _raises(DatasetError, r"no dataset at .*ds, but an interrupted collect left the previous one in .*\.ds\.old-456"
            r"-def: run `python collect.py", load_histories, data, compose("collect", []).env)
    _raises(DatasetError, r"a dataset already exists at", _collect, data)  # restored first, then not replaced
    out = capsys.readouterr().out
    assert "note: restored the previous dataset at" in out and "note: removed .ds.tmp-123-abc" in out
    assert (data / "actions.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_run_dir_leftovers_are_removed_and_reported(tiny, finished, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    (run / ".encoder-pretrained-final.pt.k2j3.tmp").write_bytes(b"torn")
    (run / "checkpoints" / ".tmp-step-00000004").mkdir()
    half = run / "checkpoints" / "step-00000001"  # a prune cut short: only loop_state.json left
    half.mkdir()
    (half / "loop_state.json").write_text('{"step": 1}')
    assert [s for s, _ in rundir.checkpoints(run)] == [2]  # the half-deleted one does not count
    train.main(tiny.compose("train", "max_steps=3", "resume=true", data_path=finished / "data", run_dir=run))
    out = capsys.readouterr().out
    assert "note: removed 3 leftover(s) of an interrupted run" in out and ".encoder-pretrained-final" in out
    assert not list(run.rglob(".*")) and not half.exists()


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """An interrupted prune may leave a .old-step-N folder (cleaned next start), never a half step-N."""
    acc = loop.make_accelerator(loop.LoopSettings(10, 1, 1e-3, cpu=True))
    model = acc.prepare(torch.nn.Linear(2, 2))
    acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))  # save_state writes optimizer.bin
    run = tmp_path / "run"
    for step in (1, 2):
        rundir.save_checkpoint(acc, run, step, keep_last=2)
    deleted = []
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda p, **kw: deleted.append(Path(p).name))
    rundir.save_checkpoint(acc, run, 3, keep_last=2)
    assert deleted[-1] == ".old-step-00000001"  # the pruned step-1 went through a rename
    assert [s for s, _ in rundir.checkpoints(run)] == [2, 3] and rundir.leftovers(run)[0].name == ".old-step-00000001"


# -- disk full, read-only folders, interrupted commands ----------------------------------------------------

def _oserror(code):
    def fail(*a, **kw):
        raise OSError(code, os.strerror(code))
    return fail


def test_disk_full_in_collect_keeps_the_old_dataset(tiny, tmp_path, monkeypatch):
    import histories

    data = tmp_path / "ds"
    shutil.copytree(tiny.data_path, data)
    before = (data / "actions.npy").read_bytes()
    monkeypatch.setattr(histories.np, "save", _oserror(errno.ENOSPC))
    _raises(DatasetError, r"cannot write the dataset .*ds \(no space left on device\); nothing was replaced",
            _collect, data, "overwrite=true")
    assert (data / "actions.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_disk_full_while_checkpointing_keeps_the_earlier_checkpoint(tiny, tmp_path, monkeypatch, one_thread):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    _raises(rundir.RunDirError, r"cannot write checkpoint .*step-00000004 \(no space left on device\); the earlier "
            r"checkpoints are intact.*resume=true", train.main,
            tiny.compose("train", "max_steps=6", "checkpoint_every=2", run_dir=tmp_path / "r"))
    assert [s for s, _ in rundir.checkpoints(tmp_path / "r")] == [2]
    assert not rundir.leftovers(tmp_path / "r")


def test_read_only_run_dir_is_one_line(tiny, finished, tmp_path, monkeypatch, one_thread):
    """As root a chmod does not stop writes, so the read-only file system is simulated where we write."""
    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    monkeypatch.setattr(rundir, "atomic_write_text", _oserror(errno.EROFS))
    _raises_cli(rundir.RunDirError, r"\(read-only file system\); nothing complete was lost", train.main,
                tiny.compose("train", "max_steps=3", "resume=true", data_path=finished / "data", run_dir=run))
    monkeypatch.setattr(rundir, "_remove", _oserror(errno.EACCES))
    _raises_cli(rundir.RunDirError, r"\(permission denied\)", train.main,
                tiny.compose("train", "max_steps=3", "overwrite=true", data_path=finished / "data", run_dir=run))
    import tempfile

    monkeypatch.setattr(tempfile, "TemporaryFile", _oserror(errno.EROFS))
    _raises(evaluate.EvalError, r"cannot write into run_dir .* \(read-only file system\): evaluate writes eval.json",
            evaluate.main, compose("evaluate", [f"run_dir={run}"]))


def test_only_project_errors_become_one_line():
    """A ValueError / FileNotFoundError from a library (or a bug) keeps its traceback."""
    from errors import UserError
    from experiments.report import ReportError
    from experiments.sweep import SweepError
    from histories import DatasetError
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


# -- issue 25: what a driver (sweep, two_stage) reuses, and disk full in torch's save paths ---------------
def test_run_state_reuses_on_content_only(finished, tmp_path):
    """rundir.run_state, shared by experiments/sweep.py and two_stage.py: a finished run is reused only with
    the same config identity, steps, data fingerprint and (stage 2) an encoder no newer than the run."""
    from histories import dataset_fingerprint

    run = tmp_path / "run"
    shutil.copytree(finished / "runs" / "done", run)
    want = json.loads((run / "config.json").read_text())
    fp = dataset_fingerprint(finished / "data")
    assert fp == want[rundir.FINGERPRINT_KEY]
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp) == "reuse"
    assert rundir.run_state(run, want, 2, "stage-2", True, "FIX", fp) == "overwrite"
    _raises(rundir.RunDirError, r"holds a stage-2 run with another config \(lr \(.* -> 0.5\)\): FIX",
            rundir.run_state, run, {**want, "lr": 0.5}, 2, "stage-2", False, "FIX", fp)
    _raises(rundir.RunDirError, r"trained on other data \(data fingerprint [0-9a-f]+ -> ffff: the dataset was "
            r"re-collected or data_path points elsewhere\): FIX", rundir.run_state, run, want, 2, "stage-2", False,
            "FIX", "ffff")
    _raises(rundir.RunDirError, r"finished a stage-2 run at step 2, not the 3 steps asked: FIX",
            rundir.run_state, run, want, 3, "stage-2", False, "FIX", fp)
    enc = tmp_path / "encoder-pretrained-final.pt"
    enc.write_bytes(b"x")
    os.utime(enc, (time.time() + 5, time.time() + 5))  # stage 1 redone after this run started
    _raises(rundir.RunDirError, r"from an older encoder-pretrained-final.pt \(stage 1 was redone after it started\)",
            rundir.run_state, run, want, 2, "stage-2", False, "FIX", fp, enc)
    os.utime(enc, (time.time() - 3600, time.time() - 3600))
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp, enc) == "reuse"
    (run / "done.json").unlink()
    assert rundir.run_state(run, want, 2, "stage-2", False, "FIX", fp) == "resume"  # its step-2 checkpoint


def test_check_dataset_refuses_asked_settings_and_notes_a_dataset_given_by_hand(tmp_path):
    """rundir.check_dataset, the one dataset check of two_stage.py and experiments/sweep.py (issue 24): a setting
    the command line asks for that the dataset lacks is refused; so is any difference at the config's own
    data_path; a dataset given by hand (data_path=...) that differs from the defaults only is a note."""
    meta = {"env": {"name": "darkroom", "horizon": 20}, "source": {"n_stream": 4}, "seed": 0, "data_seed": 0}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    want = {**meta, "source": {"n_stream": 20}}
    msg = _raises(DatasetError, r"the dataset at .* was collected with other settings than asked \(source.n_stream: "
                  r"4 -> 20\): pass collect:overwrite=true", rundir.check_dataset, tmp_path, want, {"source.n_stream"},
                  True)
    assert msg == _raises(DatasetError, "other settings", rundir.check_dataset, tmp_path, want, set(), False)
    assert rundir.check_dataset(tmp_path, want, {"data_path"}, True).startswith(
        f"the dataset at {tmp_path} differs from collect's config (source.n_stream: 4 -> 20); using it as it is")
    assert rundir.check_dataset(tmp_path, meta, {"source.n_stream"}, False) is None
    # a group on the command line (env=...) asks for all its keys; a key the dataset does not record is not compared
    env = {"name": "darkroom", "horizon": 25, "key_added_later": 1}
    _raises(DatasetError, r"\(env.horizon: 20 -> 25\)", rundir.check_dataset, tmp_path, {**meta, "env": env}, {"env"},
            True)
    _raises(DatasetError, r"\(seed: 0 -> 1\)", rundir.check_dataset, tmp_path, {**meta, "seed": 1}, {"seed"}, True)


def test_disk_full_in_torch_save_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save into a full disk raises RuntimeError, which no OSError handler catches (model.pt and
    encoder checkpoints were tracebacks); /dev/full fails every write with ENOSPC, like a full disk."""
    import atomic_io

    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic_io.os, "fdopen", lambda fd, mode: (os.close(fd), real_fdopen(
        os.open("/dev/full", os.O_WRONLY), mode))[1])
    with pytest.raises(OSError) as ei:
        atomic_io.atomic_torch_save({"w": torch.zeros(1000)}, tmp_path / "model.pt")
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())  # no temp file left


def test_checkpoint_save_on_a_full_disk_is_one_line_whatever_the_library_raises(tmp_path):
    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True)
            raise self.error

    # what torch.save and safetensors raise on a full disk (measured on a full tmpfs), not OSError
    from safetensors import SafetensorError

    for err, why in ((RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                      "write failed"),
                     (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                      "no space left on device")):
        acc = Acc()
        acc.error = err
        _raises(rundir.RunDirError, rf"cannot write checkpoint .*step-00000004 \({why}\); the earlier checkpoints "
                r"are intact", rundir.save_checkpoint, acc, tmp_path, 4, 2)
        assert not rundir.leftovers(tmp_path)

    acc.error = RuntimeError("CUDA error: an illegal memory access")  # a bug, not a disk: keeps its traceback
    with pytest.raises(RuntimeError, match="illegal memory"):
        rundir.save_checkpoint(acc, tmp_path, 6, 2)


def test_disk_full_writing_model_pt_is_one_line(tiny, tmp_path, monkeypatch, one_thread):
    """The end of stage 2 on a full disk (torch.save's RuntimeError used to escape as a traceback)."""
    import atomic_io

    real_save, real_fdopen = atomic_io.atomic_torch_save, os.fdopen

    def full_save(obj, path):
        with monkeypatch.context() as m:
            m.setattr(atomic_io.os, "fdopen", lambda fd, mode: (os.close(fd), real_fdopen(
                os.open("/dev/full", os.O_WRONLY), mode))[1])
            return real_save(obj, path)

    monkeypatch.setattr(train, "atomic_torch_save", full_save)
    _raises_cli(rundir.RunDirError, r"cannot access .*model.pt \(no space left on device\); nothing complete was "
                r"lost", train.main, tiny.compose("train", "max_steps=2", run_dir=tmp_path / "r"))
