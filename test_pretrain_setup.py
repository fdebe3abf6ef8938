"""Setup verification you run by hand before a long training run:

    python test_pretrain_setup.py                  # checks the real configs in config/
    python test_pretrain_setup.py model.n_latent=15 # ... with overrides, as you would train

Checks, one line each: imports; both models built from the real Hydra configs; a forward pass of stage 1
(reconstruction) and stage 2 (actions) on real Darkroom transitions; a stage-1 encoder checkpoint written in
the documented format and loaded into stage 2 with identical encoder outputs. Prints
`All tests passed! ✓` and exits 0, or names each failing check and exits 1. Nothing is written outside
a temporary folder.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def _compose(name: str, overrides: list[str], config_dir: str):
    from hydra_cli import compose_config

    return compose_config(name, overrides, config_dir)


def run_checks(overrides: list[str], config_dir: str = str(ROOT / "config")) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    state: dict = {}

    def check(name):
        def deco(fn):
            try:
                detail = fn() or ""
                results.append((name, True, detail))
            except KeyError as e:
                if e.args and e.args[0] in ("pre", "train", "pretrainer", "cad", "hist", "tmp", "pre_batch"):
                    results.append((name, False, "not run: an earlier check it needs failed"))
                else:
                    results.append((name, False, f"KeyError: {e}"))
            except Exception as e:  # noqa: BLE001 — report and continue: the user wants the full list
                last = traceback.extract_tb(e.__traceback__)[-1]
                results.append((name, False, f"{type(e).__name__}: {e} ({Path(last.filename).name}:{last.lineno})"))
            return fn
        return deco

    @check("imports (torch, accelerate, hydra, tensorboard, project modules)")
    def _():
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

    @check("configs compose (pretrain.yaml inherits the encoder architecture of ad_compressed_dr.yaml)")
    def _():
        from hydra_cli import rewrite_overrides

        pre = _compose("pretrain", rewrite_overrides("pretrain", overrides), config_dir)
        tr = _compose("train", rewrite_overrides("train", overrides), config_dir)
        from model.config import ENCODER_ARCH_KEYS

        diff = [k for k in ENCODER_ARCH_KEYS if k in tr.model and pre.model.get(k) != tr.model.get(k)]
        if diff:
            raise AssertionError(f"stage-1 and stage-2 encoder architecture differ in {diff}")
        state["pre"], state["train"] = pre, tr
        m = pre.model
        return f"n_latent={m.n_latent} seg_len={m.seg_len} d_model={m.d_model} enc_n_layer={m.enc_n_layer}"

    @check("models build (EncoderPretrainer, CompressedAD)")
    def _():
        from model import CompressedAD, EncoderPretrainer, ModelConfig, build_model

        pre, tr = state["pre"], state["train"]
        state["pretrainer"] = EncoderPretrainer(ModelConfig.from_cfg(pre.model, pre.env)).eval()
        net = build_model(tr.model, tr.env)
        if not isinstance(net, CompressedAD):
            raise TypeError(f"train config builds {type(net).__name__}, expected CompressedAD")
        state["cad"] = net.eval()
        n1 = sum(p.numel() for p in state["pretrainer"].parameters())
        n2 = sum(p.numel() for p in net.parameters())
        return f"{n1:,} / {n2:,} parameters"

    @check("real Darkroom transitions (batched env, short Q-learning collection)")
    def _():
        from omegaconf import OmegaConf

        import collect

        tmp = tempfile.mkdtemp(prefix="cad-setup-")
        state["tmp"] = tmp
        m = state["pre"].model
        steps = (m.max_compression_depth + 1) * m.seg_len
        h = state["pre"].env.horizon
        steps = ((steps + h - 1) // h) * h
        cfg = _compose("collect", [f"data_path={tmp}/data", "source.n_stream=1", f"source.n_steps={steps}",
                                   "source.n_stream_eval=1", "progress=false"], config_dir)
        OmegaConf.set_struct(cfg, False)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            collect.main(cfg)
        from histories import load_histories

        state["hist"] = load_histories(f"{tmp}/data", state["pre"].env)
        return f"{state['hist'].n_histories} histories x {state['hist'].n_steps} steps"

    @check("stage-1 forward pass (compress depth 1..3, reconstruct raw transitions)")
    def _():
        import torch

        from dataset_pretrain import PretrainBatches
        from model.losses import reconstruction_loss

        m = state["pre"].model
        ds = PretrainBatches(state["hist"], "train", 4, m.seg_len, m.min_seg_len, m.max_compression_depth,
                             m.get("pretrain_depth_weights"), seed=0)
        b = ds[0]
        with torch.no_grad():
            out = state["pretrainer"](b)
        loss = reconstruction_loss(out["pred"], b["seg"], b["seg_len"], state["pretrainer"].cfg)
        if not torch.isfinite(loss):
            raise AssertionError(f"reconstruction loss is {loss}")
        state["pre_batch"] = b
        return f"depths {sorted(set(b['depth'].tolist()))}, latents {tuple(out['latents'].shape)}, loss {loss:.3f}"

    @check("stage-2 forward pass (latent prefix + causal window, loss on every position)")
    def _():
        import torch

        from dataset import HistoryBatches
        from model.losses import action_loss

        m = state["train"].model
        ds = HistoryBatches(state["hist"], "train", 4, m.seg_len, m.min_seg_len, m.max_compression_depth,
                            m.get("depth_weights"), seed=0)
        b = ds[0]
        with torch.no_grad():
            out = state["cad"](b)
        a = action_loss(out["logits"], b)
        if not torch.isfinite(a["loss"]):
            raise AssertionError(f"action loss is {a['loss']}")
        return f"logits {tuple(out['logits'].shape)}, {int(a['n_labels'])} labels, loss {a['loss']:.3f}"

    @check("encoder checkpoint: documented format, loads into CompressedAD, identical encoder outputs")
    def _():
        import torch

        from model import load_pretrained_encoder, save_encoder_checkpoint
        from model.checkpoint import REQUIRED_KEYS

        pre = state["pretrainer"]
        path = Path(state["tmp"]) / "encoder-pretrained-final.pt"
        save_encoder_checkpoint(path, pre, 0, {"model": dict(pre.cfg.to_dict()), "env": {}})
        ck = torch.load(path, weights_only=True)
        missing = [k for k in REQUIRED_KEYS if k not in ck]
        if missing:
            raise AssertionError(f"checkpoint lacks {missing}")
        net = state["cad"]
        load_pretrained_encoder(net, path, log=lambda *_: None)
        b = state["pre_batch"]
        with torch.no_grad():
            a, _ = pre.compress(b["seg"], b["seg_len"])
            c, _ = net.compress(b["seg"], b["seg_len"])
        if not torch.equal(a, c):
            raise AssertionError(f"encoder outputs differ after loading (max diff {(a - c).abs().max():.2e})")
        return f"{path.name}: keys {sorted(ck)}"

    if "tmp" in state:
        import shutil

        shutil.rmtree(state["tmp"], ignore_errors=True)
    return results


def main(argv=None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    results = run_checks(overrides)
    for name, ok, detail in results:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f" — {detail}" if detail else ""))
    failed = [r for r in results if not r[1]]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed.")
        return 1
    print("All tests passed! ✓")
    return 0


if __name__ == "__main__":
    sys.exit(main())
