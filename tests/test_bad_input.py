"""Bad input: every user mistake gives ONE line naming the problem and the fix, and nothing already on
disk is overwritten.

A representative subset goes through the real command line (`python train.py ...` must print exactly one
stderr line starting with `error:` and exit 2, no traceback); those subprocesses run two at a time from
one module fixture. The rest call main(cfg) in-process and check the exception type and message.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import loop
import pretrain_encoder
import rundir
import train
from histories import DatasetError
from model.checkpoint import EncoderCheckpointError, save_encoder_checkpoint
from model.config import ConfigError


def snapshot(root: Path) -> dict:
    """{relative path: sha1} of every file under root (to prove an error wrote nothing)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished tiny stage-2 run (2 steps): config.json, checkpoints/step-2, model.pt, done.json."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("bad") / "finished"
    train.main(tiny.compose("train", "max_steps=2", run_dir=run_dir))
    return run_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory, finished_run):
    import shutil

    from model.checkpoint import REQUIRED_KEYS

    d = tmp_path_factory.mktemp("files")
    (d / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.ones(2), "step": 3}, d / "random_dict.pt")
    torch.save({**{k: {} for k in REQUIRED_KEYS}, "global_step": 1, "config": None}, d / "config_none.pt")
    shutil.copytree(finished_run, d / "nan_run")  # a finished run whose model.pt holds a NaN weight
    ck = torch.load(d / "nan_run" / "model.pt", weights_only=True)
    next(iter(ck["model_state_dict"].values())).fill_(float("nan"))
    torch.save(ck, d / "nan_run" / "model.pt")
    return d


# -- command line ------------------------------------------------------------------------------------------
# name -> (script, extra args (callable of tiny, finished_run, files, tmp) -> list, expected substring)
CLI_CASES = {
    "missing_dataset": ("train.py", lambda t, r, f, tmp: [f"data_path={tmp}/nope", f"run_dir={tmp}/a"],
                        "no dataset at"),
    "dataset_of_other_env": ("train.py", lambda t, r, f, tmp: ["env=darkroom_hard", f"run_dir={tmp}/b"],
                             "collected with a different env config: name='darkroom' (dataset)"),
    "unknown_key": ("train.py", lambda t, r, f, tmp: ["n_latnet=4"], "unknown config key 'n_latnet'"),
    "n_latent_zero": ("train.py", lambda t, r, f, tmp: ["n_latent=0", f"run_dir={tmp}/c"],
                      "model.n_latent=0 must be an integer in [1, 1024]"),
    "not_a_checkpoint": ("train.py", lambda t, r, f, tmp: [f"model.pretrained_encoder_path={f}/notes.txt",
                                                           f"run_dir={tmp}/d"],
                         "is not a readable torch checkpoint"),
    "other_run_in_run_dir": ("train.py", lambda t, r, f, tmp: [f"run_dir={r}", "lr=0.1"],
                             "already holds a different run (config differs in: lr"),
    "non_finite_loss": ("train.py", lambda t, r, f, tmp: ["lr=1e30", "grad_clip=0", f"run_dir={tmp}/e"],
                        "is nan at step"),
    "pretrain_nothing_to_resume": ("pretrain_encoder.py", lambda t, r, f, tmp: ["resume=true", f"run_dir={tmp}/f"],
                                   "resume=true but there is no run in"),
    # these were tracebacks once
    "cpu_threads_negative": ("train.py", lambda t, r, f, tmp: ["cpu_threads=-1", f"run_dir={tmp}/g"],
                             "cpu_threads=-1 must be null or an integer in [1, 1024]"),
    "save_every_zero": ("pretrain_encoder.py", lambda t, r, f, tmp: ["model.save_every=0", f"run_dir={tmp}/h"],
                        "save_every=0 must be an integer >= 1"),
    "horizon_zero": ("collect.py", lambda t, r, f, tmp: ["env.horizon=0", f"data_path={tmp}/i"],
                     "env.horizon=0 must be an integer in [1, 100000]"),
    "encoder_config_none": ("train.py", lambda t, r, f, tmp: [f"model.pretrained_encoder_path={f}/config_none.pt",
                                                              f"run_dir={tmp}/j"],
                            "has a NoneType as 'config' instead of the dict"),
    "nan_model_sampled": ("evaluate.py", lambda t, r, f, tmp: [f"run_dir={f}/nan_run", "sample=true"],
                          "holds NaN or infinite values; the model cannot be evaluated"),
    "evaluate_on_missing_gpu": ("evaluate.py", lambda t, r, f, tmp: [f"run_dir={r}", "device=cuda:7"],
                                "device=cuda:7 but this machine has"),
    "two_stage_num_processes": ("two_stage.py", lambda t, r, f, tmp: ["--accelerate", "--num-processes", "-1"],
                                "--num-processes -1 must be an integer >= 1"),
}
CONFIG_OF = {"train.py": "train", "pretrain_encoder.py": "pretrain", "collect.py": "collect",
             "evaluate.py": "evaluate"}


@pytest.fixture(scope="module")
def cli_results(tiny, finished_run, files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    before = snapshot(finished_run)

    def one(name):
        script, extra, _ = CLI_CASES[name]
        base = tiny.args(CONFIG_OF[script]) if script in CONFIG_OF else []
        if script == "collect.py":  # no Hydra output folder in the launch directory
            base += ["hydra.run.dir=.", "hydra.output_subdir=null"]
        return name, tiny.cli(script, *base, *extra(tiny, finished_run, files, tmp), timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(one, CLI_CASES))
    return results, before, snapshot(finished_run), tmp


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_one_line_error(cli_results, name):
    results, before, after, _ = cli_results
    r = results[name]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert CLI_CASES[name][2] in lines[0], lines[0]
    assert after == before  # the existing run was not touched by any of the failing commands


@pytest.mark.slow
def test_cli_errors_wrote_no_run_dirs(cli_results):
    """Errors found before training leave no run directory behind (non-finite loss stops mid-run)."""
    _, _, _, tmp = cli_results
    assert sorted(p.name for p in tmp.iterdir()) in ([], ["e"])


# -- main(cfg): exception type and message -----------------------------------------------------------------

def _raises(exc, match, fn, cfg):
    with pytest.raises(exc, match=match) as ei:
        fn(cfg)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def corrupt_data(tiny, tmp_path):
    import shutil

    d = tmp_path / "data"
    shutil.copytree(tiny.data_path, d)
    return d


def test_truncated_array(tiny, tmp_path, corrupt_data):
    f = corrupt_data / "actions.npy"
    f.write_bytes(f.read_bytes()[:-100])
    _raises(DatasetError, r"actions.npy is truncated or corrupt.*re-collect", train.main,
            tiny.compose("train", data_path=corrupt_data, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_corrupt_meta(tiny, tmp_path, corrupt_data):
    (corrupt_data / "meta.json").write_text("{not json")
    _raises(DatasetError, r"meta.json is not valid JSON", pretrain_encoder.main,
            tiny.compose("pretrain", data_path=corrupt_data, run_dir=tmp_path / "r"))


def test_missing_pretrained_encoder(tiny, tmp_path):
    _raises(EncoderCheckpointError, r"no pretrained encoder checkpoint at .*run stage 1", train.main,
            tiny.compose("train", f"model.pretrained_encoder_path={tmp_path}/missing.pt",
                         run_dir=tmp_path / "r"))


def test_encoder_checkpoint_of_other_architecture(tiny, tmp_path):
    from model import EncoderPretrainer, ModelConfig

    cfg = tiny.compose("pretrain", "model.n_latent=8")
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    save_encoder_checkpoint(tmp_path / "enc.pt", EncoderPretrainer(mcfg), 5, {"model": mcfg.to_dict()})
    msg = _raises(EncoderCheckpointError, r"different architecture", train.main,
                  tiny.compose("train", f"model.pretrained_encoder_path={tmp_path}/enc.pt", run_dir=tmp_path / "r"))
    assert "n_latent: checkpoint=8 current=4" in msg


def test_checkpoint_that_is_not_ours(tiny, tmp_path, files):
    _raises(EncoderCheckpointError, r"is not a CompressedAD encoder checkpoint", train.main,
            tiny.compose("train", f"model.pretrained_encoder_path={files}/random_dict.pt", run_dir=tmp_path / "r"))


@pytest.mark.parametrize("override, match", [
    ("model.n_head=3", r"d_model=32 must be a positive multiple of model.n_head=3"),
    ("model.seg_len=100", r"histories have only 200"),  # 3 segments of 100 + a window > 200 steps
    ("sampler.min_seg_len=30", r"min_seg_len must be in \[1, seg_len=20\]"),
    ("grad_accum=3", r"batch_size=8 must be divisible by grad_accum=3"),
    ("checkpoint_every=0", r"checkpoint_every=0 must be an integer >= 1"),
    ("max_steps=abc", r"max_steps='abc' must be an integer >= 1"),
    ("lr=-1", r"lr=-1 must be a finite number > 0"),
    ("model.freeze_encoder=true", r"freeze_encoder=true without model.pretrained_encoder_path"),
])
def test_impossible_config(tiny, tmp_path, override, match):
    _raises(ValueError, match, train.main, tiny.compose("train", override, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_batch_not_divisible_by_processes(tiny, tmp_path):
    class ThreeProcesses:  # fit only asks the accelerator its size before refusing
        num_processes, process_index, is_main_process = 3, 0, True

    s = loop.LoopSettings(max_steps=2, batch_size=8, lr=1e-3)
    with pytest.raises(ConfigError, match=r"batch_size=8 must be divisible by processes x grad_accum = 3 x 1"):
        loop.fit(None, s, tmp_path / "r", {}, accelerator=ThreeProcesses())


def test_pretrain_depth_zero(tiny, tmp_path):
    _raises(ValueError, r"max_compression_depth must be >= 1 for pretraining", pretrain_encoder.main,
            tiny.compose("pretrain", "model.max_compression_depth=0", "sampler.pretrain_depth_weights=[]",
                         run_dir=tmp_path / "r"))


def test_run_dir_states(tiny, tmp_path, finished_run, one_thread):
    before = snapshot(finished_run)
    base = ["max_steps=2"]
    # the same run again, without resume
    _raises(rundir.RunDirError, r"already holds this run \(checkpoint step 2\); pass resume=true", train.main,
            tiny.compose("train", *base, run_dir=finished_run))
    # resume and overwrite together
    _raises(ConfigError, r"pass only one of them", train.main,
            tiny.compose("train", *base, "resume=true", "overwrite=true", run_dir=finished_run))
    # resume_from a checkpoint of another architecture, into the finished run and into a new dir
    ck = finished_run / "checkpoints" / "step-00000002"
    _raises(rundir.RunDirError, r"already holds a different run", train.main,
            tiny.compose("train", *base, "model.n_latent=8", f"resume_from={ck}", run_dir=finished_run))
    _raises(rundir.RunDirError, r"cannot resume from .*step-00000002.*from another model config", train.main,
            tiny.compose("train", *base, "model.n_latent=8", f"resume_from={ck}", run_dir=tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    # resume_from something that is not a checkpoint
    _raises(rundir.RunDirError, r"is not a checkpoint", train.main,
            tiny.compose("train", *base, f"resume_from={tmp_path}/nothing", run_dir=tmp_path / "new"))
    # a non-empty folder that is not a run, and a file
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    _raises(rundir.RunDirError, r"holds no run \(no config.json\); refusing to write", train.main,
            tiny.compose("train", *base, "overwrite=true", run_dir=tmp_path / "mine"))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]
    _raises(rundir.RunDirError, r"exists and is not a folder", train.main,
            tiny.compose("train", *base, run_dir=tmp_path / "mine" / "thesis.tex"))
    # resume with nothing to resume: a run stopped before its first checkpoint
    (tmp_path / "early").mkdir()
    cfg = tiny.compose("train", *base, run_dir=tmp_path / "early")
    (tmp_path / "early" / "config.json").write_text(json.dumps(loop.to_plain(cfg)))
    _raises(rundir.RunDirError, r"has no complete checkpoint yet", train.main,
            tiny.compose("train", *base, "resume=true", run_dir=tmp_path / "early"))
    assert snapshot(finished_run) == before


def test_resume_from_damaged_checkpoint(tiny, tmp_path, finished_run):
    import shutil

    ck = tmp_path / "step-00000002"
    shutil.copytree(finished_run / "checkpoints" / "step-00000002", ck)
    (ck / "model.safetensors").write_bytes(b"\0" * 10)
    _raises(rundir.RunDirError, r"cannot resume from .*damaged", train.main,
            tiny.compose("train", "max_steps=2", f"resume_from={ck}", run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_names_the_step(tiny, tmp_path, one_thread, monkeypatch):
    from model import losses

    real = losses.action_loss
    calls = {"n": 0}

    def nan_on_third_call(logits, batch, **kw):
        calls["n"] += 1
        out = real(logits, batch, **kw)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train, "action_loss", nan_on_third_call)
    msg = _raises(loop.NonFiniteLossError, r"train loss is nan at step 3; stopped", train.main,
                  tiny.compose("train", "max_steps=4", "checkpoint_every=2", run_dir=tmp_path / "r"))
    assert "lower lr" in msg
    assert [s for s, _ in rundir.checkpoints(tmp_path / "r")] == [2]  # the last good state is kept
    assert not (tmp_path / "r" / "model.pt").exists()


def test_evaluate_without_model(tiny, tmp_path, files):
    import evaluate

    (tmp_path / "run").mkdir()
    _raises(FileNotFoundError, r"no trained model at .*model.pt", evaluate.main,
            tiny.compose("evaluate", run_dir=tmp_path / "run"))
    (tmp_path / "run" / "model.pt").write_text("garbage")
    _raises(evaluate.EvalError, r"cannot read .*model.pt", evaluate.main,
            tiny.compose("evaluate", run_dir=tmp_path / "run"))
