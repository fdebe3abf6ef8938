"""Stage-1 model: shared embeddings + CompressionEncoder (the Compressor) + ReconstructionDecoder.

forward(batch) compresses the batch's 1..3 segments hierarchically with the current weights and
reconstructs every folded transition from the final latents only.
"""

from __future__ import annotations

import math

import torch

from model.compressor import Compressor
from model.config import ModelConfig
from model.reconstruction import ReconstructionDecoder


class EncoderPretrainer(Compressor):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.recon = ReconstructionDecoder(cfg)
        from model.transformer import init_weights

        init_weights(self)
        if cfg.pretrain_slot_init:
            slot_init(self)

    def forward(self, batch: dict, latents_override: torch.Tensor | None = None) -> dict:
        seg, seg_len = batch["seg"], batch["seg_len"]
        if seg.shape[1] == 0:
            raise ValueError("stage-1 batches need depth >= 1 (nothing was compressed)")
        latents, has = self.compress(seg, seg_len, detach_old=self.cfg.detach_old_latents)
        if latents_override is not None:
            latents = latents_override
        pred = self.recon(latents, seg, seg_len)
        return {"pred": pred, "latents": latents, "has_latents": has}


def position_code(t: torch.Tensor, n_freq: int) -> torch.Tensor:
    """t [...] in [0, 1] -> [..., 2 * n_freq]: [cos(pi k t), sin(pi k t)], k = 1..n_freq. The dot product of
    two codes is sum_k cos(pi k (t - t')): n_freq at t = t', about -1 a chunk of 1/n_freq away."""
    ang = t[..., None] * (math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def _shift(n_freq: int, delta: float) -> torch.Tensor:
    """The matrix M with M @ position_code(t) = position_code(t + delta)."""
    ang = math.pi * delta * torch.arange(1, n_freq + 1, dtype=torch.float32)
    c, s = torch.diag(ang.cos()), torch.diag(ang.sin())
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


QUERY_CODE_SCALE = 0.03


@torch.no_grad()
def slot_init(model: EncoderPretrainer, nats_per_unit: float = 0.5) -> None:
    """Initialise existing weights (no new parameter: the encoder checkpoint is unchanged) so that at step 0
    latent i of the encoder attends softly to chunk i of the segment (S / n_latent transitions, each head
    a little offset inside it) and reconstruction query p to latent ~p * n_latent / S. Everything stays
    learnable: this is a starting point that makes a position-addressable code easy, not a mask.

    The last R = 2K channels (K = head_dim / 2 frequencies) carry a position code (position_code): the
    shared transition embedding's LayerNorm gain is zeroed there (content keeps out of them at init),
    seg_pos / the latent queries / the decoder's pos and latent_pos get codes of their positions
    t = (p + 0.5) / S and (i + 0.5) / n_latent, and in every encoder block and every reconstruction
    cross-attention block each head's first R query / key rows read only those channels, with a gain that
    makes the attention logit ~nats_per_unit * sum_k cos(pi k (t_q - t_k)) (peak minus a chunk away ~4.5
    nats), while the value rows ignore them. The other choices below keep the latents' content from being
    swamped by the code at step 0 (each measured; docs/design.md §5)."""
    cfg = model.cfg
    d, h = cfg.d_model, cfg.n_head
    hd = d // h
    k = min(hd // 2, d // 8)
    if k < 1:
        return
    r = 2 * k
    code = slice(d - r, d)
    enc, dec = model.encoder, model.recon
    model.embed_ln.weight[code] = 0.0
    model.embed_ln.bias[code] = 0.0
    s, n = cfg.seg_len, cfg.n_latent
    seg_code = position_code((torch.arange(s) + 0.5) / s, k)
    lat_code = position_code((torch.arange(n) + 0.5) / n, k)
    enc.seg_pos.zero_()  # the code only (random position vectors averaged over a chunk swamp the content)
    enc.seg_pos[:, code] = seg_code
    # Queries: the code only, at the scale of the attention output at init (~0.03 per channel), so the
    # first LayerNorm sees a pure code (sharp chunk attention) while the latents that come out are half
    # content: at full scale the code swamps the content in ln_f and the latents start out carrying
    # nothing (measured: ablation gap 0.006 at step 250 on quick).
    enc.queries.zero_()
    enc.queries[:, code] = QUERY_CODE_SCALE * lat_code
    # The latents leave the encoder without the code (ln_f gain 0 there, learnable): which latent is which
    # is known to the decoder by index, so it adds the code itself (ReconstructionDecoder.latent_pos).
    enc.ln_f.weight[code] = 0.0
    enc.ln_f.bias[code] = 0.0
    dec.latent_pos.zero_()
    dec.latent_pos[:, code] = lat_code
    dec.pos[:, code] = seg_code
    # LayerNorm scales, rough: a query row is all code (variance k / d per channel); a segment row is
    # content + code (the estimate counts the content twice: the measured logits were ~4 nats peak-to-far
    # with it, and the measured runs used it).
    ln_q = math.sqrt(d / k)
    ln_seg = 1.0 / math.sqrt((2 * (d - r) + k) / d)
    gain = math.sqrt(nats_per_unit * math.sqrt(hd) / (ln_q * ln_seg))

    def set_block(attn, offsets):
        for head, delta in enumerate(offsets):
            rows = slice(head * hd, head * hd + r)
            attn.q.weight[rows] = 0.0
            attn.q.weight[rows, code] = gain * _shift(k, delta)
            attn.kv.weight[rows] = 0.0  # the first d rows of kv are the keys
            attn.kv.weight[rows, code] = gain * torch.eye(r)
        attn.kv.weight[d:, code] = 0.0  # values: content only (the code says where, not what)

    # Heads of a latent spread over its chunk: offsets (j - (h-1)/2) / (n * h).
    offsets = [(j - (h - 1) / 2) / (n * h) for j in range(h)]
    for blk in enc.blocks:
        set_block(blk.attn, offsets)
    for blk in dec.blocks:
        set_block(blk.attn, [0.0] * h)
