"""Shared fixtures for tests that run the real entry points on a tiny problem.

`tiny` (session-scoped) collects ONE tiny Darkroom dataset per test session (4 streams x 200 steps per
train goal, 1 stream per test goal: 300 histories, well under a second) into a temp dir, and knows the
overrides that make a model and a loop tiny (d_model 32, 1-layer encoder/decoder, 4 latents,
seg_len 20, batch 8, a handful of steps). Use it instead of collecting your own data:

    def test_something(tiny, tmp_path, one_thread):
        cfg = tiny.compose("train", run_dir=tmp_path / "run", max_steps=4)   # a composed DictConfig
        summary = train.main(cfg)

        cfg = tiny.compose("pretrain", "save_every=2", run_dir=tmp_path / "p")

        r = tiny.cli("train.py", *tiny.args("train", run_dir=tmp_path / "run"))   # a subprocess
        assert r.returncode == 0, r.stderr

- `tiny.compose(config_name, *overrides, **key_values)`: config_name is "train", "pretrain",
  "evaluate" or "collect"; the tiny overrides come first, then `overrides` ("key=value" strings), then
  `key_values` (keyword form, for top-level keys: paths become strings, None -> null, bools -> true/false).
  Nothing is written to disk. data_path points at the tiny dataset (override it to test bad data).
- `tiny.args(config_name, *overrides, **key_values)`: the same, as a CLI argument list.
- `tiny.cli(script, *args, env=None, timeout=300)`: runs `python <repo>/<script> args...` in a temp cwd
  with OMP_NUM_THREADS=1 and returns the CompletedProcess (text stdout/stderr). `tiny.start(...)`: the
  same without waiting (a Popen; `.communicate()` it), to overlap independent runs on the 2 cores.
- `tiny.data_path`: the dataset folder (read-only by convention: copy it before corrupting it).
- `tb_scalars`: a function run_dir -> {tag: [(step, value), ...]} reading the run's TensorBoard events.
- `one_thread`: torch.set_num_threads(1) for the test (restored after). The machine has 2 shared
  cores; multi-threaded torch under contention is several times slower on these tiny models.
- `finished` (module-scoped): a root folder holding a private copy of the tiny dataset (data/) and a finished
  2-step stage-2 run on it (runs/done, checkpoint at step 2), to resume, copy or corrupt.
- `collect_small(path, *overrides)`: collect.main on a dataset as tiny as `tiny`'s, at `path`.
- `raises_one_line(exc, match, fn, *args)`: fn(*args) raises `exc` matching `match` in ONE line (the message
  a user sees); `raises_one_line_in_cli(exc, match, fn, cfg)` the same for the line the CLI error layer
  (hydra_cli.as_user_error) prints. `oserror(errno)`: a stand-in function that fails with that OS error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tiny models on 2 shared cores: one OpenMP thread per process is fastest, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
CONFIG_DIR = str(REPO / "config")
PYTHON = sys.executable

# Architecture shared by both stages (so a tiny stage-1 checkpoint fits a tiny stage-2 model).
TINY_MODEL = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.enc_n_layer=1",
              "model.recon_n_layer=1", "model.n_latent=4", "model.seg_len=20", "sampler.min_seg_len=10"]
TINY = {
    "train": TINY_MODEL + [
        "batch_size=8", "max_steps=6", "warmup_steps=2", "log_every=2", "checkpoint_every=1000",
        "heldout_every=0", "eval_every=0", "eval.n_episodes=2", "eval.seeds_per_goal=1",
        "eval.n_train_goals=1", "progress=false"],
    "pretrain": TINY_MODEL + [
        "pretrain_steps=6", "pretrain_batch_size=8", "save_every=1000", "warmup_steps=2",
        "log_every=2", "checkpoint_every=1000", "diag_every=0", "diag_batches=1", "progress=false"],
    "evaluate": ["n_episodes=2", "seeds_per_goal=1", "n_train_goals=1", "progress=false"],
    "collect": [],
}


def _kv(key_values: dict) -> list[str]:
    def fmt(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in key_values.items()]


@dataclass
class Tiny:
    data_path: Path
    root: Path

    def args(self, config_name: str, *overrides: str, **key_values) -> list[str]:
        data = [] if config_name in ("evaluate", "collect") else [f"data_path={self.data_path}"]
        return TINY[config_name] + data + list(overrides) + _kv(key_values)

    def compose(self, config_name: str, *overrides: str, **key_values):
        return compose(config_name, self.args(config_name, *overrides, **key_values))

    def _env(self, env: dict | None) -> dict:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("CAD_DEBUG", "HYDRA_FULL_ERROR", "CAD_TEST_KILL_AT"):
            full_env.pop(k, None)
        full_env.update(env or {})
        return full_env

    def cli(self, script: str, *args: str, env: dict | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, str(REPO / script), *map(str, args)], check=False, cwd=cwd or self.root,
                              env=self._env(env), capture_output=True, text=True, timeout=timeout)

    def start(self, script: str, *args: str, env: dict | None = None, cwd: Path | None = None,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
        return subprocess.Popen([PYTHON, str(REPO / script), *map(str, args)], cwd=cwd or self.root,
                                env=self._env(env), stdout=stdout, stderr=stderr, text=True)


def compose(config_name: str, overrides: list[str]):
    """Hydra's compose API on the repo's config dir (no run dir, nothing written; old key spellings
    respelled as on the command line: hydra_cli.compose_config)."""
    from hydra_cli import compose_config

    return compose_config(config_name, overrides, CONFIG_DIR)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    import collect

    root = tmp_path_factory.mktemp("tiny")
    data_path = root / "data"
    cfg = compose("collect", ["source.n_stream=4", "source.n_steps=200", "source.n_stream_eval=1",
                              f"data_path={data_path}", "progress=false"])
    collect.main(cfg)
    return Tiny(data_path=data_path, root=root)


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tb_scalars():
    """read(run_dir) -> {tag: [(step, value), ...]}: every scalar a run logged under <run_dir>/tb, as
    TensorBoard shows it (events purged by a resume are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(run_dir) -> dict[str, list[tuple[int, float]]]:
        ea = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
        ea.Reload()
        return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}

    return read


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 2-step stage-2 run (checkpoint at step 2) on a private copy of the tiny dataset."""
    import torch

    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rel")
    shutil.copytree(tiny.data_path, root / "data")
    train.main(tiny.compose("train", "max_steps=2", data_path=root / "data", run_dir=root / "runs" / "done"))
    return root


def collect_small(path: Path, *overrides: str) -> dict:
    """A tiny dataset at `path` (4 streams x 200 steps per train goal unless overridden)."""
    import collect

    return collect.main(compose("collect", ["source.n_stream=4", "source.n_steps=200", "source.n_stream_eval=1",
                                            "progress=false", f"data_path={path}", *overrides]))


def raises_one_line(exc, match, fn, *a) -> str:
    with pytest.raises(exc, match=match) as ei:
        fn(*a)
    assert "\n" not in str(ei.value), str(ei.value)
    return str(ei.value)


def raises_one_line_in_cli(exc, match, fn, cfg) -> str:
    """As raises_one_line, for the line the CLI layer prints: a disk error during training becomes one line in
    hydra_cli.as_user_error, not in the loop."""
    import hydra_cli
    from errors import UserError

    with pytest.raises(BaseException) as ei:
        fn(cfg)
    err = hydra_cli.as_user_error(ei.value, cfg) if not isinstance(ei.value, UserError) else ei.value
    assert isinstance(err, exc) and re.search(match, str(err)) and "\n" not in str(err), (ei.value, err)
    return str(err)


def oserror(code):
    def fail(*a, **kw):
        raise OSError(code, os.strerror(code))
    return fail
