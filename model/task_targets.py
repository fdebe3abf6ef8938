"""Task-relevant stage-1 targets (`model.recon_task_weight` > 0, docs/design.md §5): where reward was seen and
which cells were searched, what an in-context learner needs from a memory, read out of the flattened final
latents of a stage-1 sample (all its folded segments) beside the reconstruction:

    goal     the cell s' of the newest rewarded transition (r = 1 exactly when s' is the goal,
             env/darkroom.py), as two coordinates of G + 1 classes each (class G = "no reward seen")
             -> cross-entropy each. Coordinates, not one of G*G cells: the goals of held-out histories are
             cells no training goal was (an 81-way head never predicts a class it never saw: measured,
             0.00 on the validation goals), but their coordinates are all seen in training.
    visited  G*G binary: the cell was s or s' of some folded transition      -> binary cross-entropy

The targets come from the raw transitions only (never from the encoder), so a constant encoder cannot fake
them: it can at best predict the class / cell frequencies. The head is a stage-1 weight, not part of the
encoder checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.losses import lengths_mask
from transition import NSX, NSY, REWARD, SX, SY


def task_targets(seg: torch.Tensor, seg_len: torch.Tensor, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """seg [B, D, S, 6], seg_len [B, D] -> (goal long [B, 2]: the coordinates in 0..G (G: no reward seen),
    visited bool [B, G*G])."""
    b, n_slots, s = seg.shape[:3]
    t = seg.long().reshape(b, n_slots * s, -1)
    valid = lengths_mask(seg_len, s).reshape(b, n_slots * s)
    cell_s = t[..., SX] * grid_size + t[..., SY]
    cell_ns = t[..., NSX] * grid_size + t[..., NSY]
    n_cells = grid_size * grid_size
    visited = torch.zeros(b, n_cells + 1, dtype=torch.bool, device=seg.device)
    dump = torch.full_like(cell_s, n_cells)  # padding writes to an extra column, dropped below
    visited.scatter_(1, torch.where(valid, cell_s, dump), True)
    visited.scatter_(1, torch.where(valid, cell_ns, dump), True)
    rewarded = valid & (t[..., REWARD] > 0)
    # Newest rewarded transition: positions are in time order (slots oldest first, padding at slot ends).
    idx = torch.where(rewarded, torch.arange(n_slots * s, device=seg.device), -1).max(dim=1).values
    cols = torch.stack([t[..., NSX], t[..., NSY]], dim=-1)  # [B, L, 2]
    at = cols.gather(1, idx.clamp(min=0)[:, None, None].expand(-1, 1, 2))[:, 0]
    goal = torch.where((idx >= 0)[:, None], at, torch.full_like(at, grid_size))
    return goal, visited[:, :n_cells]


class TaskHead(nn.Module):
    """Flattened latents [B, n * d] -> goal logits [B, 2, G + 1] and visited logits [B, G*G] (one Linear)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.g = cfg.grid_size
        self.ln = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.n_latent * cfg.d_model, 2 * (self.g + 1) + self.g * self.g)

    def forward(self, latents: torch.Tensor) -> dict:
        z = self.out(self.ln(latents).flatten(1))
        k = 2 * (self.g + 1)
        return {"goal": z[:, :k].view(-1, 2, self.g + 1), "visited": z[:, k:]}


def task_loss(pred: dict, seg: torch.Tensor, seg_len: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Goal cross-entropy + visited binary cross-entropy (mean over cells), each a mean over the batch."""
    goal, visited = task_targets(seg, seg_len, grid_size)
    return (F.cross_entropy(pred["goal"].float().flatten(0, 1), goal.flatten())
            + F.binary_cross_entropy_with_logits(pred["visited"].float(), visited.float()))


@torch.no_grad()
def task_metrics(pred: dict, seg: torch.Tensor, seg_len: torch.Tensor, grid_size: int,
                 ablated: dict | None = None) -> dict:
    """task_goal_acc (both coordinates right, 'none' included), task_goal_found_acc (samples that saw
    reward only), task_visited_acc (per cell), task_visited_f1, each beside its baseline_ (the batch's most
    frequent goal; the per-cell majority) and, with `ablated` (another sample's latents), ablation_ scores."""
    goal, visited = task_targets(seg, seg_len, grid_size)
    found = goal[:, 0] < grid_size

    def scores(p: dict) -> dict:
        g = (p["goal"].argmax(-1) == goal).all(-1)
        v = p["visited"] > 0
        tp = (v & visited).sum().float()
        out = {"task_goal_acc": g.float().mean().item(),
               "task_visited_acc": (v == visited).float().mean().item(),
               "task_visited_f1": (2 * tp / (v.sum() + visited.sum()).clamp(min=1)).item()}
        if found.any():
            out["task_goal_found_acc"] = g[found].float().mean().item()
        return out

    res = scores(pred)
    counts = torch.unique(goal, dim=0, return_counts=True)[1]
    cell_majority = visited.float().mean(0) > 0.5
    base = {"task_goal_acc": (counts.max() / len(goal)).item(),  # always answering the most frequent goal
            "task_visited_acc": (visited == cell_majority).float().mean().item()}
    res |= {f"baseline_{k}": v for k, v in base.items()}
    if ablated is not None:
        res |= {f"ablation_{k}": v for k, v in scores(ablated).items()}
    return res
