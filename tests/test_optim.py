"""optim.py: AdamW (fused only on CUDA, betas from the config) and which parameters weight decay applies to."""

from __future__ import annotations

import torch

import loop
from optim import decayed_parameters, make_optimizer


def test_fused_adamw_only_on_cuda():
    m = torch.nn.Linear(3, 3)
    s = loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3).validate()
    assert not make_optimizer(m, s).defaults.get("fused")


def test_adam_betas_come_from_the_config(tiny):
    """adam_beta1 / adam_beta2 (train.yaml, pretrain.yaml) reach AdamW; the defaults are the betas the loop
    always used, (0.9, 0.95)."""
    m = torch.nn.Linear(3, 3)
    default = loop.settings_from_cfg(tiny.compose("train"), "train").validate()
    assert make_optimizer(m, default).defaults["betas"] == (0.9, 0.95)
    for name in ("train", "pretrain"):
        cfg = tiny.compose(name, "adam_beta1=0.8", "adam_beta2=0.99")
        # (stage 1's steps / batch / lr are model-group keys that pretrain_encoder.main passes explicitly)
        s = loop.settings_from_cfg(cfg, name, max_steps=1, batch_size=8, lr=1e-3).validate()
        assert make_optimizer(m, s).defaults["betas"] == (0.8, 0.99)


def test_weight_decay_only_on_linear_weights(tiny):
    """Decayed: nn.Linear weight matrices. Not decayed: biases, norms, and the tables of learned vectors
    (position tables, latent slots, the encoder's queries, nn.Embedding rows), which today's >= 2-D rule
    used to decay."""
    from model import EncoderPretrainer, ModelConfig, build_model

    block = ["attn.q.weight", "attn.kv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight"]
    cfg = tiny.compose("train")  # CompressedAD, 1 encoder and 1 decoder block
    cad = build_model(cfg.model, cfg.env)
    assert decayed_parameters(cad) == {
        "embed_context.weight", "decoder.embed_state.weight", "decoder.head.weight",
        *(f"encoder.blocks.0.{w}" for w in block), *(f"decoder.blocks.0.{w}" for w in block)}
    tables = {n for n, p in cad.named_parameters() if p.dim() >= 2} - decayed_parameters(cad)
    assert tables == {"encoder.latent_pos", "encoder.seg_pos", "encoder.queries", "decoder.pos", "decoder.prefix_pos"}
    s = loop.LoopSettings(max_steps=1, batch_size=1, lr=1e-3, weight_decay=0.1).validate()
    decay, no_decay = make_optimizer(cad, s).param_groups
    names = {id(p): n for n, p in cad.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == decayed_parameters(cad) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) + len(no_decay["params"]) == len(names)

    ad_cfg = tiny.compose("train", "model=ad_dr")
    assert "decoder.pos" not in decayed_parameters(build_model(ad_cfg.model, ad_cfg.env))
    pre_cfg = tiny.compose("pretrain")
    pre = EncoderPretrainer(ModelConfig.from_cfg(pre_cfg.model, pre_cfg.env))
    decayed = decayed_parameters(pre)
    assert not decayed & {"encoder.latent_pos", "encoder.seg_pos", "encoder.queries", "recon.pos",
                          "recon.seg_age.weight"}
    assert all(n.endswith(".weight") and pre.get_parameter(n).dim() == 2 for n in decayed)
