"""Startup validation of config keys: each script declares ONE table {dotted key: Rule} and calls
`check(cfg, TABLE)` first thing in main(cfg), so a bad value fails in one line that names the key and its
allowed values (ConfigError) before any data is read or anything is written:

    error: save_every=0 must be an integer >= 1 (write encoder-pretrained-<step>.pt every this many steps)

Tables are built from the shared pieces below (ENV_RULES, MODEL_RULES, SAMPLER_RULES, LOOP_RULES) plus the script's
own keys. tests/test_config.py::test_every_config_key_has_a_rule_and_the_defaults_pass composes every
script's config and fails if any key lacks a rule, so a new config key must come with its rule (add it to
the script's table, or to MODEL_RULES / SAMPLER_RULES for a model / sampler key).

Rules check one value at a time; relations between keys (n_latent <= seg_len, ...) are `check_model` and
the scripts' own checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from model.config import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one key accepts. kind: int | float | bool | str | choice | subset (a non-empty list of distinct
    choices) | weights (null or a list of numbers >= 0, not all zero). Bounds apply to int/float; choices to
    choice and subset; null=True also accepts null."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo excluded
    hi_open: bool = False  # hi excluded
    choices: tuple = ()
    null: bool = False
    note: str = ""  # what the key means / special values, appended to the message

    def allowed(self) -> str:
        if self.kind == "bool":
            s = "true or false"
        elif self.kind == "choice":
            s = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "str":
            s = "a string"
        elif self.kind == "subset":
            s = "a non-empty list of distinct values among " + ", ".join(map(str, self.choices))
        elif self.kind == "weights":
            s = "a list of numbers >= 0, not all zero"
        else:
            s = "an integer" if self.kind == "int" else "a finite number"
            lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
            hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
            if lo and hi and self.kind == "int" and not (self.lo_open or self.hi_open):
                s += f" in [{_num(self.lo)}, {_num(self.hi)}]"
            elif lo and hi:
                s += f" {lo} and {hi}"
            elif lo or hi:
                s += f" {lo or hi}"
        return f"null or {s}" if self.null else s

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str)
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.kind == "subset":
            return (isinstance(v, (list, tuple)) and len(v) > 0 and len(set(map(str, v))) == len(v)
                    and all(any(x == c and type(x) is type(c) for c in self.choices) for x in v))
        if self.kind == "weights":
            try:
                w = [float(x) for x in v] if not isinstance(v, (str, bytes, Mapping)) else None
            except (TypeError, ValueError):
                return False
            # [] is left to the script (it may mean "no depths", which the script names better)
            return w is not None and all(math.isfinite(x) and x >= 0 for x in w) and (not w or sum(w) > 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def integer(lo=None, hi=None, null=False, note="") -> Rule:
    return Rule("int", lo, hi, null=null, note=note)


def number(lo=None, hi=None, lo_open=False, hi_open=False, null=False, note="") -> Rule:
    return Rule("float", lo, hi, lo_open, hi_open, null=null, note=note)


def flag(note="") -> Rule:
    return Rule("bool", note=note)


def text(null=False, note="") -> Rule:
    return Rule("str", null=null, note=note)


def one_of(*choices, note="") -> Rule:
    return Rule("choice", choices=tuple(choices), note=note)


def subset(*choices, note="") -> Rule:
    return Rule("subset", choices=tuple(choices), note=note)


def weights(note="") -> Rule:
    return Rule("weights", null=True, note=note)


def message(key: str, value, rule: Rule) -> str:
    shown = "null" if value is None else repr(value) if isinstance(value, str) else value
    return f"{key}={shown} must be {rule.allowed()}" + (f" ({rule.note})" if rule.note else "")


def check_value(key: str, value, rule: Rule) -> None:
    if not rule.ok(value):
        raise ConfigError(message(key, value, rule))


def _select(cfg, key: str):
    node = cfg
    for part in key.split("."):
        try:
            if part not in node:
                return _ABSENT
            node = node[part]
        except TypeError:  # a scalar where a group was expected
            return _ABSENT
    return node


def check(cfg, rules: Mapping[str, Rule]) -> None:
    """Validate every key of `rules` present in cfg (DictConfig or dict); absent keys are skipped (the
    table may cover several model groups). Raises ConfigError naming the first bad key."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    for key, rule in rules.items():
        v = _select(cfg, key)
        if v is _ABSENT:
            continue
        if isinstance(v, (DictConfig, ListConfig)):
            v = OmegaConf.to_container(v, resolve=True)
        check_value(key, v, rule)


def leaf_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf of a (resolved) config; a list value is one leaf."""
    from omegaconf import DictConfig

    out = []
    for k, v in cfg.items():
        if isinstance(v, (dict, DictConfig)):
            out += leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Shared tables
# ---------------------------------------------------------------------------------------------------------
# torch.compile modes the `compile` key accepts ("reduce-overhead" adds CUDA graphs on CUDA), and the
# debug backend that traces the same graphs but runs them without code generation (seconds, not minutes,
# to compile on a CPU: what the tests use).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("aot_eager",)

# The config keys loop.LoopSettings reads (top level of train.yaml / pretrain.yaml), plus the other keys
# every training script shares. The training scripts merge this into their table.
LOOP_RULES = {
    "max_steps": integer(1, note="optimizer steps"),
    "batch_size": integer(1, note="global batch per optimizer step"),
    "grad_accum": integer(1),
    "lr": number(0, lo_open=True),
    "weight_decay": number(0),
    "adam_beta1": number(0, 1, hi_open=True, note="AdamW beta1"),
    "adam_beta2": number(0, 1, hi_open=True, note="AdamW beta2"),
    "warmup_steps": integer(0),
    "min_lr_ratio": number(0, 1),
    "grad_clip": number(0, note="0 disables clipping"),
    "log_every": integer(1),
    "checkpoint_every": integer(1),
    "keep_last": integer(1),
    "mixed_precision": one_of("no", "fp16", "bf16", note="fp16 needs a CUDA GPU"),
    "cpu": flag(),
    "seed": integer(0),
    "resume": flag(),
    "resume_from": text(null=True, note="a run dir or one of its checkpoints/step-N folders"),
    "overwrite": flag(),
    "progress": flag(),
    "cpu_threads": integer(1, 1024, null=True, note="torch CPU threads; null = torch's default"),
    "num_workers": integer(0, 256, note="DataLoader worker processes; 0 = sample in the main process"),
    "compile": one_of(False, True, *COMPILE_MODES, *COMPILE_BACKENDS, note="torch.compile the model; "
                      "reduce-overhead adds CUDA graphs"),
    "data_on_device": Rule("bool", null=True, note="histories on the accelerator; null = on for CUDA when "
                                                   "they fit"),
    "allow_data_change": flag(note="true: resume / load an encoder even though the data's fingerprint differs"),
    "data_seed": integer(0),
    "data_path": text(),
    "run_name": text(),
    "run_dir": text(),
}


ENV_RULES = {
    "env.name": text(note="names the dataset folder"),
    "env.grid_size": integer(2, 256, note="states are stored as uint8; a 1x1 grid has nothing to learn"),
    "env.horizon": integer(1, 100_000, note="steps per episode"),
    "env.n_actions": one_of(5, note="the Darkroom's fixed action set"),
    "env.reward_mode": one_of("every_step", "once", "key_to_door", note="key_to_door: Dark Key-to-Door"),
    "env.train_frac": number(0, 1, lo_open=True, note="fraction of goals used for training"),
    "env.split_seed": integer(0),
    "env.n_val_goals": integer(0, note="validation goals carved out of the train goals"),
    "env.max_train_tasks": integer(1, null=True, note="the first n train tasks of the seeded order; null = all"),
}

MODEL_RULES = {
    "model.name": one_of("ad_compressed", "ad", "pretrain_encoder", note="pick it with model=<file>"),
    "model.d_model": integer(1, 8192),
    "model.n_head": integer(1, 256),
    "model.n_layer": integer(1, 256),
    "model.enc_n_layer": integer(1, 256),
    "model.n_latent": integer(1, 1024, note="latent tokens per compression; also <= model.seg_len"),
    "model.seg_len": integer(1, 100_000),
    "model.keep_recent": integer(0, 100_000, note="raw transitions a fold leaves in the window; < model.seg_len"),
    "model.context_len": integer(1, 100_000),
    "model.dropout": number(0, 1, hi_open=True),
    "model.recon_n_layer": integer(1, 256),
    "model.recon_loss": one_of("mse", "ce"),
    "model.recon_decoder": one_of("parallel", "causal", "causal_fields",
                                  note="stage-1 ReconstructionDecoder (model/reconstruction.py)"),
    "model.max_compression_depth": integer(0, 64),
    "model.detach_old_latents": flag(),
    "model.label_segments": flag(),
    "model.static_shapes": flag(note="fixed segment slots and window length, masks (torch.compile, no host sync)"),
    "model.bptt_segments": integer(0, null=True, note="folds with gradients per sample; null = all"),
    "model.pretrained_encoder_path": text(null=True, note="an encoder-pretrained-*.pt; null = from scratch"),
    "model.freeze_encoder": flag(),
    "model.freeze_embeddings": Rule("bool", null=True, note="null = follow model.freeze_encoder"),
    "model.aux_recon_weight": number(0),
    "model.latent_update": one_of("replace", "gated", note="how a fold writes the latents (model/encoder.py)"),
    "model.memory_reads": one_of("embeddings", "decoder",
                                 note="what a stage-2 fold reads of a segment (decoder: RMT-style memory)"),
    "model.pretrain_slot_init": flag(note="stage 1: start with a position-addressable code wired (init only)"),
    "model.state_features": one_of("scalar", "onehot", note="what the shared embedding reads of a state"),
    "model.recon_task_weight": number(0, note="stage 1: weight of the goal / visited-cells targets; 0 = off"),
    "model.recon_linear_readout": flag(note="reconstruction decoder: add a linear readout of the latents per position"),
}

SAMPLER_RULES = {  # config/sampler/: how training samples are cut (stage 2: dataset.py, stage 1: dataset_pretrain.py)
    "sampler.schedule": one_of("random", "rollout", note="how training samples are cut (docs/design.md §4.4)"),
    "sampler.depth_weights": weights(note="one per depth 0..model.max_compression_depth; null = d+1"),
    "sampler.min_seg_len": integer(1, 100_000),
    "sampler.win_len_min": integer(1, 100_000, null=True, note="null = model.seg_len"),
    "sampler.win_len_max": integer(1, 100_000, null=True, note="null = model.seg_len"),
    "sampler.max_windows": integer(1, null=True, note="rollout schedule: first windows of each history; null = all"),
    "sampler.memory": one_of("exact", "carry", note="rollout schedule: memory folded from step 0 (exact) or carried "
                                                    "from the previous batch (carry; docs/design.md §4.4)"),
    "sampler.pretrain_depth_weights": weights(note="one per depth 1..model.max_compression_depth; null = d+1"),
    "sampler.pretrain_depth_curriculum": weights(
        note="fractions of pretrain_steps at which depths 2..model.max_compression_depth join; null = none"),
}


def check_model(model_cfg, sampler_cfg=None) -> None:
    """Relations between model keys that no single rule can express; with `sampler_cfg` (stage 2), also
    those between the model and how its training samples are cut."""
    n_latent, seg_len = model_cfg.get("n_latent"), model_cfg.get("seg_len")
    if isinstance(n_latent, int) and isinstance(seg_len, int) and n_latent > seg_len:
        raise ConfigError(f"model.n_latent={n_latent} must be <= model.seg_len={seg_len} (a compression folds "
                          f"seg_len transitions into n_latent tokens; more tokens than transitions is no "
                          f"compression and costs memory quadratic in n_latent)")
    keep = model_cfg.get("keep_recent")
    if isinstance(keep, int) and isinstance(seg_len, int) and keep >= seg_len:
        raise ConfigError(f"model.keep_recent={keep} must be < model.seg_len={seg_len}: a fold takes the oldest "
                          f"seg_len - keep_recent transitions of a full window, at least one")
    schedule = sampler_cfg.get("schedule", "random") if sampler_cfg is not None else "rollout"
    memory = sampler_cfg.get("memory", "exact") if sampler_cfg is not None else "exact"
    bptt = model_cfg.get("bptt_segments")
    if memory == "carry" and (schedule != "rollout" or not bptt):
        raise ConfigError(f"sampler.memory=carry needs sampler.schedule=rollout and model.bptt_segments >= 1 (the "
                          f"folds each sample redoes with gradients), got schedule={schedule}, bptt_segments={bptt}")
    if isinstance(keep, int) and keep > 0 and schedule != "rollout":
        raise ConfigError(f"model.keep_recent={keep} needs sampler.schedule=rollout (a random-schedule window "
                          f"has no kept transitions from a previous window); set sampler.schedule=rollout or "
                          f"model.keep_recent=0")
