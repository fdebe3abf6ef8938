"""The configuration layout (docs/design.md §12): a preset is one folder with one file per stage it changes,
each key of it differing from the stage's own value; each script composes only its own files of a preset, old
command-line spellings still work, and a stage's run identity depends on its own keys only. Every key of every
script's config is declared once, with its type, range and doc, in that script's schema (schema.py, `<Script>Config`),
and an unknown key or a bad value is refused before anything is written, in one line naming the key, what it may be
and what it means."""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import pytest
from conftest import raises_one_line
from omegaconf import OmegaConf

import collect
import evaluate
import loop
import pretrain_encoder
import rundir
import train
from hydra_cli import CONFIG_DIR, compose_config, flatten, rewrite_overrides
from model.config import ConfigError
from schema import Schema

STAGES = ("collect", "pretrain", "train", "evaluate")
PRESETS = ("quick", "mid", "full")
EXPERIMENT_DIR = Path(CONFIG_DIR) / "experiment"
# A preset's file per stage: experiment/<name>/<file>.yaml -> (the scripts that compose it, where its keys land)
PRESET_FILES = {"collect": (("collect",), ""), "pretrain": (("pretrain",), ""), "train": (("train",), ""),
                "evaluate": (("evaluate",), ""), "model": (("pretrain", "train"), "model."),
                "sampler": (("pretrain", "train"), "sampler.")}


def leaves(cfg) -> dict:
    return flatten(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_preset_adds_no_key_the_stage_does_not_declare(stage, preset):
    """A preset only sets values of keys the script's own config declares: nothing it never reads."""
    base = leaves(compose_config(stage, []))
    with_preset = leaves(compose_config(stage, [f"experiment={preset}"]))
    assert sorted(set(with_preset) - set(base)) == []
    assert set(base) - set(with_preset) == set()


def test_a_preset_is_one_folder_with_one_file_per_stage():
    """`ls config/experiment/<name>/` shows all of a preset: a file per stage it changes, nothing else;
    <name>.yaml beside it only names it (Hydra's choice), none.yaml has no folder."""
    named = {f.stem for f in EXPERIMENT_DIR.glob("*.yaml")}
    folders = {d.name for d in EXPERIMENT_DIR.iterdir() if d.is_dir()}
    assert named == folders | {"none"} and set(PRESETS) <= folders
    for name in named:
        assert set(OmegaConf.load(EXPERIMENT_DIR / f"{name}.yaml")) == set(), f"{name}.yaml only names the preset"
    for d in folders:
        assert {f.name for f in (EXPERIMENT_DIR / d).iterdir()} <= {f"{s}.yaml" for s in PRESET_FILES}, d


@functools.cache
def _composed(stage: str, preset: str, model: str | None) -> dict:
    groups = [f"model={model}"] if model else []
    return flatten(OmegaConf.to_container(compose_config(stage, [f"experiment={preset}", *groups]), resolve=False))


PRESET_FILE_PATHS = sorted(str(f.relative_to(EXPERIMENT_DIR)) for f in EXPERIMENT_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", PRESET_FILE_PATHS)
def test_every_key_of_a_preset_file_reaches_its_stage_and_differs_from_its_default(path):
    """Each key a preset file sets lands in every script that composes the file, and differs from what that
    script has without it (its own config, or for mid the quick file it starts from) for some training model:
    a key equal to its default would silently stop following that default when it is edited."""
    name, kind = path[:-len(".yaml")].split("/")
    raw = OmegaConf.load(EXPERIMENT_DIR / path)
    parents = [m[1] for d in raw.pop("defaults", []) if (m := re.fullmatch(rf"/experiment/(\w+)/{kind}@_here_", str(d)))]
    own = flatten(OmegaConf.to_container(raw, resolve=False))
    assert own or parents, f"{path} changes nothing"
    stages, prefix = PRESET_FILES[kind]
    for key, value in own.items():
        differs = False
        for stage in stages:
            for model in ("ad_compressed_dr", "ad_dr") if stage == "train" else (None,):
                assert _composed(stage, name, model)[prefix + key] == value, (stage, model, key)
                base = _composed(stage, parents[0] if parents else "none", model)
                assert prefix + key in base, f"{path}: {key} is not a {stage} key"
                differs |= base[prefix + key] != value
        assert differs, f"{path}: {key}={value!r} repeats its default: delete it from the preset"


def test_quick_preset_values_per_stage():
    """What experiment=quick sets, stage by stage (the values the single global preset used to set)."""
    col = compose_config("collect", ["experiment=quick"])
    assert (col.source.n_stream, col.source.n_stream_eval, col.source.eps_decay_steps) == (20, 5, 200)
    pre = compose_config("pretrain", ["experiment=quick"])
    assert (pre.pretrain_steps, pre.pretrain_batch_size, pre.pretrain_lr, pre.save_every) == (1000, 32, 0.001, 500)
    assert (pre.warmup_steps, pre.log_every, pre.checkpoint_every, pre.diag_every, pre.cpu_threads) == (
        100, 25, 500, 250, 1)
    tr = compose_config("train", ["experiment=quick"])
    assert (tr.max_steps, tr.batch_size, tr.lr, tr.heldout_every, tr.eval_every, tr.eval.n_episodes) == (
        1200, 16, 0.001, 200, 400, 20)
    assert (tr.model.n_latent, tr.model.seg_len, tr.model.n_layer, tr.model.dropout) == (10, 40, 3, 0.0)
    assert (tr.model.state_features, pre.model.state_features, pre.model.recon_linear_readout) == ("onehot", "onehot", True)
    ev = compose_config("evaluate", ["experiment=quick", "run_dir=x"])
    assert (ev.n_episodes, ev.seeds_per_goal, ev.data_path) == (40, 4, None)  # data: the run's own
    ad = compose_config("train", ["experiment=quick", "model=ad_dr"])
    assert ad.model.context_len == 40 and ad.sampler.win_len_max == 40  # follows the preset's seg_len


@pytest.mark.parametrize("preset", ("none", *PRESETS))
def test_stages_of_a_preset_agree_on_data_and_encoder_architecture(preset):
    from model.config import ENCODER_ARCH_KEYS

    cfgs = {s: compose_config(s, [f"experiment={preset}"]) for s in ("collect", "pretrain", "train")}
    assert len({str(c.data_path) for c in cfgs.values()}) == 1
    pre, tr = cfgs["pretrain"].model, cfgs["train"].model
    assert {k: pre.get(k) for k in ENCODER_ARCH_KEYS} == {k: tr.get(k) for k in ENCODER_ARCH_KEYS}
    assert pre.static_shapes == tr.static_shapes
    assert cfgs["pretrain"].sampler.min_seg_len == cfgs["train"].sampler.min_seg_len


@pytest.mark.parametrize("spelling", ["experiment=null", "~experiment", "experiment=none"])
def test_no_preset_spellings(spelling):
    assert rewrite_overrides("train", [spelling]) == ["experiment=none"]
    assert leaves(compose_config("train", [spelling])) == leaves(compose_config("train", []))


def _config_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, dst)
    return dst


def test_editing_an_evaluate_value_leaves_training_identities_alone(tmp_path):
    """An evaluate-only preset value used to be part of every training run's config.json, so changing it
    made existing runs "different runs" (refused on resume). Now only evaluate sees it."""
    cdir = _config_copy(tmp_path)
    f = cdir / "experiment" / "quick" / "evaluate.yaml"
    f.write_text(f.read_text().replace("n_episodes: 40", "n_episodes: 77"))
    assert compose_config("evaluate", ["experiment=quick"], str(cdir)).n_episodes == 77
    for stage in ("train", "pretrain"):
        for groups in ([], ["model=ad_dr"]) if stage == "train" else ([],):
            before = loop.to_plain(compose_config(stage, ["experiment=quick", *groups]))
            after = loop.to_plain(compose_config(stage, ["experiment=quick", *groups], str(cdir)))
            assert rundir.identity(before) == rundir.identity(after), stage
    # ... while a value the stage reads still changes it (the identity is not blind).
    g = cdir / "experiment" / "quick" / "train.yaml"
    g.write_text(g.read_text().replace("lr: 0.001", "lr: 0.002"))
    before = loop.to_plain(compose_config("train", ["experiment=quick"]))
    after = loop.to_plain(compose_config("train", ["experiment=quick"], str(cdir)))
    assert rundir.differing_keys(before, after) == ["lr (0.001 -> 0.002)"]


# ---- the command-line keys users were first given (docs/design.md §12) ------------------------------------
ORIGINAL_KEYS = {
    # script: [(what the user typed, where the value must land, the value)]; ORIGINAL_NOTES' keys
    "pretrain": [("pretrain_lr=0.0005", "pretrain_lr", 0.0005), ("pretrain_batch_size=64", "pretrain_batch_size", 64),
                 ("pretrain_steps=1000", "pretrain_steps", 1000),
                 ("max_compression_depth=2", "model.max_compression_depth", 2), ("n_latent=15", "model.n_latent", 15)],
    "train": [("pretrained_encoder_path=runs/p/encoder-pretrained-final.pt", "model.pretrained_encoder_path",
               "runs/p/encoder-pretrained-final.pt"), ("freeze_encoder=true", "model.freeze_encoder", True),
              ("lr=0.0001", "lr", 0.0001), ("n_latent=15", "model.n_latent", 15)],
    # the spellings of the previous layout, where the stage-1 budget sat in the model group
    "pretrain-old": [("model.pretrain_lr=0.0007", "pretrain_lr", 0.0007), ("model.pretrain_steps=9", "pretrain_steps", 9),
                     ("model.pretrain_batch_size=8", "pretrain_batch_size", 8), ("model.save_every=3", "save_every", 3)],
    # a bare sampler key gets its prefix
    "train-bare": [("min_seg_len=12", "sampler.min_seg_len", 12), ("max_windows=4", "sampler.max_windows", 4)],
}


@pytest.mark.parametrize("keys", sorted(ORIGINAL_KEYS))
@pytest.mark.parametrize("preset", ("none", "quick"))
def test_original_command_line_keys_still_work(keys, preset):
    stage = keys.split("-")[0]
    typed = [t for t, _, _ in ORIGINAL_KEYS[keys]]
    cfg = compose_config(stage, rewrite_overrides(stage, [f"experiment={preset}", *typed]))
    for t, key, want in ORIGINAL_KEYS[keys]:
        assert OmegaConf.select(cfg, key) == want, (t, key)
    # compose_config alone (what tests and experiments/ use) takes the old dotted spellings too
    if keys.endswith("old"):
        cfg = compose_config(stage, [f"experiment={preset}", *[t for t in typed if t.startswith("model.")]])
        for t, key, want in ORIGINAL_KEYS[keys]:
            assert not t.startswith("model.") or OmegaConf.select(cfg, key) == want, (t, key)
    assert not {"pretrain_lr", "save_every", "min_seg_len", "schedule"} & set(cfg.model)


def test_old_spelling_through_two_stage_reaches_stage_1_only():
    import two_stage

    routed = two_stage.split_overrides(["model.pretrain_steps=7", "pretrain_lr=0.01", "max_steps=5"])
    assert "pretrain_steps=7" in routed["pretrain"] and "pretrain_lr=0.01" in routed["pretrain"]
    assert not any("pretrain" in o for o in routed["train"] + routed["collect"] + routed["evaluate"])
    assert "max_steps=5" in routed["train"] and "max_steps=5" not in routed["pretrain"]


def test_old_spelling_on_the_command_line(tmp_path):
    """The real entry point: an old key spelling with a bad value fails with the current key's name."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "pretrain_encoder.py"), "model.pretrain_lr=0", f"run_dir={tmp_path}/r"],
                       check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: pretrain_lr=0 must be a finite number > 0 (peak AdamW learning rate)"), r.stderr


# ---- one typed model group, one entry-point pattern, one path rule -------------------------------------
def test_model_group_is_read_through_model_config(tiny):
    """aux_recon_weight and the freeze options are ModelConfig fields: build_model and train.py's task read
    the same parsed value."""
    import train
    from histories import load_histories
    from model import build_model

    cfg = tiny.compose("train", "model.aux_recon_weight=0.5", "model.freeze_embeddings=true")
    net = build_model(cfg.model, cfg.env)
    assert (net.cfg.name, net.cfg.aux_recon_weight, net.cfg.freeze_embeddings) == ("ad_compressed", 0.5, True)
    assert net.cfg.pretrained_encoder_path is None and net.cfg.freeze_encoder is False
    assert net.recon is not None  # the auxiliary head exists because aux_recon_weight > 0
    task = train.ActionPredictionTask(cfg, net, load_histories(tiny.data_path, cfg.env))
    assert task.aux_w == 0.5


SCRIPTS = {"collect.py": ("run", "collect"), "pretrain_encoder.py": ("run", "pretrain"), "train.py": ("run", "train"),
           "evaluate.py": ("run", "evaluate"), "two_stage.py": ("run_args", None),
           "test_pretrain_setup.py": ("run_args", None)}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_has_the_same_entry_point(script):
    """`main` does the work; the file ends in `if __name__ == "__main__":` + hydra_cli.run / run_args naming
    the script's own module (so its own error classes are the ones caught)."""
    import ast

    tree = ast.parse((Path(CONFIG_DIR).parent / script).read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'"
    calls = [n for n in ast.walk(last) if isinstance(n, ast.Call)]
    assert len(calls) == 1, ast.unparse(last)
    fn, config = SCRIPTS[script]
    args = [a.value for a in calls[0].args]
    assert ast.unparse(calls[0].func) == f"hydra_cli.{fn}"
    assert args == ([config, script[:-3]] if config else [script[:-3]])


def test_one_path_rule(tmp_path, monkeypatch):
    import two_stage
    from hydra_cli import abspath

    monkeypatch.chdir(tmp_path)
    import os

    assert abspath("runs/../runs/x") == os.path.join(os.getcwd(), "runs", "x") and abspath(None) is None
    assert abspath("~/y") == os.path.join(os.path.expanduser("~"), "y")
    os.symlink(tmp_path, tmp_path / "link")
    assert abspath("link/z") == os.path.join(os.getcwd(), "link", "z")  # a link stays a link
    assert two_stage._abs("runs/x") == Path(abspath("runs/x"))


def test_mul_interpolation_multiplies_integers_only():
    """hydra_cli.mul (`${mul:a,b}`): one key at a multiple of another, e.g. a memory-sweep arm's
    model.seg_len = 2 x model.keep_recent; anything but integers is refused."""
    from hydra_cli import mul

    assert compose_config("train", ["experiment=none", "model.keep_recent=9",
                                    "model.seg_len='${mul:${model.keep_recent},2}'"], CONFIG_DIR).model.seg_len == 18
    assert mul(3, 4, 5) == 60
    for bad in ((2.5, 2), (True, 3), ("4", 2)):
        with pytest.raises(TypeError, match="multiplies integers"):
            mul(*bad)


SCHEMA_OF = {"train": train.TrainConfig, "pretrain": pretrain_encoder.PretrainConfig, "collect": collect.CollectConfig,
             "evaluate": evaluate.EvaluateConfig}
# Keys a schema declares that not every YAML sets: only dark_key_to_door samples its tasks, and the stage-1 model keys
# are set by model/pretrain_encoder.yaml alone (stage 2 never reads them).
OPTIONAL_KEYS = {"env.max_train_tasks", "model.pretrain_slot_init", "model.recon_linear_readout",
                 "model.recon_task_weight"}


def declared(schema: type[Schema], prefix: str = "") -> dict:
    """{dotted key: pydantic FieldInfo} of every leaf key `schema` declares."""
    out = {}
    for name, f in schema.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Schema):
            out |= declared(f.annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = f
    return out


@pytest.mark.parametrize("preset", ("none", *PRESETS))
@pytest.mark.parametrize("env", ("darkroom", "darkroom_hard", "dark_key_to_door"))
@pytest.mark.parametrize("name, groups", [("train", []), ("train", ["model=ad_dr"]), ("pretrain", []), ("collect", []),
                                          ("evaluate", ["run_dir=x"])])
def test_every_config_key_is_declared_once_with_a_type_and_doc_and_the_presets_pass(name, groups, env, preset):
    """Every key of every composed config (every preset, env and model) is a key of the script's schema, with a
    type and a one-line doc; every key the schema declares is set by the YAML (the YAML holds the values, so a schema
    default never silently decides a run); and the composed values pass."""
    cfg = compose_config(name, [f"experiment={preset}", f"env={env}", *groups])
    keys, fields = set(leaves(cfg)), declared(SCHEMA_OF[name])
    assert sorted(keys - set(fields)) == [], f"config/{name}.yaml keys missing from {SCHEMA_OF[name].__name__}"
    assert sorted(set(fields) - keys - OPTIONAL_KEYS) == [], "schema keys no YAML sets"
    assert [k for k, f in fields.items() if f.annotation is None or not f.description] == []
    SCHEMA_OF[name].check(cfg)


@pytest.mark.parametrize("name", sorted(SCHEMA_OF))
def test_an_unknown_key_is_refused_at_startup_in_one_line(name):
    """A key added with +key=... (no YAML declares it) is refused before any work, naming the keys there are."""
    main = {"train": train.main, "pretrain": pretrain_encoder.main, "collect": collect.main, "evaluate": evaluate.main}
    cfg = compose_config(name, ["+env.colour=red"] + (["run_dir=x"] if name == "evaluate" else []))
    err = evaluate.EvalError if name == "evaluate" else ConfigError
    raises_one_line(err, r"unknown config key env.colour: the keys here are name, grid_size, horizon", main[name], cfg)


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
    ("train", "model.freeze_encoder=1", r"model.freeze_encoder=1 must be true or false \(encoder weights frozen"),
    ("train", "sampler.depth_weights=[0,0]", r"sampler.depth_weights=\[0, 0\] must be null or a list of numbers >= 0"),
    ("pretrain", "diag_batches=0", r"diag_batches=0 must be an integer >= 1"),
    ("pretrain", "save_every=-5", r"save_every=-5 must be an integer >= 1"),
    ("pretrain", "save_every=0", r"save_every=0 must be an integer >= 1"),
    ("pretrain", "pretrain_lr=0", r"pretrain_lr=0 must be a finite number > 0"),
])
def test_bad_value_names_the_key_and_allowed_values(tiny, tmp_path, script, override, match):
    main = train.main if script == "train" else pretrain_encoder.main
    raises_one_line(ConfigError, match, main, tiny.compose(script, override, run_dir=tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # refused before a run dir existed (save_every=0 used to leave one)
