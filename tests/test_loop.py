"""loop.py: the training step without a host sync between logs, the deferred non-finite check (same one-line
error, checkpoints stay finite), torch.compile (validated setting, same training as eager), and the process
group destroyed at the end of an accelerate-launched fit; settings that would be silently ignored (fp16 on the CPU)
are refused, and a warmup longer than the run is reported. Resume: tests/test_resume.py; multi-process:
tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from conftest import raises_one_line

import loop
import rundir
import train
from model.config import ConfigError


def test_compile_setting_is_validated():
    s = loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3, compile="reduce-overhead").validate()
    assert s.compile_mode() == "reduce-overhead"
    assert loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3, compile=True).validate().compile_mode() == "default"
    assert loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3).validate().compile_mode() is None
    with pytest.raises(loop.ConfigError, match="compile="):
        loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3, compile="fastest").validate()


def _fused_on_cpu(monkeypatch):
    """make_optimizer picks the fused AdamW on CUDA only; force it here so the CUDA code path (device-side
    non-finite flag, skipped update, deferred check) runs on the CPU (fused AdamW exists there too)."""
    real = loop.make_optimizer

    def fused(model, s):
        opt = real(model, s)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=s.lr, betas=opt.defaults["betas"], fused=True)

    monkeypatch.setattr(loop, "make_optimizer", fused)


_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"}


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts tensor calls that read a value back to the host (on CUDA each waits for the device)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in _SYNCS
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_step_has_no_host_sync_between_logs(tiny, tmp_path, one_thread, monkeypatch):
    """With static shapes, device-side data and the fused optimizer (the CUDA path), host reads happen at
    log/checkpoint/end time only: 3 steps and 9 steps between logs do the same number of them."""
    import train

    _fused_on_cpu(monkeypatch)
    counts = []
    for steps in (3, 9):
        cfg = tiny.compose("train", "model.static_shapes=true", "data_on_device=true", "log_every=1000",
                           max_steps=steps, run_dir=tmp_path / f"r{steps}")
        with _SyncCounter() as c:
            train.main(cfg)
        counts.append(c.n)
    assert counts[0] == counts[1], counts
    # The plain path (dynamic shapes: .nonzero per compression) does sync per step: the check can fail.
    cfg = tiny.compose("train", "data_on_device=true", "log_every=1000", max_steps=3, run_dir=tmp_path / "dyn")
    with _SyncCounter() as c:
        train.main(cfg)
    assert c.n > counts[0]


class _InfGrad(torch.autograd.Function):
    """0 in the forward (the loss stays finite), inf in the backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("inf"))


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_deferred_non_finite_check_names_step_and_keeps_checkpoints_finite(tiny, tmp_path, one_thread,
                                                                           monkeypatch, what):
    """Fused path: the bad step 3 is skipped on the device and reported at the step-4 log, before the
    step-4 checkpoint or model.pt is written; the step-2 checkpoint is the last one and is finite."""
    import train
    from model import losses

    _fused_on_cpu(monkeypatch)
    real, calls = losses.action_loss, {"n": 0}

    def bad_on_third_call(logits, batch, **kw):
        calls["n"] += 1
        out = real(logits, batch, **kw)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan") if what == "loss" else out["loss"] + _InfGrad.apply(logits)
        return out

    monkeypatch.setattr(train, "action_loss", bad_on_third_call)
    cfg = tiny.compose("train", "max_steps=6", "checkpoint_every=2", "log_every=4", run_dir=tmp_path / "r")
    with pytest.raises(loop.NonFiniteLossError, match=rf"train {what} is (nan|inf) at step 3; stopped"):
        train.main(cfg)
    assert [s for s, _ in rundir.checkpoints(tmp_path / "r")] == [2]
    assert not (tmp_path / "r" / "model.pt").exists()
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "r" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny, tmp_path, one_thread):
    """compile on the CPU: a few steps train through torch.compile (dynamo + AOTAutograd; the aot_eager
    backend skips only code generation, which takes minutes on this CPU), with no graph break in the
    static-shape forward, finite losses, and the weights of the eager run."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import train

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform (torch._dynamo.is_dynamo_supported())")
    torch._dynamo.reset()
    counters.clear()
    common = ("model.static_shapes=true", "model.dropout=0", "max_steps=3", "log_every=1")
    train.main(tiny.compose("train", *common, "compile=aot_eager", run_dir=tmp_path / "c"))
    assert counters["stats"]["unique_graphs"] >= 1  # the model really ran compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    train.main(tiny.compose("train", *common, run_dir=tmp_path / "e"))
    a = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "e" / "model.pt", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys()  # nn.Module.compile in place: checkpoints keep the eager names
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    torch._dynamo.reset()


@pytest.mark.slow
def test_fit_destroys_the_process_group(tiny, tmp_path):
    """accelerate-launched runs end with the process group destroyed (NCCL otherwise warns "destroy_process_group()
    was not called" at exit; gloo is silent, so ask the ranks directly), after a failed run too."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "import torch.distributed as dist\n"
        "import hydra_cli, train\n"
        "out = []\n"
        "try:\n"
        "    train.main(hydra_cli.compose_config('train', sys.argv[1:]))\n"
        "except Exception as e:\n"
        "    out.append(f'failed: {type(e).__name__}')\n"
        "out.append(f'process group alive after fit: {dist.is_initialized()}')\n"
        f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(chr(10).join(out))\n")
    acc = str(Path(sys.executable).parent / "accelerate")
    env = tiny._env({"ACCELERATE_USE_CPU": "true"})
    for extra in ([], ["batch_size=9"]):  # a clean run, and one that fails inside fit (9 rows for 2 ranks)
        r = subprocess.run([acc, "launch", "--config_file", str(repo / "accelerate_config.yaml"), "--num_processes",
                            "2", str(script), *tiny.args("train", *extra, max_steps=2, run_dir=tmp_path / "r")],
                           check=False, cwd=tiny.root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        for rank in (0, 1):
            said = (tmp_path / f"rank{rank}").read_text()
            assert said.endswith("process group alive after fit: False"), said
            assert ("failed: ConfigError" in said) == bool(extra), said
        assert "destroy_process_group" not in r.stderr


def test_fp16_on_cpu_is_refused_and_warmup_beyond_the_run_is_reported(tiny, tmp_path, capsys, one_thread):
    if not torch.cuda.is_available():
        raises_one_line(ConfigError, r"mixed_precision=fp16 needs a CUDA GPU but this run is on the CPU", train.main,
                tiny.compose("train", "mixed_precision=fp16", "cpu=true", run_dir=tmp_path / "fp16"))
        assert not (tmp_path / "fp16").exists()
    train.main(tiny.compose("train", "max_steps=2", "warmup_steps=10", run_dir=tmp_path / "w"))
    assert "warning: warmup_steps=10 > max_steps=2: the learning rate is still warming up" in capsys.readouterr().out
