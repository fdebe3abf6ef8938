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
from model.task_targets import TaskHead
from model.transformer import init_weights


class EncoderPretrainer(Compressor):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.recon = ReconstructionDecoder(cfg)
        self.task = TaskHead(cfg) if cfg.recon_task_weight > 0 else None  # model/task_targets.py
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
        out = {"pred": pred, "latents": latents, "has_latents": has}
        if self.task is not None:
            out["task"] = self.task(latents)
        return out


# Frequencies (in units of pi over a segment) of the position code: a sharp kernel, peak 8 and every other
# position of a 40-slot segment <= 3 (the first K are used when fewer channels are free).
CODE_FREQS = (1, 3, 5, 9, 13, 19, 27, 37)


def position_code(t: torch.Tensor, n_freq: int) -> torch.Tensor:
    """t [...] in [0, 1] -> [..., 2 * n_freq]: [cos(pi f t), sin(pi f t)], f = CODE_FREQS[:n_freq]. The dot
    product of two codes is sum_f cos(pi f (t - t')): n_freq at t = t', <= 3 at 1/40 or more apart (K = 8)."""
    ang = t[..., None] * (math.pi * torch.tensor(CODE_FREQS[:n_freq], dtype=torch.float32))
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def _shift(n_freq: int, delta: float) -> torch.Tensor:
    """The matrix M with M @ position_code(t) = position_code(t + delta)."""
    ang = math.pi * delta * torch.tensor(CODE_FREQS[:n_freq], dtype=torch.float32)
    c, s = torch.diag(ang.cos()), torch.diag(ang.sin())
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


@torch.no_grad()
def slot_init(model: EncoderPretrainer, nats_per_unit: float = 1.0) -> None:
    """Initialise existing weights (no new encoder parameter: the encoder checkpoint is unchanged) so that
    at step 0 the encoder already writes a position-addressable code and the decoder already reads it
    (model.pretrain_slot_init, docs/design.md §5: which head attends to which slot, and why).

    Channels: the last R = 2K (K = min(head_dim / 2, d / 8, 8)) carry a position code (position_code); the
    other d - R hold content, split into n_head blocks. The shared transition embedding's LayerNorm gain is
    zeroed on the code channels (content keeps out of them), seg_pos and the latent queries are pure codes,
    the first encoder block's query / key rows read only code channels (gain: nats_per_unit per unit of
    the kernel), its value rows of head h copy a random orthonormal projection of the content channels and
    its output projection puts head h into content block h. The encoder's ln_f gain is zeroed on the code
    channels (the latents leave without it); the decoder adds a code of each latent's index itself
    (ReconstructionDecoder.latent_pos) and its queries carry the code of the latent that holds them."""
    cfg = model.cfg
    d, h = cfg.d_model, cfg.n_head
    hd = d // h
    k = min(hd // 2, d // 8, len(CODE_FREQS))
    r = 2 * k
    block = (d - r) // h  # content channels per head
    if k < 1 or block < 1 or hd < r:
        return
    code = slice(d - r, d)
    enc, dec = model.encoder, model.recon
    s, n = cfg.seg_len, cfg.n_latent
    gen = torch.Generator().manual_seed(0)
    model.embed_ln.weight[code] = 0.0
    model.embed_ln.bias[code] = 0.0
    enc.seg_pos.zero_()
    enc.seg_pos[:, code] = position_code((torch.arange(s) + 0.5) / s, k)
    lat_t = (torch.arange(n) + 0.5) / n
    enc.queries.zero_()
    # The query tokens are keys too. With their slot's code alone they would be all code, which LayerNorm
    # scales up ~2.6x against a segment token's, and head 0 (unshifted) would attend to its own query token
    # rather than its slot (measured: every 4th position read back at ~0.6 instead of ~1.0 accuracy). So they
    # carry the code negated (code(t + 1) = -code(t): odd frequencies; the query projection negates it back,
    # so head h still targets its slot and its own token scores -n_freq) beside a fixed unit-variance content
    # vector, which gives them a segment token's LayerNorm scale (a constant per latent: it carries nothing).
    enc.queries[:, code] = -position_code(lat_t - 0.5 / n + 0.5 / (n * h), k)  # head 0's slot, negated
    enc.queries[:, :d - r] = torch.randn(n, d - r, generator=gen)
    # LayerNorm scales: query and segment rows both hold unit-variance content on d - r channels + the code.
    ln_q = ln_seg = math.sqrt(d / (d - r + k))
    gain = math.sqrt(nats_per_unit * math.sqrt(hd) / (ln_q * ln_seg))
    attn = enc.blocks[0].attn
    attn.q.weight.zero_()
    attn.kv.weight.zero_()
    attn.proj.weight.zero_()
    content = torch.arange(d - r)
    for head in range(h):
        rows = slice(head * hd, head * hd + r)
        attn.q.weight[rows, code] = -gain * _shift(k, head / (n * h))
        attn.kv.weight[rows, code] = gain * torch.eye(r)
        proj, _ = torch.linalg.qr(torch.randn(d - r, block, generator=gen))  # orthonormal columns
        attn.kv.weight[d + head * hd: d + head * hd + block, content] = proj.T
        attn.proj.weight[head * block:(head + 1) * block, head * hd: head * hd + block] = torch.eye(block)
    enc.ln_f.weight[code] = 0.0
    enc.ln_f.bias[code] = 0.0
    # Decoder: query p carries the code of latent i(p), the latent holding slot floor((p + 0.5) n H / S).
    holder = ((torch.arange(s) + 0.5) * n * h / s).floor().long().clamp(max=n * h - 1) // h
    dec.latent_pos.zero_()
    dec.latent_pos[:, code] = position_code(lat_t, k)
    dec.pos[:, code] = position_code(lat_t[holder], k)
    ln_dec = math.sqrt(d / (d - r + k))  # both sides: unit-variance channels + code
    dgain = math.sqrt(nats_per_unit * math.sqrt(hd)) / ln_dec
    for blk in dec.blocks:
        for head in range(h):
            rows = slice(head * hd, head * hd + r)
            blk.attn.q.weight[rows] = 0.0
            blk.attn.q.weight[rows, code] = dgain * torch.eye(r)
            blk.attn.kv.weight[rows] = 0.0
            blk.attn.kv.weight[rows, code] = dgain * torch.eye(r)
    # The first cross-attention block copies the attended latent's content blocks into the query's content
    # channels (value / output projection = identity there), so the decoder starts out reading the code at
    # full scale rather than through two 0.02-std matrices.
    first = dec.blocks[0].attn
    first.kv.weight[d:] = 0.0
    first.proj.weight.zero_()
    for head in range(h):
        cols = slice(head * block, (head + 1) * block)
        first.kv.weight[d + head * hd: d + head * hd + block, cols] = torch.eye(block)
        first.proj.weight[cols, head * hd: head * hd + block] = torch.eye(block)
