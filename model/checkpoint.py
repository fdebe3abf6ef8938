"""Encoder checkpoint I/O — the stage-1 -> stage-2 contract (docs/design.md §6).

Format (torch.save dict):
    {'encoder_state_dict', 'embed_context_state_dict', 'embed_ln_state_dict',
     'global_step': int, 'config': plain dict (model config incl. the architecture keys, env config,
     'data_fingerprint' of the stage-1 dataset)}
Written atomically (temp file + os.replace) so a crash never leaves a torn file under the final name.
Loading checks everything before a weight is copied: the dict's keys and types, the architecture, the data
fingerprint (unless allow_data_change), and that every tensor is a finite floating tensor of the shape the
model expects (`weights_problem`, also used for stage-2 model.pt files by evaluate.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from atomic_io import atomic_torch_save
from errors import UserError
from model.config import ARCH_KEY_DEFAULTS, ENCODER_ARCH_KEYS, ModelConfig

# The weights the checkpoint holds: its key -> the model attribute they belong to.
PARTS = {"encoder_state_dict": "encoder", "embed_context_state_dict": "embed_context",
         "embed_ln_state_dict": "embed_ln"}
REQUIRED_KEYS = (*PARTS, "global_step", "config")


class EncoderCheckpointError(UserError, ValueError):
    """A pretrained-encoder checkpoint that cannot be used; the message names the file and the fix."""


def save_encoder_checkpoint(path, model: nn.Module, global_step: int, config: dict) -> None:
    """The contract dict of any (unwrapped) model with .encoder, .embed_context, .embed_ln."""
    ckpt = {part: getattr(model, attr).state_dict() for part, attr in PARTS.items()}
    atomic_torch_save(ckpt | {"global_step": int(global_step), "config": config}, path)


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
        have = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EncoderCheckpointError(
            f"{p} is not a CompressedAD encoder checkpoint (needs keys {list(REQUIRED_KEYS)}, has {have}); "
            f"use an encoder-pretrained-*.pt written by pretrain_encoder.py")
    if not isinstance(ckpt["config"], dict):
        raise EncoderCheckpointError(
            f"{p} has a {type(ckpt['config']).__name__} as 'config' instead of the dict of model settings "
            f"pretrain_encoder.py writes: the file is damaged or foreign; re-run stage 1")
    if isinstance(ckpt["global_step"], bool) or not isinstance(ckpt["global_step"], int):
        raise EncoderCheckpointError(f"{p} has a non-integer 'global_step' ({ckpt['global_step']!r}): the file "
                                     f"is damaged or foreign; re-run stage 1")
    return ckpt


def weights_problem(state, want: Mapping[str, torch.Tensor], name: str) -> str | None:
    """What is wrong with a loaded state dict `state` for a module whose state_dict() is `want`, naming
    the first bad key, or None. Checks what load_state_dict does not: every tensor is floating where the
    model's is (load_state_dict silently casts int64 to float32), and finite (a NaN weight otherwise only
    shows up as a NaN loss or an all-zero evaluation much later)."""
    if not isinstance(state, Mapping):
        return f"'{name}' is a {type(state).__name__}, not a dict of tensors"
    missing = [k for k in want if k not in state]
    if missing:
        return f"'{name}' lacks {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = [k for k in state if k not in want]
    if extra:
        return f"'{name}' has the unexpected key {extra[0]!r}"
    for k, ref in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            return f"'{name}.{k}' is a {type(v).__name__}, not a tensor"
        if tuple(v.shape) != tuple(ref.shape):
            return f"'{name}.{k}' has shape {list(v.shape)}, the model needs {list(ref.shape)}"
        if ref.is_floating_point() != v.is_floating_point() or (not ref.is_floating_point() and v.dtype != ref.dtype):
            return f"'{name}.{k}' has dtype {v.dtype}, the model needs {ref.dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"'{name}.{k}' holds NaN or infinite values"
    return None


def check_architecture(saved: dict, current: ModelConfig, path) -> None:
    model_cfg = saved.get("model", saved)
    if not isinstance(model_cfg, dict):
        raise EncoderCheckpointError(f"{path} has a {type(model_cfg).__name__} as config['model'] instead of "
                                     f"the dict of model settings: the file is damaged or foreign; re-run stage 1")
    diffs = []
    for k in ENCODER_ARCH_KEYS:
        have = model_cfg.get(k, ARCH_KEY_DEFAULTS.get(k, "<missing>"))
        want = getattr(current, k)
        if have != want:
            diffs.append(f"{k}: checkpoint={have} current={want}")
    if diffs:
        raise EncoderCheckpointError(
            f"encoder checkpoint {path} has a different architecture — " + "; ".join(diffs)
            + " — set these model.* keys to the checkpoint's values or re-run stage 1 with the new ones")


def load_pretrained_encoder(model: nn.Module, path, freeze_encoder: bool = False,
                            freeze_embeddings: bool | None = None, log=print, data_fingerprint: str | None = None,
                            allow_data_change: bool = False) -> dict:
    """Load encoder + shared embeddings into `model` (CompressedAD). Frozen parts get requires_grad=False,
    so they receive no gradient and the optimizer (built from trainable parameters) never sees them.
    freeze_embeddings=None follows freeze_encoder. `data_fingerprint` (of the stage-2 data): refuse an
    encoder pretrained on other data unless allow_data_change. Returns the checkpoint dict."""
    log(f"Loading pretrained encoder from {path}")
    ckpt = read_encoder_checkpoint(path)
    check_architecture(ckpt["config"], model.cfg, path)
    was = ckpt["config"].get("data_fingerprint")
    if was and data_fingerprint and was != data_fingerprint and not allow_data_change:
        raise EncoderCheckpointError(
            f"encoder checkpoint {path} was pretrained on other data (fingerprint {was}) than this run's "
            f"data_path (fingerprint {data_fingerprint}): pretrain on this data, point data_path at the data "
            f"stage 1 used, or pass allow_data_change=true to fine-tune it on this data anyway")
    for part, attr in PARTS.items():
        bad = weights_problem(ckpt[part], getattr(model, attr).state_dict(), part)
        if bad:
            raise EncoderCheckpointError(f"{path}: {bad}; the file is damaged or not from this model: re-run "
                                         f"stage 1 or use an earlier encoder-pretrained-<step>.pt")
    if freeze_embeddings is None:
        freeze_embeddings = freeze_encoder
    # weights_problem has checked every key, shape and dtype load_state_dict checks: nothing here can fail
    for part, attr in PARTS.items():
        getattr(model, attr).load_state_dict(ckpt[part])
        getattr(model, attr).requires_grad_(not (freeze_encoder if attr == "encoder" else freeze_embeddings))
    log(f"  step {ckpt['global_step']}; encoder {'frozen' if freeze_encoder else 'fine-tuned'}, "
        f"shared embeddings {'frozen' if freeze_embeddings else 'fine-tuned'}")
    return ckpt
