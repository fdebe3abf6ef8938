"""Model configuration: one dataclass shared by every network in model/.

Built from the Hydra `model` and `env` groups by `ModelConfig.from_cfg`: every reader of the model group
(build_model, train.py, pretrain_encoder.py) goes through it, so each key is parsed in one place. The architecture keys listed in
`ENCODER_ARCH_KEYS` are the stage-1 -> stage-2 contract: an encoder checkpoint records them and loading
refuses a checkpoint whose values differ (see model/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from errors import UserError

# Keys that fix the shapes of encoder + shared embedding weights. Anything else (dropout, depth weights,
# learning rates) may differ between the two stages.
ENCODER_ARCH_KEYS = ("grid_size", "n_actions", "d_model", "n_head", "enc_n_layer", "n_latent", "seg_len",
                     "latent_update", "state_features", "keep_recent")
# What a checkpoint written before a key joined ENCODER_ARCH_KEYS was built with. keep_recent is not a weight
# shape but the fold length (seg_len - keep_recent) stage 1 trained the encoder on: stage 2 must fold the same.
ARCH_KEY_DEFAULTS = {"latent_update": "replace", "state_features": "scalar", "keep_recent": 0}


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent configuration; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = "ad_compressed"  # which network: ad_compressed | ad | pretrain_encoder (config/model/<file>.yaml)
    grid_size: int = 9  # G: states are (x, y) in [0, G-1]
    n_actions: int = 5  # stay, +x, -x, +y, -y
    d_model: int = 64  # width of every transformer
    n_head: int = 4  # attention heads (d_model must be divisible)
    n_layer: int = 4  # decoder blocks (CompressedAD and AD)
    enc_n_layer: int = 2  # CompressionEncoder blocks
    n_latent: int = 20  # latent tokens a compression produces
    seg_len: int = 80  # raw-window capacity; the window is compressed when it holds this many transitions
    # Kept window (issue 22): when the window is full its oldest seg_len - keep_recent transitions are folded and
    # the newest keep_recent stay raw, so after the first fold the decoder always sees >= keep_recent of them.
    # 0 = the window empties at every fold (what every config and checkpoint written before the key means).
    keep_recent: int = 0
    context_len: int = 80  # AD baseline only: sliding-window length in transitions
    dropout: float = 0.1
    detach_old_latents: bool = False  # stop gradients through all but the most recent compression
    label_segments: bool = True  # also predict the actions inside compressed segments (see CompressedAD)
    recon_n_layer: int = 2  # ReconstructionDecoder blocks (stage 1 and the stage-2 auxiliary loss)
    recon_loss: str = "mse"  # 'mse' on f(tau) (docs/design.md §5) or 'ce' (per-field cross-entropy)
    recon_decoder: str = "parallel"  # ReconstructionDecoder: 'parallel' (latents only) | 'causal' (teacher-forced)
    #   | 'causal_fields' (causal + field-level autoregression inside a transition; needs recon_loss='ce')
    # Stage 1 only: initialise encoder and reconstruction decoder with a position-addressable code already
    # wired (model/encoder_pretrainer.py slot_init). Init only: no new encoder weights (the reconstruction
    # decoder gets `latent_pos`). Dataclass default False: stage 2 never reads it.
    pretrain_slot_init: bool = False
    # Reconstruction decoder: also read every folded transition out of the flattened latents by a linear map
    # per (segment age, position), added to the attention decoder's logits (each field's, with causal_fields).
    recon_linear_readout: bool = False
    # Stage 1: > 0 adds the task-relevant targets (goal cell, visited cells of the folded history, read from
    # the latents; model/task_targets.py) to the reconstruction loss with this weight. 0 = reconstruction only.
    recon_task_weight: float = 0.0
    max_compression_depth: int = 3  # deepest hierarchy trained; sizes the reconstruction segment table
    # What the shared transition embedding reads of a state: 'scalar' (x, y scaled to [0, 1]) | 'onehot'
    # (those and a one-hot per coordinate; model/embeddings.py input_features). The model yaml sets it; this
    # default is what a model.pt or encoder checkpoint written before the key was built with.
    state_features: str = "scalar"
    latent_update: str = "replace"  # how a fold writes the latents: 'replace' | 'gated' (model/encoder.py)
    # What a stage-2 fold reads of a segment: 'embeddings' (the shared transition embeddings, as stage 1) |
    # 'decoder' (those + a zero-initialised projection of the decoder's hidden states over [latents ; segment],
    # RMT-style: the encoder sees what the decoder made of the segment in the context of the memory). Not an
    # encoder-architecture key: the encoder's weights are the same; CompressedAD owns the projection.
    memory_reads: str = "embeddings"
    bptt_segments: int | None = None  # folds with gradients per sample (newest ones); None = all
    # Training forward with masks instead of data-dependent shapes (no .nonzero(): no host sync, one graph
    # for torch.compile). Same result, more arithmetic on unused slots. Also set inside torch.compile.
    static_shapes: bool = False
    # Stage 2 from a stage-1 encoder (train.py; docs/design.md §6). Not architecture: checkpoints may differ.
    pretrained_encoder_path: str | None = None  # encoder-pretrained-*.pt; None = from scratch
    freeze_encoder: bool = False  # encoder weights frozen (no grad, not in the optimizer)
    freeze_embeddings: bool | None = None  # shared embed_context / embed_ln; None = follow freeze_encoder
    aux_recon_weight: float = 0.0  # > 0: CompressedAD gets a reconstruction head and this auxiliary loss weight

    @property
    def fold_len(self) -> int:
        """Transitions a fold takes out of the raw window (and the length of every compressed segment the
        rollout schedule cuts): seg_len - keep_recent."""
        return self.seg_len - self.keep_recent

    @property
    def feat_dim(self) -> int:
        """Width of the transition features f(tau) = [s/(G-1), onehot(a), r, s'/(G-1)]."""
        return 2 + self.n_actions + 1 + 2

    @property
    def in_dim(self) -> int:
        """Width of what the shared embedding reads (input_features): f(tau) [+ 4 one-hot coordinates]."""
        return self.feat_dim + (4 * self.grid_size if self.state_features == "onehot" else 0)

    @classmethod
    def from_cfg(cls, model_cfg, env_cfg) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: model_cfg[k] for k in names if k in model_cfg}
        if kw.get("aux_recon_weight") is None:  # null in a hand-written config = off
            kw["aux_recon_weight"] = 0.0
        kw["aux_recon_weight"] = float(kw["aux_recon_weight"])
        kw["grid_size"] = int(env_cfg["grid_size"])
        kw["n_actions"] = int(env_cfg["n_actions"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.d_model > 0 and self.d_model % self.n_head == 0,
             f"model.d_model={self.d_model} must be a positive multiple of model.n_head={self.n_head}")
        need(self.n_latent > 0, f"model.n_latent={self.n_latent} must be >= 1 (number of latent tokens)")
        need(self.seg_len > 0, f"model.seg_len={self.seg_len} must be >= 1")
        need(0 <= self.keep_recent < self.seg_len,
             f"model.keep_recent={self.keep_recent} must be in [0, model.seg_len={self.seg_len}): a fold must "
             "take at least one transition")
        need(self.context_len > 0, f"model.context_len={self.context_len} must be >= 1")
        need(self.n_layer > 0 and self.enc_n_layer > 0 and self.recon_n_layer > 0,
             "model.n_layer, model.enc_n_layer and model.recon_n_layer must all be >= 1")
        need(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        need(self.recon_loss in ("mse", "ce"), f"model.recon_loss={self.recon_loss!r}: use 'mse' or 'ce'")
        need(self.recon_decoder in ("parallel", "causal", "causal_fields"),
             f"model.recon_decoder={self.recon_decoder!r}: use 'parallel', 'causal' or 'causal_fields'")
        need(self.recon_decoder != "causal_fields" or self.recon_loss == "ce",
             "model.recon_decoder=causal_fields predicts classes field by field: it needs model.recon_loss=ce")
        need(self.state_features in ("scalar", "onehot"),
             f"model.state_features={self.state_features!r}: use 'scalar' or 'onehot'")
        need(self.latent_update in ("replace", "gated"),
             f"model.latent_update={self.latent_update!r}: use 'replace' or 'gated'")
        need(self.memory_reads in ("embeddings", "decoder"),
             f"model.memory_reads={self.memory_reads!r}: use 'embeddings' or 'decoder'")
        need(self.max_compression_depth >= 0,
             f"model.max_compression_depth={self.max_compression_depth} must be >= 0")
        need(self.grid_size >= 2, f"env.grid_size={self.grid_size} must be >= 2")
        need(self.bptt_segments is None or self.bptt_segments >= 0,
             f"model.bptt_segments={self.bptt_segments} must be >= 0 (or null: all folds get gradients)")
        need(self.recon_task_weight >= 0, f"model.recon_task_weight={self.recon_task_weight} must be >= 0")
        need(self.aux_recon_weight >= 0, f"model.aux_recon_weight={self.aux_recon_weight} must be >= 0")

    def arch_dict(self) -> dict:
        return {k: getattr(self, k) for k in ENCODER_ARCH_KEYS}

    def to_dict(self) -> dict:
        return asdict(self)
