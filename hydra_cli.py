"""The thin `@hydra.main` wrapper every entry script uses (their `main(cfg)` stays testable on its own).

Two things on top of plain Hydra:
1. Short keys. Users know the original notes' names (`pretrain_lr=0.0005`, `n_latent=15`,
   `freeze_encoder=true`, ...). A bare `key=value` that is not a top-level key but is a `model.` key is
   rewritten to `model.key=value`; a key that exists nowhere fails with one line naming the known keys.
2. Known user errors (missing dataset, bad checkpoint, impossible config, ...) print one line
   `error: ...` and exit with status 2 instead of a traceback (CAD_DEBUG=1 shows it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
GROUPS = ("env", "model", "experiment")


class UnknownKeyError(ValueError):
    pass


def user_errors() -> tuple[type[BaseException], ...]:
    from histories import DatasetError
    from loop import NonFiniteLossError, RunDirError
    from model.checkpoint import EncoderCheckpointError
    from model.config import ConfigError

    return (DatasetError, EncoderCheckpointError, ConfigError, RunDirError, NonFiniteLossError,
            UnknownKeyError, FileNotFoundError, ValueError)


def rewrite_overrides(config_name: str, args: list[str]) -> list[str]:
    """Map bare model keys to `model.<key>` and reject unknown keys, using the composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    plain = [a for a in args if not a.startswith("-") and "=" in a]
    group_choices = [a for a in plain if a.split("=", 1)[0].lstrip("+~") in GROUPS]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=group_choices)
    GlobalHydra.instance().clear()
    out = []
    for a in args:
        if a.startswith("-") or "=" not in a:
            out.append(a)
            continue
        key = a.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra.", "hydra/")) or key in GROUPS or key.startswith("override"):
            out.append(a)
            continue
        if OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
            out.append(a)
        elif "." not in key and "model" in cfg and key in cfg.model:
            out.append(f"model.{a}")
        else:
            top = ", ".join(sorted(k for k in cfg.keys() if k not in GROUPS))
            raise UnknownKeyError(
                f"unknown config key '{key}' for {config_name}: top-level keys are {top}; model keys are "
                f"model.<name> (see config/model/); add new keys with +{key}=...")
    return out


def run(config_name: str, main: Callable) -> None:
    """Entry point: python <script>.py key=value ..."""
    import hydra

    errors = user_errors()
    try:
        sys.argv = [sys.argv[0]] + rewrite_overrides(config_name, sys.argv[1:])
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")
    def _entry(cfg):
        try:
            return main(cfg)
        except errors as e:
            if os.environ.get("CAD_DEBUG"):  # developers: CAD_DEBUG=1 shows the full traceback
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _entry()


def abspath(p: str | None) -> str | None:
    """Resolve a config path against the directory the user launched from."""
    if p is None:
        return None
    return str(Path(p).expanduser().resolve())
