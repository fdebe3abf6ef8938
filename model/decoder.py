"""Causal action decoder with an optional latent prefix and a KV cache.

Tokens (one per step of the raw window, every position is a query):
    token_t = embed(tau_{t-1}) + embed_state(s_t) + pos_t        (tau_{-1} := learned `begin` vector)
predicting a_t. The sequence is [latent prefix (P tokens) ; window tokens]; attention is prefix-LM:
    prefix rows  -> every prefix key (only if the sample has latents; always itself, to avoid empty rows)
    window rows  -> every prefix key (if the sample has latents) + window keys up to themselves.
Because prefix rows never see the window, the prefix K/V depend only on the latents: a rollout encodes
them once per compression and then pays one token per environment step.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import EMB_STD, Block
from transition import state


def prefix_lm_mask(has_prefix: torch.Tensor, n_prefix: int, n_window: int) -> torch.Tensor:
    """Boolean mask [B, 1, P+W, P+W] (True = may attend) for the decoder's prefix-LM pattern."""
    b, dev = has_prefix.shape[0], has_prefix.device
    p, w = n_prefix, n_window
    mask = torch.zeros(b, p + w, p + w, dtype=torch.bool, device=dev)  # prefix rows never see the window
    mask[:, :, :p] = has_prefix[:, None, None]
    # a prefix row of a sample without latents still sees itself (no NaN)
    mask[:, :p, :p] |= torch.eye(p, dtype=torch.bool, device=dev)
    mask[:, p:, p:] = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
    return mask[:, None]


class ActionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, n_prefix: int, max_len: int):
        super().__init__()
        d = cfg.d_model
        self.n_prefix = n_prefix
        self.max_len = max_len
        self.grid_scale = float(cfg.grid_size - 1)
        self.begin = nn.Parameter(torch.randn(d) * EMB_STD)  # stands in for tau_{t-1} at the window's first step
        self.embed_state = nn.Linear(2, d)  # the current cell: as loud as the transition embedding it joins
        nn.init.normal_(self.embed_state.weight, std=EMB_STD)
        nn.init.zeros_(self.embed_state.bias)
        self.embed_state._keep_init = True
        self.pos = nn.Parameter(torch.randn(max_len, d) * EMB_STD)
        self.prefix_pos = nn.Parameter(torch.randn(n_prefix, d) * EMB_STD) if n_prefix else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_actions)

    def window_tokens(self, prev_emb: torch.Tensor, states: torch.Tensor, start: int = 0) -> torch.Tensor:
        """prev_emb [B, W, d] = embedding of tau_{t-1} (or `begin`), states [B, W, 2] -> tokens [B, W, d]
        at window positions start .. start+W-1."""
        w = states.shape[1]
        if start + w > self.max_len:
            raise ValueError(f"window position {start + w - 1} exceeds the position table ({self.max_len})")
        return prev_emb + self.embed_state(states.float() / self.grid_scale) + self.pos[start:start + w]

    def prev_embeddings(self, ctx_emb: torch.Tensor) -> torch.Tensor:
        """ctx_emb [B, W, d] of tau_0..tau_{W-1} -> [begin, tau_0, ..., tau_{W-2}] (shift right by one)."""
        b, _, d = ctx_emb.shape
        return torch.cat([self.begin.expand(b, 1, d), ctx_emb[:, :-1]], dim=1)

    def tokens(self, ctx_emb: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """Tokens of a whole window win [B, W, 6] (positions 0 .. W-1) whose transitions embed as ctx_emb."""
        return self.window_tokens(self.prev_embeddings(ctx_emb), state(win))

    def forward(self, tokens, prefix=None, has_prefix=None):
        """Full (training / recompute) pass. tokens [B, W, d]; prefix [B, P, d] latents or None.
        Returns logits [B, W, n_actions]."""
        return self.head(self.hidden(tokens, prefix, has_prefix))

    def hidden(self, tokens, prefix=None, has_prefix=None):
        """The final hidden states [B, W, d] of the window tokens (what the action head reads)."""
        w = tokens.shape[1]
        if prefix is None:
            x, p = tokens, 0
            mask = torch.ones(w, w, dtype=torch.bool, device=tokens.device).tril()
        else:
            p = prefix.shape[1]
            x = torch.cat([prefix + self.prefix_pos, tokens], dim=1)
            mask = prefix_lm_mask(has_prefix, p, w)
        return self.ln_f(self._run(x, mask)[0][:, p:])

    def _run(self, x: torch.Tensor, mask=None, cache=None):
        """Dropout, then every block, x attending (under `mask`) to the per-layer (k, v) `cache` of earlier
        positions (None: none) and to itself; returns the last block's output and the cache extended by x."""
        x = self.drop(x)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, mask=mask, cache=None if cache is None else cache[i])
            new_cache.append(kv)
        return x, new_cache

    # ---- incremental (rollout) path -------------------------------------------------------------------
    def prefix_cache(self, prefix: torch.Tensor):
        """Encode the latent prefix once; returns the per-layer (k, v) cache of its P positions. Prefix rows
        attend to every prefix row (all samples have latents here)."""
        return self._run(prefix + self.prefix_pos)[1]

    def extend(self, tokens: torch.Tensor, cache):
        """Several new window tokens [E, L, d] at once, each attending to everything cached and causally to
        the new ones before it (what L calls of `step` compute). Returns the new cache."""
        p, n = cache[0][0].shape[2], tokens.shape[1]
        mask = torch.ones(n, p + n, dtype=torch.bool, device=tokens.device).tril(diagonal=p)
        return self._run(tokens, mask, cache)[1]

    def step(self, token: torch.Tensor, cache):
        """One new window token [E, 1, d] attending to everything cached (prefix + earlier window tokens).
        Returns (logits [E, n_actions], new cache)."""
        x, cache = self._run(token, cache=cache)
        return self.head(self.ln_f(x[:, -1])), cache
