"""Setup verification you run by hand before a long training run:

    python test_pretrain_setup.py                  # checks the real configs in config/
    python test_pretrain_setup.py model.n_latent=15 # ... with overrides, as you would train

Runs the checks of `CHECKS` (at the bottom) in order, one line each, then prints `All tests passed! ✓` and
exits 0, or names each failing check and exits 1. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere: the repo's modules come first

class NotRun(Exception):
    """A check needs something an earlier check was meant to produce, and that check failed."""


class Setup(dict):
    """What the checks hand to each other (overrides, configs, models, histories, a temp folder). A missing
    entry raises NotRun, so a check whose prerequisite failed reports "not run", not a KeyError of its own."""

    def __missing__(self, key):
        raise NotRun(key)


# ---- the checks, in the order they run; each returns a one-line detail or raises --------------------------
def check_imports(s: Setup) -> str:
    import accelerate
    import hydra  # noqa: F401
    import torch
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import dataset  # noqa: F401
    import dataset_pretrain  # noqa: F401
    import evaluate  # noqa: F401
    import pretrain_encoder  # noqa: F401
    import train  # noqa: F401

    return f"torch {torch.__version__}, accelerate {accelerate.__version__}, cuda={torch.cuda.is_available()}"


def check_configs(s: Setup) -> str:
    from hydra_cli import compose_config, rewrite_overrides
    from model.config import ENCODER_ARCH_KEYS

    pre = compose_config("pretrain", rewrite_overrides("pretrain", s["overrides"]))
    tr = compose_config("train", rewrite_overrides("train", s["overrides"]))
    diff = [k for k in ENCODER_ARCH_KEYS if k in tr.model and pre.model.get(k) != tr.model.get(k)]
    if diff:
        raise AssertionError(f"stage-1 and stage-2 encoder architecture differ in {diff}")
    s["pre"], s["train"] = pre, tr
    m = pre.model
    return f"n_latent={m.n_latent} seg_len={m.seg_len} d_model={m.d_model} enc_n_layer={m.enc_n_layer}"


def check_models(s: Setup) -> str:
    from model import CompressedAD, EncoderPretrainer, ModelConfig, build_model

    pre, tr = s["pre"], s["train"]
    s["pretrainer"] = EncoderPretrainer(ModelConfig.from_cfg(pre.model, pre.env)).eval()
    net = build_model(tr.model, tr.env)
    if not isinstance(net, CompressedAD):
        raise TypeError(f"train config builds {type(net).__name__}, expected CompressedAD")
    s["cad"] = net.eval()
    n1 = sum(p.numel() for p in s["pretrainer"].parameters())
    n2 = sum(p.numel() for p in net.parameters())
    return f"{n1:,} / {n2:,} parameters"


def check_transitions(s: Setup) -> str:
    """Collect just enough histories (one stream per goal) to cut a deepest-depth sample from."""
    import collect
    from histories import load_histories
    from hydra_cli import compose_config

    m, env = s["pre"].model, s["pre"].env
    tmp = s["tmp"]
    steps = (m.max_compression_depth + 1) * m.seg_len
    steps = -(-steps // env.horizon) * env.horizon  # whole episodes
    cfg = compose_config("collect", [f"data_path={tmp}/data", "source.n_stream=1", f"source.n_steps={steps}",
                                     "source.n_stream_eval=1", "progress=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        collect.main(cfg)
    s["hist"] = load_histories(f"{tmp}/data", env)
    return f"{s['hist'].n_histories} histories x {s['hist'].n_steps} steps"


def check_stage1_forward(s: Setup) -> str:
    import torch

    from dataset_pretrain import PretrainBatches
    from model.losses import reconstruction_loss

    b = s["pre_batch"] = PretrainBatches.from_cfg(s["hist"], s["pre"], batch_size=4, seed=0)[0]
    with torch.no_grad():
        out = s["pretrainer"](b)
    loss = reconstruction_loss(out["pred"], b["seg"], b["seg_len"], s["pretrainer"].cfg)
    if not torch.isfinite(loss):
        raise AssertionError(f"reconstruction loss is {loss}")
    return f"depths {sorted(set(b['depth'].tolist()))}, latents {tuple(out['latents'].shape)}, loss {loss:.3f}"


def check_stage2_forward(s: Setup) -> str:
    import torch

    from dataset import HistoryBatches
    from model.losses import action_loss

    b = HistoryBatches.from_cfg(s["hist"], s["train"], batch_size=4, seed=0)[0]
    with torch.no_grad():
        logits = s["cad"](b)["logits"]
    a = action_loss(logits, b)
    if not torch.isfinite(a["loss"]):
        raise AssertionError(f"action loss is {a['loss']}")
    return f"logits {tuple(logits.shape)}, {int(a['n_labels'])} labels, loss {a['loss']:.3f}"


def check_encoder_checkpoint(s: Setup) -> str:
    import torch

    from model import load_pretrained_encoder, save_encoder_checkpoint
    from model.checkpoint import REQUIRED_KEYS

    pre, net, b = s["pretrainer"], s["cad"], s["pre_batch"]
    path = Path(s["tmp"]) / "encoder-pretrained-final.pt"
    save_encoder_checkpoint(path, pre, 0, {"model": dict(pre.cfg.to_dict()), "env": {}})
    ck = torch.load(path, weights_only=True)
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        raise AssertionError(f"checkpoint lacks {missing}")
    load_pretrained_encoder(net, path, log=lambda *_: None)
    with torch.no_grad():
        a, _ = pre.compress(b["seg"], b["seg_len"])
        c, _ = net.compress(b["seg"], b["seg_len"])
    if not torch.equal(a, c):
        raise AssertionError(f"encoder outputs differ after loading (max diff {(a - c).abs().max():.2e})")
    return f"{path.name}: keys {sorted(ck)}"


CHECKS: list[tuple[str, Callable[[Setup], str]]] = [
    ("imports (torch, accelerate, hydra, tensorboard, project modules)", check_imports),
    ("configs compose (pretrain.yaml inherits the encoder architecture of ad_compressed_dr.yaml)", check_configs),
    ("models build (EncoderPretrainer, CompressedAD)", check_models),
    ("real Darkroom transitions (batched env, short Q-learning collection)", check_transitions),
    ("stage-1 forward pass (compress depth 1..3, reconstruct raw transitions)", check_stage1_forward),
    ("stage-2 forward pass (latent prefix + causal window, loss on every position)", check_stage2_forward),
    ("encoder checkpoint: documented format, loads into CompressedAD, identical encoder outputs",
     check_encoder_checkpoint),
]


def run_one(fn: Callable[[Setup], str], s: Setup) -> tuple[bool, str]:
    """(passed, detail). Every failure is reported and the next check still runs: the user wants the
    full list, not the first error."""
    try:
        return True, fn(s) or ""
    except NotRun:
        return False, "not run: an earlier check it needs failed"
    except Exception as e:  # noqa: BLE001 — report and continue
        last = traceback.extract_tb(e.__traceback__)[-1]
        return False, f"{type(e).__name__}: {e} ({Path(last.filename).name}:{last.lineno})"


def main(argv=None) -> int:
    with tempfile.TemporaryDirectory(prefix="cad-setup-", ignore_cleanup_errors=True) as tmp:
        s = Setup(overrides=list(sys.argv[1:] if argv is None else argv), tmp=tmp)
        results = [(name, *run_one(fn, s)) for name, fn in CHECKS]
    for name, ok, detail in results:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f" — {detail}" if detail else ""))
    failed = [r for r in results if not r[1]]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed.")
        return 1
    print("All tests passed! ✓")
    return 0


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run_args("test_pretrain_setup")
