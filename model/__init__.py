"""CompressedAD models. Read in this order: embeddings -> transformer -> encoder -> compressor ->
decoder -> compressed_ad / ad -> reconstruction -> encoder_pretrainer; losses and checkpoint beside them."""

from model.ad import AD
from model.checkpoint import (
    EncoderCheckpointError,
    load_pretrained_encoder,
    save_encoder_checkpoint,
)
from model.compressed_ad import CompressedAD
from model.config import ConfigError, ModelConfig
from model.encoder_pretrainer import EncoderPretrainer

__all__ = [
    "AD",
    "CompressedAD",
    "ConfigError",
    "EncoderCheckpointError",
    "EncoderPretrainer",
    "ModelConfig",
    "build_model",
    "load_pretrained_encoder",
    "save_encoder_checkpoint",
]


def build_model(model_cfg, env_cfg):
    """The stage-2 network named by model_cfg.name ('ad_compressed' or 'ad')."""
    cfg = ModelConfig.from_cfg(model_cfg, env_cfg)
    if cfg.name == "ad_compressed":
        return CompressedAD(cfg, aux_recon=cfg.aux_recon_weight > 0)
    if cfg.name == "ad":
        return AD(cfg)
    raise ConfigError(f"unknown model.name={cfg.name!r}: use model=ad_compressed_dr or model=ad_dr")
