"""The part of the model that stage 1 trains and stage 2 inherits: shared embeddings + encoder.

`Compressor` owns `embed_context`, `embed_ln` (shared with the decoder) and `encoder`, under exactly the
attribute names the encoder checkpoint stores (docs/design.md §6). `compress` runs the hierarchical
schedule on a batch of right-aligned segment slots, with the current weights, every call (latents are
never cached across training steps).
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.embeddings import input_features
from model.encoder import CompressionEncoder


class TransitionEmbedding(nn.Module):
    """embed_ln(embed_context(f(tau))) — a mixin-style base for every model that embeds transitions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_context = nn.Linear(cfg.in_dim, cfg.d_model)
        self.embed_ln = nn.LayerNorm(cfg.d_model)

    def embed_transitions(self, trans: torch.Tensor) -> torch.Tensor:
        return self.embed_ln(self.embed_context(input_features(trans, self.cfg)))


class Compressor(TransitionEmbedding):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = CompressionEncoder(cfg)

    def fold_inputs(self, seg_emb: torch.Tensor, seg: torch.Tensor, latents, has: torch.Tensor) -> torch.Tensor:
        """What the encoder reads of a segment when folding it into `latents` (None or [B, n, d], `has` [B]):
        here its transition embeddings seg_emb [B, S, d] (seg [B, S, 6] are the raw transitions). CompressedAD
        overrides it for `model.memory_reads: decoder`. Every fold — training, replay, rollout — goes through it."""
        return seg_emb

    def static_path(self) -> bool:
        """Masks instead of data-dependent shapes: asked for (cfg.static_shapes) or inside torch.compile,
        where .nonzero() would break the graph."""
        return bool(self.cfg.static_shapes) or torch.compiler.is_compiling()

    def compress(self, seg: torch.Tensor, seg_len: torch.Tensor, detach_old: bool = False,
                 return_prefixes: bool = False, no_grad_slots: int = 0,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None):
        """seg [B, D, S, 6], seg_len [B, D] (right-aligned slots; 0 = unused) ->
        (latents [B, n, d] or None when D == 0, has_latents bool [B]).

        Slot k of a sample is folded into that sample's running latents only if it is used; the encoder
        runs only on those rows (samples of different depths share a batch without paying for padding).
        With return_prefixes=True also returns, per slot k, the (latents, has_latents) the sample had
        *before* folding slot k — the memory a rollout decodes segment k's window with.
        no_grad_slots=j folds the first j slots without building a graph (truncated backpropagation through
        the folds: the memory is built from the real preceding history, gradients reach only the newest
        D - j folds); the values are the same as with gradients.
        On the `static_path()` it runs the encoder on every row of every slot and keeps its output only where
        the slot is used (torch.where): fixed shapes, no host sync, same latents.
        init=(latents [B, n, d], has [B]): the memory each sample had before its first slot (sampler.memory=carry:
        carried from the previous batch); None = no memory.
        """
        static = self.static_path()
        b, n_slots, s = seg.shape[:3]
        has = torch.zeros(b, dtype=torch.bool, device=seg.device) if init is None else init[1]
        prefixes = []
        if n_slots == 0:
            lat = None if init is None else init[0]
            return (lat, has, prefixes) if return_prefixes else (lat, has)
        n_old = max(0, min(int(no_grad_slots), n_slots))
        with torch.no_grad():
            emb_old = self.embed_transitions(seg[:, :n_old])  # [B, j, S, d], no graph
        emb = self.embed_transitions(seg[:, n_old:])  # [B, D - j, S, d], all newer slots at once
        pos = torch.arange(s, device=seg.device)
        latents = emb.new_zeros(b, self.cfg.n_latent, emb.shape[-1]) if init is None else init[0]
        for k in range(n_slots):
            prefixes.append((latents, has))
            e_k = emb_old[:, k] if k < n_old else emb[:, k - n_old]
            used = seg_len[:, k] > 0
            rows = slice(None) if static else used.nonzero(as_tuple=True)[0]  # the samples that fold slot k
            if not static and rows.numel() == 0:
                continue
            prev = latents[rows]
            if detach_old:
                prev = prev.detach()  # gradients reach only the newest compression
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= n_old):
                e_rows = self.fold_inputs(e_k[rows], seg[rows, k], prev, has[rows])
                new = self.encoder(prev, has[rows], e_rows, pos[None, :] < seg_len[rows, k, None])
                latents = (torch.where(used[:, None, None], new, latents) if static
                           else latents.index_copy(0, rows, new))
            has = has | used
        return (latents, has, prefixes) if return_prefixes else (latents, has)
