"""Stage 2: train CompressedAD (encoder + causal decoder) or the AD baseline on action prediction.

    python collect.py                                   # once: learning histories -> data/darkroom-seed0
    python train.py experiment=quick                    # CPU-sized run (minutes)
    python train.py model=ad_dr experiment=quick        # AD baseline
    python train.py model.pretrained_encoder_path=runs/pretrain-encoder-darkroom-seed0/encoder-pretrained-final.pt \
                    model.freeze_encoder=true            # start from the stage-1 encoder, frozen
    accelerate launch --config_file accelerate_config.yaml train.py experiment=full

This file says what the model, the data and the loss are (the loop: loop.py), plus the held-out evaluations:
the same-position action loss on the validation goals' histories (teacher_forced.py; the test goals only at
the end) and in-context rollouts on the validation goals (final test-goal numbers: `python evaluate.py`).
"""

from __future__ import annotations

import torch

import goal_readout
import loop
import rundir
import teacher_forced
from atomic_io import atomic_torch_save
from dataset import HistoryBatches, batch_loader, data_device
from histories import load_histories
from hydra_cli import abspath
from model import build_model, load_pretrained_encoder
from model.compressed_ad import LatentCarry
from model.losses import action_loss, reconstruction_loss
from schema import Budget, ConfigError, SamplerConfig, Schema, TrainingRun, check_model, key


class EvalDuringTraining(Schema):
    """train.yaml's eval: the in-context rollouts during training (eval_every)."""

    n_episodes: int = key("episodes per rollout during training", ge=1)
    seeds_per_goal: int = key("rollouts (action-sampling streams) per goal", ge=1)
    n_train_goals: int = key("train goals evaluated besides the validation goals", ge=0)
    max_heldout_goals: int | None = key("only the first this many validation goals; null = all", ge=1)
    sample: bool = key("sample actions (false: argmax)")


class TrainConfig(Budget, TrainingRun):
    """config/train.yaml: every key stage 2 reads (the shared ones: schema.py), checked first thing in main."""

    sampler: SamplerConfig
    heldout_every: int = key("same-position loss of the validation histories every this many steps; 0 = only at "
                             "the end", ge=0)
    heldout_max_histories: int | None = key("held-out histories scored per split, spread over its goals; null = "
                                            "all", ge=1)
    eval_every: int = key("in-context rollouts every this many steps; 0 disables them", ge=0)
    eval: EvalDuringTraining


class ActionPredictionTask:
    """Model + data + loss of stage 2 (see loop.Task)."""

    def __init__(self, cfg, model, hist):
        self.cfg, self.model, self.hist = cfg, model, hist
        self.aux_w = model.cfg.aux_recon_weight  # the model's ModelConfig (build_model gave it the head)
        self.accelerator = None  # set by setup (loop.fit)
        self.carry = None  # LatentCarry with sampler.memory=carry, built with the batches

    def setup(self, accelerator, global_micro_batch):
        # The held-out data are whole histories of self.hist (same_position), nothing to build ahead.
        self.accelerator = accelerator

    def batches(self, start, rank, world, global_micro_batch):
        ds = HistoryBatches.from_cfg(self.hist, self.cfg, "train", rank, world, batch_size=global_micro_batch,
                                     seed=self.cfg.seed)
        # sampler.memory=carry: each row's memory comes from the previous micro-batch; none is held at a
        # (re)start, so the first batch folds it exactly (LatentCarry)
        self.carry = LatentCarry(ds) if ds.memory == "carry" else None
        device = data_device(self.cfg.get("data_on_device"), getattr(self.accelerator, "device", None), ds)
        return batch_loader(ds, start=start, num_workers=self.cfg.num_workers, device=device)

    def loss(self, model, batch):
        if self.carry is not None:
            batch = self.carry.attach(loop.unwrap(self.accelerator, model), batch)
        out = model(batch)
        if self.carry is not None:
            self.carry.update(batch, out)
        a = action_loss(out["logits"], batch, seg_logits=out.get("seg_logits"), labels=out)
        metrics = {"loss_action": a["loss"].detach(), "acc_action": a["acc"]}
        loss = a["loss"]
        if self.aux_w > 0 and "recon_pred" in out:
            rec = reconstruction_loss(out["recon_pred"], batch["seg"], batch["seg_len"], self.model.cfg)
            metrics["loss_recon"] = rec.detach()
            loss = loss + self.aux_w * rec
        # n_labels: window positions (+ segment positions with model.label_segments), a device tensor
        return loss, metrics, a["n_labels"]

    def incontext_eval(self, run, step) -> None:
        """Rollouts with frozen weights on the validation goals and a train-goal sample (main process; the
        others wait). The test goals are left to evaluate.py: training-time figures may steer choices."""
        from metrics import eval_scalars, summarize
        from rollout import eval_goals, incontext_rollout

        if run.is_main:
            e = self.cfg.eval
            goals = eval_goals(self.cfg.env, e.n_train_goals, self.cfg.seed, e.max_heldout_goals)
            for name in (n for n in ("val", "train") if n in goals):
                r = incontext_rollout(loop.unwrap(run.accelerator, run.model), self.cfg.env, goals[name],
                                      e.n_episodes, e.seeds_per_goal, run.accelerator.device,
                                      seed=self.cfg.seed + step, sample=e.sample)
                run.log(eval_scalars(summarize(r["returns"], r["optimal"], horizon=r["horizon"], events=r["events"]),
                                     name), step)
        run.accelerator.wait_for_everyone()

    def on_step(self, run, step):
        final = step == run.settings.max_steps  # on_end computes and logs the final held-out losses once
        if self.cfg.heldout_every and step % self.cfg.heldout_every == 0 and not final:
            # Periodically only the validation goals: they are what model selection may look at.
            for split, rep in teacher_forced.heldout_reports(
                    loop.unwrap(run.accelerator, run.model), self.hist, ("val",), run.accelerator.device,
                    max_histories=self.cfg.heldout_max_histories, accelerator=run.accelerator).items():
                run.log(teacher_forced.scalars(rep, split), step)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self.incontext_eval(run, step)

    def on_end(self, run, step):
        # done.json keeps the final measurements (goal_readout.end_of_training: the validation (selection) and test
        # (reported) goals' same-position reports with the memory probe, the goal readout); TB their figures.
        net = loop.unwrap(run.accelerator, run.model)
        summary = goal_readout.end_of_training(net, self.hist, self.cfg, run.accelerator.device, run.accelerator)
        reps = {s: summary[f"heldout_{s}"] for s in ("val", "test") if f"heldout_{s}" in summary}
        for split, rep in reps.items():
            run.log(teacher_forced.scalars(rep, split), step)
        if run.is_main:
            teacher_forced.print_report(reps)
            if gr := summary.get("goal_readout"):
                run.log({f"memory/goal_acc_{k}_{sp}": gr[sp][k]["acc"] for sp in ("val", "test")
                         for k in ("after_find", "before_find", "constant_after_find")
                         if gr[sp][k]["acc"] is not None}, step)
            atomic_torch_save({"model_state_dict": net.state_dict(), "config": run.config, "global_step": step},
                              run.run_dir / "model.pt")
        return summary


def main(cfg) -> dict:
    """Train per `cfg` (a composed config/train.yaml); returns the run summary."""
    TrainConfig.check(cfg)
    check_model(cfg.model, cfg.get("sampler"))
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    hist = load_histories(abspath(cfg.data_path), cfg.env)
    loop.seed_everything(cfg.seed)  # init weights depend on the seed only (reproducible, resumable)
    model = build_model(cfg.model, cfg.env)
    m = model.cfg  # the model group, parsed once (ModelConfig)
    if m.pretrained_encoder_path:
        if m.name != "ad_compressed":
            raise ConfigError("model.pretrained_encoder_path needs model=ad_compressed_dr (AD has no encoder)")
        load_pretrained_encoder(model, abspath(m.pretrained_encoder_path), freeze_encoder=m.freeze_encoder,
                                freeze_embeddings=m.freeze_embeddings,
                                data_fingerprint=hist.fingerprint,
                                allow_data_change=bool(cfg.get("allow_data_change")))
    elif m.freeze_encoder:
        raise ConfigError("model.freeze_encoder=true without model.pretrained_encoder_path would freeze a random "
                         "encoder; set the path to an encoder-pretrained-*.pt")
    task = ActionPredictionTask(cfg, model, hist)
    settings = loop.settings_from_cfg(cfg, "train")
    return loop.fit(task, settings, abspath(cfg.run_dir),  # resume refuses other data (rundir.check_same_data)
                    loop.to_plain(cfg) | {rundir.FINGERPRINT_KEY: hist.fingerprint})


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("train", "train")
