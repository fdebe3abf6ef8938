"""two_stage.py (the pipeline driver) and its wrappers, on a tiny problem.

two_stage.main(argv) runs in-process (cwd = a temp dir, so the default runs/ and data/ land there); every
stage it starts is a real subprocess (`python <script>.py ...`), exactly as on the command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL, raises_one_line

import loop
import rundir
import two_stage
from histories import DatasetError
from model import EncoderPretrainer, ModelConfig, save_encoder_checkpoint

# Shared overrides; two_stage routes each one to the stages whose config has the key.
PIPE = TINY_MODEL + [
    "warmup_steps=2",
    "log_every=2",
    "checkpoint_every=1000",
    "progress=false",  # pretrain + train (+ others)
    "pretrain_steps=4",
    "pretrain_batch_size=8",
    "save_every=1000",
    "diag_every=0",
    "diag_batches=1",  # stage 1 only
    "batch_size=8",
    "max_steps=4",
    "heldout_every=0",
    "eval_every=0",  # stage 2 only
    "n_episodes=2",
    "seeds_per_goal=1",
    "n_train_goals=1",  # evaluate only
]
COLLECT = ["source.n_stream=4", "source.n_steps=200", "source.n_stream_eval=1"]  # collect only
PRETRAIN_RUN = "runs/pretrain-encoder-darkroom-seed0"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A clean working directory; stage subprocesses get one torch thread and no debug switches."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.delenv("CAD_DEBUG", raising=False)
    return tmp_path.resolve()


def commands(out: str) -> dict[str, str]:
    """{stage: the printed command line} from two_stage's output."""
    return dict(re.findall(r"^\[(\w+)\] \$ (.*)$", out, flags=re.MULTILINE))


@pytest.mark.slow
def test_pretrain_only_then_full_pipeline_then_reuse(ws, tiny, capfd):
    args = PIPE + [f"data_path={tiny.data_path}"]
    ckpt = ws / PRETRAIN_RUN / "encoder-pretrained-final.pt"
    trun = ws / "runs/ad_compressed-pretrained-darkroom-seed0"

    # --pretrain-only: stage 1 and nothing after it (the dataset exists, so no collect either).
    out = two_stage.main(["--pretrain-only", *args])
    stdout = capfd.readouterr().out
    assert list(commands(stdout)) == ["pretrain"]
    assert f"[collect] dataset exists at {tiny.data_path}; reusing it" in stdout
    assert ckpt.is_file() and out["encoder_checkpoint"] == str(ckpt) and "train_run_dir" not in out
    assert [p.name for p in (ws / "runs").iterdir()] == ["pretrain-encoder-darkroom-seed0"]  # no stage-2 run

    # Full pipeline: the finished stage 1 is reused; stage 2 starts from the checkpoint it wrote; eval runs.
    out = two_stage.main(args)
    stdout = capfd.readouterr().out
    cmds = commands(stdout)
    assert list(cmds) == ["train", "evaluate"]
    assert f"[pretrain] already complete in {ws / PRETRAIN_RUN} with this config; reusing it" in stdout
    assert out["train_run_dir"] == str(trun) and out["encoder_checkpoint"] == str(ckpt)
    assert json.loads((trun / "config.json").read_text())["model"]["pretrained_encoder_path"] == str(ckpt)
    assert f"model.pretrained_encoder_path={ckpt}" in cmds["train"]
    assert (trun / "model.pt").is_file() and (trun / "eval.json").is_file() and "eval" in out
    assert cmds["evaluate"].endswith(f"run_dir={trun}")
    # Each command is printed before its stage runs (the stage's own output follows it).
    t, e = stdout.index("[train] $ "), stdout.index("[evaluate] $ ")
    assert t < stdout.index(f"Loading pretrained encoder from {ckpt}") < e < stdout.index("wrote ")
    assert "=== CompressedAD two-stage pipeline ===" in stdout
    # Overrides went only where their key exists.
    assert "max_steps=4" in cmds["train"] and "pretrain_steps" not in cmds["train"]
    assert "n_episodes=2" in cmds["evaluate"] and "model." not in cmds["evaluate"]

    # Re-run: nothing is redone.
    stamps = {p: p.stat().st_mtime_ns for p in (ws / PRETRAIN_RUN / "done.json", trun / "done.json", ckpt)}
    two_stage.main(args + ["--no-eval"])
    stdout = capfd.readouterr().out
    assert commands(stdout) == {}
    assert f"[pretrain] already complete in {ws / PRETRAIN_RUN}" in stdout
    assert f"[train] already complete in {trun}" in stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # Reuse is on content, not on "done.json exists" (issue 25): another lr is refused in one line instead of
    # reporting the lr 1e-3 model; so is a missing --pretrained-path; nothing is rewritten.
    with pytest.raises(rundir.RunDirError, match=r"holds a stage-2 run with another config \(lr \(0.0003 -> "
                       r"0.0001\)\): pass --force to redo it, or train:run_name="):
        two_stage.main(["--no-eval", *args, "train:lr=1e-4"])
    with pytest.raises(two_stage.PipelineError, match=r"--pretrained-path nope.pt: no such file"):
        two_stage.main(["--train-only", "--pretrained-path", "nope.pt", *args])
    # stage 1 redone (--force --pretrain-only): the stage-2 run made from the old encoder is not reused
    two_stage.main(["--pretrain-only", "--force", *args])
    with pytest.raises(rundir.RunDirError, match=r"from an older encoder-pretrained-final.pt \(stage 1 was "
                       r"redone after it started\): pass --force"):
        two_stage.main(args + ["--no-eval"])
    capfd.readouterr()
    assert stamps[trun / "done.json"] == (trun / "done.json").stat().st_mtime_ns


@pytest.mark.slow
def test_train_only_from_given_checkpoint_frozen(ws, tiny, capfd):
    cfg = tiny.compose("pretrain")
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    torch.manual_seed(0)
    pre = EncoderPretrainer(mcfg)
    ckpt = ws / "given" / "encoder-pretrained-final.pt"
    save_encoder_checkpoint(ckpt, pre, 3, {"model": mcfg.to_dict(), "env": loop.to_plain(cfg.env)})

    out = two_stage.main(
        [
            "--train-only",
            "--pretrained-path",
            "given/encoder-pretrained-final.pt",  # relative
            "--freeze-encoder",
            "--no-eval",
            *PIPE,
            f"data_path={tiny.data_path}",
        ]
    )
    stdout = capfd.readouterr().out
    assert list(commands(stdout)) == ["train"]  # no stage 1, no collect, no eval
    trun = ws / "runs/ad_compressed-pretrained-frozen-darkroom-seed0"
    assert out["train_run_dir"] == str(trun) and not (ws / PRETRAIN_RUN).exists()
    model_cfg = json.loads((trun / "config.json").read_text())["model"]
    assert model_cfg["pretrained_encoder_path"] == str(ckpt) and model_cfg["freeze_encoder"] is True
    assert f"Loading pretrained encoder from {ckpt}" in stdout
    sd = torch.load(trun / "model.pt", weights_only=True)["model_state_dict"]
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(sd[f"encoder.{k}"], v), k  # frozen through training


@pytest.mark.slow
def test_modes_dry_run(ws, capfd):
    base = PIPE + COLLECT + ["data_path=data/x"]
    two_stage.main(
        ["--dry-run", "--freeze-encoder", *base, "train:lr=0.0001", "pretrain_lr=0.01", "n_latent=3"]
    )
    cmds = commands(capfd.readouterr().out)
    assert list(cmds) == ["collect", "pretrain", "train", "evaluate"]  # data/x is missing: collect first
    assert "source.n_stream=4" in cmds["collect"] and "source." not in cmds["pretrain"] + cmds["train"]
    assert "model." not in cmds["collect"] + cmds["evaluate"]
    frozen = ws / "runs/ad_compressed-pretrained-frozen-darkroom-seed0"
    assert "model.freeze_encoder=true" in cmds["train"]
    assert (
        f"model.pretrained_encoder_path={ws / PRETRAIN_RUN / 'encoder-pretrained-final.pt'}" in cmds["train"]
    )
    assert cmds["evaluate"].endswith(f"run_dir={frozen}")
    assert " lr=0.0001" in cmds["train"] and "lr=0.0001" not in cmds["pretrain"]
    assert "pretrain_lr=0.01" in cmds["pretrain"] and "pretrain_lr" not in cmds["train"]
    assert "model.n_latent=3" in cmds["pretrain"] and "model.n_latent=3" in cmds["train"]
    assert not (ws / "runs").exists() and not (ws / "data").exists()  # a dry run writes nothing

    two_stage.main(["--dry-run", "--train-only", *base])
    cmds = commands(capfd.readouterr().out)
    assert list(cmds) == ["collect", "train", "evaluate"] and "pretrained_encoder_path" not in cmds["train"]
    assert cmds["evaluate"].endswith(f"run_dir={ws / 'runs/ad_compressed-darkroom-seed0'}")

    two_stage.main(["--dry-run", "--accelerate", "--num-processes", "2", "--no-eval", "--force", *base])
    cmds = commands(capfd.readouterr().out)
    launch = (
        f"-m accelerate.commands.launch --config_file {REPO / 'accelerate_config.yaml'} --num_processes 2 "
    )
    assert launch + str(REPO / "pretrain_encoder.py") in cmds["pretrain"]
    assert launch + str(REPO / "train.py") in cmds["train"]
    assert "accelerate" not in cmds["collect"] and "evaluate" not in cmds
    assert cmds["pretrain"].endswith("overwrite=true") and cmds["train"].endswith("overwrite=true")


def test_stage_prefix_beats_shared_override():
    routed = two_stage.split_overrides(
        ["warmup_steps=2", "pretrain:warmup_steps=7", "model.n_latent=4", "train:model.n_latent=6", "seed=1"]
    )
    pre, tr = two_stage.compose("pretrain", routed["pretrain"]), two_stage.compose("train", routed["train"])
    assert (pre.warmup_steps, pre.model.n_latent) == (7, 4)
    assert (tr.warmup_steps, tr.model.n_latent) == (2, 6)
    assert all("seed=1" in routed[s] for s in ("pretrain", "train")) and "seed=1" not in routed["evaluate"]


def test_seed_and_run_name_reach_only_the_stages_they_mean():
    """seed=1 next to data_seed=5 wrote data/...-seed5 with a meta.json saying seed 1; run_name=X put both
    training stages into one run dir (stage 2 then found stage 1's done.json). A stage prefix still targets them."""
    routed = two_stage.split_overrides(["seed=1", "data_seed=5", "run_name=X", "collect:seed=3",
                                        "pretrain:run_name=P"])
    assert "seed=1" not in routed["collect"] and routed["collect"][-1] == "seed=3"
    assert "seed=1" in routed["pretrain"] and "seed=1" in routed["train"]
    assert "run_name=X" in routed["train"] and "run_name=X" not in routed["pretrain"]
    assert two_stage.compose("collect", routed["collect"][:-1]).seed == 5  # collect's seed follows data_seed
    assert two_stage.compose("pretrain", routed["pretrain"]).run_dir == "runs/P"
    assert two_stage.compose("train", routed["train"]).run_dir == "runs/X"


def test_seed_is_the_training_seed_and_data_seed_picks_one_dataset_for_every_stage():
    """`two_stage.py experiment=quick seed=1` (issue 24): stages 1 and 2 train with seed 1; collect keeps the seed
    of its data_seed (with seed=1 it refused the seed-0 dataset, or collected with seed 1 into ...-seed0);
    evaluate keeps its own sampling seed, as in a sweep. data_seed=2 names one dataset for collect and both
    training stages; evaluate reads the run's own."""
    routed = two_stage.split_overrides(["experiment=quick", "seed=1", "data_seed=2"])
    c = {s: two_stage.compose(s, routed[s]) for s in two_stage.STAGES}
    data = "data/darkroom-quick-seed2"
    assert (c["collect"].seed, c["collect"].data_seed, c["collect"].data_path) == (2, 2, data)
    for s in ("pretrain", "train"):
        assert (c[s].seed, c[s].data_seed, c[s].data_path) == (1, 2, data), s
    assert c["pretrain"].run_dir == "runs/pretrain-encoder-darkroom-seed1"
    assert c["train"].run_dir == "runs/ad_compressed-darkroom-seed1"
    assert (c["evaluate"].seed, c["evaluate"].data_path) == (0, None)


def test_another_goal_split_gets_its_own_dataset_and_run_dirs():
    """env.split_seed=1 (the rule of evidence's second split) went into split 0's data/darkroom-quick-seed0 and
    runs/...-seed0, refused there as another split's data / another run; it gets the -split1 names a sweep
    gives it. The env's own split renames nothing; a data_path / run_dir / run_name given is kept."""
    def named(*overrides):
        routed = two_stage.split_overrides(["experiment=quick", *overrides])
        split = two_stage.name_split(routed)
        c = {s: two_stage.compose(s, routed[s]) for s in ("collect", "pretrain", "train")}
        return split, c["collect"].data_path, c["pretrain"].run_dir, c["train"].run_dir

    assert named() == named("env.split_seed=0") == (None, "data/darkroom-quick-seed0",
                                                     "runs/pretrain-encoder-darkroom-seed0",
                                                     "runs/ad_compressed-darkroom-seed0")
    assert named("env.split_seed=1", "seed=2") == (1, "data/darkroom-quick-split1-seed0",
                                                   "runs/pretrain-encoder-darkroom-seed2-split1",
                                                   "runs/ad_compressed-darkroom-seed2-split1")
    assert named("env=dark_key_to_door", "env.split_seed=0")[1:3] == (  # that env's own split is 4
        "data/dark_key_to_door-quick-split0-seed0", "runs/pretrain-encoder-dark_key_to_door-seed0-split0")
    assert named("env.split_seed=1", "data_path=data/mine", "train:run_name=T", "pretrain:run_dir=runs/P") == (
        1, "data/mine", "runs/P", "runs/T")
    # the encoder tag of stage 2's run name still follows the encoder it is given
    routed = two_stage.split_overrides(["experiment=quick", "env.split_seed=1"])
    two_stage.name_split(routed)
    tr = two_stage.compose("train", routed["train"] + ["model.pretrained_encoder_path=x.pt"])
    assert tr.run_dir == "runs/ad_compressed-pretrained-darkroom-seed0-split1" and tr.env.split_seed == 1


@pytest.mark.slow
def test_seed_and_data_seed_reach_the_stage_commands(ws, capfd):
    """End to end (a dry run): the printed commands carry the routing above; the training stages read the
    dataset collect makes (its data_path, given to them)."""
    two_stage.main(["--dry-run", "experiment=quick", "seed=1", "data_seed=3"])
    cmds = commands(capfd.readouterr().out)
    assert list(cmds) == ["collect", "pretrain", "train", "evaluate"]  # no dataset yet: collect first
    assert "seed=1" not in cmds["collect"].split() and "data_seed=3" in cmds["collect"].split()
    for s in ("pretrain", "train"):
        assert {"seed=1", "data_seed=3", f"data_path={ws / 'data/darkroom-quick-seed3'}"} <= set(cmds[s].split()), s
    assert "seed=1" not in cmds["evaluate"].split()
    assert cmds["evaluate"].endswith(f"run_dir={ws / 'runs/ad_compressed-pretrained-darkroom-seed1'}")


def test_stage2_run_dirs_never_collide(tmp_path):
    """train.yaml's run_name tags a stage-2 run by where its encoder came from, so the README's stage-by-stage
    quick start (`train.py model.pretrained_encoder_path=...`) and the scratch run `train.py` get different run
    dirs (docs/design.md §6)."""
    from hydra_cli import compose_config

    ckpt = tmp_path / "encoder-pretrained-final.pt"

    def run_dir(*overrides):
        return compose_config("train", ["experiment=quick", *overrides]).run_dir

    assert run_dir() == "runs/ad_compressed-darkroom-seed0"  # unchanged: existing scratch runs keep their dir
    assert run_dir(f"model.pretrained_encoder_path={ckpt}") == "runs/ad_compressed-pretrained-darkroom-seed0"
    assert (run_dir(f"model.pretrained_encoder_path={ckpt}", "model.freeze_encoder=true")
            == "runs/ad_compressed-pretrained-frozen-darkroom-seed0")
    assert run_dir("model=ad_dr", "seed=3") == "runs/ad-darkroom-seed3"
    # An explicit run_name still wins (sweeps and users name their own runs).
    assert run_dir(f"model.pretrained_encoder_path={ckpt}", "run_name=mine") == "runs/mine"


@pytest.mark.slow
def test_pipeline_takes_its_stage2_run_dir_from_train_yaml(ws, capfd):
    """two_stage.py passes no run_name: its pretrained and frozen stage-2 runs land where train.py puts them."""
    ckpt = ws / PRETRAIN_RUN / "encoder-pretrained-final.pt"
    for flags, tag in (([], "pretrained"), (["--freeze-encoder"], "pretrained-frozen")):
        two_stage.main(["--dry-run", "--train-only", "--pretrained-path", str(ckpt), *flags, "experiment=quick"])
        cmds = commands(capfd.readouterr().out)
        assert "run_name" not in cmds["train"]
        assert cmds["evaluate"].endswith(f"run_dir={ws / f'runs/ad_compressed-{tag}-darkroom-seed0'}")


def _quick_start_commands() -> list[list[str]]:
    """The README's stage-by-stage quick start, one argv per command (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Quick start, stage by stage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds, cur = [], ""
    for line in block.splitlines():
        line = line.split("#", 1)[0].rstrip()
        cur += " " + line.rstrip("\\")
        if line and not line.endswith("\\"):
            cmds.append(cur.split())
            cur = ""
    return [c for c in cmds if c and c[0] == "python"]


@pytest.mark.slow
def test_readme_quick_start_agrees_with_the_pipeline(ws):
    """The README's stage-by-stage commands evaluate the run its pretrained train.py command writes, which is
    two_stage.py's run dir, not the scratch run's."""
    cmds = _quick_start_commands()
    scripts = [c[1] for c in cmds]
    assert scripts[:4] == ["collect.py", "pretrain_encoder.py", "train.py", "evaluate.py"], scripts
    pre_args, tr_args, ev_args = cmds[1][2:], cmds[2][2:], cmds[3][2:]
    tr_args = [a.replace("$PWD", str(ws)) for a in tr_args]
    pre = two_stage.compose("pretrain", two_stage.split_overrides(pre_args)["pretrain"])
    ckpt = ws / pre.run_dir / "encoder-pretrained-final.pt"
    assert f"model.pretrained_encoder_path={ckpt}" in tr_args  # exactly what two_stage.py passes
    trun = two_stage.compose("train", two_stage.split_overrides(tr_args)["train"]).run_dir
    assert f"run_dir={trun}" in ev_args
    assert trun != two_stage.compose("train", ["experiment=quick"]).run_dir  # not the scratch run
    out = two_stage.main(["--dry-run", "experiment=quick"])  # what `make demo` runs
    assert out["train_run_dir"] == str(ws / trun) and out["encoder_checkpoint"] == str(ckpt)


@pytest.mark.slow
def test_pipeline_errors(ws):
    with pytest.raises(two_stage.PipelineError, match="--pretrained-path is for stage 2"):
        two_stage.main(["--dry-run", "--pretrain-only", "--pretrained-path", "x.pt"])
    with pytest.raises(two_stage.PipelineError, match="--freeze-encoder needs a pretrained encoder"):
        two_stage.main(["--dry-run", "--train-only", "--freeze-encoder"])
    with pytest.raises(two_stage.PipelineError, match="'bogus=1' matches no stage"):
        two_stage.main(["--dry-run", "bogus=1"])
    with pytest.raises(two_stage.PipelineError, match="unknown stage prefix"):
        two_stage.main(["--dry-run", "stage3:lr=1"])
    with pytest.raises(two_stage.PipelineError, match=r"\[train\] unknown config key 'lrr'"):
        two_stage.main(["--dry-run", "train:lrr=1"])
    with pytest.raises(SystemExit) as ei:
        two_stage.main(["--pretrain-only", "--train-only"])
    assert ei.value.code == 2
    assert not (ws / "runs").exists()


def _wrapper_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHON", None)
    env.pop("CAD_DEBUG", None)
    return env


@pytest.mark.slow
def test_shell_wrapper_passes_options_through(tmp_path):
    args = [
        "--dry-run",
        "--train-only",
        "--pretrained-path",
        "some/enc.pt",
        "--freeze-encoder",
        "--accelerate",
        "--num-processes",
        "3",
        "--accelerate-config",
        "my_acc.yaml",
        "--no-eval",
        "--force",
        "data_path=data/x",
        "train:lr=0.0001",
        "n_latent=3",
    ]
    r = subprocess.run(
        ["bash", str(REPO / "train_two_stage.sh"), *args],
        cwd=tmp_path,
        env=_wrapper_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert list(cmds) == ["collect", "train"]
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():  # the wrapper prefers the repo's virtual environment
        assert cmds["train"].startswith(f"{venv} -m accelerate.commands.launch")
    t = cmds["train"]
    assert "--config_file my_acc.yaml --num_processes 3" in t
    for piece in (
        f"model.pretrained_encoder_path={(tmp_path / 'some/enc.pt').resolve()}",
        "model.freeze_encoder=true",
        " lr=0.0001",
        "model.n_latent=3",
        "overwrite=true",
        "data_path=data/x",
    ):
        assert piece in t, piece


@pytest.mark.slow
def test_failing_stage_stops_the_pipeline_with_its_exit_code(tmp_path):
    """Through the shell wrapper, stdout and stderr in one stream: the dataset is missing so collect runs,
    stage 1 fails on a bad stage-targeted override, stage 2 and eval never start, and the stage's exit
    code (1: CAD_DEBUG=1 makes the script raise instead of exiting 2) comes out of the wrapper."""
    data = tmp_path / "data" / "fresh"
    r = subprocess.run(
        [
            "bash",
            str(REPO / "train_two_stage.sh"),
            *PIPE,
            *COLLECT,
            f"data_path={data}",
            "pretrain:model.n_latent=0",
        ],
        cwd=tmp_path,
        env={**_wrapper_env(), "CAD_DEBUG": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    out = r.stdout
    assert r.returncode == 1, out
    assert list(commands(out)) == ["collect", "pretrain"]
    assert (data / "meta.json").is_file()  # collect ran because the dataset was missing
    assert "source.n_stream=4" in commands(out)["collect"]
    assert (
        out.index("[pretrain] $ ")
        < out.index("model.n_latent=0 must be an integer in [1, 1024]")
        < out.index("[pretrain] failed with exit code 1; stopping the pipeline")
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["collect"]  # collect's Hydra log only


# ---- train_two_stage.ps1 ----------------------------------------------------------------------------------
PS1_SWITCHES = {
    "PretrainOnly": "--pretrain-only",
    "TrainOnly": "--train-only",
    "FreezeEncoder": "--freeze-encoder",
    "PretrainedPath": "--pretrained-path",
    "Accelerate": "--accelerate",
    "AccelerateConfig": "--accelerate-config",
    "NumProcesses": "--num-processes",
    "NoEval": "--no-eval",
    "Force": "--force",
    "DryRun": "--dry-run",
}


def test_ps1_maps_every_switch_to_two_stage_flags():
    text = (REPO / "train_two_stage.ps1").read_text()
    mapped = dict(re.findall(r'if \(\$(\w+)(?: -gt 0)?\) \{ \$argsList \+= (?:@\()?"(--[\w-]+)"', text))
    assert mapped == PS1_SWITCHES
    params = re.search(r"param\((.*?)\n\)", text, flags=re.DOTALL).group(1)
    for name in PS1_SWITCHES:
        assert re.search(rf"\]\${name}\b", params), f"-{name} is not a parameter"
    # Every two_stage.py option has a switch, and each flag exists there.
    flags = set(re.findall(r'add_argument\("(--[\w-]+)"', (REPO / "two_stage.py").read_text()))
    assert flags == set(PS1_SWITCHES.values())
    for switch in ("PretrainedPath", "AccelerateConfig", "NumProcesses"):  # value-taking: the value follows
        assert re.search(rf'@\("{PS1_SWITCHES[switch]}", "?\${switch}"?\)', text), switch
    assert "ValueFromRemainingArguments" in text and "$argsList += $Overrides" in text
    assert 'Join-Path $here "two_stage.py"' in text and "exit $LASTEXITCODE" in text


def test_ps1_parses_as_powershell():
    """A real PowerShell grammar (tree-sitter, from the dev dependencies) parses the wrapper without an error
    node, and finds one in a broken copy: the regex checks above cannot see a missing brace."""
    import tree_sitter
    import tree_sitter_powershell

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    src = (REPO / "train_two_stage.ps1").read_bytes()
    assert not parser.parse(src).root_node.has_error
    broken = src.replace(b"if ($DryRun) {", b"if ($DryRun {", 1)
    assert broken != src and parser.parse(broken).root_node.has_error


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell (pwsh) is not installed")
def test_ps1_wrapper_passes_options_through(tmp_path):
    r = subprocess.run(
        [
            "pwsh",
            "-NoProfile",
            "-File",
            str(REPO / "train_two_stage.ps1"),
            "-DryRun",
            "-TrainOnly",
            "-PretrainedPath",
            "some/enc.pt",
            "-FreezeEncoder",
            "-Accelerate",
            "-NumProcesses",
            "3",
            "-NoEval",
            "data_path=data/x",
            "train:lr=0.0001",
        ],
        cwd=tmp_path,
        env=_wrapper_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    t = commands(r.stdout)["train"]
    for piece in (
        "--num_processes 3",
        "model.freeze_encoder=true",
        " lr=0.0001",
        "model.pretrained_encoder_path=",
    ):
        assert piece in t, piece
    assert sys.executable  # same interpreter family; the wrapper picks .venv when present


@pytest.mark.slow
def test_two_stage_refuses_a_dataset_collected_with_other_settings(tiny, tmp_path, monkeypatch, capsys):
    import two_stage

    monkeypatch.chdir(tmp_path)
    base = ["--dry-run", f"data_path={tiny.data_path}"]
    raises_one_line(DatasetError, r"was collected with other settings than asked \(source.n_stream: 4 -> 3\): "
            r"pass collect:overwrite=true", two_stage.main, [*base, "collect:source.n_stream=3", "source.n_steps=200"])
    two_stage.main([*base, "--pretrain-only"])  # defaults differ from the tiny data: reused, but said
    assert "[collect] note: the dataset at" in capsys.readouterr().out
    for n in ("-1", "0"):
        raises_one_line(two_stage.PipelineError, rf"--num-processes {n} must be an integer >= 1", two_stage.main,
                ["--accelerate", "--num-processes", n, *base])
