"""Stage 2: train CompressedAD (encoder + causal decoder) or the AD baseline on action prediction.

    python collect.py                                   # once: learning histories -> data/darkroom-seed0
    python train.py experiment=quick                    # CPU-sized run (minutes)
    python train.py model=ad_dr experiment=quick        # AD baseline
    python train.py model.pretrained_encoder_path=runs/pretrain-encoder-darkroom-seed0/encoder-pretrained-final.pt \
                    model.freeze_encoder=true            # start from the stage-1 encoder, frozen
    accelerate launch --config_file accelerate_config.yaml train.py experiment=full

Without a pretrained_encoder_path it trains from scratch exactly as before stage 1 existed. The loop
(Accelerate, logging, checkpoints, resume) lives in loop.py; this file only says what the model, the
data and the loss are, plus the held-out loss and in-context evaluation that run periodically.
"""

from __future__ import annotations

import torch

import config_check as cc
import loop
from atomic_io import atomic_torch_save
from dataset import HistoryBatches, batch_loader
from histories import load_histories
from hydra_cli import abspath
from model import build_model, load_pretrained_encoder
from model.config import ConfigError
from model.losses import action_loss, reconstruction_loss

# Every key of config/train.yaml and its allowed values, checked first thing in main (config_check).
# tests/test_reliability.py fails when a key of the composed config has no rule here.
KEY_RULES = {
    **loop.LOOP_RULES, **cc.ENV_RULES, **cc.MODEL_RULES,
    "heldout_every": cc.integer(0, note="0 disables the held-out loss"),
    "heldout_batches": cc.integer(1),
    "eval_every": cc.integer(0, note="0 disables in-context evaluation during training"),
    "eval.n_episodes": cc.integer(1),
    "eval.seeds_per_goal": cc.integer(1),
    "eval.n_train_goals": cc.integer(0),
    "eval.sample": cc.flag(),
}


class ActionPredictionTask:
    """Model + data + loss of stage 2 (see loop.Task)."""

    def __init__(self, cfg, model, hist):
        self.cfg, self.model, self.hist = cfg, model, hist
        self.aux_w = float(cfg.model.get("aux_recon_weight", 0.0) or 0.0)
        self.accelerator = None

    def _dataset(self, split, rank, world, batch, seed):
        return HistoryBatches.from_cfg(self.hist, self.cfg, split, rank, world, batch_size=batch * world, seed=seed)

    def batches(self, start, rank, world, micro_batch):
        ds = self._dataset("train", rank, world, micro_batch, self.cfg.seed)
        # Held-out loss on the test goals' histories (collect.py writes n_stream_eval of them per goal).
        self.heldout = None
        if len(self.hist.split_indices("test")):
            self.heldout = self._dataset("test", rank, world, micro_batch, self.cfg.seed + 1_000_003)
        return batch_loader(ds, start=start, num_workers=self.cfg.num_workers)

    def loss(self, model, batch):
        out = model(batch)
        a = action_loss(out["logits"], batch, seg_logits=out.get("seg_logits"))
        self._labels = int(a["n_labels"])
        metrics = {"loss_action": a["loss"].detach(), "acc_action": a["acc"]}
        loss = a["loss"]
        if self.aux_w > 0 and "recon_pred" in out:
            rec = reconstruction_loss(out["recon_pred"], batch["seg"], batch["seg_len"], loop.unwrap(
                self.accelerator, model).cfg)
            metrics["loss_recon"] = rec.detach()
            loss = loss + self.aux_w * rec
        return loss, metrics

    def n_labels(self, batch):
        return self._labels  # window positions (+ segment positions with model.label_segments)

    @torch.no_grad()
    def heldout_loss(self, run, model) -> dict:
        """Action loss/accuracy on histories of the held-out (test) goals, averaged over all ranks."""
        model.eval()
        tot = torch.zeros(2, device=run.accelerator.device)
        for k in range(self.cfg.heldout_batches):
            b = {key: v.to(run.accelerator.device) for key, v in self.heldout[k].items()}
            a = action_loss(model(b)["logits"], b)  # held-out figure: decoder-window positions only
            tot += torch.stack([a["loss"], a["acc"]])
        model.train()
        tot = run.accelerator.reduce(tot / self.cfg.heldout_batches, "mean")
        return {"heldout/loss_action": tot[0].item(), "heldout/acc_action": tot[1].item()}

    def incontext_eval(self, run, step) -> dict:
        """Rollouts with frozen weights on the held-out goals (main process; others wait)."""
        from evaluate import eval_goals, eval_scalars, incontext_rollout, summarize

        out = {}
        if run.is_main:
            net = loop.unwrap(run.accelerator, run.model)
            net.eval()
            e = self.cfg.eval
            test_goals, pick = eval_goals(self.cfg.env, e.n_train_goals, self.cfg.seed)
            for name, goals in (("test", test_goals), ("train", pick)):
                r = incontext_rollout(net, self.cfg.env, goals, e.n_episodes, e.seeds_per_goal,
                                      run.accelerator.device, seed=self.cfg.seed + step, sample=e.sample)
                out.update(eval_scalars(summarize(r["returns"], r["optimal"], horizon=r["horizon"]), name))
            net.train()
            run.log(out, step)
        run.accelerator.wait_for_everyone()
        return out

    def on_step(self, run, step):
        final = step == run.settings.max_steps  # on_end computes and logs the final held-out loss once
        if self.heldout is not None and self.cfg.heldout_every and step % self.cfg.heldout_every == 0 and not final:
            run.log(self.heldout_loss(run, run.model), step)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self.incontext_eval(run, step)

    def on_end(self, run, step):
        summary = self.heldout_loss(run, run.model) if self.heldout is not None else {}
        run.log(summary, step)
        if run.is_main:
            net = loop.unwrap(run.accelerator, run.model)
            atomic_torch_save({"model_state_dict": net.state_dict(), "config": run.config, "global_step": step},
                              run.run_dir / "model.pt")
        return summary


def main(cfg) -> dict:
    """Train per `cfg` (a composed config/train.yaml); returns the run summary."""
    cc.check(cfg, KEY_RULES)
    cc.check_model(cfg.model)
    plain = loop.to_plain(cfg)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    hist = load_histories(abspath(cfg.data_path), cfg.env)
    plain[loop.FINGERPRINT_KEY] = hist.fingerprint  # resume refuses other data (loop.check_same_data)
    loop.seed_everything(cfg.seed)  # init weights depend on the seed only (reproducible, resumable)
    model = build_model(cfg.model, cfg.env)
    path = cfg.model.get("pretrained_encoder_path")
    if path:
        if cfg.model.name != "ad_compressed":
            raise ConfigError("model.pretrained_encoder_path needs model=ad_compressed_dr (AD has no encoder)")
        load_pretrained_encoder(model, abspath(path), freeze_encoder=bool(cfg.model.freeze_encoder),
                                freeze_embeddings=cfg.model.get("freeze_embeddings"),
                                data_fingerprint=hist.fingerprint,
                                allow_data_change=bool(cfg.get("allow_data_change")))
    elif cfg.model.get("freeze_encoder"):
        raise ConfigError("model.freeze_encoder=true without model.pretrained_encoder_path would freeze a random "
                         "encoder; set the path to an encoder-pretrained-*.pt")
    task = ActionPredictionTask(cfg, model, hist)
    settings = loop.settings_from_cfg(cfg, "train")
    return loop.fit(task, settings, abspath(cfg.run_dir), plain)


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("train", main)
