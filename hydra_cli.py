"""The thin `@hydra.main` wrapper every entry script uses (their `main(cfg)` stays testable on its own), with two
things on top of plain Hydra: the command-line spellings of docs/design.md §12 (bare `model.` / `sampler.` keys,
KEY_ALIASES, one line for a key that exists nowhere) and the one-line errors of §10.15 (`run`, `as_user_error`).
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

from errors import UserError

REPO = Path(__file__).resolve().parent  # the repository: the scripts and config/
CONFIG_DIR = str(REPO / "config")
GROUPS = ("env", "model", "experiment")
# Command-line spellings that moved and still work (docs/design.md §12): old key -> where it lives now. A table, not
# schema field aliases: each maps a key of one group to another group or to the top level.
# The stage-1 optimisation keys: in config/model/pretrain_encoder.yaml (the original notes), top level of pretrain.yaml now.
KEY_ALIASES = {f"model.{k}": k for k in ("pretrain_steps", "pretrain_batch_size", "pretrain_lr", "save_every")}
BARE_GROUPS = ("model", "sampler")  # `key=value` with a key of one of these groups means `<group>.key=value`
NO_PRESET = "none"  # config/experiment/none.yaml: what `experiment=null` / `~experiment` mean


def apply_alias(override: str) -> str:
    """`override` with an old key spelling (KEY_ALIASES) replaced by the current one; `experiment=null` and
    `~experiment` become `experiment=none` (each script's defaults list interpolates the preset name, which
    must be a string). Anything else unchanged."""
    if override.startswith("-"):
        return override
    key, eq, value = override.partition("=")
    if key == "~experiment" or (key.lstrip("+") == "experiment" and value == "null"):
        return f"experiment={NO_PRESET}"
    prefix = key[:len(key) - len(key.lstrip("+~"))]
    bare = key[len(prefix):]
    return f"{prefix}{KEY_ALIASES[bare]}{eq}{value}" if bare in KEY_ALIASES and eq else override


def encoder_tag(pretrained_encoder_path, freeze_encoder) -> str:
    """config/train.yaml's run_name suffix: '' from scratch, '-pretrained' from a stage-1 encoder,
    '-pretrained-frozen' from a frozen one. So `python train.py model.pretrained_encoder_path=...` never
    shares a run directory with the scratch run (docs/design.md §6), and two_stage.py needs no name of its own."""
    if not pretrained_encoder_path:
        return ""
    return "-pretrained-frozen" if freeze_encoder else "-pretrained"


def mul(*factors) -> int:
    """`${mul:a,b,...}`: the product of integers, so one key can follow another at a multiple (a memory-sweep
    arm sets model.keep_recent = w and model.seg_len = ${mul:${model.keep_recent},2})."""
    bad = [f for f in factors if isinstance(f, bool) or not isinstance(f, int)]
    if bad:
        raise TypeError(f"${{mul:...}} multiplies integers, got {bad[0]!r}")
    return math.prod(factors)


def split_tag(split_seed) -> str:
    """`${split_tag:${split_seed}}`: "" for the env's own goal split (null), else "-split<s>": what a sweep
    appends to its out dir and its dataset's name, so two goal splits never share a folder."""
    return "" if split_seed is None else f"-split{split_seed}"


# The `${encoder_tag:...}`, `${mul:...}` and `${split_tag:...}` interpolations, registered on import, so every
# composition through this module (or a script that imports it) resolves train.yaml, the arms and the sweeps.
for _name, _fn in (("encoder_tag", encoder_tag), ("mul", mul), ("split_tag", split_tag)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


class UnknownKeyError(UserError, ValueError):
    """A command-line key that exists in no config group (typo), or an override Hydra cannot apply."""


def one_line(e: BaseException) -> str:
    """The error's message on one line (our errors are one line already; library ones may not be)."""
    return " ".join(str(e).split()) or type(e).__name__


def report(e: BaseException) -> None:
    """Print `error: <message>` once per launch (rank 0), then exit 2 (or the error's exit_code)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "exit_code", 2))


def user_errors() -> tuple[type[BaseException], ...]:
    """The project's user-facing error classes. Deliberately not ValueError / OSError in general: those come
    from bugs and from libraries too, and keep a traceback."""
    return (UserError,)


def compose_config(config_name: str, overrides: list[str], config_dir: str = CONFIG_DIR):
    """Hydra compose of <config_dir>/<config_name>.yaml, leaving the global Hydra state as it found it (so it can
    be called repeatedly, before @hydra.main and inside a Hydra job). Hydra/OmegaConf errors propagate."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None  # inside a running Hydra job (a sweep job): put it back
    gh.clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=[apply_alias(o) for o in overrides])
    finally:
        gh.clear()
        if outer is not None:
            gh.initialize(outer)


def route_override(cfg, override: str) -> str | None:
    """How `override` applies to a script whose composed config is `cfg`: unchanged, respelled (an old key,
    apply_alias), rewritten to `<group>.<key>=...` (a bare key of a BARE_GROUPS group), or None when that config
    has no such key."""
    override = apply_alias(override)
    if override.startswith("-") or "=" not in override:
        return override
    key = override.split("=", 1)[0]
    if key.startswith(("+", "~", "hydra.", "hydra/", "override")) or key in GROUPS:
        return override
    if OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
        return override
    if "." not in key:
        for group in BARE_GROUPS:
            if group in cfg and key in cfg[group]:
                return f"{group}.{override}"
    return None


def override_key(o: str) -> str:
    """The key an override sets: `stage:+key=value` -> `key`."""
    return o.split("=", 1)[0].split(":", 1)[-1].lstrip("+~")


def group_choices(args: list[str]) -> list[str]:
    """The config-group choices among `args` (env=..., model=..., experiment=...)."""
    return [a for a in args if "=" in a and not a.startswith("-") and override_key(a) in GROUPS]


def rewrite_overrides(config_name: str, args: list[str]) -> list[str]:
    """Map bare model keys to `model.<key>` and reject unknown keys, using the composed config."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def composed(overrides: list[str], what: str):
        try:
            c = compose_config(config_name, overrides)
            OmegaConf.to_container(c, resolve=True)  # interpolation errors surface here, not mid-run
            return c
        except (HydraException, OmegaConfBaseException) as e:
            raise UnknownKeyError(f"{what}: {one_line(e)}") from None

    args = [apply_alias(a) for a in args]
    cfg = composed(group_choices(args), "bad config group choice (see config/<group>/*.yaml)")
    out = []
    for a in args:
        routed = route_override(cfg, a)
        if routed is None:
            key = a.split("=", 1)[0]
            top = ", ".join(sorted(k for k in cfg if k not in GROUPS))
            name = key.lstrip("+~").rsplit(".", 1)[-1]  # the same name in another group (a key that moved)
            where = [w for w in (name, "env." + name, "model." + name, "sampler." + name)
                     if w != key.lstrip("+~") and OmegaConf.select(cfg, w, default=KeyError) is not KeyError]
            hint = f" (did you mean {' or '.join(sorted(set(where)))}?)" if where else ""
            raise UnknownKeyError(
                f"unknown config key '{key}' for {config_name}{hint}: top-level keys are {top}; model and sampler keys "
                f"are model.<name> / sampler.<name> (see config/model/, config/sampler/); a new key is declared in "
                f"the script's schema (schema.py) and set in its YAML")
        out.append(routed)
    # Compose once with everything (hydra.* excluded: compose does not take them) so that bad override
    # syntax or a value that breaks an interpolation fails here, in one line, before any work.
    composed([a for a in out if "=" in a and not a.startswith("-")
              and not override_key(a).startswith("hydra")], "bad override")
    return out


def run(config_name: str, module: str) -> None:
    """The entry point of every script configured by Hydra (collect, pretrain_encoder, train, evaluate), whose
    work is its `main(cfg)` (what tests call): `hydra_cli.run("train", "train")` composes config/train.yaml and
    runs train.main(cfg). `module` is imported by name and ITS main runs, not the __main__ copy's (a __main__
    copy would define its own classes beside the importable module's)."""
    import hydra

    try:  # before importing the module (and torch with it): a typo fails in about a second
        sys.argv = [sys.argv[0]] + rewrite_overrides(config_name, sys.argv[1:])
    except UnknownKeyError as e:
        report(e)
    main = importlib.import_module(module).main

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")
    def _entry(cfg):
        previous = signal.signal(signal.SIGINT, _on_ctrl_c)  # hydra runs this in the main thread
        try:
            return main(cfg)
        except BaseException as e:
            _stop_retrying()
            err = e if isinstance(e, user_errors()) else as_user_error(e, cfg)
            if err is None or os.environ.get("CAD_DEBUG"):  # developers: CAD_DEBUG=1 shows the traceback
                raise
            report(err)
        finally:
            signal.signal(signal.SIGINT, previous)

    _entry()


class Interrupted(UserError):
    """Ctrl-C (KeyboardInterrupt); the message says how to continue."""

    exit_code = 130  # the shell's convention for SIGINT


def as_user_error(e: BaseException, cfg) -> UserError | None:
    """The one line for an exception that is not a project error, or None (it keeps its traceback): Ctrl-C, and
    a full / read-only disk in a training run (a config with checkpoints), whose checkpoints are intact."""
    from atomic_io import DISK_ERRNOS, os_error_reason
    from rundir import RunDirError, checkpoints

    run_dir = Path(abspath(cfg.run_dir)) if "checkpoint_every" in cfg and cfg.get("run_dir") else None
    if isinstance(e, KeyboardInterrupt) and run_dir is None:
        return Interrupted("interrupted; outputs are written atomically, so nothing partial is left under a "
                           "final name: run the same command again")
    if isinstance(e, KeyboardInterrupt):
        done = checkpoints(run_dir) if run_dir.is_dir() else []
        if not done:
            return Interrupted(f"interrupted before the first checkpoint (checkpoint_every={cfg.checkpoint_every}"
                               f"), nothing to resume: run the same command again to start over")
        step, ck = done[-1]
        return Interrupted(f"interrupted; the last checkpoint is {ck} (step {step}): continue with the same "
                           f"command plus resume=true")
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS and run_dir is not None:
        return RunDirError(f"cannot access {e.filename or f'a file in {run_dir}'} ({os_error_reason(e)}); nothing "
                           f"complete was lost (the checkpoints in {run_dir / 'checkpoints'} are intact): free space "
                           f"or fix the permissions, then continue with resume=true, or choose another run_dir=...")
    return None


_RETRIES: list = []  # the timers of _on_ctrl_c
CTRL_C_RETRY_S = 5.0


def _on_ctrl_c(signum, frame):
    """SIGINT: KeyboardInterrupt, as Python's own handler, and again every CTRL_C_RETRY_S until `run` has caught one. An
    interrupt raised inside a finalizer or a library callback is dropped silently, and a training once kept
    running after Ctrl-C (tests/test_hydra_cli.py)."""
    # A real signal to the main thread: it also cuts short a blocking call (sleep, a queue wait).
    timer = threading.Timer(CTRL_C_RETRY_S, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.daemon = True
    timer.start()
    _RETRIES.append(timer)
    raise KeyboardInterrupt


def _stop_retrying() -> None:
    while _RETRIES:
        _RETRIES.pop().cancel()


def run_args(module: str) -> None:
    """The entry point of the scripts that take flags of their own (two_stage.py, test_pretrain_setup.py), as
    `run`: `<module>.main(argv)` does the work, an int it returns is the exit status, and the module's
    USER_ERRORS print one line `error: ...` and exit 2."""
    mod = importlib.import_module(module)
    try:
        rc = mod.main(sys.argv[1:])
    except getattr(mod, "USER_ERRORS", ()) as e:
        if os.environ.get("CAD_DEBUG"):
            raise
        report(e)
    sys.exit(rc if isinstance(rc, int) else 0)


def abspath(p: str | Path | None, cwd: str | Path = "") -> str | None:
    """The one path rule of every script: a path given in a config or on the command line (data_path, run_dir,
    model.pretrained_encoder_path, resume_from, --pretrained-path, a sweep's out) means what it says from the
    directory you launched in (`cwd`, default this process's: hydra.job.chdir is false in every config), with ~
    expanded. Returns it absolute and normalised, as a string; symbolic links are kept (a data_path that is a
    link names the link, not its target); None stays None."""
    return None if p is None else os.path.abspath(os.path.join(cwd, os.path.expanduser(str(p))))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict -> {dotted key: leaf value} (how overrides name keys)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
