"""CompressionEncoder: folds [previous latents ; a window of transitions] into n_latent latent tokens.

Input sequence (bidirectional attention, padding keys masked):
    [ previous latents + latent_pos  (n_latent, absent at depth 0)
      window transition embeddings + seg_pos  (S)
      n_latent learned query tokens ]
The outputs at the query positions are the new latents. Applied repeatedly (segment 1, 2, 3, ...) it
builds the hierarchical memory: latents_k = E(latents_{k-1}, segment_k).

`model.latent_update: gated` makes the fold a GRU-style update instead of a replacement:
    latents_k = g * E(latents_{k-1}, segment_k) + (1 - g) * latents_{k-1},  g = sigmoid(W [E(.); latents_{k-1}])
per latent and channel, so content the gate keeps is carried to the next fold unchanged (a replacement must
re-encode it through every block at every fold). docs/design.md §4.3.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import EMB_STD, Block


class CompressionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_latent = cfg.n_latent
        self.seg_len = cfg.seg_len
        self.latent_pos = nn.Parameter(torch.randn(cfg.n_latent, d) * EMB_STD)  # marks "previous latent slot i"
        self.seg_pos = nn.Parameter(torch.randn(cfg.seg_len, d) * EMB_STD)  # position inside the segment
        self.queries = nn.Parameter(torch.randn(cfg.n_latent, d) * 0.02)  # small: outputs start from content  # one per output latent
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.enc_n_layer))
        self.ln_f = nn.LayerNorm(d)
        # Gated update (None: replace). Zero-initialised like every Linear bias: g starts at 0.5.
        self.gate = nn.Linear(2 * d, d) if cfg.latent_update == "gated" else None

    def forward(self, prev_latents, has_prev, seg_emb, seg_mask):
        """prev_latents [B, n, d] or None; has_prev bool [B] (False: ignore prev_latents for that row);
        seg_emb [B, S, d] embedded transitions; seg_mask bool [B, S] (True = real transition).
        Returns latents [B, n, d]."""
        b, s, d = seg_emb.shape
        if s > self.seg_len:
            raise ValueError(f"segment of {s} transitions exceeds model.seg_len={self.seg_len}")
        if prev_latents is None:
            prev_latents = seg_emb.new_zeros(b, self.n_latent, d)
            has_prev = torch.zeros(b, dtype=torch.bool, device=seg_emb.device)
        x = torch.cat(
            [prev_latents + self.latent_pos, seg_emb + self.seg_pos[:s], self.queries.expand(b, -1, -1)], dim=1
        )
        key_ok = torch.cat(
            [has_prev[:, None].expand(b, self.n_latent), seg_mask,
             torch.ones(b, self.n_latent, dtype=torch.bool, device=seg_emb.device)], dim=1
        )
        # Every row can see the query keys, so no row is fully masked (which would give NaN).
        mask = key_ok[:, None, None, :]
        x = self.drop(x)
        for blk in self.blocks:
            x, _ = blk(x, mask=mask)
        new = self.ln_f(x[:, -self.n_latent:])
        if self.gate is None:
            return new
        g = torch.sigmoid(self.gate(torch.cat([new, prev_latents], dim=-1)))
        # Rows without previous latents have nothing to keep: their latents are the encoder's output.
        return torch.where(has_prev[:, None, None], g * new + (1 - g) * prev_latents, new)
