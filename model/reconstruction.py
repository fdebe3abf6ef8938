"""ReconstructionDecoder: reads the raw transitions back out of the final latents (stage-1 objective).

One query per folded transition, built only from (segment age, position in segment) — no data — so the
only path from a sample's transitions to the prediction runs through its final latents. Queries
cross-attend to the latents only (no self-attention), and a head predicts f(tau) ('mse') or per-field
logits ('ce'). The target is always the raw transition, never something the encoder produced: a
constant encoder cannot drive this loss down (docs/design.md §5).
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import EMB_STD, Block


def recon_out_dim(cfg: ModelConfig) -> int:
    if cfg.recon_loss == "mse":
        return cfg.feat_dim
    g = cfg.grid_size
    return 4 * g + cfg.n_actions + 2  # sx, sy, a, r, nsx, nsy logits


class ReconstructionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.max_segments = max(1, cfg.max_compression_depth)
        self.seg_age = nn.Embedding(self.max_segments, d)  # 0 = most recently folded segment
        self.pos = nn.Parameter(torch.randn(cfg.seg_len, d) * EMB_STD)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, cross=True) for _ in range(cfg.recon_n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, recon_out_dim(cfg))

    def forward(self, latents: torch.Tensor, n_slots: int, seg_size: int) -> torch.Tensor:
        """latents [B, n, d] -> predictions [B, D, S, out] for right-aligned slots 0..D-1 (slot D-1 newest)."""
        if n_slots > self.max_segments:
            raise ValueError(f"{n_slots} segments to reconstruct but model.max_compression_depth="
                             f"{self.max_segments}; raise it")
        b = latents.shape[0]
        age = torch.arange(n_slots - 1, -1, -1, device=latents.device)
        q = self.seg_age(age)[:, None, :] + self.pos[None, :seg_size]  # [D, S, d]
        x = q.reshape(1, n_slots * seg_size, -1).expand(b, -1, -1)
        for blk in self.blocks:
            x, _ = blk(x, source=latents)
        return self.head(self.ln_f(x)).view(b, n_slots, seg_size, -1)
