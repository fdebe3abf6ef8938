"""Model configuration: one typed config (schema.ModelKeys + the env's keys) shared by every network in model/.

Built from the Hydra `model` and `env` groups by `ModelConfig.from_cfg`: every reader of the model group
(build_model, train.py, pretrain_encoder.py) goes through it, so each key is parsed in one place. The architecture keys listed in
`ENCODER_ARCH_KEYS` are the stage-1 -> stage-2 contract: an encoder checkpoint records them and loading
refuses a checkpoint whose values differ (see model/checkpoint.py).
"""

from __future__ import annotations

from typing import Literal

from schema import Checked, ConfigError, ModelKeys, check_model, key  # noqa: F401 -- ConfigError: the model package names it

# Keys that fix the shapes of encoder + shared embedding weights. Anything else (dropout, depth weights,
# learning rates) may differ between the two stages.
ENCODER_ARCH_KEYS = ("grid_size", "n_actions", "d_model", "n_head", "enc_n_layer", "n_latent", "seg_len",
                     "latent_update", "state_features", "keep_recent")
# What a checkpoint written before a key joined ENCODER_ARCH_KEYS was built with: the key's schema default. keep_recent
# is not a weight shape but the fold length (seg_len - keep_recent) stage 1 trained the encoder on: stage 2 must fold
# the same.
ARCH_KEY_DEFAULTS = {k: ModelKeys.model_fields[k].default for k in ("latent_update", "state_features", "keep_recent")}


class ModelConfig(ModelKeys, Checked):
    """The model group (its keys, types, ranges, docs and checkpoint defaults: schema.ModelKeys) plus the env's
    grid_size and n_actions; every network in model/ reads it."""

    grid_size: int = key("G: states are (x, y) in [0, G-1]; from env.grid_size", 9, ge=2, le=256)
    n_actions: Literal[5] = key("stay, +x, -x, +y, -y; from env.n_actions", 5)

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
        kw = {k: model_cfg[k] for k in cls.model_fields if k in model_cfg}
        w = kw.get("aux_recon_weight")
        kw["aux_recon_weight"] = 0.0 if w is None else float(w)  # null in a hand-written config = off
        kw["grid_size"] = int(env_cfg["grid_size"])
        kw["n_actions"] = int(env_cfg["n_actions"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Relations between keys (each key's own range is checked on construction): schema.check_model."""
        check_model(self.model_dump())

    def arch_dict(self) -> dict:
        return {k: getattr(self, k) for k in ENCODER_ARCH_KEYS}

    def to_dict(self) -> dict:
        return self.model_dump()
