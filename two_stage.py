"""The two-stage pipeline in one command: collect (if the dataset is missing) -> stage 1 -> stage 2 -> eval.

    python two_stage.py experiment=quick                       # everything, CPU-sized (what `make demo` runs)
    python two_stage.py --pretrain-only experiment=quick
    python two_stage.py --train-only --pretrained-path runs/pretrain-encoder-darkroom-seed0/encoder-pretrained-final.pt
    python two_stage.py --freeze-encoder --accelerate --num-processes 4 experiment=full

train_two_stage.ps1 / train_two_stage.sh are thin wrappers over this file. Every stage is a separate
process (`python <script>.py` or `accelerate launch ... <script>.py`); each command is printed before it
runs; the first failing stage stops the pipeline with its exit code. No config file is ever edited: the
stage-1 checkpoint reaches stage 2 as `model.pretrained_encoder_path=...`.

Free overrides (`key=value`) go to every stage whose config has that key (so `experiment=quick` or
`env=darkroom_hard` reach all of them, `pretrain_lr=...` only stage 1, `max_steps=...` only stage 2). Prefix
one with a stage name to target it alone: `train:lr=1e-4`, `pretrain:seed=3`, `collect:source.n_stream=20`,
`evaluate:n_episodes=200`. `seed=1` is the training seed of stage 1 and stage 2 (collect's follows
`data_seed=`, which picks the dataset for every stage; evaluate keeps its own) and `run_name` names stage 2
only; target the others with a prefix (`collect:seed=3`, `evaluate:seed=2`, `pretrain:run_name=x`).
`env.split_seed=1` (another goal split than the env's own) names the dataset and both run dirs `-split1`.
A stage that already finished is reused only if its run dir holds the same config (identity), steps and
data fingerprint and, for stage 2, was trained from the current encoder (rundir.run_state, as in
experiments/sweep.py); a run dir holding another run is refused in one line. Pass --force to redo it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

import hydra_cli
import rundir
from errors import UserError
from hydra_cli import REPO, UnknownKeyError, abspath, override_key, rewrite_overrides

STAGES = ("collect", "pretrain", "train", "evaluate")  # in pipeline order
SCRIPTS = {"collect": "collect.py", "pretrain": "pretrain_encoder.py", "train": "train.py",
           "evaluate": "evaluate.py"}


# Shared keys that mean one thing for some stages only (the module docstring; experiments/sweep.py routes
# through split_overrides too): a shared seed=1 reaching collect made it refuse the seed-0 dataset (or collect
# with seed 1 into data/...-seed0); run_name in stage 1 as well put both stages into one run dir, and stage 2
# found stage 1's done.json and was skipped.
SHARED_KEY_STAGES = {"seed": ("pretrain", "train"), "run_name": ("train",)}
# A training stage's step count and name in rundir.run_state's messages
TRAINING = {"pretrain": ("pretrain_steps", "stage-1"), "train": ("max_steps", "stage-2")}


class PipelineError(UserError, RuntimeError):
    pass


USER_ERRORS = (UserError,)  # one line `error: ...`, exit 2 (hydra_cli.run_args): the run-state and dataset checks too


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pretrain-only", action="store_true", help="collect if needed, then stage 1 only")
    mode.add_argument("--train-only", action="store_true",
                      help="stage 2 (+ eval) only; with --pretrained-path, start from that encoder")
    p.add_argument("--pretrained-path", default=None, help="encoder-pretrained-*.pt for stage 2 (skips stage 1)")
    p.add_argument("--freeze-encoder", action="store_true", help="stage 2 keeps the pretrained encoder frozen")
    p.add_argument("--no-eval", action="store_true", help="skip the final in-context evaluation")
    p.add_argument("--accelerate", action="store_true", help="run the training stages under accelerate launch")
    p.add_argument("--accelerate-config", default=str(REPO / "accelerate_config.yaml"),
                   help="accelerate config file (default: accelerate_config.yaml)")
    p.add_argument("--num-processes", type=int, default=None, help="accelerate launch --num_processes")
    p.add_argument("--force", action="store_true", help="redo stages that already finished (overwrite=true)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, optionally stage:key=value")
    a = p.parse_args(argv)
    # 0 used to be dropped silently, -1 reached accelerate launch and failed there with a traceback
    if a.num_processes is not None and a.num_processes < 1:
        raise PipelineError(f"--num-processes {a.num_processes} must be an integer >= 1 (processes per "
                            f"training stage under accelerate launch)")
    return a


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """Route each override to the stages whose config knows its key (stage:key=value -> that stage)."""
    routed: dict[str, list[str]] = {s: [] for s in STAGES}
    only: dict[str, list[str]] = {s: [] for s in STAGES}  # stage:key=value, appended last so they win
    targeted = [o for o in overrides if ":" in o.split("=", 1)[0]]
    shared = [o for o in overrides if o not in targeted]
    for o in targeted:
        stage, kv = o.split(":", 1)
        if stage not in STAGES:
            raise PipelineError(f"unknown stage prefix {stage!r} in {o!r}: use one of {', '.join(STAGES)}")
        only[stage].append(kv)
    groups = hydra_cli.group_choices(shared)
    # One composition per stage (with the group choices: each stage composes only its own slice of an
    # experiment preset, so the preset adds no key a stage does not read), then a lookup per key (composing per key and stage took ~15 CPU-s for a
    # typical command line). route_override is the decision hydra_cli.rewrite_overrides makes; the full
    # lists are validated by rewrite_overrides itself below.
    try:
        bases = {s: compose(s, groups) for s in STAGES}
    except UnknownKeyError as e:
        raise PipelineError(str(e)) from None
    for o in shared:
        stages = SHARED_KEY_STAGES.get(override_key(o), STAGES)
        took = {s: o if o in groups else hydra_cli.route_override(bases[s], o) for s in stages}
        if all(r is None for r in took.values()):
            raise PipelineError(f"override {o!r} matches no stage's config (collect, pretrain, train, evaluate)")
        for s, r in took.items():
            if r is not None:
                routed[s].append(r)
    for s in STAGES:
        routed[s] += only[s]  # Hydra applies overrides in order: `train:lr=1e-4` beats a shared `lr=1e-3`
        try:  # bad values / syntax fail here, before any stage runs
            rewrite_overrides(s, routed[s])
        except UnknownKeyError as e:
            raise PipelineError(f"[{s}] {e}") from None
    return routed


def compose(stage: str, overrides: list[str]):
    """The composed config a stage's script would see for these overrides (short keys rewritten)."""
    return hydra_cli.compose_config(stage, rewrite_overrides(stage, overrides))


def dataset_for_split(data_path: str, split_seed: int) -> str:
    """The preset's dataset folder for another goal split: -split<s> before its -seed<d> (data/darkroom-quick-seed0
    -> data/darkroom-quick-split1-seed0), or at its end; collect refuses a folder that holds another split."""
    head, sep, tail = data_path.rpartition("-seed")
    tag = hydra_cli.split_tag(split_seed)
    return f"{head}{tag}{sep}{tail}" if sep and tail.isdigit() else f"{data_path}{tag}"


def name_split(routed: dict[str, list[str]]) -> int | None:
    """Another goal split than the env's own (env.split_seed=<s>, the rule of evidence's second split) gets the
    dataset and run dirs of its own that experiments/sweep.py gives it (data/darkroom-quick-split1-seed0,
    runs/<run_name>-split1), except where data_path or run_dir / run_name are given: the env's own split's
    dataset and run dirs would be refused (another split's data, another run's dir). Returns the split, or
    None for the env's own (nothing renamed)."""
    split = compose("collect", routed["collect"]).env.split_seed
    own = compose("collect", [o for o in routed["collect"] if override_key(o) != "env.split_seed"])
    if split == own.env.split_seed:
        return None
    if not any(override_key(o) == "data_path" for o in routed["collect"]):
        routed["collect"].append(f"data_path={dataset_for_split(own.data_path, split)}")
    for stage in ("pretrain", "train"):
        if not any(override_key(o) in ("run_dir", "run_name") for o in routed[stage]):
            raw = OmegaConf.to_container(compose(stage, routed[stage]), resolve=False)["run_dir"]
            routed[stage].append(f"run_dir={raw}{hydra_cli.split_tag(split)}")  # e.g. runs/${run_name}-split1
    return split


def command(stage: str, overrides: list[str], a, port: int | None = None) -> list[str]:
    """A stage's command line (port: accelerate's rendezvous port, for parallel sweep jobs on one node)."""
    script = str(REPO / SCRIPTS[stage])
    if a.accelerate and stage in TRAINING:
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        launch += ["--main_process_port", str(port)] if port is not None else []
        launch += ["--config_file", a.accelerate_config]
        launch += ["--num_processes", str(a.num_processes)] if a.num_processes is not None else []
        return launch + [script] + overrides
    return [sys.executable, script] + overrides


def call(cmd: list[str], **popen) -> int:
    """Run a stage's process to its end; its exit code. Ctrl-C reaches the child too (one process group): let
    it finish its interrupted-run handling (train.py says where its last checkpoint is) instead of killing it
    mid-write, as subprocess.call does."""
    p = subprocess.Popen(cmd, **popen)
    try:
        return p.wait()
    except KeyboardInterrupt:
        try:
            p.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            p.kill()
            p.wait()
        raise


def run_stage(stage: str, overrides: list[str], a) -> None:
    cmd = command(stage, overrides, a)
    print(f"\n[{stage}] $ {shlex.join(cmd)}", flush=True)
    if a.dry_run:
        return
    rc = call(cmd)
    if rc != 0:
        print(f"[{stage}] failed with exit code {rc}; stopping the pipeline", file=sys.stderr, flush=True)
        raise SystemExit(rc)


def _abs(p: str) -> Path:
    return Path(abspath(p))  # the scripts' one path rule (hydra_cli.abspath)


def check_dataset(data_path: Path, ccfg: dict, overrides: list[str]) -> str | None:
    """rundir.check_dataset of the dataset a collect config `ccfg` names, against collect's overrides (the keys
    they set are asked for; a data_path= among them gives the dataset by hand); experiments/sweep.py's too."""
    asked = {override_key(o) for o in overrides if "=" in o}
    return rundir.check_dataset(data_path, ccfg, asked, by_hand="data_path" in asked)


def stage_state(stage: str, overrides: list[str], force: bool, fix: str, fp: str | None,
                encoder: Path | None = None) -> SimpleNamespace:
    """What to do with a training stage, decided from its run dir before launching it, by two_stage.py and
    experiments/sweep.py alike: its composed config `want`, `run_dir`, rundir.run_state's `state` (reuse, resume,
    fresh, overwrite, or refused in one line ending in `fix`; fp: the dataset's fingerprint) and `overrides` to
    launch it with (an interrupted run resumes, force starts it over)."""
    want = OmegaConf.to_container(compose(stage, overrides), resolve=True)
    run_dir, (steps_key, what) = _abs(want["run_dir"]), TRAINING[stage]
    state = rundir.run_state(run_dir, want, int(want[steps_key]), what, force, fix, fp, encoder)
    return SimpleNamespace(want=want, run_dir=run_dir, state=state,
                           overrides=overrides + ([f"{state}=true"] if state in ("resume", "overwrite") else []))


def run_unless_done(stage: str, overrides: list[str], a, fp: str | None, encoder: Path | None = None) -> Path:
    """Run a training stage unless its run dir holds it finished (stage_state). Returns the run dir."""
    st = stage_state(stage, overrides, a.force, f"pass --force to redo it, or {stage}:run_name=<another name>", fp,
                     encoder)
    if st.state == "reuse":
        print(f"[{stage}] already complete in {st.run_dir} with this config; reusing it (--force to redo)")
        return st.run_dir
    if st.state == "resume":
        print(f"[resume] {st.run_dir} has checkpoints but no done.json: resuming it")
    run_stage(stage, st.overrides, a)
    return st.run_dir


def main(argv=None) -> dict:
    from histories import dataset_fingerprint

    a = parse_args(argv)
    routed = split_overrides(a.overrides)
    name_split(routed)
    out: dict = {}
    if a.pretrained_path and a.pretrain_only:
        raise PipelineError("--pretrained-path is for stage 2; it makes no sense with --pretrain-only")

    # 1. data: the training stages read what collect made or checked (collect:data_path / data_seed included)
    ccfg = compose("collect", routed["collect"])
    data_path = _abs(ccfg.data_path)
    for s in ("pretrain", "train"):
        routed[s].insert(0, f"data_path={data_path}")  # first: a stage's own data_path= still wins
    if (data_path / "meta.json").is_file() and not ccfg.overwrite:
        note = check_dataset(data_path, OmegaConf.to_container(ccfg, resolve=True), routed["collect"])
        if note:
            print(f"[collect] note: {note}")
        print(f"[collect] dataset exists at {data_path}; reusing it")
    else:
        run_stage("collect", routed["collect"], a)
    out["data_path"] = str(data_path)

    # 2. stage 1
    fp = dataset_fingerprint(data_path)  # None before a dry run's collect: nothing to compare yet
    ckpt = a.pretrained_path
    if ckpt and not a.dry_run and not _abs(ckpt).is_file():
        raise PipelineError(f"--pretrained-path {ckpt}: no such file (give a stage-1 run's encoder-pretrained-*.pt, "
                            f"or leave the flag out to run stage 1)")
    if not a.train_only and not ckpt:
        prun = run_unless_done("pretrain", routed["pretrain"], a, fp)
        ckpt = str(prun / "encoder-pretrained-final.pt")
        out["pretrain_run_dir"] = str(prun)
        if (prun / "done.json").is_file():
            out["pretrain"] = rundir.read_json(prun / "done.json") or {}
    out["encoder_checkpoint"] = ckpt
    if a.pretrain_only:
        return out

    # 3. stage 2
    tr = list(routed["train"])
    if ckpt:
        # train.yaml's run_name then ends in -pretrained / -pretrained-frozen (hydra_cli.encoder_tag): the
        # same run_dir as the stage-by-stage quick start, never the scratch run's.
        tr.append(f"model.pretrained_encoder_path={_abs(ckpt)}")
        if a.freeze_encoder:
            tr.append("model.freeze_encoder=true")
    elif a.freeze_encoder:
        raise PipelineError("--freeze-encoder needs a pretrained encoder (run stage 1 or pass --pretrained-path)")
    trun = run_unless_done("train", tr, a, fp, _abs(ckpt) if ckpt else None)
    out["train_run_dir"] = str(trun)

    # 4. evaluation
    if not a.no_eval:
        run_stage("evaluate", routed["evaluate"] + [f"run_dir={trun}"], a)
        if not a.dry_run:
            out["eval"] = rundir.read_json(trun / "eval.json") or {}
    if not a.dry_run:
        print_report(out)
    return out


def print_report(out: dict) -> None:
    print("\n=== CompressedAD two-stage pipeline ===")
    ev = out.get("eval") or {}
    test = ((ev.get("splits") or {}).get("test") or {}).get("summary") or {}
    rows = []
    if test:
        rows += [("held-out return, first episode", test.get("first_episode")),
                 (f"held-out return, last {test.get('last_k', 5)} episodes", test.get("last_k_mean")),
                 ("held-out optimal return", test.get("optimal_mean")),
                 ("held-out last episodes / optimal", test.get("last_k_normalized"))]
    if "pretrain" in out:
        pre = out["pretrain"]
        # R² against each feature's own mean: a decoder that ignores the latents scores 0 (see model/losses.py).
        rows += [("stage-1 R² (diagnostic goals; constant = 0)", pre.get("r2")),
                 ("stage-1 transition exact match", pre.get("acc_exact")),
                 ("  majority-class predictor", pre.get("baseline_acc_exact"))]
    for name, v in rows:
        print(f"  {name:<40} {v:8.3f}" if isinstance(v, (int, float)) else f"  {name:<40} {v}")
    if "train_run_dir" in out:
        print(f"  TensorBoard:  tensorboard --logdir {Path(out['train_run_dir']).parent}")
        png = Path(out["train_run_dir"]) / "eval.png"
        if png.is_file():
            print(f"  plot:         {png}")


if __name__ == "__main__":
    hydra_cli.run_args("two_stage")
