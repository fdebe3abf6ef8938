"""Encoder checkpoint I/O — the stage-1 -> stage-2 contract (docs/design.md §6).

Format (torch.save dict):
    {'encoder_state_dict', 'embed_context_state_dict', 'embed_ln_state_dict',
     'global_step': int, 'config': plain dict (model config incl. the architecture keys, env config)}
Written atomically (temp file + os.replace) so a crash never leaves a torn file under the final name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from atomic_io import atomic_torch_save
from model.config import ENCODER_ARCH_KEYS, ModelConfig

REQUIRED_KEYS = ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict", "global_step", "config")


class EncoderCheckpointError(ValueError):
    """A pretrained-encoder checkpoint that cannot be used; the message names the file and the fix."""


def encoder_checkpoint(model: nn.Module, global_step: int, config: dict) -> dict:
    """The contract dict for any model with .encoder, .embed_context, .embed_ln (unwrapped)."""
    return {
        "encoder_state_dict": model.encoder.state_dict(),
        "embed_context_state_dict": model.embed_context.state_dict(),
        "embed_ln_state_dict": model.embed_ln.state_dict(),
        "global_step": int(global_step),
        "config": config,
    }


def save_encoder_checkpoint(path, model: nn.Module, global_step: int, config: dict) -> None:
    atomic_torch_save(encoder_checkpoint(model, global_step, config), path)


def read_encoder_checkpoint(path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderCheckpointError(
            f"no pretrained encoder checkpoint at {p.resolve()}: run stage 1 (python pretrain_encoder.py) "
            f"or fix model.pretrained_encoder_path")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated file, wrong format, pickle of something else: all mean "not usable"
        raise EncoderCheckpointError(
            f"{p} is not a readable torch checkpoint ({type(e).__name__}); re-run stage 1 or point "
            f"model.pretrained_encoder_path at an encoder-pretrained-*.pt file") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EncoderCheckpointError(
            f"{p} is not a CompressedAD encoder checkpoint (needs keys {list(REQUIRED_KEYS)}, has {have}); "
            f"use an encoder-pretrained-*.pt written by pretrain_encoder.py")
    return ckpt


def check_architecture(saved: dict, current: ModelConfig, path) -> None:
    model_cfg = saved.get("model", saved)
    diffs = []
    for k in ENCODER_ARCH_KEYS:
        have = model_cfg.get(k, "<missing>")
        want = getattr(current, k)
        if have != want:
            diffs.append(f"{k}: checkpoint={have} current={want}")
    if diffs:
        raise EncoderCheckpointError(
            f"encoder checkpoint {path} has a different architecture — " + "; ".join(diffs)
            + " — set these model.* keys to the checkpoint's values or re-run stage 1 with the new ones")


def load_pretrained_encoder(model: nn.Module, path, freeze_encoder: bool = False,
                            freeze_embeddings: bool | None = None, log=print) -> dict:
    """Load encoder + shared embeddings into `model` (CompressedAD). Frozen parts get requires_grad=False,
    so they receive no gradient and the optimizer (built from trainable parameters) never sees them.
    freeze_embeddings=None follows freeze_encoder. Returns the checkpoint dict."""
    log(f"Loading pretrained encoder from {path}")
    ckpt = read_encoder_checkpoint(path)
    check_architecture(ckpt["config"], model.cfg, path)
    try:
        model.encoder.load_state_dict(ckpt["encoder_state_dict"])
        model.embed_context.load_state_dict(ckpt["embed_context_state_dict"])
        model.embed_ln.load_state_dict(ckpt["embed_ln_state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise EncoderCheckpointError(f"{path}: weights do not fit this model ({first})") from None
    if freeze_embeddings is None:
        freeze_embeddings = freeze_encoder
    for p in model.encoder.parameters():
        p.requires_grad_(not freeze_encoder)
    for mod in (model.embed_context, model.embed_ln):
        for p in mod.parameters():
            p.requires_grad_(not freeze_embeddings)
    log(f"  step {ckpt['global_step']}; encoder {'frozen' if freeze_encoder else 'fine-tuned'}, "
        f"shared embeddings {'frozen' if freeze_embeddings else 'fine-tuned'}")
    return ckpt
