"""Same-position held-out evaluation and the memory probe (docs/design.md §7.1): every step of every held-out
learning history scored under each model's own rollout schedule, so two models are compared on identical label
positions. A rollout without an environment (the actions are the source's): batched over histories, one decoder
pass per window.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from transition import action

# History-step buckets [lo, hi) of the per-step loss. The last bucket is open-ended (hi=None: to the end).
DEFAULT_BUCKETS = ((0, 200), (200, 500), (500, None))
PROBE_DEPTHS = (0, 1, 2, 3)
# The memory probe calls the older segments useful only if the whole history beats the last segment alone by
# more than two standard errors AND by at least this much (nats per step): 0.005 nats is ~0.5% of a typical
# held-out NLL, below which a difference is statistically visible over 40 histories but irrelevant.
MIN_MEMORY_EFFECT = 0.005


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (dropout off) for the block and its train/eval mode restored after: the
    measurements run between optimizer steps too. A stand-in without modes (tests) passes through."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def history_nll(model, trans, device, memory_segments: int | None = None, histories_per_pass: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step action NLL and correctness of recorded histories under the model's rollout schedule.

    trans: packed transitions [N, T, 6] (numpy or tensor). Returns (nll float64 [N, T], correct bool [N, T])
    on the CPU. The model must provide `rollout_logits(trans, memory_segments)` (model/ad.py,
    model/compressed_ad.py)."""
    trans = torch.as_tensor(np.asarray(trans) if not torch.is_tensor(trans) else trans)
    nll, ok = [], []
    with eval_mode(model):
        for a in range(0, trans.shape[0], histories_per_pass):
            x = trans[a:a + histories_per_pass].to(device).long()
            logits = model.rollout_logits(x, memory_segments=memory_segments).float()
            target = action(x)
            nll.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
                       .view(target.shape).double().cpu())
            ok.append((logits.argmax(-1) == target).cpu())
    return torch.cat(nll), torch.cat(ok)


def nll_summary(nll: torch.Tensor, correct: torch.Tensor | None = None, buckets=DEFAULT_BUCKETS) -> dict:
    """Mean NLL over every step and per history-step bucket; plus the spread over histories (the standard
    error of the mean of per-history losses) and each history's mean, so two models scored on the same
    histories can be compared pairwise (`paired_difference`)."""
    per_hist = nll.mean(dim=1)
    n, t_len = nll.shape
    out = {"loss": float(nll.mean()), "loss_se": float(per_hist.std() / math.sqrt(n)) if n > 1 else 0.0,
           "n_histories": int(n), "n_steps": int(t_len), "buckets": {},
           "per_history": per_hist.tolist()}  # for paired comparisons of models on the same histories
    if correct is not None:
        out["acc"] = float(correct.double().mean())
    for lo, hi in buckets:
        if lo < t_len:
            out["buckets"][f"{lo}-{'end' if hi is None else hi}"] = float(nll[:, lo:hi].mean())
    return out


def score(model, trans, device, probe: bool = False) -> dict[str, torch.Tensor]:
    """Every per-step figure of histories trans [N, T, 6]: {'nll', 'correct'} under the full rollout
    schedule and, with probe=True (models with compressed memory only), 'nll_k<k>' with the latents
    rebuilt from only the last k segments. All [N, T] on the CPU, row i = history i, so shards computed by
    different processes interleave (heldout_reports)."""
    nll, ok = history_nll(model, trans, device)
    out = {"nll": nll, "correct": ok}
    if probe and has_memory(model):
        for k in PROBE_DEPTHS:
            out[f"nll_k{k}"] = history_nll(model, trans, device, memory_segments=k)[0]
    return out


def report(scores: dict[str, torch.Tensor], buckets=DEFAULT_BUCKETS) -> dict:
    """Summary of `score`'s output: nll_summary of the full schedule plus, if probed, "memory_probe" =
    {"k0": loss, ..., "all": loss, "buckets": {...}, "all_minus_k1", "all_minus_k1_se", "verdict"}; the
    verdict reads all - k1, paired per history (docs/design.md §7.1)."""
    rep = nll_summary(scores["nll"], scores.get("correct"), buckets)
    per_k = {name[4:]: v for name, v in scores.items() if name.startswith("nll_k")}
    if not per_k:
        return rep
    per_k["all"] = scores["nll"]
    probe = {name: float(v.mean()) for name, v in per_k.items()}
    probe["buckets"] = {name: nll_summary(v, buckets=buckets)["buckets"] for name, v in per_k.items()}
    diff = (per_k["all"] - per_k["k1"]).mean(dim=1)  # per history
    d = float(diff.mean())
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    probe["all_minus_k1"], probe["all_minus_k1_se"] = d, se
    if d < -2 * se and d <= -MIN_MEMORY_EFFECT:
        probe["verdict"] = (f"the whole compressed history predicts better than the last segment alone "
                            f"(all - k1 = {d:+.4f} +- {se:.4f} nats)")
    elif d < -2 * se:
        probe["verdict"] = (f"the compressed memory beyond its last segment is detectable but negligible "
                            f"(all - k1 = {d:+.4f} +- {se:.4f} nats, under {MIN_MEMORY_EFFECT} nats)")
    else:
        probe["verdict"] = (f"the compressed memory carries nothing measurable beyond its last segment "
                            f"(all - k1 = {d:+.4f} +- {se:.4f} nats)")
    rep["memory_probe"] = probe
    return rep


def heldout_reports(model, hist, splits, device, probe: bool = False, max_histories: int | None = None,
                    accelerator=None) -> dict[str, dict]:
    """{split: report} of the same-position evaluation of each split of a dataset (histories.Histories) that has
    histories (at most max_histories of it, spread over its goals: Histories.split_indices). probe=True adds the
    memory probe (models with compressed memory only). With an `accelerator` (train.py), every rank scores every
    world-th history and the per-step scores are gathered back into history order, so every rank gets the same
    report whatever the number of processes (a collective: call it on every rank)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    out = {}
    for split in splits:
        idx = hist.split_indices(split, max_histories)
        if len(idx) == 0:
            continue
        mine = idx[rank::world]
        scores = score(model, hist.transitions(mine), device, probe=probe) if len(mine) else None
        if world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([scores])
            scores = {k: torch.empty(len(idx), *v.shape[1:], dtype=v.dtype) for k, v in parts[0].items()}
            for r, part in enumerate(parts):
                if part is not None:
                    for k, v in part.items():
                        scores[k][r::world] = v
        out[split] = {**report(scores), "split": split}
    return out


def paired_difference(a: dict, b: dict) -> dict:
    """b - a for two reports on the SAME histories (same split of the same dataset): the mean of the
    per-history differences and its standard error. Different histories are refused, not compared."""
    pa, pb = a.get("per_history"), b.get("per_history")
    if not pa or not pb or len(pa) != len(pb) or a.get("n_steps") != b.get("n_steps"):
        raise ValueError("paired_difference needs two reports of the same histories (same split, dataset "
                         "and length), each with per_history")
    d = torch.tensor(pb, dtype=torch.float64) - torch.tensor(pa, dtype=torch.float64)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"diff": float(d.mean()), "se": se, "n_histories": len(d)}


def has_memory(model) -> bool:
    return hasattr(model, "encoder")


def scalars(report: dict, split: str) -> dict[str, float]:
    """TensorBoard tags of one split's report (heldout/..., memory/...; docs/design.md §11)."""
    out = {f"heldout/loss_{split}": report["loss"]}
    if "acc" in report:
        out[f"heldout/acc_{split}"] = report["acc"]
    out |= {f"heldout/loss_{split}_steps_{name}": v for name, v in report["buckets"].items()}
    probe = report.get("memory_probe") or {}
    return out | {f"memory/loss_{k}_{split}": v for k, v in probe.items() if k.startswith("k") or k == "all"}


def print_report(reports: dict) -> None:
    """One line per split, then the memory probe if present."""
    for split, rep in reports.items():
        b = "  ".join(f"{k}: {v:.4f}" for k, v in rep["buckets"].items())
        print(f"same-position action NLL, {split} histories ({rep['n_histories']} x {rep['n_steps']} steps): "
              f"{rep['loss']:.4f} +- {rep['loss_se']:.4f}  [{b}]")
        probe = rep.get("memory_probe")
        if probe:
            ks = "  ".join(f"{k}: {probe[k]:.4f}" for k in probe if k.startswith("k") or k == "all")
            print(f"  memory probe ({split}): {ks}\n  -> {probe['verdict']}")
