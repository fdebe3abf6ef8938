"""Losses and diagnostics for both stages. Padding never counts: every reduction is masked by lengths.

Stage 2: cross-entropy over every valid window position (S labels per sample, not 1).
Stage 1: reconstruction of the raw transition features f(tau) of every folded transition, plus the
metrics that reveal a collapsed encoder (correlation, per-field accuracy, latent effective rank,
latent-ablation gap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.embeddings import featurize


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """lengths [...] -> bool [..., size], True at the first `length` positions."""
    return torch.arange(size, device=lengths.device) < lengths[..., None]


# ---- stage 2 --------------------------------------------------------------------------------------------
def action_loss(logits: torch.Tensor, batch: dict, last_only: bool = False,
                seg_logits: torch.Tensor | None = None) -> dict:
    """Mean cross-entropy of a_t over every valid window position (or only each window's last position),
    plus, when `seg_logits` [B, D', S, A] is given, every valid position of the batch's LAST D' compressed
    segment slots (D' < D when older folds ran without gradients, model.bptt_segments)."""
    win, win_len = batch["win"], batch["win_len"]
    target = win[..., 2].long()
    mask = lengths_mask(win_len, win.shape[1])
    if last_only:
        mask = torch.zeros_like(mask)
        mask[torch.arange(mask.shape[0]), win_len - 1] = True
    terms = [(logits, target, mask)]
    if seg_logits is not None and not last_only and seg_logits.shape[1] > 0:
        d = seg_logits.shape[1]
        seg, seg_len = batch["seg"][:, -d:], batch["seg_len"][:, -d:]
        terms.append((seg_logits, seg[..., 2].long(), lengths_mask(seg_len, seg.shape[2])))
    total = logits.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), device=logits.device)
    count = torch.zeros((), device=logits.device, dtype=torch.long)
    for lg, tg, mk in terms:
        ce = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none")
        total = total + (ce * mk.reshape(-1)).sum()
        with torch.no_grad():
            correct = correct + ((lg.argmax(-1) == tg) & mk).sum()
        count = count + mk.sum()
    n = count.clamp(min=1)
    return {"loss": total / n, "acc": correct.float() / n, "n_labels": count}


# ---- stage 1 --------------------------------------------------------------------------------------------
def _field_slices(cfg: ModelConfig):
    g, a = cfg.grid_size, cfg.n_actions
    sizes = [g, g, a, 2, g, g]  # ce head layout: sx, sy, a, r, nsx, nsy
    out, o = [], 0
    for s in sizes:
        out.append(slice(o, o + s))
        o += s
    return out


def reconstruction_loss(pred: torch.Tensor, seg: torch.Tensor, seg_len: torch.Tensor, cfg: ModelConfig):
    """pred [B, D, S, out] vs the raw transitions seg [B, D, S, 6]; mean over real transitions."""
    mask = lengths_mask(seg_len, seg.shape[2])  # [B, D, S]
    n = mask.sum().clamp(min=1)
    if cfg.recon_loss == "mse":
        target = featurize(seg, cfg.grid_size, cfg.n_actions)
        per = ((pred.float() - target) ** 2).mean(-1)
    else:
        per = 0.0
        for col, sl in enumerate(_field_slices(cfg)):
            per = per + F.cross_entropy(pred[..., sl].float().flatten(0, 2), seg[..., col].long().flatten(),
                                        reduction="none").view(mask.shape)
    return (per * mask).sum() / n


def decode_fields(pred: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Predictions -> integer transition fields [..., 6] (rounded states, argmax action, rounded reward)."""
    g = cfg.grid_size
    if cfg.recon_loss == "mse":
        p = pred.float()
        s = (p[..., 0:2] * (g - 1)).round().clamp(0, g - 1)
        a = p[..., 2:2 + cfg.n_actions].argmax(-1, keepdim=True).float()
        r = p[..., 2 + cfg.n_actions: 3 + cfg.n_actions].round().clamp(0, 1)
        ns = (p[..., -2:] * (g - 1)).round().clamp(0, g - 1)
        return torch.cat([s, a, r, ns], dim=-1).long()
    return torch.stack([pred[..., sl].argmax(-1) for sl in _field_slices(cfg)], dim=-1)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.float().flatten(), y.float().flatten()
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else 0.0


def effective_rank(latents: torch.Tensor) -> float:
    """exp(entropy of normalised singular values) of the batch's flattened, centred latents.
    ~0 for a constant encoder (all samples identical); up to min(B, n*d) when samples differ."""
    z = latents.float().flatten(1)
    zc = z - z.mean(0, keepdim=True)
    # Identical rows leave only float32 rounding of the mean (~1e-7 relative): that is a collapse, not rank 1.
    if zc.norm() <= 1e-5 * z.norm():
        return 0.0
    s = torch.linalg.svdvals(zc)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def reconstruction_metrics(pred, seg, seg_len, depth, cfg: ModelConfig, max_depth: int = 3) -> dict:
    """Correlation and per-field accuracy, overall and by sample depth (for TensorBoard pretrain/*)."""
    mask = lengths_mask(seg_len, seg.shape[2])
    out = {}
    if cfg.recon_loss == "mse":
        target = featurize(seg, cfg.grid_size, cfg.n_actions)
        m = mask[..., None].expand_as(target)
        out["correlation"] = pearson(pred.float()[m], target[m])
    else:
        out["correlation"] = pearson(decode_fields(pred, cfg)[mask].float(), seg[mask].float())
    fields = decode_fields(pred, cfg)
    truth = seg.long()
    checks = {
        "action": fields[..., 2] == truth[..., 2],
        "state": (fields[..., 0:2] == truth[..., 0:2]).all(-1),
        "next_state": (fields[..., 4:6] == truth[..., 4:6]).all(-1),
        "reward": fields[..., 3] == truth[..., 3],
    }
    for name, ok in checks.items():
        out[f"acc_{name}"] = float((ok & mask).sum() / mask.sum().clamp(min=1))
        for d in range(1, max_depth + 1):
            sel = mask & (depth[:, None, None] == d)
            if sel.any():
                out[f"acc_{name}_depth{d}"] = float((ok & sel).sum() / sel.sum())
    for d in range(1, max_depth + 1):
        sel = depth == d
        if sel.any():
            md = mask[sel]
            if cfg.recon_loss == "mse":
                t = featurize(seg[sel], cfg.grid_size, cfg.n_actions)
                mm = md[..., None].expand_as(t)
                out[f"correlation_depth{d}"] = pearson(pred[sel].float()[mm], t[mm])
    return out
