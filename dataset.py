"""Training batches of both stages, gathered from the sample specs of schedules.py (docs/design.md §4.4).

Batch format: right-padded, zero-filled, lengths carry the masks.
    seg      long [B, D, S, 6]  D = max depth in the global batch (may be 0), S = seg_len
    seg_len  long [B, D]        slots RIGHT-ALIGNED: a depth-d sample uses slots D-d .. D-1
    win      long [B, W, 6]     W = max window length in the global batch
    win_len  long [B]
    depth    long [B]
With static_shapes (config key model.static_shapes) D = max_compression_depth and W = win_len_max for every
batch, so a compiled training step sees one input shape and never recompiles. Same samples, more padding.

Batch k is a pure function of (seed, k) (docs/design.md §4.4, §10.2): each rank keeps its rows of the global
batch, padded alike, so the per-rank tensors concatenate to it; resuming at step k needs nothing but k. The
transitions are gathered in one indexing op from a packed copy of the histories (`pack_transitions`), in RAM or,
with config key data_on_device, in device memory (`gather_batch`: exactly the same batches).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import schedules
from histories import DatasetError
from model.config import ConfigError
from transition import N_FIELDS, pack

_MISSING = object()


def pack_transitions(histories: Any) -> np.ndarray:
    """Flat [N*T + 1, 6] uint8 (sx, sy, a, r, nsx, nsy), in RAM; the extra last row is all zeros.

    Done once so that a batch gather is a single `np.take` instead of four (and so that DataLoader
    workers do not page through four memory-maps): 7,300 x 1,000 histories -> 44 MB. Padding positions
    index the zero row, so gathered batches come out zero-padded with no masking pass.
    `flat[:-1].reshape(N, T, N_FIELDS)` is the per-history view.
    """
    states = np.asarray(histories.states)
    n, t = states.shape[:2]
    flat = np.zeros((n * t + 1, N_FIELDS), dtype=np.uint8)
    pack(states, np.asarray(histories.actions), np.asarray(histories.rewards), np.asarray(histories.next_states),
         out=flat[:-1].reshape(n, t, N_FIELDS))
    return flat


def _gather(flat, n_steps: int, hist, start, length, cap: int):
    """Gather runs of transitions: out[..., p, :] = history[hist, start + p] for p < length, else 0.

    hist/start/length broadcast to a common shape X; returns int64 [*X, cap, 6], numpy or torch like `flat`
    (`pack_transitions`), whose last row is zeros: padded positions point there. On the host one `np.take`
    (several times faster than fancy indexing, and than torch's index_select)."""
    xp = torch if torch.is_tensor(flat) else np
    pos = torch.arange(cap, device=flat.device) if xp is torch else np.arange(cap, dtype=np.int64)
    idx = xp.where(pos < length[..., None], (hist * n_steps + start)[..., None] + pos, len(flat) - 1)
    return flat[idx].long() if xp is torch else np.take(flat, idx, axis=0).astype(np.int64)


def gather_batch(flat, n_steps: int, specs: schedules.SampleSpecs, n_slots: int, S: int,
                 W: int | None) -> dict[str, torch.Tensor]:
    """Vectorised batch from specs: keeps the last `n_slots` segment slots, pads segments to S and the
    window to W (W=None: no window keys, as in stage 1). `flat` comes from `pack_transitions`, in RAM or
    already on a device (`SegmentBatches.to_device`): then the specs go over as one int64 matrix in one
    non-blocking copy from pinned memory (on CUDA), so sampling never waits for the device to finish the
    previous step, and the batch is built where the model runs."""
    first = specs.seg_len.shape[1] - n_slots
    m = np.concatenate([specs.hist[:, None], specs.win_start[:, None], specs.win_len[:, None], specs.depth[:, None],
                        specs.seg_start[:, first:], specs.seg_len[:, first:]], axis=1).astype(np.int64, copy=False)
    if torch.is_tensor(flat):
        m = torch.from_numpy(m)
        m = (m.pin_memory() if flat.device.type == "cuda" else m).to(flat.device, non_blocking=True)
    hist, win_start, win_len, depth = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
    seg_start, seg_len = m[:, 4:4 + n_slots], m[:, 4 + n_slots:]
    batch = {"seg": _gather(flat, n_steps, hist[:, None], seg_start, seg_len, S), "seg_len": seg_len}
    if W is not None:
        batch["win"], batch["win_len"] = _gather(flat, n_steps, hist, win_start, win_len, W), win_len
    batch["depth"] = depth
    if torch.is_tensor(flat):
        return batch
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def spec_items(packed: np.ndarray, specs: schedules.SampleSpecs, with_window: bool = True) -> list[dict]:
    """Per-sample dicts for `collate` (slow, loop-based reference; used by tests and one-off sampling).

    Each item: {'seg': [array [L_i, 6] uint8, oldest first], 'win': array [w, 6] uint8}.
    """
    items = []
    for i, h in enumerate(specs.hist):
        segs = [packed[h, s:s + n] for s, n in zip(specs.seg_start[i], specs.seg_len[i]) if n > 0]
        item: dict[str, Any] = {"seg": segs}
        if with_window:
            item["win"] = packed[h, specs.win_start[i]:specs.win_start[i] + specs.win_len[i]]
        items.append(item)
    return items


def collate(samples: Sequence[dict], pad_seg_len: int | None = None, pad_depth: int | None = None,
            pad_win_len: int | None = None) -> dict[str, torch.Tensor]:
    """Batch variable-length samples into the padded batch format (module docstring).

    samples: dicts with 'seg' (list of [L_i, 6] int arrays, oldest first; may be empty) and optionally
    'win' ([w, 6]); if no sample has 'win', the batch has no window keys (stage 1).
    Padding sizes default to the maxima over `samples` (S: longest segment); pass pad_* to force the
    sampler's sizes (S = seg_len, D/W = global-batch maxima).
    """
    B = len(samples)
    if B == 0:
        raise ValueError("collate got an empty list of samples; pass at least one sample")
    depths = [len(s["seg"]) for s in samples]
    D = max(depths) if pad_depth is None else pad_depth
    S = max([len(x) for s in samples for x in s["seg"]], default=0) if pad_seg_len is None else pad_seg_len
    if max(depths) > D:
        raise ValueError(f"collate: a sample has depth {max(depths)} > pad_depth={D}; raise pad_depth")
    seg = torch.zeros(B, D, S, N_FIELDS, dtype=torch.long)
    seg_len = torch.zeros(B, D, dtype=torch.long)
    for b, s in enumerate(samples):
        for slot, x in enumerate(s["seg"], start=D - len(s["seg"])):  # right-aligned
            if len(x) > S:
                raise ValueError(f"collate: segment of length {len(x)} > pad_seg_len={S}; raise pad_seg_len")
            seg[b, slot, :len(x)] = torch.as_tensor(np.asarray(x), dtype=torch.long)
            seg_len[b, slot] = len(x)
    batch = {"seg": seg, "seg_len": seg_len}
    if any("win" in s for s in samples):
        lens = [len(s["win"]) for s in samples]
        W = max(lens) if pad_win_len is None else pad_win_len
        if max(lens) > W:
            raise ValueError(f"collate: window of length {max(lens)} > pad_win_len={W}; raise pad_win_len")
        win = torch.zeros(B, W, N_FIELDS, dtype=torch.long)
        for b, s in enumerate(samples):
            win[b, :len(s["win"])] = torch.as_tensor(np.asarray(s["win"]), dtype=torch.long)
        batch["win"], batch["win_len"] = win, torch.tensor(lens, dtype=torch.long)
    batch["depth"] = torch.tensor(depths, dtype=torch.long)
    return batch


class SegmentBatches(torch.utils.data.Dataset):
    """Deterministic, resumable stream of batches of [d segments (+ window)] from learning histories.

    Base class shared by stage 2 (`HistoryBatches`, depth 0..max_depth, with window) and stage 1
    (`dataset_pretrain.PretrainBatches`, depth 1..max_depth, no window). Item k is global batch k's
    share for this rank; see the module docstring.
    """

    def __init__(self, histories: Any, split: str, batch_size: int, seg_len: int, min_seg_len: int,
                 min_depth: int, max_depth: int, depth_weights: Sequence[float] | None,
                 win_len_min: int, win_len_max: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_batches: int | None = None, name: str = "dataset", static_shapes: bool = False,
                 schedule: str = "random", max_windows: int | None = None, keep_recent: int = 0,
                 memory: str = "exact", carry_slots: int | None = None):
        self.name = name
        # sampler.memory: 'exact' (every sample's memory folded from step 0 of its history) | 'carry' (lanes
        # walk their histories window by window; schedules.carry_specs / model.compressed_ad.LatentCarry)
        self.memory = memory
        self.carry_slots = None if carry_slots is None else int(carry_slots)
        self.static_shapes = bool(static_shapes)
        self.flat_device: torch.Tensor | None = None  # set by to_device
        self.schedule = schedule
        self.max_windows = None if max_windows is None else int(max_windows)
        self.global_batch_size = int(batch_size)
        self.seg_len, self.min_seg_len = int(seg_len), int(min_seg_len)
        # model.keep_recent: a fold takes fold_len = seg_len - keep_recent transitions, so every compressed
        # segment (both stages) is at most fold_len long; the decoder window stays seg_len.
        self.keep_recent = int(keep_recent)
        self.fold_len = self.seg_len - self.keep_recent
        self.min_depth, self.max_depth = int(min_depth), int(max_depth)
        self.win_len_min, self.win_len_max = int(win_len_min), int(win_len_max)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_batches = sys.maxsize if num_batches is None else int(num_batches)
        self.with_window = self.win_len_max > 0
        self.depths = np.arange(self.min_depth, self.max_depth + 1, dtype=np.int64)
        if depth_weights is None:  # weight(d) = d + 1: 1:2:3:4 over 0..3 (stage 2), 2:3:4 over 1..3 (stage 1)
            depth_weights = self.depths + 1
        self.depth_weights = [float(w) for w in depth_weights]
        self._validate_settings()

        self.pool = np.asarray(histories.split_indices(split), dtype=np.int64)
        if self.pool.size == 0:
            raise DatasetError(f"{name}: split {split!r} has no histories; collect data for it or use "
                             "another split")
        self.flat = pack_transitions(histories)
        n_histories, self.n_steps = np.asarray(histories.states).shape[:2]
        self.packed = self.flat[:-1].reshape(n_histories, self.n_steps, N_FIELDS)   # a view
        # rollout: at least one full window; deeper samples use what the history holds
        need = self.seg_len if self.schedule == "rollout" else self.max_depth * self.fold_len + self.win_len_max
        if need > self.n_steps:
            raise ConfigError(
                f"{name}: a sample needs up to max_depth*{'seg_len' if not self.keep_recent else 'fold_len'} + "
                f"win_len_max = {self.max_depth}*{self.fold_len} + {self.win_len_max} = {need} steps but histories "
                f"have only {self.n_steps}; lower max_compression_depth, seg_len or win_len_max, or collect longer "
                "histories")
        self.depth_probs = np.asarray(self.depth_weights) / sum(self.depth_weights)
        self.local_batch_size = self.global_batch_size // self.world_size  # rows of each global batch this rank gets
        self.rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)

    @classmethod
    def from_cfg(cls, histories: Any, cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1,
                 num_batches: int | None = None, batch_size: int | None = None, seed: int | None = None,
                 **options: Any) -> SegmentBatches:
        """The sampler a composed config describes (cfg.batch_size is the GLOBAL batch; `batch_size` / `seed`
        given here replace cfg's). Each stage's own keys come from `_cfg_options` (`options` go to it)."""
        m, s = cfg_get(cfg, "model"), cfg_get(cfg, "sampler")
        return cls(histories, split,
                   batch_size=cfg_get(cfg, "batch_size") if batch_size is None else batch_size,
                   seed=cfg_get(cfg, "seed") if seed is None else seed,
                   seg_len=cfg_get(m, "seg_len"), min_seg_len=cfg_get(s, "min_seg_len"),
                   max_depth=cfg_get(m, "max_compression_depth"),
                   static_shapes=bool(cfg_get(m, "static_shapes", False)),
                   keep_recent=int(cfg_get(m, "keep_recent", 0)),
                   rank=rank, world_size=world_size, num_batches=num_batches,
                   **cls._cfg_options(cfg, s, **options))

    # -- validation ---------------------------------------------------------------------------------
    def _validate_settings(self) -> None:
        n = self.name
        if self.global_batch_size < 1:
            raise ConfigError(f"{n}: batch_size must be >= 1, got {self.global_batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"{n}: need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")
        if self.global_batch_size % self.world_size:
            raise ConfigError(f"{n}: global batch_size {self.global_batch_size} is not divisible by "
                             f"world_size {self.world_size}; pick a batch_size that is a multiple of "
                             "the number of processes")
        if self.seed < 0:
            raise ConfigError(f"{n}: seed must be >= 0 (numpy SeedSequence), got {self.seed}")
        if self.seg_len < 1:
            raise ConfigError(f"{n}: seg_len must be >= 1, got {self.seg_len}")
        if not 0 <= self.keep_recent < self.seg_len:
            raise ConfigError(f"{n}: model.keep_recent={self.keep_recent} must be in [0, seg_len={self.seg_len})")
        if self.keep_recent and self.with_window and self.schedule != "rollout":
            raise ConfigError(f"{n}: model.keep_recent={self.keep_recent} needs sampler.schedule=rollout (a "
                              "random-schedule window has no kept transitions from a previous window); set "
                              "sampler.schedule=rollout or model.keep_recent=0")
        if not 1 <= self.min_seg_len <= self.seg_len:
            raise ConfigError(f"{n}: min_seg_len must be in [1, seg_len={self.seg_len}], got "
                             f"{self.min_seg_len}")
        if self.max_depth < self.min_depth:
            raise ConfigError(f"{n}: max_compression_depth must be >= {self.min_depth}, got "
                             f"{self.max_depth}")
        if len(self.depth_weights) != len(self.depths):
            raise ConfigError(f"{n}: depth_weights has {len(self.depth_weights)} entries but depths "
                             f"{self.min_depth}..{self.max_depth} need {len(self.depths)}; give one "
                             "weight per depth (or null for the default d+1)")
        w = np.asarray(self.depth_weights)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError(f"{n}: depth_weights must be finite, >= 0 and not all zero, got "
                             f"{self.depth_weights}")
        if self.schedule not in ("random", "rollout"):
            raise ValueError(f"{n}: sampler.schedule={self.schedule!r}: use 'rollout' (segments of exactly "
                             "seg_len at the rollout's phases) or 'random' (random lengths and phases)")
        if self.memory not in ("exact", "carry"):
            raise ConfigError(f"{n}: sampler.memory={self.memory!r}: use 'exact' (fold every sample's memory from "
                              "step 0) or 'carry' (carry each lane's memory from the previous batch)")
        if self.memory == "carry" and (self.schedule != "rollout" or not self.carry_slots):
            raise ConfigError(f"{n}: sampler.memory=carry needs sampler.schedule=rollout and model.bptt_segments "
                              f">= 1 (the folds each sample redoes with gradients), got schedule={self.schedule!r}, "
                              f"bptt_segments={self.carry_slots}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"{n}: sampler.max_windows={self.max_windows} must be >= 1 (or null: all)")
        if self.with_window and not 1 <= self.win_len_min <= self.win_len_max:
            raise ConfigError(f"{n}: need 1 <= win_len_min <= win_len_max, got win_len_min="
                             f"{self.win_len_min}, win_len_max={self.win_len_max}")

    def __len__(self) -> int:
        return self.num_batches

    # -- sampling -------------------------------------------------------------------------------------
    def global_specs(self, k: int) -> schedules.SampleSpecs:
        """Specs of global batch k (all ranks), a pure function of (seed, k)."""
        if self.memory == "carry":
            return schedules.carry_specs(self.seed, k, self.global_batch_size, self.pool, self.n_steps,
                                         self.seg_len, self.carry_slots, self.max_windows, self.keep_recent)
        rng = np.random.default_rng([self.seed, int(k)])
        if self.schedule == "rollout":
            return schedules.rollout_specs(rng, self.global_batch_size, self.pool, self.n_steps, self.seg_len,
                                           self.max_windows, self.keep_recent)
        return self.random_specs(rng, self.depth_probs)

    def random_specs(self, rng: np.random.Generator, depth_probs: np.ndarray) -> schedules.SampleSpecs:
        """The random schedule's draw: segment lengths in [min(min_seg_len, fold_len), fold_len]."""
        return schedules.sample_specs(rng, self.global_batch_size, self.pool, self.n_steps, self.depths,
                                      depth_probs, self.max_depth, self.fold_len,
                                      min(self.min_seg_len, self.fold_len), self.win_len_min, self.win_len_max)

    def _padding(self, specs: schedules.SampleSpecs) -> tuple[int, int | None]:
        """(D, W) from the GLOBAL batch so that every rank's tensors have the same shapes; with
        static_shapes the fixed maxima, so that every batch has the same shapes."""
        if self.static_shapes:  # every slot the schedule has (max_depth, or all windows but one: rollout)
            return specs.seg_len.shape[1], (self.win_len_max if self.with_window else None)
        return int(specs.depth.max()), (int(specs.win_len.max()) if self.with_window else None)

    def to_device(self, device) -> SegmentBatches:
        """Keep a copy of the packed transitions on `device` and gather batches there from now on
        (identical batches; see gather_batch). Not for DataLoader workers: iterate in-process."""
        self.flat_device = torch.from_numpy(self.flat).to(device)
        return self

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < self.num_batches:
            raise IndexError(f"{self.name}: batch {k} out of range [0, {self.num_batches})")
        specs = self.global_specs(k)
        D, W = self._padding(specs)
        specs = specs.rows(self.rows)
        flat = self.flat if self.flat_device is None else self.flat_device
        batch = gather_batch(flat, self.n_steps, specs, D, self.fold_len, W)
        if self.memory == "carry":  # which memory each row needs: segments 0 .. window - depth - 1 of hist
            batch |= {k: torch.tensor(getattr(specs, k), device=batch["seg"].device) for k in ("hist", "window")}
        return batch

    def memory_batch(self, hist: np.ndarray, n_segments: np.ndarray) -> dict[str, torch.Tensor]:
        """{'seg', 'seg_len'} of segments 0 .. n_segments-1 of each history `hist` (right-aligned, rollout
        phases): what an exact fold of the memory before segment n_segments reads (sampler.memory=carry
        rebuilds a memory it does not hold from these, e.g. at the first batch after a start or resume)."""
        hist, n_segments = np.asarray(hist, dtype=np.int64), np.asarray(n_segments, dtype=np.int64)
        d = int(n_segments.max(initial=0))
        specs = schedules.window_specs(hist, n_segments, n_segments, d, self.seg_len, self.keep_recent)
        batch = gather_batch(self.flat, self.n_steps, specs, d, self.fold_len, None)
        return {"seg": batch["seg"], "seg_len": batch["seg_len"]}

    def collate_items(self, k: int) -> dict[str, torch.Tensor]:
        """`collate` of this rank's samples of batch k as per-sample dicts (`spec_items`), padded like
        `self[k]`; must equal self[k] (the loop-based reference path)."""
        specs = self.global_specs(k)
        D, W = self._padding(specs)
        return collate(spec_items(self.packed, specs.rows(self.rows), self.with_window), pad_seg_len=self.fold_len,
                       pad_depth=D, pad_win_len=W)


class HistoryBatches(SegmentBatches):
    """Stage-2 batches (CompressedAD; AD with max_depth=0 and a fixed window): depth 0..max_depth.

    depth_weights: one weight per depth 0..max_depth (None -> d+1, i.e. [1, 2, 3, 4] for max_depth 3).
    win_len_min / win_len_max: None -> seg_len (full windows: schedules.py says why).
    Further keyword arguments (seed, rank, world_size, schedule, memory, ...): `SegmentBatches`.
    """

    def __init__(self, histories: Any, split: str, batch_size: int, seg_len: int, min_seg_len: int,
                 max_depth: int, depth_weights: Sequence[float] | None = None,
                 win_len_min: int | None = None, win_len_max: int | None = None, **kw: Any):
        super().__init__(histories, split, batch_size, seg_len, min_seg_len, 0, max_depth, depth_weights,
                         seg_len if win_len_min is None else win_len_min,
                         seg_len if win_len_max is None else win_len_max, name="HistoryBatches", **kw)

    @classmethod
    def _cfg_options(cls, cfg: Any, s: Any) -> dict:
        """Stage 2's keys for `from_cfg`; model.bptt_segments: the folds a sample holds (sampler.memory=carry)."""
        return {**{k: cfg_get(s, k, None) for k in ("depth_weights", "win_len_min", "win_len_max", "max_windows")},
                "schedule": cfg_get(s, "schedule", "random"), "memory": cfg_get(s, "memory", "exact"),
                "carry_slots": cfg_get(cfg_get(cfg, "model"), "bptt_segments", None)}


def cfg_get(node: Any, key: str, default: Any = _MISSING) -> Any:
    """cfg[key] for DictConfig / dict / attribute objects; a null value counts as missing when a
    default is given. Missing required keys raise one clear KeyError."""
    value = node.get(key, None) if callable(getattr(node, "get", None)) else getattr(node, key, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(f"config key {key!r} is missing or null; set it in the config")
        return default
    return value


def data_device(setting: Any, device: torch.device | str | None, dataset: SegmentBatches) -> torch.device | None:
    """Where batches are gathered: `device` if the packed transitions should live there, else None (host;
    also when there is no device yet, e.g. a task used outside the training loop).

    setting (config key data_on_device): true / false, or null = on for CUDA when the packed array takes
    at most a quarter of the free device memory (the default dataset: 7.4 M transitions x 6 B = 44 MB)."""
    if device is None:
        return None
    device = torch.device(device)
    if setting is None:
        setting = device.type == "cuda" and dataset.flat.nbytes <= torch.cuda.mem_get_info(device)[0] // 4
    return device if setting else None


def batch_loader(dataset: SegmentBatches, start: int = 0, stop: int | None = None, num_workers: int = 0,
                 device: torch.device | str | None = None):
    """Batches start, start+1, ..., stop-1 (resume = pass the step as start).

    device=None: a DataLoader (batch_size=None because each item is already a batch; workers fork-share
    the packed array). device given: the packed array moves there (`to_device`) and batches are gathered
    on it in this process (workers would have to share device memory), as a plain iterator.
    """
    stop = len(dataset) if stop is None else stop
    if device is not None:
        dataset.to_device(device)
        return (dataset[k] for k in range(start, stop))
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
