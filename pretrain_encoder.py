"""Stage 1: pretrain the CompressionEncoder (with the shared embed_context / embed_ln) on reconstruction.

    python collect.py                                   # once: learning histories
    python pretrain_encoder.py experiment=quick         # CPU-sized run
    python pretrain_encoder.py pretrain_lr=0.0005 n_latent=15 max_compression_depth=2
    accelerate launch --config_file accelerate_config.yaml pretrain_encoder.py

The target is the raw transitions, never anything the encoder produced, so a constant encoder cannot lower
the loss (docs/design.md §5); the collapse detectors are logged here (latent effective rank, ablation gap).

Writes <run_dir>/encoder-pretrained-<step>.pt every save_every steps and
<run_dir>/encoder-pretrained-final.pt at the end (format: model/checkpoint.py), main process only.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

import loop
import rundir
from dataset import batch_loader, data_device
from dataset_pretrain import PretrainBatches
from histories import load_histories
from hydra_cli import abspath
from model import EncoderPretrainer, ModelConfig, save_encoder_checkpoint
from model.losses import effective_rank, reconstruction_loss, reconstruction_metrics
from model.task_targets import task_loss, task_metrics
from schema import ConfigError, PretrainSamplerConfig, TrainingRun, check_model, key


class PretrainConfig(TrainingRun):
    """config/pretrain.yaml: every key stage 1 reads (the shared ones: schema.py), checked first thing in main."""

    sampler: PretrainSamplerConfig
    pretrain_steps: int = key("stage-1 optimizer steps", ge=1)
    pretrain_batch_size: int = key("global batch per optimizer step", ge=1)
    pretrain_lr: float = key("peak AdamW learning rate", gt=0)
    save_every: int = key("write encoder-pretrained-<step>.pt every this many steps", ge=1)
    diag_every: int = key("held-out diagnostics every this many steps; 0: only at the end", ge=0)
    diag_batches: int = key("fixed held-out batches per diagnostic", ge=1)


class ReconstructionTask:
    """Model + data + loss of stage 1 (see loop.Task)."""

    def __init__(self, cfg, model: EncoderPretrainer, hist):
        self.cfg, self.model, self.hist = cfg, model, hist
        self.mcfg: ModelConfig = model.cfg
        # The checkpoint's config: the model group as composed plus the resolved architecture (grid_size and
        # n_actions come from env), so stage 2 can check every shape-defining key.
        # data_fingerprint: stage 2 refuses this encoder for other data unless allow_data_change=true.
        self.ckpt_config = {"model": loop.to_plain(cfg.model) | self.mcfg.to_dict(), "env": loop.to_plain(cfg.env),
                            "data_fingerprint": hist.fingerprint}
        self.accelerator = None  # set by setup (loop.fit)
        self.diag: dict[str, PretrainBatches] = {}  # split -> diagnostic batches, built by setup
        self.diag_split: str | None = None  # the split the periodic diagnostics use

    def _dataset(self, split, rank, world, global_micro_batch, seed, curriculum=False):
        return PretrainBatches.from_cfg(self.hist, self.cfg, split, rank, world, batch_size=global_micro_batch,
                                        seed=seed, curriculum=curriculum)

    def setup(self, accelerator, global_micro_batch):
        self.accelerator = accelerator
        self.diag = self.diagnostic_data(accelerator.process_index, accelerator.num_processes, global_micro_batch)
        self.diag_split = next(iter(self.diag))

    def diagnostic_data(self, rank, world, global_micro_batch) -> dict:
        """{split: this rank's diagnostic batches}, on goals never trained on (generalisation, not recall):
        the validation goals during training (what choices may be made on); the test goals once at the end,
        for reported figures. Their own stream (seed + 1_000_003), the size of a training micro-batch."""
        # a dataset with no held-out goals at all: train goals, rather than nothing
        splits = [sp for sp in ("val", "test") if len(self.hist.split_indices(sp))] or ["train"]
        return {sp: self._dataset(sp, rank, world, global_micro_batch, self.cfg.seed + 1_000_003) for sp in splits}

    def batches(self, start, rank, world, global_micro_batch):
        ds = self._dataset("train", rank, world, global_micro_batch, self.cfg.seed, curriculum=True)
        device = data_device(self.cfg.get("data_on_device"), getattr(self.accelerator, "device", None), ds)
        return batch_loader(ds, start=start, num_workers=self.cfg.num_workers, device=device)

    def loss(self, model, batch):
        out = model(batch)
        n_labels = batch["seg_len"].sum()  # transitions reconstructed (a device tensor: no host sync)
        loss = reconstruction_loss(out["pred"], batch["seg"], batch["seg_len"], self.mcfg)
        if "task" not in out:
            return loss, {}, n_labels
        task = task_loss(out["task"], batch["seg"], batch["seg_len"], self.mcfg.grid_size)
        return loss + self.mcfg.recon_task_weight * task, {"task_loss": task.detach()}, n_labels

    @torch.no_grad()
    def diagnostics(self, run, split: str | None = None) -> dict:
        """Reconstruction quality and collapse detectors on fixed batches of `split`'s goals (default: the
        validation goals), all ranks, reduced."""
        diag = self.diag[split or self.diag_split]
        net = loop.unwrap(run.accelerator, run.model)
        net.eval()
        sums, counts = Counter(), Counter()  # per key: a depth's metrics exist only where it was drawn
        for k in range(self.cfg.diag_batches):
            b = {key: v.to(run.accelerator.device) for key, v in diag[k].items()}
            out = net(b)
            loss = reconstruction_loss(out["pred"], b["seg"], b["seg_len"], self.mcfg)
            # Ablation: every sample decodes from another sample's latents. Zero gap = latents carry nothing.
            perm = torch.roll(torch.arange(out["latents"].shape[0], device=loss.device), 1)
            shuffled = net(b, latents_override=out["latents"][perm])
            loss_shuf = reconstruction_loss(shuffled["pred"], b["seg"], b["seg_len"], self.mcfg)
            vals = {"heldout_loss": loss.item(), "ablation_gap": (loss_shuf - loss).item(),
                    "latent_effective_rank": effective_rank(out["latents"])}
            vals.update(reconstruction_metrics(out["pred"], b["seg"], b["seg_len"], b["depth"], self.mcfg,
                                               self.mcfg.max_compression_depth, ablated_pred=shuffled["pred"]))
            if "task" in out:
                vals.update(task_metrics(out["task"], b["seg"], b["seg_len"], self.mcfg.grid_size,
                                         ablated=shuffled["task"]))
            sums.update(vals)
            counts.update(vals.keys())
        net.train()
        # Per-depth keys exist only where that depth was drawn; reduce_means copes with ranks that differ.
        return loop.reduce_means(run.accelerator, sums, counts)

    def on_step(self, run, step):
        final = step == run.settings.max_steps  # on_end runs and logs the final diagnostics once
        if self.cfg.diag_every and step % self.cfg.diag_every == 0 and not final:
            run.log({f"pretrain/{k}": v for k, v in self.diagnostics(run).items()}, step)
        if step % self.cfg.save_every == 0 and run.is_main:
            save_encoder_checkpoint(run.run_dir / f"encoder-pretrained-{step}.pt",
                                    loop.unwrap(run.accelerator, run.model), step, self.ckpt_config)

    def on_end(self, run, step):
        diag = self.diagnostics(run)
        # the test goals: the reported figures, measured and logged once
        test = self.diagnostics(run, "test") if "test" in self.diag and self.diag_split != "test" else {}
        run.log({f"pretrain/{k}": v for k, v in diag.items()} | {f"pretrain_test/{k}": v for k, v in test.items()},
                step)
        if run.is_main:
            save_encoder_checkpoint(run.run_dir / "encoder-pretrained-final.pt",
                                    loop.unwrap(run.accelerator, run.model), step, self.ckpt_config)
        run.accelerator.wait_for_everyone()
        # done.json: the validation-goal diagnostics as top-level keys, the test-goal ones under "test".
        return diag | {"diagnostics_split": self.diag_split, "test": test,
                       "encoder_checkpoint": str(run.run_dir / "encoder-pretrained-final.pt")}


def main(cfg) -> dict:
    """Pretrain per `cfg` (a composed config/pretrain.yaml); returns the run summary."""
    PretrainConfig.check(cfg)
    check_model(cfg.model)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    hist = load_histories(abspath(cfg.data_path), cfg.env)
    mcfg = ModelConfig.from_cfg(cfg.model, cfg.env)
    if mcfg.max_compression_depth < 1:
        raise ConfigError("model.max_compression_depth must be >= 1 for pretraining (depth 0 compresses nothing)")
    slots = mcfg.n_latent * mcfg.n_head
    # Before the Accelerator exists: the launcher's RANK says which process is the main one (warn once).
    if mcfg.pretrain_slot_init and slots < mcfg.seg_len and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: model.n_latent x model.n_head = {slots} < model.seg_len={mcfg.seg_len}: the slot "
              f"initialisation gives {mcfg.seg_len - slots} positions of a full segment no head of their own, and "
              "they are read back worse (docs/design.md §5); make n_latent x n_head >= seg_len", flush=True)
    loop.seed_everything(cfg.seed)  # init weights depend on the seed only (reproducible, resumable)
    model = EncoderPretrainer(mcfg)
    task = ReconstructionTask(cfg, model, hist)
    settings = loop.settings_from_cfg(cfg, "pretrain", max_steps=int(cfg.pretrain_steps),
                                      batch_size=int(cfg.pretrain_batch_size), lr=float(cfg.pretrain_lr))
    return loop.fit(task, settings, abspath(cfg.run_dir),
                    loop.to_plain(cfg) | {rundir.FINGERPRINT_KEY: hist.fingerprint})


if __name__ == "__main__":
    import hydra_cli

    hydra_cli.run("pretrain", "pretrain_encoder")
