"""Stage-1 model: shared embeddings + CompressionEncoder (the Compressor) + ReconstructionDecoder.

forward(batch) compresses the batch's 1..3 segments hierarchically with the current weights and
reconstructs every folded transition from the final latents only.
"""

from __future__ import annotations

import torch

from model.compressor import Compressor
from model.config import ModelConfig
from model.reconstruction import ReconstructionDecoder


class EncoderPretrainer(Compressor):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.recon = ReconstructionDecoder(cfg)
        from model.transformer import init_weights

        init_weights(self)

    def forward(self, batch: dict, latents_override: torch.Tensor | None = None) -> dict:
        seg, seg_len = batch["seg"], batch["seg_len"]
        if seg.shape[1] == 0:
            raise ValueError("stage-1 batches need depth >= 1 (nothing was compressed)")
        latents, has = self.compress(seg, seg_len, detach_old=self.cfg.detach_old_latents)
        if latents_override is not None:
            latents = latents_override
        pred = self.recon(latents, seg, seg_len)
        return {"pred": pred, "latents": latents, "has_latents": has}
