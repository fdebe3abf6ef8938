"""The typed config schemas (pydantic), each key declared once with its type, range or choices and a one-line doc,
checked first thing by each script's `main` (`<Script>Config.check(cfg)`, docs/design.md §12). Here: the groups
and keys several scripts share (env, model, sampler, the loop's); each script's own top-level keys are its
`<Script>Config`. Relations between keys (n_latent <= seg_len, ...) are `check_model`, ModelConfig.validate and
the scripts' own checks.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import annotated_types as at
from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

from errors import UserError


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent configuration; the message says which key and how to fix it."""


class Schema(BaseModel):
    """A config group: unknown keys refused, no silent conversion (true is not 1, "3" is not 3), finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    prefix: ClassVar[str] = ""  # how the group's keys are named when it is validated on its own ("model.")

    @classmethod
    def check(cls, cfg) -> None:
        """Validate a composed config (DictConfig or dict) against this schema; ConfigError names the first bad key."""
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        try:
            cls(**data)
        except ValidationError as e:
            raise ConfigError(explain(cls, e, data)) from None


class Checked(Schema):
    """A schema that code builds itself (model.ModelConfig, loop.LoopSettings): a bad value raises ConfigError on
    construction. Never the type of a group inside another schema: pydantic would call this __init__ for it."""

    def __init__(self, **kw):
        try:
            super().__init__(**kw)
        except ValidationError as e:
            raise ConfigError(explain(type(self), e, kw)) from None


def key(doc: str, default: Any = PydanticUndefined, **bounds) -> Any:
    """One key: its one-line doc, its default if code may omit it (required otherwise), its bounds (ge, gt, le, lt)."""
    return Field(default, description=doc, **bounds)


class Allowed(str):
    """Annotated metadata: what a key of a kind no plain type says accepts, as the error line words it."""


def _weights(v):
    if v and (min(v) < 0 or sum(v) == 0):  # [] is left to the script (it may mean "no depths")
        raise ValueError("weights")
    return v


def _distinct(v):
    if len(set(v)) != len(v):
        raise ValueError("distinct")
    return v


# null or one weight per depth
Weights = Annotated[list[float] | None, AfterValidator(_weights),
                    Allowed("null or a list of numbers >= 0, not all zero")]


def subset(*choices: str) -> Any:
    """A non-empty list of distinct values among `choices`."""
    return Annotated[list[Literal[choices]], Field(min_length=1), AfterValidator(_distinct),
                     Allowed("a non-empty list of distinct values among " + ", ".join(choices))]


_BOUNDS = ((at.Gt, ">", "gt"), (at.Ge, ">=", "ge"), (at.Lt, "<", "lt"), (at.Le, "<=", "le"))  # lower ones first


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def allowed(f) -> str:
    """What the key of FieldInfo `f` accepts, in words."""
    words = next((m for m in f.metadata if isinstance(m, Allowed)), None)
    if words:
        return words
    t, args = f.annotation, get_args(f.annotation)
    null = type(None) in args and get_origin(t) is not Literal
    if null:
        t = next(a for a in args if a is not type(None))
    if t is bool:
        s = "true or false"
    elif get_origin(t) is Literal:
        s = "one of " + ", ".join(map(str, get_args(t)))
    elif t is str:
        s = "a string"
    else:
        b = [(op, _num(getattr(m, name))) for kind, op, name in _BOUNDS for m in f.metadata if isinstance(m, kind)]
        s = "an integer" if t is int else "a finite number"
        if t is int and [op for op, _ in b] == [">=", "<="]:
            s += f" in [{b[0][1]}, {b[1][1]}]"
        elif b:
            s += " " + " and ".join(f"{op} {v}" for op, v in b)
    return f"null or {s}" if null else s


def explain(cls: type[Schema], err: ValidationError, data: dict) -> str:
    """The one line for the first error of validating `data` against `cls`."""
    e = err.errors()[0]
    names, node, field, value = [], cls, None, data
    for part in e["loc"]:
        fields = node.model_fields if isinstance(node, type) and issubclass(node, Schema) else {}
        if part not in fields:
            names += [part] if e["type"] == "extra_forbidden" else []
            break
        names.append(part)
        field, node, value = fields[part], fields[part].annotation, value.get(part) if isinstance(value, dict) else None
    name = cls.prefix + ".".join(map(str, names))
    if e["type"] == "extra_forbidden":
        return f"unknown config key {name}: the keys here are {', '.join(node.model_fields)}"
    if e["type"] == "missing":
        return f"{name} is missing from the config ({field.description}): set it in its YAML file"
    shown = "null" if value is None else repr(value) if isinstance(value, str) else value
    return f"{name}={shown} must be {allowed(field)} ({field.description})"


# ---------------------------------------------------------------------------------------------------------
# Groups several scripts share
# ---------------------------------------------------------------------------------------------------------
class EnvConfig(Schema):
    """config/env/*.yaml: which Darkroom variant (every script)."""

    name: str = key("names the dataset folder")
    grid_size: int = key("states are stored as uint8; a 1x1 grid has nothing to learn", ge=2, le=256)
    horizon: int = key("steps per episode", ge=1, le=100_000)
    n_actions: Literal[5] = key("the Darkroom's fixed action set")
    reward_mode: Literal["every_step", "once", "key_to_door"] = key("key_to_door: Dark Key-to-Door")
    train_frac: float = key("fraction of goals used for training", gt=0, le=1)
    split_seed: int = key("seed of the goal shuffle", ge=0)
    n_val_goals: int = key("validation goals carved out of the train goals", ge=0)
    max_train_tasks: int | None = key("the first n train tasks of the seeded order; null = all", None, ge=1)


class ModelKeys(Schema):
    """config/model/*.yaml (model.ModelConfig adds the env's grid_size and n_actions). The defaults are what a
    model.pt or encoder checkpoint written before the key existed was built with, not what a run gets (its YAML)."""

    prefix: ClassVar[str] = "model."
    name: Literal["ad_compressed", "ad", "pretrain_encoder"] = key("which network; pick it with model=<file>",
                                                                   "ad_compressed")
    d_model: int = key("width of every transformer", 64, ge=1, le=8192)
    n_head: int = key("attention heads (d_model must be divisible)", 4, ge=1, le=256)
    n_layer: int = key("decoder blocks (CompressedAD and AD)", 4, ge=1, le=256)
    enc_n_layer: int = key("CompressionEncoder blocks", 2, ge=1, le=256)
    n_latent: int = key("latent tokens per compression; also <= model.seg_len", 20, ge=1, le=1024)
    seg_len: int = key("raw-window capacity; the window is compressed when it holds this many transitions", 80,
                       ge=1, le=100_000)
    keep_recent: int = key("raw transitions a fold leaves in the window; < model.seg_len (0: it empties)", 0,
                           ge=0, le=100_000)
    context_len: int = key("AD baseline only: sliding-window length in transitions", 80, ge=1, le=100_000)
    dropout: float = key("in every transformer block", 0.1, ge=0, lt=1)
    detach_old_latents: bool = key("gradients reach only the newest compression", False)
    label_segments: bool = key("also predict the actions inside compressed segments", True)
    recon_n_layer: int = key("ReconstructionDecoder blocks", 2, ge=1, le=256)
    recon_loss: Literal["mse", "ce"] = key("reconstruction loss: mse on f(tau) | ce per field", "mse")
    recon_decoder: Literal["parallel", "causal", "causal_fields"] = key(
        "stage-1 ReconstructionDecoder (model/reconstruction.py); causal_fields needs recon_loss=ce", "parallel")
    pretrain_slot_init: bool = key("stage 1: start with a position-addressable code wired (init only)", False)
    recon_linear_readout: bool = key("reconstruction decoder: add a linear readout of the latents per position",
                                     False)
    recon_task_weight: float = key("stage 1: weight of the goal / visited-cells targets; 0 = off", 0.0, ge=0)
    max_compression_depth: int = key("deepest hierarchy trained; sizes the reconstruction segment table", 3,
                                     ge=0, le=64)
    state_features: Literal["scalar", "onehot"] = key("what the shared embedding reads of a state", "scalar")
    latent_update: Literal["replace", "gated"] = key("how a fold writes the latents (model/encoder.py)", "replace")
    memory_reads: Literal["embeddings", "decoder"] = key(
        "what a stage-2 fold reads of a segment (decoder: RMT-style memory)", "embeddings")
    bptt_segments: int | None = key("folds with gradients per sample; null = all", None, ge=0)
    static_shapes: bool = key("fixed segment slots and window length, masks (torch.compile, no host sync)", False)
    pretrained_encoder_path: str | None = key("an encoder-pretrained-*.pt; null = from scratch", None)
    freeze_encoder: bool = key("encoder weights frozen (no grad, not in the optimizer)", False)
    freeze_embeddings: bool | None = key("shared embed_context / embed_ln; null = follow model.freeze_encoder",
                                            None)
    aux_recon_weight: float = key("> 0: stage 2 gets a reconstruction head and this auxiliary loss weight", 0.0,
                                  ge=0)


class Segments(Schema):
    """config/sampler/*.yaml, what both stages share: how compressed segments are cut."""

    min_seg_len: int = key("compressed segments have lengths in [min_seg_len, model.seg_len]", ge=1, le=100_000)


class SamplerConfig(Segments):
    """Stage 2's samples (dataset.HistoryBatches)."""

    schedule: Literal["random", "rollout"] = key("how training samples are cut (docs/design.md §4.4)")
    depth_weights: Weights = key("one per depth 0..model.max_compression_depth; null = d+1")
    win_len_min: int | None = key("decoder-window length, at least; null = model.seg_len", ge=1, le=100_000)
    win_len_max: int | None = key("decoder-window length, at most; null = model.seg_len", ge=1, le=100_000)
    max_windows: int | None = key("rollout schedule: first windows of each history; null = all", ge=1)
    memory: Literal["exact", "carry"] = key("rollout schedule: memory folded from step 0 (exact) or carried from "
                                            "the previous batch (carry; docs/design.md §4.4)")


class PretrainSamplerConfig(Segments):
    """Stage 1's samples (dataset_pretrain.PretrainBatches)."""

    pretrain_depth_weights: Weights = key("one per depth 1..model.max_compression_depth; null = d+1")
    pretrain_depth_curriculum: Weights = key(
        "fractions of pretrain_steps at which depths 2..model.max_compression_depth join; null = none")


# torch.compile modes the `compile` key accepts ("reduce-overhead" adds CUDA graphs on CUDA), and the debug backend
# that traces the same graphs but runs them without code generation (seconds, not minutes, to compile on a CPU:
# what the tests use).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("aot_eager",)


class LoopOptions(Schema):
    """Top-level keys of train.yaml and pretrain.yaml that the loop reads (loop.LoopSettings), beside the budget."""

    grad_accum: int = key("micro-batches per optimizer step", 1, ge=1)
    weight_decay: float = key("AdamW decay of nn.Linear weight matrices", 0.01, ge=0)
    adam_beta1: float = key("AdamW beta1", 0.9, ge=0, lt=1)
    adam_beta2: float = key("AdamW beta2", 0.95, ge=0, lt=1)
    warmup_steps: int = key("linear warmup steps", 0, ge=0)
    min_lr_ratio: float = key("final lr as a fraction of the peak lr", 0.1, ge=0, le=1)
    grad_clip: float = key("max global grad norm; 0 disables clipping", 1.0, ge=0)
    log_every: int = key("scalars every this many steps", 50, ge=1)
    checkpoint_every: int = key("accelerate save_state for resume every this many steps", 1000, ge=1)
    keep_last: int = key("checkpoints kept", 2, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = key("fp16 needs a CUDA GPU", "no")
    cpu: bool = key("force the CPU even when a GPU is present", False)
    seed: int = key("init + data-sampling seed", 0, ge=0)
    resume: bool = key("continue from the latest checkpoint of run_dir", False)
    resume_from: str | None = key("a run dir or one of its checkpoints/step-N folders", None)
    overwrite: bool = key("replace whatever run_dir holds", False)
    progress: bool = key("tqdm bar", True)
    compile: Literal[(False, True, *COMPILE_MODES, *COMPILE_BACKENDS)] = key(
        "torch.compile the model; reduce-overhead adds CUDA graphs", False)


class Budget(Schema):
    """train.yaml's budget keys (pretrain.yaml names its own pretrain_steps / _batch_size / _lr)."""

    max_steps: int = key("optimizer steps", ge=1)
    batch_size: int = key("global batch per optimizer step", ge=1)
    lr: float = key("peak AdamW learning rate", gt=0)


class TrainingRun(LoopOptions):
    """What both training scripts' configs hold besides their own keys."""

    cpu_threads: int | None = key("torch CPU threads; null = torch's default", ge=1, le=1024)
    num_workers: int = key("DataLoader worker processes; 0 = sample in the main process", ge=0, le=256)
    data_on_device: bool | None = key("histories on the accelerator; null = on for CUDA when they fit")
    allow_data_change: bool = key("true: resume / load an encoder even though the data's fingerprint differs")
    data_seed: int = key("which collected dataset to read", ge=0)
    data_path: str = key("the dataset collect.py wrote")
    run_name: str = key("names run_dir")
    run_dir: str = key("TensorBoard, checkpoints and outputs of the run")
    env: EnvConfig
    model: ModelKeys


def check_model(model_cfg, sampler_cfg=None) -> None:
    """Relations between model keys that no single key's schema can express (one place: the startup check of a
    composed config and ModelConfig.validate both call it); with `sampler_cfg` (stage 2), also those between
    the model and how its training samples are cut. Keys absent from a partial config are not checked."""
    m = {k: v for k, v in dict(model_cfg).items() if v is not None}
    d_model, n_head, n_latent = m.get("d_model"), m.get("n_head"), m.get("n_latent")
    seg_len, keep = m.get("seg_len"), m.get("keep_recent")
    if isinstance(d_model, int) and isinstance(n_head, int) and (d_model <= 0 or d_model % n_head):
        raise ConfigError(f"model.d_model={d_model} must be a positive multiple of model.n_head={n_head}")
    if isinstance(n_latent, int) and isinstance(seg_len, int) and n_latent > seg_len:
        raise ConfigError(f"model.n_latent={n_latent} must be <= model.seg_len={seg_len} (a compression folds "
                          f"seg_len transitions into n_latent tokens; more tokens than transitions is no "
                          f"compression and costs memory quadratic in n_latent)")
    if isinstance(keep, int) and isinstance(seg_len, int) and not 0 <= keep < seg_len:
        raise ConfigError(f"model.keep_recent={keep} must be in [0, model.seg_len={seg_len}): a fold takes the "
                          f"oldest seg_len - keep_recent transitions of a full window, at least one")
    if m.get("recon_decoder") == "causal_fields" and m.get("recon_loss", "ce") != "ce":
        raise ConfigError("model.recon_decoder=causal_fields predicts classes field by field: it needs "
                          "model.recon_loss=ce")
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
