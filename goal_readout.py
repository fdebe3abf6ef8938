"""What the compressed memory holds (docs/design.md §7), which the NLL memory probe (teacher_forced.py) cannot
tell from, say, a sense of elapsed time: a ridge readout of the task's hidden cell(s) from the flattened latents
after every fold of a replay through the model's own rollout schedule (`init_rollout` / `observe`), scored on
held-out goals 'after find' (the folds already hold the reward that reveals the cell), 'before find' (only
elimination helps) and as a constant guess: `acc` (rounded to the grid, equals the cell), `mae` (per coordinate,
in cells), `n` (folds scored).

TARGETS: Dark Key-to-Door's door pays only once the key is held, so it is revealed by an episode's second reward:
asking for it before, or for both cells after the key alone, would be unfair questions.
"""

from __future__ import annotations

import numpy as np
import torch

from teacher_forced import eval_mode, has_memory, heldout_reports
from transition import REWARD

LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried (x n_samples / 1000), chosen on val
MAX_TRAIN_HISTORIES = 512  # training-goal histories the readout is fitted on (every k-th: all goals covered)
# The hidden cells read out, by the width of a dataset's goal record: (name, its goal columns, which reward of an
# episode reveals it: 1 = the episode's first)
TARGETS = {2: (("goal", slice(0, 2), 1),),
           4: (("key", slice(0, 2), 1), ("door", slice(2, 4), 2))}


@torch.no_grad()
def fold_latents(model, trans: np.ndarray, device, histories_per_pass: int = 128
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(latents float32 [N, F, n_latent * d] after each of the F folds of a rollout over the recorded
    transitions trans [N, T, 6], fold steps int [F]: how many transitions each fold's latents cover)."""
    feats, steps = [], None
    with eval_mode(model):
        for a in range(0, trans.shape[0], histories_per_pass):
            x = torch.as_tensor(np.asarray(trans[a:a + histories_per_pass])).to(device).long()
            st = model.init_rollout(x.shape[0], device, use_cache=False)
            mine, at = [], []
            for t in range(x.shape[1]):
                before = st.n_compressions
                model.observe(st, x[:, t])
                if st.n_compressions != before:
                    mine.append(st.latents.flatten(1).float().cpu())
                    at.append(t + 1)
            if not mine:
                return np.zeros((trans.shape[0], 0, 0), np.float32), np.zeros(0, np.int64)
            feats.append(torch.stack(mine, dim=1).numpy())
            steps = np.asarray(at, dtype=np.int64)
    return np.concatenate(feats), steps


def first_find(trans: np.ndarray, horizon: int | None = None, nth: int = 1) -> np.ndarray:
    """Per history, the number of transitions up to and including the first one that is the nth rewarded
    step of its episode (episodes of `horizon` steps; nth = 1: the first reward of the history; T + 1: never)."""
    r = np.asarray(trans[..., REWARD]) > 0
    if nth > 1:
        n, t = r.shape
        if not horizon or t % horizon:
            raise ValueError(f"a history of {t} steps is no whole number of {horizon}-step episodes")
        rank = np.cumsum(r.reshape(n, t // horizon, horizon), axis=-1).reshape(n, t)
        r = r & (rank == nth)
    return np.where(r.any(axis=1), r.argmax(axis=1) + 1, r.shape[1] + 1)


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean_x, W, mean_y) of ridge regression y ~ (x - mean_x) W + mean_y (intercept not penalised)."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc = (x - mx).astype(np.float64)
    a = xc.T @ xc + lam * np.eye(x.shape[1])
    return mx, np.linalg.solve(a, xc.T @ (y - my)), my


def _score(pred: np.ndarray, y: np.ndarray, grid_size: int) -> dict:
    cell = np.clip(np.rint(pred), 0, grid_size - 1)
    return {"acc": float((cell == y).all(axis=-1).mean()) if len(y) else None,
            "mae": float(np.abs(pred - y).mean()) if len(y) else None, "n": len(y)}


def _samples(model, hist, idx, device) -> tuple[np.ndarray, dict]:
    """(features [M, D], {target: (its cell [M, 2], after-find flags [M])}) of every fold of histories idx."""
    trans = hist.transitions(idx)
    lat, steps = fold_latents(model, trans, device)
    n, f = lat.shape[:2]
    goals = np.asarray(hist.goals[idx], dtype=np.float64).reshape(len(idx), -1)
    horizon = (hist.meta.get("env") or {}).get("horizon")
    per = {name: (np.repeat(goals[:, cols], f, axis=0),
                  (first_find(trans, horizon, nth)[:, None] <= steps[None, :]).reshape(-1))
           for name, cols, nth in TARGETS[goals.shape[1]]}
    return lat.reshape(n * f, -1), per


def end_of_training(model, hist, cfg, device, accelerator=None) -> dict:
    """The measurements done.json keeps from the end of training (cfg: the run's config), written by train.py and
    recomputed by remeasure.py: teacher_forced's same-position reports of the validation and test goals with the
    memory probe (`tf_loss_<split>`, `heldout_<split>`) and this readout (`goal_readout`). With train.py's
    `accelerator` the held-out reports are a collective of every rank, the readout the main process's."""
    at_most = cfg.get("heldout_max_histories")
    out = {}
    for split, rep in heldout_reports(model, hist, ("val", "test"), device, probe=True, max_histories=at_most,
                                      accelerator=accelerator).items():
        out[f"tf_loss_{split}"], out[f"heldout_{split}"] = rep["loss"], rep
    if accelerator is None or accelerator.is_main_process:
        gr = report(model, hist, int(cfg["env"]["grid_size"]), device, max_heldout_histories=at_most)
        if gr is not None:
            out["goal_readout"] = gr
    return out


def report(model, hist, grid_size: int, device, max_heldout_histories: int | None = None) -> dict | None:
    """The readouts fitted on training-goal histories, scored on the validation and test goals (see the
    module docstring). None when the model has no compressed memory or a split has no histories."""
    if not has_memory(model):
        return None
    tr = hist.split_indices("train", MAX_TRAIN_HISTORIES)  # spread over the goals (every k-th history)
    held = {s: hist.split_indices(s, max_heldout_histories) for s in ("val", "test")}
    if len(tr) == 0 or any(len(i) == 0 for i in held.values()):
        return None
    x, ys = _samples(model, hist, tr, device)
    if x.shape[1] == 0:
        return None
    data = {s: _samples(model, hist, i, device) for s, i in held.items()}
    readouts = {name: _readout(x, y, {s: (xs, per[name]) for s, (xs, per) in data.items()}, grid_size)
                for name, (y, _) in ys.items()}
    first, *rest = readouts
    return {**readouts[first], "target": first, **{name: {**readouts[name], "target": name} for name in rest},
            "n_train_histories": len(tr)}


def _readout(x: np.ndarray, y: np.ndarray, held: dict, grid_size: int) -> dict:
    """One cell's ridge readout: fitted on (x, y) at each strength, the strength chosen on held['val']'s
    after-find error, scored on every held-out split {split: (features, (cells, after-find flags))}."""

    def scores(fit, s):
        mx, w, my = fit
        xs, (ys, after) = held[s]
        pred, const = (xs - mx) @ w + my, np.broadcast_to(my, ys.shape)
        return {f"{kind}{when}": _score(p[m], ys[m], grid_size) for kind, p in (("", pred), ("constant_", const))
                for when, m in (("after_find", after), ("before_find", ~after))}

    fits = {lam: fit_ridge(x, y, lam * len(x) / 1000.0) for lam in LAMBDAS}
    best = min(LAMBDAS, key=lambda lam: scores(fits[lam], "val")["after_find"]["mae"] or np.inf)
    return {**{s: scores(fits[best], s) for s in held}, "ridge_lambda": best, "n_train_samples": len(x),
            "n_features": int(x.shape[1])}

