"""ReconstructionDecoder: reads the raw transitions back out of the final latents (stage-1 objective).

One query per folded transition, built from (segment age, position in segment), cross-attending to the
latents. `model.recon_decoder` (docs/design.md §5 says why each exists and what a constant encoder gains):

- 'parallel': the queries carry no data and do not see each other.
- 'causal': autoregressive over the sample's folded transitions, oldest first: query j also gets the
  embedding of the *previous real* transition (across segment boundaries; a learned `begin` vector for the
  first; always the ground truth) and self-attends causally to the earlier queries.
- 'causal_fields': 'causal', and inside each transition the fields are predicted in the order s, a, s', r,
  each head also given the earlier fields of the same transition: the true ones while training, the
  decoder's own argmax in eval mode (`teacher_fields`). Needs recon_loss='ce'.

A head predicts f(tau) ('mse') or per-field logits ('ce'). The target is always the raw transition.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.embeddings import input_features
from model.losses import field_slices, lengths_mask
from model.transformer import EMB_STD, Block


def recon_out_dim(cfg: ModelConfig) -> int:
    if cfg.recon_loss == "mse":
        return cfg.feat_dim
    return field_slices(cfg)[-1].stop  # sx, sy, a, r, nsx, nsy logits


def previous_transitions(seg: torch.Tensor, seg_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """seg [B, D, S, 6], seg_len [B, D] -> (prev [B, D*S, 6], has_prev bool [B, D*S]): for each flattened
    position, the latest real transition strictly before it (segments are consecutive in time, slots
    oldest first, padding at the end of each slot); has_prev False for a sample's first transition."""
    b, n_slots, s = seg.shape[:3]
    flat = seg.reshape(b, n_slots * s, -1)
    valid = lengths_mask(seg_len, s).reshape(b, n_slots * s)
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
        self.causal = cfg.recon_decoder in ("causal", "causal_fields")
        self.field_ar = cfg.recon_decoder == "causal_fields"
        self.max_segments = max(1, cfg.max_compression_depth)
        self.seg_age = nn.Embedding(self.max_segments, d)  # 0 = most recently folded segment
        self.pos = nn.Parameter(torch.randn(cfg.seg_len, d) * EMB_STD)
        # pretrain_slot_init: a code of each latent's index added to the latents this decoder reads (the
        # encoder's output then need not carry which latent it is; model/encoder_pretrainer.py slot_init).
        self.latent_pos = nn.Parameter(torch.zeros(cfg.n_latent, d)) if cfg.pretrain_slot_init else None
        if self.causal:
            # Teacher-forcing input: its own embedding of the previous transition (not the shared
            # embed_context, which belongs to the encoder checkpoint).
            self.prev_embed = nn.Linear(cfg.in_dim, d)
            self.prev_ln = nn.LayerNorm(d)
            self.begin = nn.Parameter(torch.randn(d) * EMB_STD)
            self.self_blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.recon_n_layer))
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout, cross=True) for _ in range(cfg.recon_n_layer))
        self.ln_f = nn.LayerNorm(d)
        if self.field_ar:
            g, n_act = cfg.grid_size, cfg.n_actions
            self.head_state = nn.Linear(d, 2 * g)
            self.emb_state = nn.Embedding(g * g, d)  # the transition's own s (true or predicted)
            self.ln_action = nn.LayerNorm(d)
            self.head_action = nn.Linear(d, n_act)
            self.emb_action = nn.Embedding(n_act, d)
            # s' = dynamics(s, a) and r = [s' == goal] are not linear in the summed embeddings: one MLP each.
            self.mlp_next = _Mlp(d)
            self.head_next = nn.Linear(d, 2 * g)
            self.emb_next = nn.Embedding(g * g, d)
            for emb in (self.emb_state, self.emb_action, self.emb_next):  # at the scale of h (LayerNorm'd)
                nn.init.normal_(emb.weight, std=EMB_STD)
                emb._keep_init = True
            self.mlp_reward = _Mlp(d)
            self.head_reward = nn.Linear(d, 2)
        else:
            self.head = nn.Linear(d, recon_out_dim(cfg))
        self.readout = (nn.Linear(cfg.n_latent * d, self.max_segments * cfg.seg_len * recon_out_dim(cfg))
                        if cfg.recon_linear_readout else None)

    def forward(self, latents: torch.Tensor, seg: torch.Tensor, seg_len: torch.Tensor,
                teacher_fields: bool | None = None) -> torch.Tensor:
        """latents [B, n, d]; seg [B, D, S, 6] / seg_len [B, D] the folded segments (right-aligned slots,
        slot D-1 newest) -> predictions [B, D, S, out]. 'parallel' reads only the shapes of seg.
        teacher_fields ('causal_fields' only; None = self.training): feed the true earlier fields of each
        transition to the later fields' heads, else the decoder's own argmax."""
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
            emb = self.prev_ln(self.prev_embed(input_features(prev, self.cfg)))
            x = x + torch.where(has_prev[..., None], emb, self.begin)
            n = x.shape[1]
            valid = lengths_mask(seg_len, seg_size).reshape(b, n)
            causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
            # Keys: earlier-or-same real positions; the diagonal always, so a padding row is never all-masked.
            mask = (causal & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=seg.device)
            mask = mask[:, None]
        source = latents if self.latent_pos is None else latents + self.latent_pos
        for i, blk in enumerate(self.blocks):
            if self.causal:
                x, _ = self.self_blocks[i](x, mask=mask)
            x, _ = blk(x, source=source)
        h = self.ln_f(x).view(b, n_slots, seg_size, -1)
        extra = None
        if self.readout is not None:
            r = self.readout(latents.flatten(1)).view(b, self.max_segments, self.cfg.seg_len, -1)
            extra = r[:, age, :seg_size]  # slot k of D reads its age's maps
        if not self.field_ar:
            out = self.head(h)
            return out if extra is None else out + extra
        return self._fields(h, seg, self.training if teacher_fields is None else teacher_fields, extra)

    def _fields(self, h: torch.Tensor, seg: torch.Tensor, teacher: bool, extra: torch.Tensor | None = None):
        """Field-level autoregression: logits of s, then a | s, then s' | s, a, then r | s, a, s'; returned
        in the 'ce' layout (sx, sy, a, r, nsx, nsy). `extra` (the linear readout, same layout) is added to
        each field's logits before the field is fed on (its argmax in eval mode)."""
        g = self.cfg.grid_size
        t = seg.long()
        sx, sy, a, r, nsx, nsy = field_slices(self.cfg)  # the layout the loss reads
        spans = {"state": slice(sx.start, sy.stop), "action": a, "reward": r, "next": slice(nsx.start, nsy.stop)}

        def add(field, logits):
            return logits if extra is None else logits + extra[..., spans[field]]

        def cell(logits, cols):
            if teacher:
                return t[..., cols[0]] * g + t[..., cols[1]]
            return logits[..., :g].argmax(-1) * g + logits[..., g:].argmax(-1)

        state = add("state", self.head_state(h))
        z = h + self.emb_state(cell(state, (0, 1)))
        action = add("action", self.head_action(self.ln_action(z)))
        z = z + self.emb_action(t[..., 2] if teacher else action.argmax(-1))
        z = z + self.mlp_next(z)
        nxt = add("next", self.head_next(z))
        z = z + self.emb_next(cell(nxt, (4, 5)))
        z = z + self.mlp_reward(z)
        reward = add("reward", self.head_reward(z))
        return torch.cat([state, action, reward, nxt], dim=-1)


class _Mlp(nn.Module):
    """ln -> d x 4d GELU -> d, then ln (so the next head reads a normalised vector)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.ln(x))
