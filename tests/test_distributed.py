"""Real data parallelism (docs/design.md §8): `accelerate launch` with 2 CPU processes (gloo) through
the repo's accelerate_config.yaml, for both training scripts. Checks that 2 ranks really ran, that they
produced one run directory with one set of logs/checkpoints (rank 1 writes only its RNG state), and that
the result matches a 1-process run with the same global batch (dropout 0, so the only difference is
float summation order). Against a run directory locked elsewhere every rank stops, with the error printed once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atomic_io import PathLock

pytestmark = pytest.mark.slow  # subprocesses end to end: make test runs it, make test-fast skips it

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tiny, script: str, args: list[str], nproc: int) -> subprocess.Popen:
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_config.yaml"), "--num_processes",
           str(nproc), "--main_process_port", str(_free_port()), "--num_machines", "1",
           "--dynamo_backend", "no", str(REPO / script), *args]
    return subprocess.Popen(cmd, cwd=tiny.root, env=tiny._env({"ACCELERATE_USE_CPU": "true"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-5000:]}"
    return out


def _files(run_dir: Path) -> list[str]:
    """Relative paths; TensorBoard files (named after time and pid) count as 'tb/events'."""
    rel = (str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    return sorted("tb/events" if r.startswith("tb/events.out.tfevents") else r for r in rel)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def _check_layout(two: Path, one: Path, final_step: int) -> None:
    """One run directory, one set of files: the 2-process run has exactly the 1-process run's files plus
    rank 1's RNG state in each checkpoint."""
    assert json.loads((two / "done.json").read_text())["world_size"] == 2  # 2 ranks really ran
    assert json.loads((one / "done.json").read_text())["world_size"] == 1
    assert len(list((two / "tb").iterdir())) == 1  # a single tfevents file: rank 1 logs nothing
    extra = sorted(set(_files(two)) - set(_files(one)))
    ck = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert extra == [f"checkpoints/{c}/random_states_1.pkl" for c in ck]
    assert not set(_files(one)) - set(_files(two))
    assert ck[-1] == f"step-{final_step:08d}"
    assert not list(two.rglob(".*"))  # no temp files or folders left


def _train_two_and_one(tiny, tmp_path, args: list[str], final_step: int) -> float:
    """train.py with `args` on 2 processes and on 1, side by side; checks the run directories' layout and
    returns the largest weight difference of their model.pt."""
    two = _launch(tiny, "train.py", [*args, f"run_dir={tmp_path / 'two'}"], nproc=2)
    one = tiny.start("train.py", *args, f"run_dir={tmp_path / 'one'}")
    _wait(two)
    _wait(one)
    _check_layout(tmp_path / "two", tmp_path / "one", final_step)
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["model_state_dict"]
    return _max_diff(a, b)


def test_train_two_processes_match_one(tiny, tmp_path, tb_scalars):
    args = tiny.args("train", "model.dropout=0", "max_steps=6", "checkpoint_every=3", "heldout_every=3",
                     "eval_every=6")
    assert _train_two_and_one(tiny, tmp_path, args, 6) < 1e-4
    for tag in ("train/loss", "heldout/loss_val", "heldout/loss_test", "memory/loss_k1_test"):
        la, lb = tb_scalars(tmp_path / "one")[tag], tb_scalars(tmp_path / "two")[tag]
        assert [s for s, _ in la] == [s for s, _ in lb]
        assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) < 1e-4, tag
    assert tb_scalars(tmp_path / "two")["eval/return_val"]  # main-only eval ran while rank 1 waited


def test_train_two_processes_match_one_with_the_kept_window_and_carried_memory(tiny, tmp_path):
    """sampler.memory=carry: each rank carries the memory of its own rows (lanes) from micro-batch to
    micro-batch; together they are the 1-process run's lanes, so the weights match."""
    args = tiny.args("train", "model.dropout=0", "max_steps=4", "checkpoint_every=4", "sampler.schedule=rollout",
                     "model.seg_len=8", "sampler.min_seg_len=8", "model.keep_recent=3", "model.bptt_segments=1",
                     "sampler.memory=carry")
    assert _train_two_and_one(tiny, tmp_path, args, 4) < 1e-4


def test_pretrain_two_processes_match_one(tiny, tmp_path, tb_scalars):
    """Stage 1 has variable-length segments and depths, so per-rank label counts differ: the loop's
    label-weighted loss is what makes 2 processes equal 1 (per-rank means would not)."""
    args = tiny.args("pretrain", "model.dropout=0", "pretrain_steps=6", "checkpoint_every=3",
                     "save_every=3", "diag_every=3")
    two = _launch(tiny, "pretrain_encoder.py", [*args, f"run_dir={tmp_path / 'two'}"], nproc=2)
    one = tiny.start("pretrain_encoder.py", *args, f"run_dir={tmp_path / 'one'}")
    _wait(two)
    _wait(one)
    _check_layout(tmp_path / "two", tmp_path / "one", 6)
    for name in ("encoder-pretrained-3.pt", "encoder-pretrained-final.pt"):
        a = torch.load(tmp_path / "one" / name, weights_only=True)
        b = torch.load(tmp_path / "two" / name, weights_only=True)
        for part in ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"):
            assert _max_diff(a[part], b[part]) < 1e-4, (name, part)
    la, lb = tb_scalars(tmp_path / "one")["pretrain/loss"], tb_scalars(tmp_path / "two")["pretrain/loss"]
    assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) < 1e-4


@pytest.mark.slow
def test_two_process_launch_on_a_locked_run_dir_fails_on_every_rank(tiny, tmp_path):
    """accelerate launch (2 gloo ranks): only the main process takes the lock (tests/test_distributed.py
    shows the ranks of one launch share it); against a lock held elsewhere every rank stops, the error is
    printed once, and nothing hangs."""
    from test_distributed import _launch

    held = PathLock(tmp_path / "r")
    assert held.acquire() is None
    try:
        p = _launch(tiny, "train.py", tiny.args("train", run_dir=tmp_path / "r"), nproc=2)
        _, err = p.communicate(timeout=300)
    finally:
        held.release()
    assert p.returncode != 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"is in use by another training (pid {os.getpid()} on" in errors[0], err[-3000:]
    assert not (tmp_path / "r").exists()
