"""Run DICP's own Dark Key-to-Door beside ours and record what it does (tests/data/dicp_key_to_door.json).

    # DICP's file, copied OUTSIDE this repository (their code is never committed here):
    git -C <dicp clone> show HEAD:gridworld/env/dark_key_to_door.py > /tmp/dicp/dark_key_to_door.py
    .venv/bin/python tests/tooling/dicp_key_to_door_fixture.py --dicp /tmp/dicp [--episodes 1200]

Needs DICP's module (numpy + gymnasium only); tests/test_key_to_door.py replays the recorded fixture
WITHOUT it. What it does:

1. Splits. DICP's `sample_dark_key_to_door({'grid_size': 9, 'env_split_seed': 4, 'train_env_ratio': 0.95})`
   (their gridworld/cfg/env/dark_key_to_door.yaml), and the index shuffle their ADDataset uses (random.seed(4)
   on range(9^4), mapped onto the unshuffled task list) -> both compared with env.key_to_door.task_split; the
   fixture keeps DICP's test list in full and sha256 digests of both lists.
2. Episodes. `--episodes` episodes on tasks drawn uniformly from all 9^4 (plus forced edge cases: key on
   the start cell, key == door, key/door in corners), each driven by one of: uniformly random actions, or
   DICP's own `get_optimal_action` oracle with epsilon-random actions (eps 0.1 / 0.3 / 0.6), so that both
   rewards occur often. Each episode is played in DICP's env with DICP's action ids; the same actions,
   relabelled to ours (env.key_to_door.from_dicp_action), are replayed in one BatchedKeyToDoor over all
   episodes at once, and every step's next state, reward and end flag is compared. The fixture keeps each
   episode's task, our actions, DICP's per-step rewards and a digest of DICP's next states and end flags,
   plus the full DICP trajectory of the first few episodes.
3. Optimal return: DICP's get_max_return() (2) against env.key_to_door.optimal_return for all 9^4 tasks.

Prints the counts; exits 1 on any disagreement (and then writes no fixture).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from atomic_io import atomic_write_json
from env.key_to_door import BatchedKeyToDoor, from_dicp_action, optimal_return, task_split

OUT = REPO / "tests" / "data" / "dicp_key_to_door.json"
CONFIG = {"env": "darkkeytodoor", "grid_size": 9, "horizon": 50, "env_split_seed": 4, "train_env_ratio": 0.95}
POLICIES = ("random", "oracle_eps0.1", "oracle_eps0.3", "oracle_eps0.6")
N_FULL = 5  # episodes whose whole DICP trajectory (states, rewards, ends) is stored verbatim


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def trajectory_digest(next_states, dones) -> str:
    """8 hex digits of an episode's next states and end flags (the test recomputes it from ours)."""
    return digest([[int(v) for v in s] for s in next_states] + [[int(d) for d in dones]])[:8]


def encode_actions(actions) -> str:
    """Action ids 0..4 -> one base-5 number in hex (a 50-step episode: 30 characters instead of 50)."""
    n = 0
    for a in actions:
        n = n * 5 + int(a)
    return format(n, "x")


def decode_actions(code: str, length: int) -> list[int]:
    n, out = int(code, 16), []
    for _ in range(length):
        n, a = divmod(n, 5)
        out.append(a)
    return out[::-1]


def load_dicp(folder: Path):
    spec = importlib.util.spec_from_file_location("dicp_dark_key_to_door", folder / "dark_key_to_door.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare_splits(dicp) -> dict:
    train, test = dicp.sample_dark_key_to_door(CONFIG, shuffle=True)
    train = [tuple(int(v) for v in t) for t in train]
    test = [tuple(int(v) for v in t) for t in test]
    # Their ADDataset shuffles indices into the unshuffled list instead: the same permutation?
    plain_train, plain_test = dicp.sample_dark_key_to_door(CONFIG, shuffle=False)
    plain = [tuple(int(v) for v in t) for t in plain_train + plain_test]
    idx = list(range(len(plain)))
    random.seed(CONFIG["env_split_seed"])
    random.shuffle(idx)
    n_train = round(len(plain) * CONFIG["train_env_ratio"])
    by_index = ([plain[i] for i in idx[:n_train]], [plain[i] for i in idx[n_train:]])
    ours = task_split(CONFIG["grid_size"], CONFIG["train_env_ratio"], CONFIG["env_split_seed"])
    return {"dicp": (train, test), "dataset_index_shuffle_agrees": by_index == (train, test),
            "ours_agrees": ours == (train, test)}


def pick_tasks(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    g = CONFIG["grid_size"]
    c = g // 2
    tasks = [tuple(int(v) for v in rng.integers(0, g, 4)) for _ in range(n)]
    for i in range(0, n, 20):  # edge cases every 20 episodes, in rotation
        k = tuple(int(v) for v in rng.integers(0, g, 2))
        kind = (i // 20) % 4
        if kind == 0:
            tasks[i] = (c, c) + tasks[i][2:]        # key on the start cell
        elif kind == 1:
            tasks[i] = k + k                          # key == door
        elif kind == 2:
            tasks[i] = (0, 0, g - 1, g - 1)           # opposite corners
        else:
            tasks[i] = (c, c, c, c)                   # both on the start cell
    return tasks


def play_dicp(dicp, task, policy: str, rng: np.random.Generator):
    """One episode in DICP's env: (DICP action ids, next states, rewards, dones, have_key after each step)."""
    env = dicp.DarkKeyToDoor(CONFIG, key=np.array(task[:2]), goal=np.array(task[2:]))
    s, _ = env.reset()
    acts, states, rewards, dones = [], [], [], []
    eps = 1.0 if policy == "random" else float(policy.split("eps")[1])
    done = False
    while not done:
        if rng.random() < eps:
            a = int(rng.integers(0, 5))
        else:
            a = int(env.get_optimal_action(s, env.have_key))
        s, r, done, _truncated, _ = env.step(a)
        acts.append(a)
        states.append([int(v) for v in s])
        rewards.append(int(r))
        dones.append(bool(done))
    return acts, states, rewards, dones


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dicp", type=Path, required=True, help="folder holding DICP's dark_key_to_door.py")
    ap.add_argument("--episodes", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    dicp = load_dicp(a.dicp)

    sp = compare_splits(dicp)
    train, test = sp["dicp"]
    print(f"splits: DICP {len(train)} train / {len(test)} test; ours identical: {sp['ours_agrees']}; DICP's "
          f"ADDataset index shuffle gives the same lists: {sp['dataset_index_shuffle_agrees']}")

    g, h = CONFIG["grid_size"], CONFIG["horizon"]
    all_tasks = [(i, j, k, m) for i in range(g) for j in range(g) for k in range(g) for m in range(g)]
    max_ret = dicp.DarkKeyToDoor(CONFIG, key=np.zeros(2, int), goal=np.zeros(2, int)).get_max_return()
    opt_bad = [t for t in all_tasks if optimal_return(t, g, h) != max_ret]
    print(f"optimal return: DICP get_max_return() = {max_ret}; ours differs on {len(opt_bad)} of {len(all_tasks)} tasks")

    rng = np.random.default_rng(a.seed)
    tasks = pick_tasks(rng, a.episodes)
    policies = [POLICIES[i % len(POLICIES)] for i in range(a.episodes)]
    played = [play_dicp(dicp, t, p, rng) for t, p in zip(tasks, policies)]

    # Ours: every episode at once, DICP's actions relabelled.
    env = BatchedKeyToDoor(tasks, grid_size=g, horizon=h)
    env.reset()
    ours_s, ours_r, ours_d = [], [], []
    for t in range(h):
        acts = torch.tensor([from_dicp_action(p[0][t]) for p in played])
        s, r, d = env.step(acts)
        ours_s.append(s)
        ours_r.append(r)
        ours_d.append(d)
    ours_s, ours_r, ours_d = torch.stack(ours_s, 1), torch.stack(ours_r, 1), torch.stack(ours_d, 1)
    n_state = n_rew = n_done = 0
    bad_eps = set()
    for e, (_, st, rw, dn) in enumerate(played):
        ds = int((ours_s[e] != torch.tensor(st)).any(-1).sum())
        dr = int((ours_r[e] != torch.tensor(rw, dtype=torch.float32)).sum())
        dd = int((ours_d[e] != torch.tensor(dn)).sum())
        n_state, n_rew, n_done = n_state + ds, n_rew + dr, n_done + dd
        if ds or dr or dd:
            bad_eps.add(e)
    rets = [sum(p[2]) for p in played]
    n_steps = a.episodes * h
    print(f"episodes: {a.episodes} ({len(set(tasks))} distinct tasks; policies {', '.join(POLICIES)}), "
          f"{n_steps} steps; returns 0/1/2: {rets.count(0)}/{rets.count(1)}/{rets.count(2)}; rewarded steps "
          f"{sum(rets)}")
    print(f"disagreements (ours vs DICP): next state {n_state}, reward {n_rew}, end flag {n_done} steps; "
          f"{len(bad_eps)} episodes")
    ok = sp["ours_agrees"] and sp["dataset_index_shuffle_agrees"] and not opt_bad and not bad_eps
    if not ok:
        print("DISAGREEMENT: no fixture written", file=sys.stderr)
        return 1

    fixture = {
        "source": "github.com/jaehyeon-son/dicp @ e36b3f713fdca775728525dc621820a1989691f8, "
                  "gridworld/env/dark_key_to_door.py run by tests/tooling/dicp_key_to_door_fixture.py",
        "config": CONFIG,
        "split": {"n_train": len(train), "n_test": len(test), "train_sha256": digest(train),
                  "test_sha256": digest(test), "test": [list(t) for t in test]},
        "max_return": int(max_ret),
        "counts": {"episodes": a.episodes, "steps": n_steps, "distinct_tasks": len(set(tasks)),
                   "returns_0_1_2": [rets.count(0), rets.count(1), rets.count(2)],
                   "disagreements": {"state": n_state, "reward": n_rew, "done": n_done}},
        # One row per episode: [task, our actions as a base-5 number in hex (first action = most significant
        # digit; decode_actions), DICP's rewarded steps (0-based), digest of DICP's next states + end flags].
        "episode_columns": ["task", "actions_base5_hex", "rewarded_steps", "states_dones_digest"],
        "episodes": [[list(t), encode_actions([from_dicp_action(x) for x in acts]),
                      [i for i, x in enumerate(rw) if x], trajectory_digest(st, dn)]
                     for t, (acts, st, rw, dn) in zip(tasks, played)],
        "full": [{"task": list(tasks[e]), "dicp_actions": played[e][0], "next_states": played[e][1],
                  "rewards": played[e][2], "dones": played[e][3]} for e in range(N_FULL)],
    }
    assert all(decode_actions(row[1], h) == [from_dicp_action(x) for x in p[0]]
               for row, p in zip(fixture["episodes"], played))
    atomic_write_json(a.out, fixture, indent=None, separators=(",", ":"))
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
