"""Stage-1 compression samples: d consecutive segments of one learning history, d in 1..max_depth.

The encoder pretraining (docs/design.md §5) folds segment 1, then [latents; segment 2], ... into latents and
reconstructs every raw transition of every segment from the final latents. So a sample is just the
segments -- no decoder window. Depth 0 is excluded (it teaches the encoder nothing); depths are drawn
with weights, default 2:3:4 over 1..3 (stage 2's 1:2:3:4 with depth 0 removed), segment lengths
uniform in [min_seg_len, seg_len] exactly as in stage 2.

This is the stage-2 sampler (`dataset.SegmentBatches`) with min_depth=1 and no window, so both stages
share one implementation of sampling, padding, determinism and rank slicing. Output keys:
    seg      long [B, D, S, 6]   right-aligned slots, zero padding
    seg_len  long [B, D]         0 = unused slot; the reconstruction loss must mask with these lengths
    depth    long [B]            always >= 1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dataset import SegmentBatches, cfg_get, collate, segment_mask

__all__ = ["PretrainBatches", "collate", "segment_mask"]


class PretrainBatches(SegmentBatches):
    """Deterministic, resumable stage-1 batches; item k = this rank's rows of global batch k.

    depth_weights: one weight per depth 1..max_depth (None -> d+1, i.e. [2, 3, 4] for max_depth 3).
    """

    def __init__(self, histories: Any, split: str, batch_size: int, seg_len: int, min_seg_len: int,
                 max_depth: int = 3, depth_weights: Sequence[float] | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_batches: int | None = None,
                 static_shapes: bool = False):
        super().__init__(histories, split, batch_size, seg_len, min_seg_len, min_depth=1,
                         max_depth=max_depth, depth_weights=depth_weights, win_len_min=0, win_len_max=0,
                         seed=seed, rank=rank, world_size=world_size, num_batches=num_batches,
                         name="PretrainBatches", static_shapes=static_shapes)

    @classmethod
    def from_cfg(cls, histories: Any, cfg: Any, split: str = "train", rank: int = 0,
                 world_size: int = 1, num_batches: int | None = None, batch_size: int | None = None,
                 seed: int | None = None) -> PretrainBatches:
        """Reads cfg.model.{seg_len, min_seg_len, max_compression_depth, pretrain_depth_weights, static_shapes}
        (null weights -> d+1 = [2, 3, 4]), cfg.batch_size (GLOBAL batch), cfg.seed;
        `batch_size` / `seed` given here take their place."""
        m = cfg_get(cfg, "model")
        if batch_size is None:
            batch_size = cfg_get(cfg, "batch_size")
        if seed is None:
            seed = cfg_get(cfg, "seed")
        return cls(histories, split, batch_size=batch_size,
                   seg_len=cfg_get(m, "seg_len"), min_seg_len=cfg_get(m, "min_seg_len"),
                   max_depth=cfg_get(m, "max_compression_depth"),
                   depth_weights=cfg_get(m, "pretrain_depth_weights", None),
                   seed=seed, rank=rank, world_size=world_size, num_batches=num_batches,
                   static_shapes=bool(cfg_get(m, "static_shapes", False)))
