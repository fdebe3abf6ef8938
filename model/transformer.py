"""Pre-LN transformer block on F.scaled_dot_product_attention, with an optional KV cache.

One block type serves the bidirectional encoder, the prefix-causal decoder and (with `kv` given) the
cross-attending reconstruction decoder; the attention pattern is always an explicit boolean mask so a
test can check exactly what each position sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_head, d // self.n_head).transpose(1, 2)

    def forward(self, x, mask=None, source=None, cache=None):
        """x [B, Lq, d]; source [B, Lk, d] for cross-attention (default: x itself);
        mask bool, broadcastable to [B, 1, Lq, Lk_total] (True = may attend);
        cache: (k, v) of earlier positions [B, h, Lp, hd], prepended to this call's keys.
        Returns (out, (k, v)) with k/v covering cache + this call, for the caller to keep."""
        src = x if source is None else source
        q = self._heads(self.q(x))
        k, v = self.kv(src).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(x.shape)
        return self.resid_drop(self.proj(y)), (k, v)


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x)). `cross=True` attends to an external, separately normed source."""

    def __init__(self, d_model: int, n_head: int, dropout: float, cross: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.ln_src = nn.LayerNorm(d_model) if cross else None
        self.attn = Attention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x, mask=None, source=None, cache=None):
        src = None if source is None else self.ln_src(source)
        a, kv = self.attn(self.ln1(x), mask=mask, source=src, cache=cache)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, kv


# Learned position / type / query vectors are added to LayerNorm'd transition embeddings (per-element std
# ~1). At GPT-2's 0.02 they would be ~1/50 of the content and positions would be nearly invisible at the
# start (measured: stage-1 reconstruction plateaued); they start at the content's scale instead.
EMB_STD = 1.0


def init_weights(module: nn.Module) -> None:
    """GPT-2 style init: small normal weights, zero biases."""
    for m in module.modules():
        if getattr(m, "_keep_init", False):  # embeddings initialised at the content's scale on purpose
            continue
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
