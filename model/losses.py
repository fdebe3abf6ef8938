"""Losses and diagnostics for both stages. Padding never counts: every reduction is masked by lengths.

Stage 2: cross-entropy over every valid window position (S labels per sample, not 1).
Stage 1: reconstruction of the raw transition features f(tau) of every folded transition, plus the
metrics a decoder that ignores the latents cannot fake (R² against each feature's own mean, per-field
exact accuracy beside the majority-class accuracy, whole-transition exact match, the same scores with
shuffled latents) and the collapse detectors (latent effective rank, latent-ablation gap).
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.embeddings import featurize
from transition import FIELD_COLUMNS, FIELDS, N_FIELDS, NEXT_STATE, STATE, action


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """lengths [...] -> bool [..., size], True at the first `length` positions."""
    return torch.arange(size, device=lengths.device) < lengths[..., None]


# ---- stage 2 --------------------------------------------------------------------------------------------
def action_loss(logits: torch.Tensor, batch: dict, last_only: bool = False,
                seg_logits: torch.Tensor | None = None, labels: dict | None = None) -> dict:
    """Mean cross-entropy of a_t over every valid window position (or only each window's last position),
    plus, when `seg_logits` [B, D', S, A] is given, every valid position of the batch's LAST D' compressed
    segment slots (D' < D when older folds ran without gradients, model.bptt_segments).
    labels: the model's output, whose 'win_mask' / 'seg_target' + 'seg_mask' (CompressedAD with
    model.keep_recent > 0: which positions a rollout predicts, and slots decoded as longer windows) replace
    the masks and targets read from the batch's lengths."""
    labels = labels or {}
    win, win_len = batch["win"], batch["win_len"]
    target = action(win).long()
    mask = labels["win_mask"] if "win_mask" in labels else lengths_mask(win_len, win.shape[1])
    if last_only:
        mask = torch.zeros_like(mask)
        mask[torch.arange(mask.shape[0]), win_len - 1] = True
    terms = [(logits, target, mask)]
    if seg_logits is not None and not last_only and seg_logits.shape[1] > 0:
        d = seg_logits.shape[1]
        if "seg_target" in labels:
            terms.append((seg_logits, labels["seg_target"], labels["seg_mask"]))
        else:
            seg, seg_len = batch["seg"][:, -d:], batch["seg_len"][:, -d:]
            terms.append((seg_logits, action(seg).long(), lengths_mask(seg_len, seg.shape[2])))
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
def field_slices(cfg: ModelConfig) -> list[slice]:
    """The 'ce' logits layout of the reconstruction heads: one slice per packed column (sx, sy, a, r, nsx, nsy)."""
    g, a = cfg.grid_size, cfg.n_actions
    sizes = [{"sx": g, "sy": g, "a": a, "r": 2, "nsx": g, "nsy": g}[name] for name in FIELDS]  # in packed order
    return [slice(end - size, end) for size, end in zip(sizes, accumulate(sizes))]


# The four fields a transition is scored on: their packed columns are transition.FIELD_COLUMNS, their
# features of f(tau) = [s/(G-1), onehot(a), r, s'/(G-1)] are these slices. A state counts as right only if
# both coordinates are.
def _feature_slices(cfg: ModelConfig) -> dict:
    a = cfg.n_actions
    return {"state": slice(0, 2), "action": slice(2, 2 + a), "reward": slice(2 + a, 3 + a),
            "next_state": slice(3 + a, 5 + a)}


def reconstruction_loss(pred: torch.Tensor, seg: torch.Tensor, seg_len: torch.Tensor, cfg: ModelConfig):
    """pred [B, D, S, out] vs the raw transitions seg [B, D, S, 6]; mean over real transitions."""
    mask = lengths_mask(seg_len, seg.shape[2])  # [B, D, S]
    n = mask.sum().clamp(min=1)
    if cfg.recon_loss == "mse":
        target = featurize(seg, cfg.grid_size, cfg.n_actions)
        per = ((pred.float() - target) ** 2).mean(-1)
    else:
        per = 0.0
        for col, sl in enumerate(field_slices(cfg)):
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
    return torch.stack([pred[..., sl].argmax(-1) for sl in field_slices(cfg)], dim=-1)


def point_features(pred: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Predictions -> a point estimate of f(tau) [..., feat_dim], the thing R² scores. 'mse' predicts f(tau)
    itself; for 'ce' it is the expectation under the predicted distributions (coordinates: expected cell;
    action: the class probabilities, i.e. the expected one-hot; reward: P(r = 1)), the squared-error-optimal
    point estimate of what the head believes."""
    if cfg.recon_loss == "mse":
        return pred.float()
    g = cfg.grid_size
    sx, sy, a, r, nx, ny = (pred[..., sl].float().softmax(-1) for sl in field_slices(cfg))
    cells = torch.arange(g, device=pred.device, dtype=torch.float32) / (g - 1)
    coord = [(p * cells).sum(-1, keepdim=True) for p in (sx, sy, nx, ny)]
    return torch.cat([coord[0], coord[1], a, r[..., 1:2], coord[2], coord[3]], dim=-1)


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


def majority_fields(fields: torch.Tensor) -> torch.Tensor:
    """The majority-class predictor of a set of packed transitions [N, 6]: per field, its most common value
    (a state is one class per grid cell, so the mode is of the (x, y) pair, not of each coordinate).
    Returns one transition [6]; ties go to the smallest class (unique sorts, argmax takes the first)."""
    out = torch.zeros(N_FIELDS, dtype=torch.long, device=fields.device)
    for cols in FIELD_COLUMNS.values():
        values, counts = torch.unique(fields[:, list(cols)], dim=0, return_counts=True)
        out[list(cols)] = values[counts.argmax()].long()
    return out


def copy_previous_state(seg: torch.Tensor, seg_len: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The state [B, D, L, 2] a predictor gets by copying the previous transition's next state, which the
    teacher-forced prefix hands the reconstruction decoder: position i > 0 of segment j takes s' of position
    i - 1; position 0 of a segment the last valid s' of the used segment before it (the d segments are
    consecutive in their history); the first segment's position 0 has no predecessor and takes `fallback` [2]
    (the majority state).
    Darkroom states follow s' exactly, so this scores ~1: the bar a state accuracy must clear to mean that
    the latents, not the prefix, carry the state."""
    nxt = seg[..., NEXT_STATE].long()
    out = torch.roll(nxt, 1, dims=2)
    b, d = seg.shape[:2]
    last = nxt[torch.arange(b)[:, None], torch.arange(d)[None, :], (seg_len.long() - 1).clamp(min=0)]  # [B, D, 2]
    # A sample of depth d uses the LAST d slots (unused ones have length 0), so a segment's predecessor is the
    # slot before it only when that slot is used.
    used_before = torch.cat([torch.zeros_like(seg_len[:, :1]), seg_len[:, :-1]], dim=1) > 0  # [B, D]
    prev_last = torch.cat([last[:, :1], last[:, :-1]], dim=1)
    out[:, :, 0] = torch.where(used_before[..., None], prev_last, fallback.to(out))
    return out


def field_scores(point: torch.Tensor, fields: torch.Tensor, target: torch.Tensor, truth: torch.Tensor,
                 cfg: ModelConfig) -> dict:
    """Scores of predictions on N transitions: point [N, F] / fields [N, 6] predicted, target [N, F] =
    f(truth), truth [N, 6]. R² = 1 - SSE / SST with SST taken around each feature's own mean over these N
    (so predicting the means scores exactly 0 and a perfect prediction 1), per field (pooled over the
    field's features) and pooled over all features; exact accuracy per field and of whole transitions.
    An R² whose SST is 0 (a field constant over these N) is undefined and left out."""
    out = {}
    err = (point.float() - target) ** 2
    sst = (target - target.mean(0, keepdim=True)) ** 2
    if sst.sum() > 0:
        out["r2"] = float(1 - err.sum() / sst.sum())
    for name, sl in _feature_slices(cfg).items():
        if sst[:, sl].sum() > 0:
            out[f"r2_{name}"] = float(1 - err[:, sl].sum() / sst[:, sl].sum())
    for name, cols in FIELD_COLUMNS.items():
        out[f"acc_{name}"] = float((fields[:, cols] == truth[:, cols]).all(-1).float().mean())
    out["acc_exact"] = float((fields == truth).all(-1).float().mean())
    return out


@torch.no_grad()
def reconstruction_metrics(pred, seg, seg_len, depth, cfg: ModelConfig, max_depth: int = 3,
                           ablated_pred: torch.Tensor | None = None) -> dict:
    """Stage-1 scores that a decoder ignoring the latents cannot fake, overall and per sample depth (key
    suffix _depth<d>), each beside the same score of the constant predictor on the same transitions:
        r2, r2_<field>              variance explained (field_scores); baseline_r2* = the constant-mean
                                    predictor's (0 by construction: the reference line, not a free number)
        acc_<field>, acc_exact      exact per-field accuracy / whole-transition exact match;
                                    baseline_acc_* = the majority-class predictor's (majority_fields)
        copyprev_acc_state          state accuracy of copying the previous transition's next state
                                    (copy_previous_state): the bar for acc_state
        correlation_pooled          Pearson correlation pooled over all features (NOT a fair score: the
                                    features' different means alone give a constant predictor ~0.5)
        ablation_r2, ablation_acc_* the same scores when the prediction came from another sample's latents
                                    (`ablated_pred`, optional): what the decoder gets without the code
    Fields: state, action, reward, next_state (a state is right only if both coordinates are)."""
    mask = lengths_mask(seg_len, seg.shape[2])
    target_all = featurize(seg, cfg.grid_size, cfg.n_actions)
    point_all, fields_all = point_features(pred, cfg), decode_fields(pred, cfg)
    if ablated_pred is not None:
        abl_point, abl_fields = point_features(ablated_pred, cfg), decode_fields(ablated_pred, cfg)
    scopes = [("", mask)] + [(f"_depth{d}", mask & (depth[:, None, None] == d)) for d in range(1, max_depth + 1)]
    out = {}
    for suffix, sel in scopes:
        if not sel.any():
            continue  # a depth not drawn in this batch
        target, truth = target_all[sel], seg[sel].long()
        scores = field_scores(point_all[sel], fields_all[sel], target, truth, cfg)
        const = target.mean(0, keepdim=True).expand_as(target)
        majority = majority_fields(truth).expand_as(truth)
        scores |= {f"baseline_{k}": v for k, v in field_scores(const, majority, target, truth, cfg).items()}
        scores["correlation_pooled"] = pearson(point_all[sel], target)
        copied = copy_previous_state(seg, seg_len, majority[0, STATE])[sel]
        scores["copyprev_acc_state"] = float((copied == truth[:, STATE]).all(-1).float().mean())
        if ablated_pred is not None:
            abl = field_scores(abl_point[sel], abl_fields[sel], target, truth, cfg)
            scores |= {f"ablation_{k}": v for k, v in abl.items() if k == "r2" or k.startswith("acc_")}
        out |= {f"{k}{suffix}": v for k, v in scores.items()}
    return out
