"""In-context evaluation (docs/design.md §7): can a frozen model *learn* a new task from its own history?

Every (goal x seed) environment is batched into one batched env (env.make_batched_env: BatchedDarkroom, or
BatchedKeyToDoor where a "goal" is a (key, door) task) and stepped in lockstep: one
`model.act` and one `model.observe` per environment step for all of them. Episodes run back to back
(the env resets at the horizon) while the model's memory is kept, so any improvement of the return
over episodes is in-context RL; the weights never change. CompressedAD's memory per step is constant
(its raw window is compressed into latents) and AD's window slides, so rollouts can run for hundreds
of episodes.

Library (also used by train.py's periodic eval and the comparison runner):
    incontext_rollout(model, env_cfg, goals, n_episodes, seeds_per_goal, device, seed, ...) -> dict
    summarize(returns, optimal, last_k=5, horizon=None) -> dict
    eval_scalars(summary, split) -> {tensorboard tag: value}
    load_trained_model(run_dir, device) -> (model, config_dict, global_step)

Script:
    python evaluate.py run_dir=runs/<name> [n_episodes=500] [seeds_per_goal=8] [sample=false]
writes <run_dir>/eval.json, <run_dir>/eval.png and eval/* scalars into <run_dir>/tb.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import config_check as cc
import teacher_forced
from atomic_io import atomic_write, atomic_write_json
from env import make_batched_env, splits_from_cfg, task_optimal_return
from errors import UserError
from hydra_cli import abspath
from transition import pack

FORMAT_VERSION = 1


class EvalError(UserError, ValueError):
    """Bad evaluation input (config, checkpoint contents); the message says what is wrong and the fix."""


class TrainedModelNotFoundError(EvalError, FileNotFoundError):
    """run_dir or its model.pt does not exist."""


# ---------------------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------------------
def incontext_rollout(model, env_cfg, goals: list[tuple], n_episodes: int, seeds_per_goal: int, device,
                      seed: int, sample: bool = True, use_cache: bool = True, progress: bool = False,
                      record: bool = False) -> dict:
    """Roll a frozen model out in context on `goals` x `seeds_per_goal` environments for n_episodes each.

    env_cfg: dict or DictConfig with grid_size, horizon, reward_mode. Environment e = g * seeds_per_goal + s
    (goal-major), so the returns reshape to [goal, seed, episode]. The seeds of a goal differ only in their
    action-sampling draws, which come from a private torch.Generator seeded with `seed`: the global RNG is
    never touched, so calling this in the middle of training keeps resumed runs bit-exact. With
    sample=False actions are argmax and the seeds of a goal are identical.

    The model's train/eval mode is restored on return (train.py calls this between optimizer steps).
    Pass an unwrapped model (accelerator.unwrap_model): DDP wrappers do not forward init_rollout/act.

    Returns numpy arrays 'returns' float64 [n_goals, seeds_per_goal, n_episodes] and 'optimal' float64
    [n_goals] (per-goal optimal episode return), plus 'goals', 'horizon', 'n_env_steps', 'wall_s', and
    'events' ({} for Darkroom; Dark Key-to-Door: 'key_found' / 'door_found' bool [n_goals, seeds_per_goal,
    n_episodes], read from the env's hidden progress at each episode's end).
    record=True also returns the rollout as data: 'trans' long [n_envs, T, 6] (the transitions taken, in
    the histories' packed layout) and 'action_logp' float [n_envs, T] (log-probability the model gave the
    action it took) — what teacher_forced.py must reproduce from 'trans' alone.
    """
    if n_episodes < 1 or seeds_per_goal < 1:
        raise EvalError(f"n_episodes={n_episodes} and seeds_per_goal={seeds_per_goal} must both be >= 1")
    if len(goals) == 0:
        raise EvalError("incontext_rollout got no goals: pass at least one (x, y) goal cell")
    grid, horizon = int(env_cfg["grid_size"]), int(env_cfg["horizon"])
    model_grid = getattr(getattr(model, "cfg", None), "grid_size", grid)
    if model_grid != grid:
        raise EvalError(f"model was built for grid_size={model_grid} but env.grid_size={grid}: "
                        "evaluate on the env the model was trained on")
    device = torch.device(device)
    goals = [tuple(int(v) for v in g) for g in goals]
    n_goals = len(goals)
    n_envs = n_goals * seeds_per_goal
    env_goals = torch.tensor(goals, dtype=torch.long).repeat_interleave(seeds_per_goal, dim=0)
    env = make_batched_env(env_cfg, env_goals, device=device)
    track = hasattr(env, "door_opened")  # BatchedKeyToDoor: record key found / door opened per episode
    # A dedicated generator on the rollout device: multinomial needs one on the same device as probs.
    gen = torch.Generator(device=device).manual_seed(int(seed))

    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()  # dropout off: the weights are frozen and evaluation deterministic given the seed
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            st = model.init_rollout(n_envs, device, use_cache=use_cache)
            # Accumulate on the device and copy once at the end: no host sync per step.
            returns = torch.zeros(n_envs, n_episodes, dtype=torch.float32, device=device)
            found = torch.zeros(2, n_envs, n_episodes, dtype=torch.bool, device=device) if track else None
            rec_trans, rec_logp = [], []
            episodes = range(n_episodes)
            if progress:
                from tqdm import tqdm
                episodes = tqdm(episodes, desc=f"in-context rollout ({n_envs} envs)", unit="ep", mininterval=1.0)
            for ep in episodes:
                states = env.reset()  # the env resets, the model's memory `st` does not
                for _ in range(horizon):
                    logits = model.act(st, states)
                    if sample:
                        probs = torch.softmax(logits.float(), dim=-1)
                        actions = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                    else:
                        actions = logits.argmax(dim=-1)
                    next_states, rewards, _ = env.step(actions)
                    trans = pack(states.long(), actions, rewards.long(), next_states.long())
                    model.observe(st, trans)
                    if record:
                        rec_trans.append(trans)
                        rec_logp.append(torch.log_softmax(logits.float(), -1).gather(1, actions[:, None])[:, 0])
                    returns[:, ep] += rewards
                    states = next_states
                if track:
                    found[0, :, ep], found[1, :, ep] = env.has_key, env.door_opened
                if progress:
                    episodes.set_postfix(mean_return=f"{returns[:, ep].mean().item():.2f}")
    finally:
        if was_training:
            model.train()
    opt = [task_optimal_return(env_cfg, g) for g in goals]
    shape = (n_goals, seeds_per_goal, n_episodes)
    events = {"key_found": found[0].cpu().numpy().reshape(shape),
              "door_found": found[1].cpu().numpy().reshape(shape)} if track else {}
    extra = {"trans": torch.stack(rec_trans, 1).cpu(), "action_logp": torch.stack(rec_logp, 1).cpu()} if record else {}
    return {**extra,
        "returns": returns.cpu().double().numpy().reshape(n_goals, seeds_per_goal, n_episodes),
        "optimal": np.asarray(opt, dtype=np.float64),
        "events": events,
        "goals": goals,
        "horizon": horizon,
        "n_env_steps": n_envs * n_episodes * horizon,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def eval_goals(env_cfg, n_train_goals: int, seed: int) -> dict[str, list]:
    """{'test': the held-out test goals, 'val': the validation goals, 'train': a fixed sample of n_train_goals
    train goals} (env.splits_from_cfg; a goal is a key-to-door task there). The train sample is drawn with its own seeded rng (never the
    global one) and sorted for readability. Empty splits are left out."""
    splits = splits_from_cfg(env_cfg)
    train = splits["train"]
    rng = np.random.default_rng(seed)
    n = min(n_train_goals, len(train))
    pick = [train[i] for i in sorted(rng.choice(len(train), n, replace=False))]
    return {k: v for k, v in (("test", splits["test"]), ("val", splits["val"]), ("train", pick)) if v}


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
    """Splits in-context learning into finding the goal and using what was found, per rollout stream (goal,
    seed), an episode "finds" the goal when its return is > 0 (Darkroom pays only on the goal cell; in Dark
    Key-to-Door the first reward is the key, so "found" means the key was found: the door has its own
    fractions, `event_metrics`):
      found_goal_frac                 fraction of streams that found the goal at least once
      episodes_to_first_goal          mean 1-based episode of the first find, over the streams that found it
      return_after_found_normalized   mean return / that goal's optimal over every episode AFTER the first find
                                      (streams whose first find was their last episode add nothing): how well
                                      the learner returns to a goal it has seen — what memory is for
    A learner that explores well but forgets scores early finds and a low return after; one that remembers but
    explores poorly, late finds and a high return after."""
    r = np.asarray(returns, dtype=np.float64)
    opt = np.asarray(optimal, dtype=np.float64)
    found = r > 0
    any_found = found.any(axis=2)  # [G, S]
    first = found.argmax(axis=2)  # [G, S], 0 where never found (masked by any_found)
    after = []
    for g, s_ in zip(*np.nonzero(any_found)):
        rest = r[g, s_, first[g, s_] + 1:]
        if rest.size and opt[g] > 0:
            after.append(rest / opt[g])
    return {
        "found_goal_frac": float(any_found.mean()),
        "episodes_to_first_goal": float(first[any_found].mean() + 1) if any_found.any() else None,
        "return_after_found_normalized": float(np.concatenate(after).mean()) if after else None,
    }


def event_metrics(events: dict, k: int) -> dict:
    """Dark Key-to-Door's per-episode events (incontext_rollout's 'events': name -> bool [n_goals, n_seeds,
    n_episodes]) as fractions of rollout streams: <name>_curve per episode, <name>_first (episode 1),
    <name>_last_k (mean over the last k episodes). Names: key_found, door_found."""
    out = {}
    for name, ev in (events or {}).items():
        curve = np.asarray(ev, dtype=np.float64).mean(axis=(0, 1))
        out.update({f"{name}_curve": curve.tolist(), f"{name}_first": float(curve[0]),
                    f"{name}_last_k": float(curve[-k:].mean())})
    return out


def summarize(returns, optimal, last_k: int = 5, horizon: int | None = None, events: dict | None = None) -> dict:
    """Scalar metrics and curves of a rollout. Plain Python floats/lists (JSON-ready).

    returns [n_goals, n_seeds, n_episodes]; optimal [n_goals]. Means are over goals and seeds; "std" is
    the (population, ddof=0) std over seeds of the goal-averaged quantity, i.e. the seed-to-seed spread.
    Normalised values divide by the mean optimal return over the goals (None if that is 0).
      curve / curve_std         per-episode mean return, and its std over seeds
      first_episode             episode-1 mean return (before any in-context learning)
      last_k_mean / last_k_std  mean return over the last k = min(last_k, n_episodes) episodes (the headline)
      mean_return               mean over all episodes
      *_normalized              the above divided by optimal_mean
      episodes_to_0.5/0.8/0.9   learning speed: first episode whose 5-episode moving mean return reaches that
                                fraction of optimal_mean (null if never; see `episodes_to`)
      auc_normalized            area under the normalised curve = mean_return_normalized
      per_goal_last             last-k mean return of each goal (goal order), so a goal the model never
                                learns is visible; per_goal_last_normalized divides by each goal's optimal
      found_goal_frac, episodes_to_first_goal, return_after_found_normalized: search vs use (`search_and_use`)
      reward_per_step           mean_return / horizon: the reward rate of the whole rollout, learning included;
      reward_per_step_last_k    last_k_mean / horizon. Both only when horizon is given.
      key_found_* / door_found_*  Dark Key-to-Door (pass incontext_rollout's 'events'): fraction of streams that
                                found the key / opened the door, per episode, in episode 1 and over the last k
                                (`event_metrics`)
    """
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
    out.update(event_metrics(events, k))
    return out


def eval_scalars(summary: dict, split: str) -> dict[str, float]:
    """TensorBoard tags (all under eval/) for one split ('test', 'val' or 'train'). train.py's periodic eval
    logs these too, so both writers put the same quantity on the same chart:
      eval/return_<split>             mean return of the last k episodes (the headline number)
      eval/return_<split>_last<k>     the same value, with k in the name (k is clipped to n_episodes)
      eval/return_<split>_first       episode-1 mean return (before in-context learning)
      eval/return_<split>_normalized  last-k mean / mean optimal return
      eval/reward_per_step_<split>    mean reward per env step over the whole rollout (needs horizon)
      eval/auc_<split>_normalized     area under the normalised return curve (learning speed)
      eval/episodes_to_0.8_<split>    first episode whose 5-episode mean reaches 0.8 x optimal (absent if
                                      never reached: an absent point, not a fake number)
      eval/key_found_<split>, eval/door_found_<split>   Dark Key-to-Door: fraction of rollouts that found the
                                      key / opened the door, mean over the last k episodes
    """
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


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"device={name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise EvalError(f"device={name} but this machine has {n} CUDA GPU(s): use device=cpu or device=auto "
                            f"(the model itself is fine)")
    return dev


def load_trained_model(run_dir, device="cpu"):
    """Rebuild a stage-2 model from <run_dir>/model.pt.

    model.pt (train.py) = {'model_state_dict', 'config': plain dict with 'model' and 'env', 'global_step'}.
    Returns (model on `device` in eval mode, config dict, global_step).
    """
    from model import build_model  # lazy: keeps `import evaluate` light for the env-only callers

    run_dir = Path(run_dir).expanduser()
    path = run_dir / "model.pt"
    if not path.is_file():
        raise TrainedModelNotFoundError(f"no trained model at {path}: train one with `python train.py` "
                                        "or pass run_dir=<a run directory>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # to `device` once checked
    except Exception as e:  # torn/foreign file: say which file and what to do instead of a pickle trace
        raise EvalError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                        "it is not a model.pt written by train.py; retrain or pass another run_dir") from e
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(cfg, dict) or "model_state_dict" not in ckpt or not {"model", "env"} <= cfg.keys():
        raise EvalError(f"{path} lacks 'model_state_dict' or a 'config' with 'model' and 'env': "
                        "it is not a stage-2 model.pt (an encoder-pretrained-*.pt cannot be evaluated)")
    from model.checkpoint import weights_problem
    from model.config import ConfigError

    if not isinstance(cfg["model"], dict) or not isinstance(cfg["env"], dict):
        raise EvalError(f"{path}: config['model'] and config['env'] must be dicts of settings: the file is "
                        f"damaged or foreign; retrain or pass another run_dir")
    try:
        model = build_model(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["env"]))
    except (ConfigError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: its config does not describe a buildable model ({one_line_msg(e)}): the "
                        f"file is damaged or foreign; retrain or pass another run_dir") from None
    state = ckpt["model_state_dict"]
    # A state dict saved from a DDP / torch.compile wrapper carries a prefix on every key; strip it.
    for prefix in ("module.", "_orig_mod."):
        if isinstance(state, dict) and state and all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = weights_problem(state, model.state_dict(), "model_state_dict")
    if bad:  # e.g. NaN weights: sampling would fail and argmax would give an all-zero eval.json
        raise EvalError(f"{path}: {bad}; the model cannot be evaluated: retrain it, or evaluate another run")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EvalError(f"{path}: weights do not fit the model its config describes "
                        f"({str(e).splitlines()[0]} ...); the file is inconsistent, retrain") from e
    model.to(device).eval()
    return model, cfg, int(ckpt.get("global_step", 0))


def _run_histories(cfg: DictConfig, run_cfg: dict, env_cfg: dict):
    """The dataset the run was trained on (data_path=null) or cfg.data_path: its held-out histories give the
    same-position loss, its meta.json the source algorithm's own learning curve. Validated against env."""
    from histories import load_histories

    path = cfg.data_path if cfg.data_path else run_cfg.get("data_path")
    if not path:
        raise EvalError("the run's config names no data_path: pass data_path=<its dataset>, or "
                        "teacher_forced=false source_curve=false")
    return load_histories(abspath(path), env_cfg)


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


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=1)


def plot_curves(path: Path, results: dict, title: str) -> None:
    """Learning curves: mean return per episode, ±1 std over seeds, dashed line at the mean optimal, dotted
    line at the source algorithm's own learning curve on those goals (when the dataset gives it)."""
    # The object API with the Agg canvas: no pyplot, so no global backend switch in an importing process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = any("key_found_curve" in res["summary"] for res in results.values())  # Dark Key-to-Door
    fig = Figure(figsize=(9.5, 7.4 if found else 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if found else fig.add_subplot()
    colors = {"test": "tab:blue", "val": "tab:green", "train": "tab:orange"}
    for split, res in results.items():
        s = res["summary"]
        mean, std = np.asarray(s["curve"]), np.asarray(s["curve_std"])
        x = np.arange(1, len(mean) + 1)
        c = colors.get(split)
        ax.plot(x, mean, color=c, label=f"{split} goals (n={s['n_goals']}, {s['n_seeds']} seeds)")
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.2, linewidth=0)
        ax.axhline(s["optimal_mean"], color=c, linestyle="--", linewidth=1,
                   label=f"{split} optimal ({s['optimal_mean']:.2f})")
        if res.get("source"):  # the source algorithm's own learning on these goals: the yardstick
            src = np.asarray(res["source"]["curve"])
            ax.plot(np.arange(1, len(src) + 1), src, color=c, linestyle=":", linewidth=1.5,
                    label=f"{split}: source algorithm (its own learning)")
    ax.set_xlabel("episode (in context, frozen weights)")
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
    if found:
        _plot_found(fig.add_subplot(2, 1, 2), results, colors)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)


def _plot_found(ax, results: dict, colors: dict) -> None:
    """Dark Key-to-Door panel: per episode, the fraction of rollouts that found the key (solid) and opened the
    door (dashed); the source algorithm's own fractions dotted (key) / dash-dotted (door)."""
    for split, res in results.items():
        s, c, src = res["summary"], colors.get(split), res.get("source") or {}
        for name, style, src_style in (("key_found", "-", ":"), ("door_found", "--", "-.")):
            if f"{name}_curve" not in s:
                continue
            y = np.asarray(s[f"{name}_curve"])
            ax.plot(np.arange(1, len(y) + 1), y, color=c, linestyle=style, label=f"{split}: {name.replace('_', ' ')}")
            if f"{name}_curve" in src:
                y = np.asarray(src[f"{name}_curve"])
                ax.plot(np.arange(1, len(y) + 1), y, color=c, linestyle=src_style, linewidth=1,
                        label=f"{split}: source, {name.replace('_', ' ')}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("episode (in context, frozen weights)")
    ax.set_ylabel("fraction of rollouts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def write_tensorboard(log_dir: Path, results: dict, global_step: int) -> None:
    """eval/* scalars at the run's global_step, and each split's curve as eval/curve_<split> indexed by
    episode (1-based). A new event file per call; train.py's writer may share the directory."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for split, res in results.items():
            for tag, v in eval_scalars(res["summary"], split).items():
                writer.add_scalar(tag, v, global_step)
            for ep, v in enumerate(res["summary"]["curve"], start=1):
                writer.add_scalar(f"eval/curve_{split}", v, ep)
        writer.flush()
    finally:
        writer.close()


def print_table(results: dict) -> None:
    """One row per split: returns, normalised last-k, learning speed (episodes to 0.8 of optimal, '-' if
    never) and AUC; a 'source' row under a split gives the source algorithm's own figures on those goals."""
    k = next(iter(results.values()))["summary"]["last_k"]
    head = (f"{'split':<9} {'goals':>5} {'seeds':>5} {'first':>7} {f'last{k}':>7} {'± seed':>7} "
            f"{'optimal':>7} {'norm':>6} {'ep->0.8':>7} {'auc':>6}")
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for split, res in results.items():
        s = res["summary"]
        print(f"{split:<9} {s['n_goals']:>5} {s['n_seeds']:>5} {s['first_episode']:>7.2f} {s['last_k_mean']:>7.2f} "
              f"{s['last_k_std']:>7.2f} {s['optimal_mean']:>7.2f} {fmt(s['last_k_normalized'], '.3f'):>6} "
              f"{fmt(s['episodes_to_0.8'], 'd'):>7} {fmt(s['auc_normalized'], '.3f'):>6}")
        if "key_found_curve" in s:
            print(f"{'  found':<9} key {s['key_found_first']:.2f} -> {s['key_found_last_k']:.2f}, door "
                  f"{s['door_found_first']:.2f} -> {s['door_found_last_k']:.2f} (episode 1 -> last {k})")
        src = res.get("source")
        if src:
            c = src["curve"]
            print(f"{'  source':<9} {'':>5} {'':>5} {c[0]:>7.2f} {np.mean(c[-k:]):>7.2f} {'':>7} {'':>7} "
                  f"{np.mean(c[-k:]) / s['optimal_mean']:>6.3f} {fmt(src['episodes_to_0.8'], 'd'):>7} "
                  f"{fmt(src['auc_normalized'], '.3f'):>6}")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def one_line_msg(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# Every key of config/evaluate.yaml and its allowed values (config_check; tests/test_reliability.py).
KEY_RULES = {
    **cc.ENV_RULES,
    "run_dir": cc.text(note="a stage-2 run directory holding model.pt"),
    "env_from_run": cc.flag(),
    "n_episodes": cc.integer(1),
    "seeds_per_goal": cc.integer(1),
    "n_train_goals": cc.integer(0),
    "last_k": cc.integer(1),
    "sample": cc.flag(),
    "use_cache": cc.flag(),
    "seed": cc.integer(0),
    "device": cc.text(note="auto, cpu, cuda or cuda:N"),
    "cpu_threads": cc.integer(1, 1024, null=True, note="torch CPU threads; null = torch's default"),
    "out_name": cc.text(),
    "tensorboard": cc.flag(),
    "progress": cc.flag(),
    "splits": cc.subset("test", "val", "train", note="the goal sets rolled out"),
    "teacher_forced": cc.flag(note="also the same-position loss of the run's held-out histories"),
    "source_curve": cc.flag(note="also the source algorithm's own learning curve"),
    "data_path": cc.text(null=True, note="the dataset; null = the run's own"),
}


def _check_cfg(cfg: DictConfig) -> None:
    from model.config import ConfigError

    if cfg.run_dir in (None, ""):
        raise EvalError("run_dir is required: python evaluate.py run_dir=runs/<name> "
                        "(a stage-2 run directory containing model.pt)")
    try:
        cc.check(cfg, KEY_RULES)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if not str(cfg.out_name) or "/" in str(cfg.out_name):
        raise EvalError(f"out_name={cfg.out_name!r} must be a plain file stem (written inside run_dir)")
    run_dir = Path(abspath(cfg.run_dir))
    if run_dir.is_dir():  # evaluate writes its outputs there: find out now, not after the rollouts
        import tempfile

        from atomic_io import os_error_reason
        try:
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as e:
            raise EvalError(f"cannot write into run_dir {run_dir} ({os_error_reason(e)}): evaluate writes "
                            f"{cfg.out_name}.json/.png there; fix its permissions, or copy the run somewhere "
                            f"writable and evaluate the copy") from None


def main(cfg: DictConfig) -> dict:
    """Evaluate <run_dir>/model.pt on the test goals and a seeded train-goal sample; write the outputs.
    Returns the report written to eval.json plus 'json_path' and 'png_path'."""
    t0 = time.perf_counter()
    _check_cfg(cfg)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = Path(abspath(cfg.run_dir))
    device = resolve_device(str(cfg.device))
    model, run_cfg, global_step = load_trained_model(run_dir, device)

    if cfg.env_from_run:
        env_cfg = dict(run_cfg["env"])
    else:  # e.g. a longer horizon than in training; the grid fixes the model's input scaling and the split
        env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
        for key in ("grid_size", "n_actions"):
            if env_cfg[key] != run_cfg["env"][key]:
                raise EvalError(f"env.{key}={env_cfg[key]} but the model was trained with "
                                f"{run_cfg['env'][key]}: use env_from_run=true or a matching env")
    goals = eval_goals(env_cfg, int(cfg.n_train_goals), int(cfg.seed))
    hist = _run_histories(cfg, run_cfg, env_cfg) if (cfg.teacher_forced or cfg.source_curve) else None
    source = (hist.meta if hist is not None else {}) if cfg.source_curve else {}

    results = {}
    for split, split_goals in goals.items():
        if split not in cfg.splits:
            continue
        ro = incontext_rollout(model, env_cfg, split_goals, int(cfg.n_episodes), int(cfg.seeds_per_goal), device,
                               seed=int(cfg.seed), sample=bool(cfg.sample), use_cache=bool(cfg.use_cache),
                               progress=bool(cfg.progress))
        summary = summarize(ro["returns"], ro["optimal"], int(cfg.last_k), ro["horizon"], events=ro["events"])
        per_goal = [{"goal": list(g), "optimal": float(o), "curve": ro["returns"][i].mean(axis=0).tolist(),
                     "last_k_mean": float(ro["returns"][i, :, -summary["last_k"]:].mean())}
                    for i, (g, o) in enumerate(zip(ro["goals"], ro["optimal"]))]
        results[split] = {"goals": [list(g) for g in ro["goals"]], "optimal": ro["optimal"].tolist(),
                          "summary": summary, "per_goal": per_goal, "returns": ro["returns"].tolist(),
                          "wall_s": ro["wall_s"], "env_steps_per_s": ro["n_env_steps"] / max(ro["wall_s"], 1e-9)}
        src = source_reference(source, split, summary["optimal_mean"])
        if src is not None:
            results[split]["source"] = src
    if not results:
        raise EvalError(f"no goals to evaluate in splits={list(cfg.splits)} (n_train_goals="
                        f"{cfg.n_train_goals}, env.n_val_goals={env_cfg.get('n_val_goals', 0)})")

    same_position = {}
    if cfg.teacher_forced:
        for split in ("val", "test"):
            rep = teacher_forced.heldout_report(model, hist, split, device, probe=True)
            if rep is not None:
                same_position[split] = rep
    metrics = {}
    for split, res in results.items():
        metrics.update(eval_scalars(res["summary"], split))
    if same_position:
        for split, rep in same_position.items():
            metrics.update(teacher_forced.scalars(rep, split))
    report = {
        "format_version": FORMAT_VERSION,
        "run_dir": str(run_dir),
        "model_name": run_cfg["model"].get("name"),
        "global_step": global_step,
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": env_cfg,
        "metrics": metrics,
        "splits": results,
        "same_position": same_position,
    }
    json_path, png_path = run_dir / f"{cfg.out_name}.json", run_dir / f"{cfg.out_name}.png"
    title = f"{report['model_name']} @ step {global_step}: in-context return ({run_dir.name})"
    plot_curves(png_path, results, title)
    if cfg.tensorboard:
        write_tensorboard(run_dir / "tb", results, global_step)
    report["wall_s"] = time.perf_counter() - t0
    write_json_atomic(json_path, report)  # last: its presence means every output is complete

    print(f"{report['model_name']} @ step {global_step}, {cfg.n_episodes} episodes, "
          f"{'sampled' if cfg.sample else 'greedy'} actions, {device}, {report['wall_s']:.1f}s")
    print_table(results)
    if same_position:
        teacher_forced.print_report(same_position)
    print(f"wrote {json_path} and {png_path}")
    return {**report, "json_path": str(json_path), "png_path": str(png_path)}


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("evaluate", "evaluate")
