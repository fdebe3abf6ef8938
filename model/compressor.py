"""The part of the model that stage 1 trains and stage 2 inherits: shared embeddings + encoder.

`Compressor` owns `embed_context`, `embed_ln` (shared with the decoder) and `encoder`, under exactly the
attribute names the encoder checkpoint stores (DESIGN §6). `compress` runs the hierarchical schedule on a
batch of right-aligned segment slots, with the current weights, every call (latents are never cached
across training steps).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.embeddings import featurize
from model.encoder import CompressionEncoder


class TransitionEmbedding(nn.Module):
    """embed_ln(embed_context(f(tau))) — a mixin-style base for every model that embeds transitions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_context = nn.Linear(cfg.feat_dim, cfg.d_model)
        self.embed_ln = nn.LayerNorm(cfg.d_model)

    def embed_transitions(self, trans: torch.Tensor) -> torch.Tensor:
        return self.embed_ln(self.embed_context(featurize(trans, self.cfg.grid_size, self.cfg.n_actions)))


class Compressor(TransitionEmbedding):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = CompressionEncoder(cfg)

    def compress(self, seg: torch.Tensor, seg_len: torch.Tensor, detach_old: bool = False):
        """seg [B, D, S, 6], seg_len [B, D] (right-aligned slots; 0 = unused) ->
        (latents [B, n, d] or None when D == 0, has_latents bool [B]).

        Slot k of a sample is folded into that sample's running latents only if it is used; rows whose slot
        is unused keep their previous latents (torch.where), so samples of different depths share a batch.
        """
        b, n_slots, s = seg.shape[:3]
        has = torch.zeros(b, dtype=torch.bool, device=seg.device)
        if n_slots == 0:
            return None, has
        emb = self.embed_transitions(seg)  # [B, D, S, d], all slots at once
        pos = torch.arange(s, device=seg.device)
        latents = None
        for k in range(n_slots):
            used = seg_len[:, k] > 0
            prev = latents
            if prev is not None and detach_old:
                prev = prev.detach()  # gradients reach only the newest compression
            new = self.encoder(prev, has, emb[:, k], pos[None, :] < seg_len[:, k, None])
            latents = new if latents is None else torch.where(used[:, None, None], new, latents)
            has = has | used
        return latents, has
