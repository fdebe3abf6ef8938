"""Metrics of in-context rollouts (docs/design.md §7, §11): pure functions of returns arrays and learning
curves, shared by evaluate.py, train.py's periodic eval and the experiment reports."""

from __future__ import annotations

import numpy as np

from errors import EvalError

LEARNING_SPEED_FRACS = (0.5, 0.8, 0.9)
MOVING_WINDOW = 5


def episodes_to(curve, target: float, window: int = MOVING_WINDOW) -> int | None:
    """First episode e (1-based) at which the mean return of episodes e-window+1 .. e reaches `target`;
    only full windows count (e >= window, or the whole curve if it is shorter). None if never."""
    c = np.asarray(curve, dtype=np.float64)
    w = min(window, len(c))
    if w == 0:
        return None
    mov = np.convolve(c, np.ones(w) / w, mode="valid")  # mov[i] = mean of c[i .. i+w-1]
    hit = np.nonzero(mov >= target - 1e-9)[0]
    return int(hit[0] + w) if len(hit) else None


def learning_speed(curve, optimal_mean: float) -> dict:
    """episodes_to_<f>: first episode whose 5-episode moving mean reaches f x optimal (None if never), for
    f in 0.5 / 0.8 / 0.9; auc_normalized: the area under the normalised return curve, i.e. the mean over
    episodes of return / optimal (1.0 = optimal from the first episode on)."""
    out = {f"episodes_to_{f}": episodes_to(curve, f * optimal_mean) for f in LEARNING_SPEED_FRACS}
    out["auc_normalized"] = float(np.mean(curve)) / optimal_mean if optimal_mean > 0 else None
    return out


def search_and_use(returns, optimal) -> dict:
    """Finding the goal vs using what was found (docs/design.md §7, search vs use), per rollout stream (goal,
    seed): an episode "finds" the goal when its return is > 0 (Dark Key-to-Door: the key, whose reward comes
    first; the door has its own fractions, `summarize`). found_goal_frac: streams that found it at least once;
    episodes_to_first_goal: mean 1-based episode of the first find, over those; return_after_found_normalized:
    mean return / that goal's optimal over every episode AFTER the first find (a last-episode find adds nothing)."""
    r = np.asarray(returns, dtype=np.float64)
    opt = np.asarray(optimal, dtype=np.float64)
    found = r > 0
    any_found = found.any(axis=2)  # [G, S]
    first = found.argmax(axis=2)  # [G, S], 0 where never found (masked by any_found)
    after = any_found[..., None] & (np.arange(r.shape[2]) > first[..., None]) & (opt > 0)[:, None, None]
    after = (r / np.where(opt > 0, opt, 1.0)[:, None, None])[after]  # in (goal, seed, episode) order
    return {
        "found_goal_frac": float(any_found.mean()),
        "episodes_to_first_goal": float(first[any_found].mean() + 1) if any_found.any() else None,
        "return_after_found_normalized": float(after.mean()) if after.size else None,
    }


def summarize(returns, optimal, last_k: int = 5, horizon: int | None = None, events: dict | None = None) -> dict:
    """Scalar metrics and curves of a rollout, plain Python floats/lists (JSON-ready): eval.json's `summary`, each
    key listed in docs/design.md §11. returns [n_goals, n_seeds, n_episodes]; optimal [n_goals]. Means are over
    goals and seeds; "std" is the (population, ddof=0) std over seeds of the goal-averaged quantity, i.e. the
    seed-to-seed spread. Normalised values divide by the mean optimal return (None if that is 0); the reward
    rates need `horizon`, the key / door fractions incontext_rollout's `events` (Dark Key-to-Door)."""
    r = np.asarray(returns, dtype=np.float64)
    opt = np.asarray(optimal, dtype=np.float64)
    if r.ndim != 3 or min(r.shape) == 0:
        raise EvalError(f"returns must be a non-empty [n_goals, n_seeds, n_episodes] array, got {r.shape}")
    if opt.shape != (r.shape[0],):
        raise EvalError(f"optimal must have shape [{r.shape[0]}] (one per goal), got {opt.shape}")
    if last_k < 1:
        raise EvalError(f"last_k={last_k} must be >= 1")
    k = min(int(last_k), r.shape[2])
    per_seed = r.mean(axis=0)  # [S, N]: each seed's goal-averaged learning curve
    curve = per_seed.mean(axis=0)
    opt_mean = float(opt.mean())
    first, last, mean = float(curve[0]), float(curve[-k:].mean()), float(curve.mean())

    def norm(v: float) -> float | None:
        return v / opt_mean if opt_mean > 0 else None

    per_goal = r[:, :, -k:].mean(axis=(1, 2))
    out = {
        "n_goals": int(r.shape[0]), "n_seeds": int(r.shape[1]), "n_episodes": int(r.shape[2]), "last_k": k,
        "curve": curve.tolist(), "curve_std": per_seed.std(axis=0).tolist(),
        "optimal_mean": opt_mean,
        "first_episode": first, "last_k_mean": last, "mean_return": mean,
        "last_k_std": float(per_seed[:, -k:].mean(axis=1).std()),
        "first_episode_normalized": norm(first), "last_k_normalized": norm(last),
        "mean_return_normalized": norm(mean),
        **learning_speed(curve, opt_mean),
        **search_and_use(r, opt),
        "per_goal_last": per_goal.tolist(),
        "per_goal_last_normalized": [float(v / o) if o > 0 else None for v, o in zip(per_goal, opt)],
    }
    if horizon is not None:
        out["reward_per_step"] = mean / horizon
        out["reward_per_step_last_k"] = last / horizon
    for name, ev in (events or {}).items():  # key_found / door_found bool [goal, seed, episode]: stream fractions
        frac = np.asarray(ev, dtype=np.float64).mean(axis=(0, 1))
        out.update({f"{name}_curve": frac.tolist(), f"{name}_first": float(frac[0]),
                    f"{name}_last_k": float(frac[-k:].mean())})
    return out


def eval_scalars(summary: dict, split: str) -> dict[str, float]:
    """TensorBoard tags (all under eval/, listed in docs/design.md §11) for one split ('test', 'val' or 'train').
    train.py's periodic eval logs these too, so both writers put the same quantity on the same chart; a value
    that is None (e.g. episodes_to_0.8 never reached) is an absent point, not a fake number."""
    k = summary["last_k"]
    tags = {
        f"eval/return_{split}": summary["last_k_mean"],
        f"eval/return_{split}_last{k}": summary["last_k_mean"],
        f"eval/return_{split}_first": summary["first_episode"],
        f"eval/return_{split}_normalized": summary["last_k_normalized"],
        f"eval/reward_per_step_{split}": summary.get("reward_per_step"),
        f"eval/auc_{split}_normalized": summary.get("auc_normalized"),
        f"eval/episodes_to_0.8_{split}": summary.get("episodes_to_0.8"),
        f"eval/key_found_{split}": summary.get("key_found_last_k"),
        f"eval/door_found_{split}": summary.get("door_found_last_k"),
    }
    return {t: float(v) for t, v in tags.items() if v is not None}


def source_reference(meta: dict, split: str, optimal_mean: float) -> dict | None:
    """The source algorithm's own learning curve on the split's goals (mean over its histories, from the
    dataset's meta.json) with the same learning-speed metrics, as the yardstick of in-context learning.
    None if the dataset has no histories for that split (the train sample uses the train-goal curve).
    Dark Key-to-Door datasets add the source's key_found / door_found curves (collect.found_curves)."""
    curve = meta.get("return_curve" if split == "train" else f"return_curve_{split}")
    if not curve:
        return None
    found = {f"{k}_curve": list(v) for k, v in (meta.get("found_curves") or {}).get(split, {}).items()}
    return {"curve": list(curve), **learning_speed(curve, optimal_mean), **found}

