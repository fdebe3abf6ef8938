"""In-context evaluation of a trained model (docs/design.md §7): the script around rollout.py and metrics.py.

    python evaluate.py run_dir=runs/<name> [n_episodes=500] [seeds_per_goal=8] [sample=false]
writes <run_dir>/eval.json, <run_dir>/eval.png and eval/* scalars into <run_dir>/tb.

Also a library for the experiment scripts: load_trained_model(run_dir, device) -> (model, config_dict,
global_step), resolve_device(name).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import teacher_forced
from atomic_io import atomic_write, atomic_write_json, os_error_reason
from errors import EvalError
from hydra_cli import abspath, one_line
from metrics import eval_scalars, source_reference, summarize
from rollout import eval_goals, incontext_rollout
from schema import ConfigError, EnvConfig, Schema, key, subset

FORMAT_VERSION = 1


class TrainedModelNotFoundError(EvalError, FileNotFoundError):
    """run_dir or its model.pt does not exist."""


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"device={name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise EvalError(f"device={name} but this machine has {n} CUDA GPU(s): use device=cpu or device=auto "
                            f"(the model itself is fine)")
    return dev


def load_trained_model(run_dir, device="cpu"):
    """Rebuild a stage-2 model from <run_dir>/model.pt (train.py's, docs/design.md §6): (model on `device` in
    eval mode, config dict, global_step)."""
    from model import build_model  # lazy: keeps `import evaluate` light for the env-only callers
    from model.checkpoint import weights_problem

    run_dir = Path(run_dir).expanduser()
    path = run_dir / "model.pt"
    if not path.is_file():
        raise TrainedModelNotFoundError(f"no trained model at {path}: train one with `python train.py` "
                                        "or pass run_dir=<a run directory>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # to `device` once checked
    except Exception as e:  # torn/foreign file: say which file and what to do instead of a pickle trace
        raise EvalError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                        "it is not a model.pt written by train.py; retrain or pass another run_dir") from e
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(cfg, dict) or "model_state_dict" not in ckpt or not {"model", "env"} <= cfg.keys():
        raise EvalError(f"{path} lacks 'model_state_dict' or a 'config' with 'model' and 'env': "
                        "it is not a stage-2 model.pt (an encoder-pretrained-*.pt cannot be evaluated)")
    if not isinstance(cfg["model"], dict) or not isinstance(cfg["env"], dict):
        raise EvalError(f"{path}: config['model'] and config['env'] must be dicts of settings: the file is "
                        f"damaged or foreign; retrain or pass another run_dir")
    try:
        model = build_model(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["env"]))
    except (ConfigError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: its config does not describe a buildable model ({one_line(e)}): the "
                        f"file is damaged or foreign; retrain or pass another run_dir") from None
    state = ckpt["model_state_dict"]
    # `accelerate launch --dynamo_backend ...` wraps the model in torch.compile, and unwrap_model keeps that
    # wrapper by default (keep_torch_compile), so its state dict carries `_orig_mod.` on every key; strip it.
    for prefix in ("module.", "_orig_mod."):
        if isinstance(state, dict) and state and all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = weights_problem(state, model.state_dict(), "model_state_dict")
    if bad:  # e.g. NaN weights: sampling would fail and argmax would give an all-zero eval.json
        raise EvalError(f"{path}: {bad}; the model cannot be evaluated: retrain it, or evaluate another run")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EvalError(f"{path}: weights do not fit the model its config describes "
                        f"({str(e).splitlines()[0]} ...); the file is inconsistent, retrain") from e
    model.to(device).eval()
    return model, cfg, int(ckpt.get("global_step", 0))


def run_histories(run_cfg: dict, env_cfg: dict, data_path: str | None = None):
    """The dataset the run was trained on (data_path=None) or data_path: its held-out histories give the
    same-position loss, its meta.json the source algorithm's own learning curve. Validated against env; the
    run's own dataset must still be the data it trained on (its recorded fingerprint), else the figures would
    describe other histories than the run's."""
    from histories import load_histories
    from rundir import FINGERPRINT_KEY

    path = data_path or run_cfg.get("data_path")
    if not path:
        raise EvalError("the run's config names no data_path: pass data_path=<its dataset>, or "
                        "teacher_forced=false source_curve=false")
    hist = load_histories(abspath(path), env_cfg)
    was = run_cfg.get(FINGERPRINT_KEY)
    if not data_path and was and hist.fingerprint != was:
        raise EvalError(f"{path} was re-collected since the run trained on it (data fingerprint {was} -> "
                        f"{hist.fingerprint}): pass data_path=<the data it trained on>, or "
                        f"teacher_forced=false source_curve=false")
    return hist


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def plot_curves(path: Path, results: dict, title: str) -> None:
    """Learning curves: mean return per episode, ±1 std over seeds, dashed line at the mean optimal, dotted
    line at the source algorithm's own learning curve on those goals (when the dataset gives it)."""
    # The object API (savefig picks the Agg canvas for a png): no pyplot, so no global backend switch in an
    # importing process.
    from matplotlib.figure import Figure

    found = any("key_found_curve" in res["summary"] for res in results.values())  # Dark Key-to-Door
    fig = Figure(figsize=(9.5, 7.4 if found else 4.2))
    ax = fig.add_subplot(2, 1, 1) if found else fig.add_subplot()
    colors = {"test": "tab:blue", "val": "tab:green", "train": "tab:orange"}
    for split, res in results.items():
        s = res["summary"]
        mean, std = np.asarray(s["curve"]), np.asarray(s["curve_std"])
        x = np.arange(1, len(mean) + 1)
        c = colors.get(split)
        ax.plot(x, mean, color=c, label=f"{split} goals (n={s['n_goals']}, {s['n_seeds']} seeds)")
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.2, linewidth=0)
        ax.axhline(s["optimal_mean"], color=c, linestyle="--", linewidth=1,
                   label=f"{split} optimal ({s['optimal_mean']:.2f})")
        if res.get("source"):  # the source algorithm's own learning on these goals: the yardstick
            src = np.asarray(res["source"]["curve"])
            ax.plot(np.arange(1, len(src) + 1), src, color=c, linestyle=":", linewidth=1.5,
                    label=f"{split}: source algorithm (its own learning)")
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=9, wrap=True)
    if found:
        _plot_found(fig.add_subplot(2, 1, 2), results, colors)
    for ax in fig.axes:
        ax.set_xlabel("episode (in context, frozen weights)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)


def _plot_found(ax, results: dict, colors: dict) -> None:
    """Dark Key-to-Door panel: per episode, the fraction of rollouts that found the key (solid) and opened the
    door (dashed); the source algorithm's own fractions dotted (key) / dash-dotted (door)."""
    for split, res in results.items():
        s, c, src = res["summary"], colors.get(split), res.get("source") or {}
        for name, style, src_style in (("key_found", "-", ":"), ("door_found", "--", "-.")):
            if f"{name}_curve" not in s:
                continue
            y = np.asarray(s[f"{name}_curve"])
            ax.plot(np.arange(1, len(y) + 1), y, color=c, linestyle=style, label=f"{split}: {name.replace('_', ' ')}")
            if f"{name}_curve" in src:
                y = np.asarray(src[f"{name}_curve"])
                ax.plot(np.arange(1, len(y) + 1), y, color=c, linestyle=src_style, linewidth=1,
                        label=f"{split}: source, {name.replace('_', ' ')}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of rollouts")


def write_tensorboard(log_dir: Path, results: dict, global_step: int) -> None:
    """eval/* scalars at the run's global_step, and each split's curve as eval/curve_<split> indexed by
    episode (1-based). A new event file per call; train.py's writer may share the directory."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:  # closing flushes
        for split, res in results.items():
            for tag, v in eval_scalars(res["summary"], split).items():
                writer.add_scalar(tag, v, global_step)
            for ep, v in enumerate(res["summary"]["curve"], start=1):
                writer.add_scalar(f"eval/curve_{split}", v, ep)


def print_table(results: dict) -> None:
    """One row per split: returns, normalised last-k, learning speed (episodes to 0.8 of optimal, '-' if
    never) and AUC; a 'source' row under a split gives the source algorithm's own figures on those goals."""
    k = next(iter(results.values()))["summary"]["last_k"]
    head = (f"{'split':<9} {'goals':>5} {'seeds':>5} {'first':>7} {f'last{k}':>7} {'± seed':>7} "
            f"{'optimal':>7} {'norm':>6} {'ep->0.8':>7} {'auc':>6}")
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for split, res in results.items():
        s = res["summary"]
        print(f"{split:<9} {s['n_goals']:>5} {s['n_seeds']:>5} {s['first_episode']:>7.2f} {s['last_k_mean']:>7.2f} "
              f"{s['last_k_std']:>7.2f} {s['optimal_mean']:>7.2f} {fmt(s['last_k_normalized'], '.3f'):>6} "
              f"{fmt(s['episodes_to_0.8'], 'd'):>7} {fmt(s['auc_normalized'], '.3f'):>6}")
        if "key_found_curve" in s:
            print(f"{'  found':<9} key {s['key_found_first']:.2f} -> {s['key_found_last_k']:.2f}, door "
                  f"{s['door_found_first']:.2f} -> {s['door_found_last_k']:.2f} (episode 1 -> last {k})")
        src = res.get("source")
        if src:
            c = src["curve"]
            print(f"{'  source':<9} {'':>5} {'':>5} {c[0]:>7.2f} {np.mean(c[-k:]):>7.2f} {'':>7} {'':>7} "
                  f"{np.mean(c[-k:]) / s['optimal_mean']:>6.3f} {fmt(src['episodes_to_0.8'], 'd'):>7} "
                  f"{fmt(src['auc_normalized'], '.3f'):>6}")


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
class EvaluateConfig(Schema):
    """config/evaluate.yaml: every key evaluate.py reads, checked first thing in main."""

    env: EnvConfig
    run_dir: str | None = key("REQUIRED: a stage-2 run directory holding model.pt")
    env_from_run: bool = key("true: the env stored in model.pt; false: this config's env group")
    n_episodes: int = key("episodes per environment, back to back", ge=1)
    seeds_per_goal: int = key("rollouts (action-sampling streams) per goal", ge=1)
    n_train_goals: int = key("size of the seeded sample of train goals in the 'train' split", ge=0)
    max_heldout_goals: int | None = key("roll out only the first this many test and val goals; null = all", ge=1)
    last_k: int = key("final performance = mean return of the last last_k episodes", ge=1)
    sample: bool = key("actions ~ softmax(logits); false: argmax")
    use_cache: bool = key("CompressedAD KV cache; false = recompute (reference)")
    seed: int = key("seeds action sampling and the train-goal sample", ge=0)
    device: str = key("auto, cpu, cuda or cuda:N")
    cpu_threads: int | None = key("torch CPU threads; null = torch's default", ge=1, le=1024)
    out_name: str = key("writes <run_dir>/<out_name>.json and .png")
    tensorboard: bool = key("also log eval/* scalars into <run_dir>/tb")
    progress: bool = key("tqdm bar over episodes")
    splits: subset("test", "val", "train") = key("the goal sets rolled out")
    teacher_forced: bool = key("also the same-position loss of the run's held-out histories")
    source_curve: bool = key("also the source algorithm's own learning curve")
    data_path: str | None = key("the dataset; null = the run's own")


def _check_cfg(cfg: DictConfig) -> None:
    if cfg.run_dir in (None, ""):
        raise EvalError("run_dir is required: python evaluate.py run_dir=runs/<name> "
                        "(a stage-2 run directory containing model.pt)")
    try:
        EvaluateConfig.check(cfg)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if not str(cfg.out_name) or "/" in str(cfg.out_name):
        raise EvalError(f"out_name={cfg.out_name!r} must be a plain file stem (written inside run_dir)")
    run_dir = Path(abspath(cfg.run_dir))
    if run_dir.is_dir():  # evaluate writes its outputs there: find out now, not after the rollouts
        try:
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as e:
            raise EvalError(f"cannot write into run_dir {run_dir} ({os_error_reason(e)}): evaluate writes "
                            f"{cfg.out_name}.json/.png there; fix its permissions, or copy the run somewhere "
                            f"writable and evaluate the copy") from None


def main(cfg: DictConfig) -> dict:
    """Evaluate <run_dir>/model.pt on the test goals and a seeded train-goal sample; write the outputs.
    Returns the report written to eval.json plus 'json_path' and 'png_path'."""
    t0 = time.perf_counter()
    _check_cfg(cfg)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = Path(abspath(cfg.run_dir))
    device = resolve_device(str(cfg.device))
    model, run_cfg, global_step = load_trained_model(run_dir, device)

    if cfg.env_from_run:
        env_cfg = dict(run_cfg["env"])
    else:  # e.g. a longer horizon than in training. The grid fixes the model's input scaling; the split keys fix
        # which goals are held out: another split would report "test" on goals the model was trained on.
        env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
        for key in ("grid_size", "n_actions", "train_frac", "split_seed", "n_val_goals"):
            if env_cfg.get(key) != run_cfg["env"].get(key):
                raise EvalError(f"env.{key}={env_cfg.get(key)} but the model was trained with "
                                f"{run_cfg['env'].get(key)}: use env_from_run=true or a matching env")
    goals = eval_goals(env_cfg, int(cfg.n_train_goals), int(cfg.seed), cfg.max_heldout_goals)
    # The run's own histories were collected in the run's env (a longer rollout horizon does not change them); a
    # dataset given by hand is checked against this evaluation's env.
    from histories import env_differences

    hist_env = env_cfg if cfg.data_path else run_cfg["env"]
    hist = run_histories(run_cfg, hist_env, cfg.data_path) if (cfg.teacher_forced or cfg.source_curve) else None
    source = hist.meta if cfg.source_curve else {}
    if differ := env_differences(hist.meta["env"], env_cfg, "evaluation") if source else []:
        # the source learnt in another env: its curve would sit beside these returns as if comparable
        print(f"note: no source curve: the dataset's env differs from this evaluation's ({', '.join(differ)})")
        source = {}

    results = {}
    for split in (s for s in goals if s in cfg.splits):
        ro = incontext_rollout(model, env_cfg, goals[split], int(cfg.n_episodes), int(cfg.seeds_per_goal), device,
                               seed=int(cfg.seed), sample=bool(cfg.sample), use_cache=bool(cfg.use_cache),
                               progress=bool(cfg.progress))
        summary = summarize(ro["returns"], ro["optimal"], int(cfg.last_k), ro["horizon"], events=ro["events"])
        per_goal = [{"goal": list(g), "optimal": float(o), "curve": ro["returns"][i].mean(axis=0).tolist(),
                     "last_k_mean": float(ro["returns"][i, :, -summary["last_k"]:].mean())}
                    for i, (g, o) in enumerate(zip(ro["goals"], ro["optimal"]))]
        results[split] = {"goals": [list(g) for g in ro["goals"]], "optimal": ro["optimal"].tolist(),
                          "summary": summary, "per_goal": per_goal, "returns": ro["returns"].tolist(),
                          "wall_s": ro["wall_s"], "env_steps_per_s": ro["n_env_steps"] / max(ro["wall_s"], 1e-9)}
        src = source_reference(source, split, summary["optimal_mean"])
        if src is not None:
            results[split]["source"] = src
    if not results:
        raise EvalError(f"no goals to evaluate in splits={list(cfg.splits)} (n_train_goals="
                        f"{cfg.n_train_goals}, env.n_val_goals={env_cfg.get('n_val_goals', 0)})")

    same_position = teacher_forced.heldout_reports(model, hist, ("val", "test") if cfg.teacher_forced else (),
                                                   device, probe=True)
    metrics = {t: v for split, res in results.items() for t, v in eval_scalars(res["summary"], split).items()}
    metrics |= {t: v for split, rep in same_position.items() for t, v in teacher_forced.scalars(rep, split).items()}
    report = {
        "format_version": FORMAT_VERSION,
        "run_dir": str(run_dir),
        "model_name": run_cfg["model"].get("name"),
        "global_step": global_step,
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": env_cfg,
        "metrics": metrics,
        "splits": results,
        "same_position": same_position,
    }
    json_path, png_path = run_dir / f"{cfg.out_name}.json", run_dir / f"{cfg.out_name}.png"
    title = f"{report['model_name']} @ step {global_step}: in-context return ({run_dir.name})"
    plot_curves(png_path, results, title)
    if cfg.tensorboard:
        write_tensorboard(run_dir / "tb", results, global_step)
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_json(json_path, report, indent=1)  # last: its presence means every output is complete

    print(f"{report['model_name']} @ step {global_step}, {cfg.n_episodes} episodes, "
          f"{'sampled' if cfg.sample else 'greedy'} actions, {device}, {report['wall_s']:.1f}s")
    print_table(results)
    teacher_forced.print_report(same_position)
    print(f"wrote {json_path} and {png_path}")
    return {**report, "json_path": str(json_path), "png_path": str(png_path)}


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("evaluate", "evaluate")
