"""Sample schedules (docs/design.md §4.4): which transitions a training sample holds, decided as index arrays
(`SampleSpecs`) before anything is gathered (dataset.py). The draw order of each function defines the data
stream, so a global batch is a pure function of (seed, k).

`sample_specs` (sampler.schedule=random), `rollout_specs` (rollout) and `carry_specs` (sampler.memory=carry);
`window_specs` is the rollout geometry both of the latter use.

Full windows are the default (win_len_min = win_len_max = seg_len) because the decoder is causal and its loss is
taken at every window position: a window of seg_len already carries the labels of every shorter prefix window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SampleSpecs:
    """Where each sample of a batch lives in the histories; all arrays have leading dim B.

    Segment slots are laid out right-aligned over `max_depth` slots (unused slots: length 0, start 0);
    a batch keeps only the last D = max(depth) slots.
    """

    hist: np.ndarray       # int64 [B]             history index
    depth: np.ndarray      # int64 [B]             number of compressed segments
    seg_len: np.ndarray    # int64 [B, max_depth]  right-aligned segment lengths
    seg_start: np.ndarray  # int64 [B, max_depth]  first time step of each segment
    win_start: np.ndarray  # int64 [B]             first time step of the window
    win_len: np.ndarray    # int64 [B]             (0 for stage-1 samples, which have no window)
    # sampler.memory=carry only: the window's index m in its history; its m - depth older segments are
    # folded into a memory the training task carries from the previous micro-batch (LatentCarry).
    window: np.ndarray | None = None  # int64 [B]

    def __len__(self) -> int:
        return len(self.hist)

    def rows(self, sl: slice) -> SampleSpecs:
        return SampleSpecs(**{k: None if v is None else v[sl] for k, v in vars(self).items()})


def sample_specs(rng: np.random.Generator, n: int, pool: np.ndarray, n_steps: int,
                 depths: np.ndarray, depth_probs: np.ndarray, max_depth: int,
                 seg_len: int, min_seg_len: int, win_len_min: int, win_len_max: int) -> SampleSpecs:
    """n random-schedule specs at once. Segment lengths are drawn for all max_depth slots and the leading
    (unused) ones zeroed, so the number of random draws does not depend on the depths drawn."""
    hist = pool[rng.integers(0, len(pool), size=n)]
    depth = depths[rng.choice(len(depths), size=n, p=depth_probs)].astype(np.int64)
    lens = rng.integers(min_seg_len, seg_len + 1, size=(n, max_depth), dtype=np.int64)
    used = np.arange(max_depth) >= (max_depth - depth)[:, None]          # right-aligned slots
    lens = np.where(used, lens, 0)
    win_len = rng.integers(win_len_min, win_len_max + 1, size=n, dtype=np.int64)
    total = lens.sum(axis=1) + win_len
    start = rng.integers(0, n_steps - total + 1, dtype=np.int64)          # array bound: per sample
    # Segments are consecutive: exclusive cumulative sum of the (right-aligned) lengths.
    offsets = np.cumsum(lens, axis=1) - lens
    seg_start = np.where(used, start[:, None] + offsets, 0)
    win_start = start + lens.sum(axis=1)
    return SampleSpecs(hist, depth, lens, seg_start, win_start, win_len)


def n_rollout_windows(n_steps: int, seg_len: int, keep_recent: int = 0, max_windows: int | None = None) -> int:
    """Full rollout windows of a T-step history: (T - S) // F + 1 with F = S - keep_recent (T // S when
    keep_recent = 0), capped at max_windows."""
    n_full = (n_steps - seg_len) // (seg_len - keep_recent) + 1
    return n_full if max_windows is None else min(int(max_windows), n_full)


def window_specs(hist: np.ndarray, window: np.ndarray, depth: np.ndarray, n_slots: int, seg_len: int,
                 keep_recent: int = 0) -> SampleSpecs:
    """Rollout window m = `window` of each history `hist` (steps [m*F, m*F + S), F = S - keep_recent) with its
    newest `depth` segments (m - depth .. m - 1, each [j*F, (j+1)*F)) right-aligned over n_slots slots."""
    f = seg_len - keep_recent
    j = np.arange(n_slots, dtype=np.int64)[None, :] - (n_slots - depth)[:, None]  # slot's index among the used
    used = j >= 0
    seg_len_arr = np.where(used, f, 0).astype(np.int64)
    seg_start = np.where(used, (window - depth)[:, None] + j, 0).astype(np.int64) * f
    win_len = np.full(len(hist), seg_len, dtype=np.int64)
    return SampleSpecs(hist, depth, seg_len_arr, seg_start, window * f, win_len, window)


def rollout_specs(rng: np.random.Generator, n: int, pool: np.ndarray, n_steps: int, seg_len: int,
                  max_windows: int | None = None, keep_recent: int = 0) -> SampleSpecs:
    """n samples cut at the ROLLOUT schedule (vectorised; the draw order defines the data stream): window index
    m uniform over the history's M = n_rollout_windows full windows (so every step is equally likely to be
    labelled), preceded by all m segments from step 0 at the rollout's phases (`window_specs`), right-aligned
    over M-1 slots; the model decides how many of the newest folds get gradients (model.bptt_segments). Same
    draws in the same order for every keep_recent."""
    n_win = n_rollout_windows(n_steps, seg_len, keep_recent, max_windows)
    hist = pool[rng.integers(0, len(pool), size=n)]
    depth = rng.integers(0, n_win, size=n, dtype=np.int64)               # window index m = folds before it
    return window_specs(hist, depth, depth, max(n_win - 1, 0), seg_len, keep_recent)


def carry_specs(seed: int, k: int, n: int, pool: np.ndarray, n_steps: int, seg_len: int, n_slots: int,
                max_windows: int | None = None, keep_recent: int = 0) -> SampleSpecs:
    """Global micro-batch k of sampler.memory=carry (docs/design.md §4.4, carried memory): lane i is at position
    p = k + o_i (o_i uniform over the M windows, fixed per (seed, n)); lap p // M draws its history from the
    pool, m = p % M is its window, and the sample holds the window and its newest min(m, n_slots) segments (the
    older ones are the carried memory's). A pure function of (seed, k, n), like every batch."""
    n_win = n_rollout_windows(n_steps, seg_len, keep_recent, max_windows)
    offset = np.random.default_rng([seed, 1, n]).integers(0, n_win, size=n)  # 3 words: no batch's stream
    pos = int(k) + offset
    lap, window = pos // n_win, (pos % n_win).astype(np.int64)
    hist = np.array([pool[np.random.default_rng([seed, 2, i, int(r)]).integers(0, len(pool))]
                     for i, r in enumerate(lap)], dtype=np.int64)
    return window_specs(hist, window, np.minimum(window, n_slots), n_slots, seg_len, keep_recent)

