"""ReconstructionDecoder: reads the raw transitions back out of the final latents (stage-1 objective).

One query per folded transition, built from (segment age, position in segment). Two modes
(`model.recon_decoder`):

- 'parallel' (the seed's): queries carry no data and cross-attend to the latents only (no self-attention),
  so every transition must be read out of the latents independently.
- 'causal': autoregressive over the sample's folded transitions, oldest first, teacher-forced: query j also
  gets the embedding of the *previous real* transition (across segment boundaries; a learned `begin` vector
  for the first) and self-attends causally to the earlier queries, then cross-attends to the latents. The
  decoder can then use what the prefix already tells (s_t = s'_{t-1} for ~95 % of Darkroom transitions), so
  the latents need carry only what the prefix cannot predict (actions, rewards, the first state). The prefix
  is the ground truth, never the decoder's or the encoder's output, so a constant encoder still cannot lower
  the loss below what the prefix alone gives: the latent-ablation gap and the `ablation_*` scores (the same
  decoder fed another sample's latents) measure exactly what the latents add.

A head predicts f(tau) ('mse') or per-field logits ('ce'). The target is always the raw transition.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.embeddings import featurize
from model.transformer import EMB_STD, Block


def recon_out_dim(cfg: ModelConfig) -> int:
    if cfg.recon_loss == "mse":
        return cfg.feat_dim
    g = cfg.grid_size
    return 4 * g + cfg.n_actions + 2  # sx, sy, a, r, nsx, nsy logits


def previous_transitions(seg: torch.Tensor, seg_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """seg [B, D, S, 6], seg_len [B, D] -> (prev [B, D*S, 6], has_prev bool [B, D*S]): for each flattened
    position, the latest real transition strictly before it (segments are consecutive in time, slots
    oldest first, padding at the end of each slot); has_prev False for a sample's first transition."""
    b, n_slots, s = seg.shape[:3]
    flat = seg.reshape(b, n_slots * s, -1)
    valid = (torch.arange(s, device=seg.device) < seg_len[..., None]).reshape(b, n_slots * s)
    idx = torch.where(valid, torch.arange(n_slots * s, device=seg.device).expand(b, -1), -1)
    last = idx.cummax(dim=1).values  # latest real position <= j
    prev_idx = torch.cat([last.new_full((b, 1), -1), last[:, :-1]], dim=1)  # latest real position < j
    prev = flat.gather(1, prev_idx.clamp(min=0)[..., None].expand(-1, -1, flat.shape[-1]))
    return prev, prev_idx >= 0


class ReconstructionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.causal = cfg.recon_decoder == "causal"
        self.max_segments = max(1, cfg.max_compression_depth)
        self.seg_age = nn.Embedding(self.max_segments, d)  # 0 = most recently folded segment
        self.pos = nn.Parameter(torch.randn(cfg.seg_len, d) * EMB_STD)
        if self.causal:
            # Teacher-forcing input: its own embedding of the previous transition (not the shared
            # embed_context, which belongs to the encoder checkpoint).
            self.prev_embed = nn.Linear(cfg.feat_dim, d)
            self.prev_ln = nn.LayerNorm(d)
            self.begin = nn.Parameter(torch.randn(d) * EMB_STD)
            self.self_blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.recon_n_layer))
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, cross=True) for _ in range(cfg.recon_n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, recon_out_dim(cfg))

    def forward(self, latents: torch.Tensor, seg: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
        """latents [B, n, d]; seg [B, D, S, 6] / seg_len [B, D] the folded segments (right-aligned slots,
        slot D-1 newest) -> predictions [B, D, S, out]. 'parallel' reads only the shapes of seg."""
        b, n_slots, seg_size = seg.shape[:3]
        if n_slots > self.max_segments:
            raise ValueError(f"{n_slots} segments to reconstruct but model.max_compression_depth="
                             f"{self.max_segments}; raise it")
        age = torch.arange(n_slots - 1, -1, -1, device=latents.device)
        q = self.seg_age(age)[:, None, :] + self.pos[None, :seg_size]  # [D, S, d]
        x = q.reshape(1, n_slots * seg_size, -1).expand(b, -1, -1)
        mask = None
        if self.causal:
            prev, has_prev = previous_transitions(seg, seg_len)
            emb = self.prev_ln(self.prev_embed(featurize(prev, self.cfg.grid_size, self.cfg.n_actions)))
            x = x + torch.where(has_prev[..., None], emb, self.begin)
            n = x.shape[1]
            valid = (torch.arange(seg_size, device=seg.device) < seg_len[..., None]).reshape(b, n)
            causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
            # Keys: earlier-or-same real positions; the diagonal always, so a padding row is never all-masked.
            mask = (causal & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=seg.device)
            mask = mask[:, None]
        for i, blk in enumerate(self.blocks):
            if self.causal:
                x, _ = self.self_blocks[i](x, mask=mask)
            x, _ = blk(x, source=latents)
        return self.head(self.ln_f(x)).view(b, n_slots, seg_size, -1)
