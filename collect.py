"""Collect learning histories: run a source RL algorithm on every goal, save what it did (docs/design.md §3).

    python collect.py                              # darkroom, 73 train goals x 100 streams x 1000 steps
    python collect.py env=darkroom_hard ...       # source settings: see config/env/darkroom_hard.yaml
    python collect.py data_seed=1 overwrite=true

AD distils the source's learning, so a history must show *learning*: return rising from a random policy's
toward optimal. The source is tabular Q-learning, vectorised over every (goal x stream), with:
  * optimistic initial values (q_init): untried actions look good, so greedy play explores systematically;
  * epsilon-greedy decaying linearly from eps_start (1.0: a uniformly random first episode) to eps_end;
  * random tie-breaking among greedy actions (otherwise argmax always picks 'stay' on fresh states);
  * backward replay of each finished episode (Lin 1992), so a reward found at the end of an episode propagates
    along the whole path at once: plain one-step Q-learning leaves the far goals (Manhattan distance 6-8)
    unlearnt within 50 episodes (last-5 return ~75% of optimal instead of ~91%), for one more vectorised
    update per step on average.
The horizon is a time limit, not a terminal state, so every update bootstraps. Output format: histories.py.
"""

from __future__ import annotations

import datetime
import time
from typing import Literal

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from atomic_io import PathLock, os_error_reason
from env import N_ACTIONS, SPLITS, is_key_to_door, make_batched_env, splits_from_cfg, task_optimal_return
from histories import (
    FORMAT_VERSION,
    DatasetError,
    check_can_write,
    recover_leftovers,
    save_histories,
    split_layout,
)
from hydra_cli import abspath
from model.config import ConfigError  # the project's one config error class (one line, exit 2)
from schema import EnvConfig, Schema, key


@torch.no_grad()
def qlearning_histories(goals: torch.Tensor, env_cfg, src, n_steps: int, seed: int,
                        device: str = "cpu", progress: bool = True, n_train: int | None = None
                        ) -> dict[str, np.ndarray]:
    """Run vectorised tabular Q-learning, one independent learner per row of `goals` [N, task_dim].

    Returns uint8 arrays states [N, T, 2], actions [N, T], rewards [N, T], next_states [N, T, 2].
    `n_train` (first rows = train goals) only selects which streams the progress bar's return shows.
    The learner's state is the cell, plus the env's hidden progress where it has one (Dark Key-to-Door:
    env.phase() = key held / door opened, so S = 3 G^2): the source may see it, the histories do not.
    """
    device = torch.device(device)
    G, H, A = int(env_cfg.grid_size), int(env_cfg.horizon), N_ACTIONS
    gen = torch.Generator(device=device).manual_seed(int(seed))
    env = make_batched_env(env_cfg, goals, device)
    n_phases = int(env.n_phases)
    N, S = goals.shape[0], G * G * n_phases

    def state_rows(s):  # row of each learner's current state in Q
        cell = s[:, 0] * G + s[:, 1]
        return row0 + (cell if n_phases == 1 else env.phase() * (G * G) + cell)

    # One table, rows n*S + s hold Q(s, .) of learner n: a step gathers N rows with index_select
    # (several times faster than advanced indexing on CPU) and writes N entries with index_copy_.
    Q = torch.full((N * S, A), float(src.q_init), dtype=torch.float32, device=device)
    Qf = Q.view(-1)  # flat view, entry (row, a) at row * A + a
    row0 = torch.arange(N, device=device) * S
    lr, gamma = float(src.lr), float(src.gamma)

    def td_update(rows, a, r, next_rows, cur=None):
        idx = rows * A + a
        if cur is None:
            cur = Qf.index_select(0, idx)
        target = r + gamma * Q.index_select(0, next_rows).amax(dim=1)  # always bootstrap: the horizon
        Qf.index_copy_(0, idx, cur + lr * (target - cur))              # is a time limit, not terminal

    # Time-major buffers: writing step t is one contiguous row; transposed to [N, T] once at the end.
    bufs = {k: torch.empty((n_steps, N, *tail), dtype=torch.uint8, device=device)
            for k, tail in (("states", (2,)), ("actions", ()), ("rewards", ()), ("next_states", (2,)))}
    episode = []  # (rows, a, r, next_rows) of the current episode, for backward replay

    s = env.reset()
    bar = tqdm(range(n_steps), desc="collect", unit="step", disable=not progress, mininterval=0.5)
    for t in bar:
        rows = state_rows(s)
        q = Q.index_select(0, rows)  # [N, A]
        # One uniform draw per stream and slot: [:, :A] random tie-break scores (greedy = argmax over
        # the maximal entries, else argmax would always pick 'stay' on fresh states), [:, A] the
        # epsilon test, [:, A+1] the random action.
        u = torch.rand((N, A + 2), generator=gen, device=device)
        greedy = torch.where(q == q.amax(dim=1, keepdim=True), u[:, :A], -1.0).argmax(dim=1)
        rand_a = (u[:, A + 1] * A).long().clamp_(max=A - 1)
        eps = (src.eps_start + min(1.0, t / src.eps_decay_steps) * (src.eps_end - src.eps_start)
               if src.eps_decay_steps > 0 else src.eps_end)  # linear decay, then constant
        a = torch.where(u[:, A] < eps, rand_a, greedy)
        ns, r, _ = env.step(a)
        next_rows = state_rows(ns)  # the phase after this step
        td_update(rows, a, r, next_rows, cur=q.gather(1, a[:, None]).squeeze(1))
        for buf, v in zip(bufs.values(), (s, a, r, ns)):
            buf[t] = v
        episode.append((rows, a, r, next_rows))
        s = ns
        if env.t >= H:  # episode over for every stream (shared step counter; no device sync)
            for _ in range(int(src.replay_passes)):
                for step in reversed(episode):
                    td_update(*step)
            episode.clear()
            s = env.reset()
            if progress:
                ret = bufs["rewards"][t + 1 - H:t + 1, :n_train].sum(0).float().mean().item()
                bar.set_postfix(ret=f"{ret:.2f}", refresh=False)
    bar.close()

    return {k: np.ascontiguousarray(buf.transpose(0, 1).cpu().numpy()) for k, buf in bufs.items()}  # [N, T, ...]


# Source algorithms by name (source.name). Each maps (goals, env_cfg, src, n_steps, seed, device,
# progress, n_train) -> uint8 arrays; add new ones here.
SOURCES = {"qlearning": qlearning_histories}


class SourceConfig(Schema):
    """collect.yaml's source: the source RL algorithm whose learning histories AD distils."""

    name: Literal[tuple(SOURCES)] = key("the source algorithm: a name in collect.SOURCES")
    n_stream: int = key("histories per train goal", ge=1, le=100_000)
    n_steps: int = key("transitions per history; a multiple of env.horizon", ge=1)
    n_stream_eval: int = key("histories per test goal", ge=0, le=100_000)
    lr: float = key("Q-learning step size", gt=0, le=1)
    gamma: float = key("discount", ge=0, lt=1)
    q_init: float = key("initial Q value")
    eps_start: float = key("epsilon-greedy at step 0", ge=0, le=1)
    eps_end: float = key("epsilon floor after the decay", ge=0, le=1)
    eps_decay_steps: int = key("linear epsilon decay length in steps", ge=0)
    replay_passes: int = key("backward replays of each finished episode", ge=0, le=100)


class CollectConfig(Schema):
    """config/collect.yaml: every key collect.py reads, checked first thing in main."""

    env: EnvConfig
    seed: int = key("RNG seed of the source algorithm", ge=0)
    data_seed: int = key("dataset identity: part of the default data_path", ge=0)
    data_path: str = key("output folder")
    overwrite: bool = key("replace an existing dataset at data_path")
    device: str = key("torch device of the source: cpu, cuda or cuda:N")
    progress: bool = key("tqdm bar over environment steps")
    num_threads: int = key("torch CPU threads; 0 = torch's default", ge=0, le=1024)
    source: SourceConfig


# A source whose last-5-episode return is below random + this fraction of (optimal - random) learnt
# (almost) nothing: its histories cannot teach in-context learning.
NOT_LEARNING_FRAC = 0.1


def episode_returns(rewards: np.ndarray, horizon: int) -> np.ndarray:
    """rewards uint8 [N, T] -> float64 [N, T // horizon] return of each episode."""
    N, T = rewards.shape
    return rewards.reshape(N, T // horizon, horizon).sum(-1, dtype=np.float64)


@torch.no_grad()
def random_policy_return(goals: list, env_cfg, n_rep: int = 100, seed: int = 0) -> float:
    """Monte-Carlo mean return of the uniformly random policy over `goals` (n_rep episodes each):
    the baseline a source's first episode should be close to."""
    if not goals:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    env = make_batched_env(env_cfg, torch.tensor(goals).repeat_interleave(n_rep, 0))
    env.reset()
    total = torch.zeros(env.n_envs)
    for _ in range(env.horizon):
        _, r, _ = env.step(torch.randint(0, N_ACTIONS, (env.n_envs,), generator=gen))
        total += r
    return total.mean().item()


def _split_summary(ret: np.ndarray, goals: list, env_cfg, seed: int) -> dict:
    """First-episode / last-5-episode mean return of one split vs random and optimal."""
    if ret.shape[0] == 0:
        return {}
    opt = float(np.mean([task_optimal_return(env_cfg, g) for g in goals]))
    last5 = float(ret[:, -5:].mean())
    out = {"first_episode": float(ret[:, 0].mean()), "last5": last5, "optimal": opt,
           "random": random_policy_return(goals, env_cfg, seed=seed),
           "last5_frac_optimal": last5 / opt if opt > 0 else float("nan")}
    for name, curve in found_curves(ret, env_cfg).items():  # Dark Key-to-Door: key / door found
        out[f"{name}_first_episode"], out[f"{name}_last5"] = curve[0], float(np.mean(curve[-5:]))
    return out


def found_curves(ret: np.ndarray, env_cfg) -> dict[str, list[float]]:
    """Dark Key-to-Door: per episode, the fraction of histories that found the key / opened the door
    ({'key_found': [...], 'door_found': [...]}; {} for Darkroom). Read off the returns exactly: the door
    pays only after the key, so an episode's first reward is the key and its second the door."""
    if not is_key_to_door(env_cfg):
        return {}
    return {"key_found": (ret >= 1).mean(0).tolist(), "door_found": (ret >= 2).mean(0).tolist()}


def _check_cfg(cfg: DictConfig) -> None:
    """Reject a bad config before any work (ConfigError, one line)."""
    src, env = cfg.source, cfg.env
    CollectConfig.check(cfg)
    if src.n_steps % env.horizon:  # >= 1: the schema
        raise ConfigError(f"source.n_steps={src.n_steps} must be a positive multiple of env.horizon="
                          f"{env.horizon} (histories hold whole episodes)")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available: use device=cpu")


def main(cfg: DictConfig) -> dict:
    """Collect and save one dataset; returns (and prints) the summary. Tests call this directly."""
    _check_cfg(cfg)
    path = abspath(cfg.data_path)  # relative to where you launched
    lock = PathLock(path)  # one collect per dataset: a second one would replace it under the first one's feet
    try:
        holder = lock.acquire()
    except OSError as e:
        raise DatasetError(f"cannot create the lock file {lock.file} ({os_error_reason(e)}): choose another "
                           f"data_path or fix the folder's permissions") from None
    if holder:
        raise DatasetError(f"data_path {path} is being written by another collect ({holder}, lock file "
                           f"{lock.file}): wait for it to finish, or choose another data_path / data_seed")
    try:
        for note in recover_leftovers(path):
            print(f"note: {note}", flush=True)
        return _collect(cfg, path)
    finally:
        lock.release()


def _collect(cfg: DictConfig, path: str) -> dict:
    check_can_write(path, bool(cfg.overwrite))   # fail before any work, not after it
    env_cfg, src = cfg.env, cfg.source
    splits = splits_from_cfg(env_cfg)
    # Train goals get n_stream histories each (the training data); validation and test goals get
    # n_stream_eval each: they are only scored (held-out loss, stage-1 diagnostics), never trained on.
    per_goal = {"train": int(src.n_stream), "val": int(src.n_stream_eval), "test": int(src.n_stream_eval)}
    goal_arr, split_meta, ranges = split_layout(splits, per_goal)
    goals = torch.from_numpy(goal_arr)
    n_train = ranges["train"]["stop"]
    N, T = goals.shape[0], int(src.n_steps)

    prev_threads = torch.get_num_threads()
    if cfg.num_threads:  # restored afterwards: tests call main() inside a longer-lived process
        torch.set_num_threads(int(cfg.num_threads))
    t0 = time.perf_counter()
    try:
        arrays = SOURCES[src.name](goals, env_cfg, src, T, int(cfg.seed), str(cfg.device),
                                   bool(cfg.progress), n_train=n_train)
    finally:
        torch.set_num_threads(prev_threads)
    wall = time.perf_counter() - t0
    arrays["goals"] = goals.numpy().astype(np.uint8)  # [N, 2] goal cells, or [N, 4] key-to-door tasks

    ret = episode_returns(arrays["rewards"], env_cfg.horizon)
    rets = {k: ret[r["start"]:r["stop"]] for k, r in ranges.items()}  # [histories of the split, episode]
    summary = {
        "n_histories": N, **{f"n_{k}_histories": len(v) for k, v in rets.items()},
        "n_steps": T, "n_episodes": T // env_cfg.horizon, "n_transitions": N * T,
        "wall_s": wall, "transitions_per_s": N * T / wall,
        **{k: _split_summary(v, splits[k], env_cfg, int(cfg.seed) + {"train": 1, "test": 2, "val": 3}[k])
           for k, v in rets.items()},
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "env": OmegaConf.to_container(env_cfg, resolve=True),
        "split": split_meta,
        "source": OmegaConf.to_container(src, resolve=True),
        "seed": int(cfg.seed), "data_seed": int(cfg.data_seed),
        "n_stream": int(src.n_stream), "n_stream_eval": int(src.n_stream_eval), "n_steps": T,
        "histories": ranges,
        "layout": "train histories first, goal-major in split order (n_stream per goal), then validation, "
                  "then test histories (n_stream_eval per goal each); goals.npy holds each history's goal",
        "return_curve": rets["train"].mean(0).tolist(),
        **{f"return_curve_{k}": v.mean(0).tolist() if len(v) else [] for k, v in rets.items() if k != "train"},
        # Dark Key-to-Door only: the source's key / door found fractions per episode, per split
        **({"found_curves": {k: found_curves(v, env_cfg) for k, v in rets.items() if len(v)}}
           if is_key_to_door(env_cfg) else {}),
        "summary": summary,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_histories(path, arrays, meta, overwrite=bool(cfg.overwrite))
    summary["data_path"] = path
    print_summary(summary, meta["return_curve"])
    tr = summary["train"]
    if tr and tr["last5"] < tr["random"] + NOT_LEARNING_FRAC * (tr["optimal"] - tr["random"]):
        print(f"warning: the source did not learn: its last-5-episode return {tr['last5']:.2f} is close to a "
              f"random policy's {tr['random']:.2f} (optimal {tr['optimal']:.2f}); these histories show no "
              f"learning for AD to distil: check source.lr / gamma / eps_* / n_steps", flush=True)
    return summary


def print_summary(s: dict, curve: list | None = None) -> None:
    print(f"collected {s['n_histories']:,} histories ({s['n_train_histories']:,} train, {s['n_val_histories']:,} "
          f"val, {s['n_test_histories']:,} test) x {s['n_steps']} steps = {s['n_transitions']:,} transitions in {s['wall_s']:.1f} s "
          f"({s['transitions_per_s'] / 1e6:.2f} M/s) -> {s['data_path']}")
    def table(title: str, cols: list[tuple[str, str, int, str]]) -> None:  # (header, key, width, format)
        print(f"{title:<12}" + "".join(f"{h:>{w}}" for h, _, w, _ in cols))
        for split in SPLITS:
            if s[split]:
                print(f"{split + ' goals':<12}" + "".join(f"{s[split][k]:>{w}{f}}" for _, k, w, f in cols))

    table("mean return", [("random", "random", 9, ".2f"), ("first ep", "first_episode", 10, ".2f"),
                          ("last 5 ep", "last5", 11, ".2f"), ("optimal", "optimal", 9, ".2f"),
                          ("last5/opt", "last5_frac_optimal", 11, ".3f")])
    if any("key_found_first_episode" in s[split] for split in SPLITS if s[split]):
        table("found frac", [("key ep 1", "key_found_first_episode", 9, ".2f"),
                             ("key last5", "key_found_last5", 10, ".2f"),
                             ("door ep 1", "door_found_first_episode", 11, ".2f"),
                             ("door last5", "door_found_last5", 11, ".2f")])
    if curve:  # the source's own learning curve on the train goals, at a few episodes
        marks = sorted({1, 2, 5, 10, 20, 50, 100, len(curve)} & set(range(1, len(curve) + 1)))
        print("train return by episode: " + "  ".join(f"{e}: {curve[e - 1]:.2f}" for e in marks))


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("collect", "collect")
