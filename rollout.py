"""In-context rollouts (docs/design.md §7): can a frozen model *learn* a new task from its own history?
Every (goal x seed) environment is stepped in lockstep in one batched env, episodes back to back with the
model's memory kept, so any rise of the return over episodes is in-context RL; the weights never change.
Used by evaluate.py and by train.py's periodic eval; metrics.py scores the returns.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from env import make_batched_env, splits_from_cfg, task_optimal_return
from errors import EvalError
from teacher_forced import eval_mode
from transition import pack


def incontext_rollout(model, env_cfg, goals: list[tuple], n_episodes: int, seeds_per_goal: int, device,
                      seed: int, sample: bool = True, use_cache: bool = True, progress: bool = False,
                      record: bool = False) -> dict:
    """Roll a frozen model out in context on `goals` x `seeds_per_goal` environments for n_episodes each.

    env_cfg: dict or DictConfig with grid_size, horizon, reward_mode. Environment e = g * seeds_per_goal + s
    (goal-major), so the returns reshape to [goal, seed, episode]. The seeds of a goal differ only in their
    action-sampling draws, which come from a private torch.Generator seeded with `seed`: the global RNG is
    never touched, so calling this in the middle of training keeps resumed runs bit-exact. With
    sample=False actions are argmax and the seeds of a goal are identical.

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

    t0 = time.perf_counter()
    # eval mode (dropout off): the weights are frozen and evaluation deterministic given the seed
    with eval_mode(model), torch.inference_mode():
        st = model.init_rollout(n_envs, device, use_cache=use_cache)
        # Accumulate on the device and copy once at the end: no host sync per step.
        returns = torch.zeros(n_envs, n_episodes, dtype=torch.float32, device=device)
        found = torch.zeros(2, n_envs, n_episodes, dtype=torch.bool, device=device) if track else None
        rec_trans, rec_logp = [], []
        episodes = tqdm(range(n_episodes), desc=f"in-context rollout ({n_envs} envs)", unit="ep", mininterval=1.0,
                        disable=not progress)
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
    shape = (n_goals, seeds_per_goal, n_episodes)
    events = {"key_found": found[0].cpu().numpy().reshape(shape),
              "door_found": found[1].cpu().numpy().reshape(shape)} if track else {}
    extra = {"trans": torch.stack(rec_trans, 1).cpu(), "action_logp": torch.stack(rec_logp, 1).cpu()} if record else {}
    return {**extra,
        "returns": returns.cpu().double().numpy().reshape(shape),
        "optimal": np.asarray([task_optimal_return(env_cfg, g) for g in goals], dtype=np.float64),
        "events": events,
        "goals": goals,
        "horizon": horizon,
        "n_env_steps": n_envs * n_episodes * horizon,
        "wall_s": time.perf_counter() - t0,
    }


def eval_goals(env_cfg, n_train_goals: int, seed: int, max_heldout_goals: int | None = None) -> dict[str, list]:
    """{'test', 'val', 'train'} goals of env.splits_from_cfg, 'train' a fixed sample of n_train_goals of them
    drawn with its own seeded rng (never the global one), sorted. max_heldout_goals keeps the first that many
    test and val goals: each split is already in a seeded random order, so they are a random sample of it (Dark
    Key-to-Door's 328 test tasks x 100 episodes of 50 steps are beyond a CPU). Empty splits are left out."""
    splits = splits_from_cfg(env_cfg)
    if max_heldout_goals is not None:
        splits = {**splits, "test": splits["test"][:max_heldout_goals], "val": splits["val"][:max_heldout_goals]}
    train = splits["train"]
    rng = np.random.default_rng(seed)
    n = min(n_train_goals, len(train))
    pick = [train[i] for i in sorted(rng.choice(len(train), n, replace=False))]
    return {k: v for k, v in (("test", splits["test"]), ("val", splits["val"]), ("train", pick)) if v}
