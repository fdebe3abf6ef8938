"""Stage-1 compression samples (docs/design.md §5): the stage-2 sampler (`dataset.SegmentBatches`) with depths
1..max_depth and no decoder window, so both stages share one implementation of sampling, padding, determinism
and rank slicing. Batches have the keys seg, seg_len (the reconstruction loss masks with these) and depth (>= 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataset import SegmentBatches, cfg_get


class PretrainBatches(SegmentBatches):
    """Deterministic, resumable stage-1 batches; item k = this rank's rows of global batch k.

    depth_weights: one weight per depth 1..max_depth (None -> d+1, i.e. [2, 3, 4] for max_depth 3).
    depth_starts: optional curriculum, one global-batch index per depth 2..max_depth: depth d is drawn
    only from batch depth_starts[d-2] on (before it, the weights of the depths already open are used,
    renormalised). Batch k stays a pure function of (seed, k).
    """

    def __init__(self, histories: Any, split: str, batch_size: int, seg_len: int, min_seg_len: int,
                 max_depth: int = 3, depth_weights: Sequence[float] | None = None,
                 depth_starts: Sequence[int] | None = None, **kw: Any):
        super().__init__(histories, split, batch_size, seg_len, min_seg_len, 1, max_depth, depth_weights, 0, 0,
                         name="PretrainBatches", **kw)
        self.depth_starts = None if depth_starts is None else [int(x) for x in depth_starts]
        if self.depth_starts is not None and (len(self.depth_starts) != max_depth - 1
                                              or any(x < 0 for x in self.depth_starts)):
            raise ValueError(f"PretrainBatches: depth curriculum needs one start >= 0 per depth 2..{max_depth}, "
                             f"got {self.depth_starts}")

    def global_specs(self, k: int):
        if self.depth_starts is None:
            return super().global_specs(k)
        # The base class's draw with this batch's curriculum weights (depths not yet open get weight 0).
        open_ = np.asarray([True] + [k >= s for s in self.depth_starts])
        w = np.where(open_, self.depth_probs, 0.0)
        if w.sum() <= 0:  # only depths of weight 0 are open yet: depth 1
            w = (self.depths == 1).astype(float)
        return self.random_specs(np.random.default_rng([self.seed, int(k)]), w / w.sum())

    @classmethod
    def _cfg_options(cls, cfg: Any, s: Any, curriculum: bool = False) -> dict:
        """Stage 1's keys for `from_cfg(..., curriculum=False)`: sampler.pretrain_depth_weights (null -> d+1 =
        [2, 3, 4]); curriculum=True applies sampler.pretrain_depth_curriculum (fractions of cfg.pretrain_steps
        at which depths 2.. join; the training stream only, never the diagnostics)."""
        starts = None
        fracs = cfg_get(s, "pretrain_depth_curriculum", None) if curriculum else None
        if fracs is not None:
            per_step = int(cfg_get(cfg, "grad_accum", 1) or 1)  # batches are indexed by micro-batch
            starts = [round(float(f) * int(cfg_get(cfg, "pretrain_steps")) * per_step) for f in fracs]
        return {"depth_weights": cfg_get(s, "pretrain_depth_weights", None), "depth_starts": starts}
