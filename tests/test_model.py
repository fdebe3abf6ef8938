"""Model behaviour: masks and causality, KV cache == recompute, rollout schedule == training forward, the gated
latent update (model.latent_update=gated; its training == rollout equivalence at depth >= 10 is in
tests/test_schedules.py), and static shapes (masks instead of .nonzero()) giving the dynamic path's outputs and
gradients."""

import math

import pytest
import torch
from test_dataset import RandomHistories, random_stage2

from dataset_pretrain import PretrainBatches
from model import AD, CompressedAD, EncoderPretrainer, ModelConfig
from model.config import ConfigError
from model.losses import action_loss, reconstruction_loss

SEG = 6


def tiny_cfg(**kw):
    base = {"d_model": 32, "n_head": 2, "n_layer": 2, "enc_n_layer": 2, "n_latent": 3, "seg_len": SEG, "context_len": SEG,
                "dropout": 0.0, "grid_size": 5}
    base.update(kw)
    return ModelConfig(**base)


def random_history(t, g=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randint(0, g, (t, 6), generator=gen)
    tr[:, 2] = torch.randint(0, 5, (t,), generator=gen)
    tr[:, 3] = torch.randint(0, 2, (t,), generator=gen)
    return tr


def batch_from_history(hist, depth, seg_len, win_len):
    """One training sample: `depth` segments of seg_len then a window, all consecutive in hist."""
    seg = hist[: depth * seg_len].view(1, depth, seg_len, 6) if depth else torch.zeros(1, 0, seg_len, 6).long()
    win = hist[depth * seg_len: depth * seg_len + win_len][None]
    return {"seg": seg, "seg_len": torch.full((1, depth), seg_len), "win": win,
            "win_len": torch.tensor([win_len]), "depth": torch.tensor([depth])}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_future_transition_does_not_change_earlier_logits():
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(2 * SEG)
    b1 = batch_from_history(hist, 1, SEG, SEG)
    b2 = batch_from_history(hist.clone(), 1, SEG, SEG)
    # Change what happened at step 3 (action, reward, next state), keeping s_3 which token 3 may see.
    b2["win"][0, 3, 2:] = (b2["win"][0, 3, 2:] + 1) % 2 + 2
    l1, l2 = m(b1)["logits"], m(b2)["logits"]
    # token t embeds tau_{t-1}, so positions 0..3 are unaffected and position 4 changes.
    assert torch.allclose(l1[0, :4], l2[0, :4], atol=1e-6)
    assert not torch.allclose(l1[0, 4], l2[0, 4], atol=1e-4)


def test_latents_visible_to_every_position():
    m = CompressedAD(tiny_cfg()).eval()
    win = random_history(SEG)[None]
    tokens = m.decoder.window_tokens(m.decoder.prev_embeddings(m.embed_transitions(win)), win[..., 0:2])
    has = torch.ones(1, dtype=torch.bool)
    l1 = m.decoder(tokens, prefix=torch.randn(1, 3, 32), has_prefix=has)
    l2 = m.decoder(tokens, prefix=torch.randn(1, 3, 32), has_prefix=has)
    assert ((l1 - l2).abs().amax(-1) > 1e-4).all(), "every window position must depend on the latents"
    # ... and a sample without latents ignores whatever sits in the prefix slots.
    no = torch.zeros(1, dtype=torch.bool)
    l3 = m.decoder(tokens, prefix=torch.randn(1, 3, 32), has_prefix=no)
    l4 = m.decoder(tokens, prefix=torch.randn(1, 3, 32), has_prefix=no)
    assert torch.allclose(l3, l4, atol=1e-6)


def test_padding_is_inert():
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(3 * SEG)
    short = batch_from_history(hist, 2, SEG, 4)
    # Same sample, but with a shorter first segment padded with garbage and a padded window.
    padded = {k: v.clone() for k, v in short.items()}
    padded["win"] = torch.cat([short["win"], torch.randint(0, 5, (1, 2, 6))], dim=1)
    padded["seg"][0, 0, 4:] = 3  # garbage beyond the first segment's length
    padded["seg_len"] = torch.tensor([[4, SEG]])
    ref = {k: v.clone() for k, v in short.items()}
    ref["seg_len"] = torch.tensor([[4, SEG]])
    ref["seg"][0, 0, 4:] = 0
    a, b = m(ref)["logits"], m(padded)["logits"]
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-5)
    # Labels at padded window positions never count.
    lp = action_loss(b, padded)
    la = action_loss(a, ref)
    assert lp["n_labels"].item() == 4 and torch.allclose(lp["loss"], la["loss"], atol=1e-5)


def test_unused_slots_equal_lower_depth():
    """A depth-1 sample in a depth-2 batch (slot 0 unused) gives the same logits as alone."""
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(3 * SEG)
    alone = batch_from_history(hist, 1, SEG, SEG)
    mixed = {"seg": torch.cat([torch.zeros(1, 1, SEG, 6).long(), alone["seg"]], dim=1),
             "seg_len": torch.tensor([[0, SEG]]), "win": alone["win"], "win_len": alone["win_len"]}
    assert torch.allclose(m(alone)["logits"], m(mixed)["logits"], atol=1e-5)
    depth0 = batch_from_history(hist, 0, SEG, SEG)
    masked = {"seg": torch.zeros(1, 1, SEG, 6).long(), "seg_len": torch.tensor([[0]]), "win": depth0["win"],
              "win_len": depth0["win_len"]}
    assert torch.allclose(m(depth0)["logits"], m(masked)["logits"], atol=1e-5)


def rollout_logits(model, hist, use_cache):
    st = model.init_rollout(1, "cpu", use_cache=use_cache)
    out = []
    for t in range(hist.shape[0]):
        out.append(model.act(st, hist[t: t + 1, 0:2]))
        model.observe(st, hist[t: t + 1])
    return torch.cat(out), st


def test_kv_cache_matches_recompute_across_compressions():
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(4 * SEG + 3)
    cached, st = rollout_logits(m, hist, True)
    full, _ = rollout_logits(m, hist, False)
    assert st.n_compressions == 4
    assert torch.allclose(cached, full, atol=1e-5)


def test_rollout_schedule_equals_training_forward():
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(3 * SEG + 4)
    rolled, st = rollout_logits(m, hist, True)
    # The rollout compresses exactly when the window reaches seg_len.
    assert st.n_compressions == 3 and st.n_win == 4
    for depth in range(4):
        w = SEG if depth < 3 else 4
        out = m(batch_from_history(hist, depth, SEG, w))
        assert torch.allclose(out["logits"][0], rolled[depth * SEG: depth * SEG + w], atol=1e-5), f"depth {depth}"
        if depth:  # compressed segments decoded from the latents before them == the rollout's windows
            seg_logits = out["seg_logits"][0].reshape(depth * SEG, -1)
            assert torch.allclose(seg_logits, rolled[: depth * SEG], atol=1e-5), f"segments, depth {depth}"


def test_ad_rollout_equals_training_forward_on_sliding_windows():
    cfg = tiny_cfg(context_len=5)
    m = AD(cfg).eval()
    hist = random_history(12)
    rolled, _ = rollout_logits(m, hist, False)
    for t in range(12):
        lo = max(0, t - 4)
        win = hist[lo: t + 1][None]
        logits = m({"win": win, "win_len": torch.tensor([win.shape[1]])})["logits"][0, -1]
        assert torch.allclose(logits, rolled[t], atol=1e-5)


def test_segment_labels_count_every_transition_once():
    m = CompressedAD(tiny_cfg()).eval()
    hist = random_history(3 * SEG)
    b = batch_from_history(hist, 2, SEG, 5)
    b["seg_len"] = torch.tensor([[3, SEG]])
    out = m(b)
    a = action_loss(out["logits"], b, seg_logits=out["seg_logits"])
    assert a["n_labels"].item() == 3 + SEG + 5
    assert action_loss(out["logits"], b)["n_labels"].item() == 5


def test_action_loss_falls_far_below_ln5_on_tiny_data():
    """Learning happens: a deterministic policy hidden in the history is fit quickly."""
    torch.manual_seed(0)
    m = CompressedAD(tiny_cfg())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    hist = random_history(3 * SEG, seed=1)
    hist[:, 2] = (hist[:, 0] + hist[:, 1]) % 5  # action is a function of the state
    b = batch_from_history(hist, 2, SEG, SEG)
    for _ in range(150):
        loss = action_loss(m(b)["logits"], b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * math.log(5)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="n_latent"):
        ModelConfig(n_latent=0).validate()
    with pytest.raises(ConfigError, match="multiple of model.n_head"):
        ModelConfig(d_model=30, n_head=4).validate()


@pytest.mark.parametrize("bad, match", [
    ({"d_model": 30, "n_head": 4}, r"model.d_model=30 must be a positive multiple of model.n_head=4"),
    ({"n_latent": 12, "seg_len": 10, "context_len": 10}, r"model.n_latent=12 must be <= model.seg_len=10"),
    ({"keep_recent": 10, "seg_len": 10, "context_len": 10}, r"model.keep_recent=10 must be in \[0, model.seg_len=10\)"),
    ({"recon_decoder": "causal_fields", "recon_loss": "mse"}, r"causal_fields .* needs model.recon_loss=ce"),
])
def test_model_relations_are_checked_once_for_built_and_composed_configs(bad, match):
    """schema.check_model is the one home of the relations between model keys: a composed config (a dict) and a
    built ModelConfig are refused with the same line."""
    from schema import check_model

    with pytest.raises(ConfigError, match=match):
        check_model(tiny_cfg().model_dump() | bad)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_cfg(tiny_cfg().model_dump() | bad, {"grid_size": 5, "n_actions": 5})


def test_pretrainer_output_shapes_and_depth_check():
    cfg = tiny_cfg()
    p = EncoderPretrainer(cfg)
    b = batch_from_history(random_history(3 * SEG), 3, SEG, 1)
    out = p(b)
    assert out["pred"].shape == (1, 3, SEG, cfg.feat_dim)
    with pytest.raises(ValueError, match="depth >= 1"):
        p({"seg": torch.zeros(1, 0, SEG, 6).long(), "seg_len": torch.zeros(1, 0).long()})


def test_a_closed_gate_carries_the_latents_through_a_fold_unchanged_and_an_open_one_replaces_them():
    S = 8  # the segment length
    cfg = ModelConfig(grid_size=9, d_model=32, n_head=2, n_layer=1, enc_n_layer=1, n_latent=3, seg_len=S,
                      dropout=0.0, latent_update="gated")
    model = CompressedAD(cfg).eval()
    seg = torch.randint(0, 5, (4, 2, S, 6))
    seg_len = torch.full((4, 2), S)
    with torch.no_grad():
        first, _ = model.compress(seg[:, :1], seg_len[:, :1])
        torch.nn.init.constant_(model.encoder.gate.bias, -50.0)  # g = 0: keep the previous latents
        kept, _ = model.compress(seg, seg_len)
        torch.nn.init.constant_(model.encoder.gate.bias, 50.0)  # g = 1: the plain replacement
        replaced, _ = model.compress(seg, seg_len)
        model.encoder.gate = None
        plain, _ = model.compress(seg, seg_len)
    assert torch.allclose(kept, first, atol=1e-5)  # the first fold has no previous latents: never gated
    assert torch.allclose(replaced, plain, atol=1e-5)
    assert not torch.allclose(kept, plain, atol=1e-3)


def static_cfg(**kw):
    base = {"d_model": 32, "n_head": 2, "n_layer": 1, "enc_n_layer": 1, "n_latent": 3, "seg_len": 10,
            "context_len": 10, "dropout": 0.0, "grid_size": 5, "recon_n_layer": 1}
    return ModelConfig(**(base | kw))


def test_static_forward_equals_dynamic_forward():
    """Masks instead of .nonzero(): same logits, segment logits (on used slots), loss and gradients."""
    torch.manual_seed(0)
    m = CompressedAD(static_cfg())
    batch = random_stage2(True)[0]
    assert batch["depth"].min() < 3  # a mix of depths, so unused slots exist
    outs = []
    for static in (False, True):
        m.cfg.static_shapes = static
        m.zero_grad()
        out = m(batch)
        loss = action_loss(out["logits"], batch, seg_logits=out["seg_logits"])
        loss["loss"].backward()
        outs.append((out, loss, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (o1, l1, g1), (o2, l2, g2) = outs
    used = (torch.arange(10) < batch["seg_len"][..., None])
    assert torch.allclose(o1["logits"], o2["logits"], atol=1e-5)
    assert torch.allclose(o1["seg_logits"][used], o2["seg_logits"][used], atol=1e-5)
    assert torch.allclose(o1["latents"], o2["latents"], atol=1e-5)
    assert torch.equal(l1["n_labels"], l2["n_labels"]) and torch.allclose(l1["loss"], l2["loss"], atol=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-5), n


def test_static_pretrainer_equals_dynamic():
    torch.manual_seed(0)
    m = EncoderPretrainer(static_cfg())
    batch = PretrainBatches(RandomHistories(), "train", batch_size=8, seg_len=10, min_seg_len=4, static_shapes=True)[0]
    preds = []
    for static in (False, True):
        m.cfg.static_shapes = static
        preds.append(m(batch)["pred"])
    mask = torch.arange(10) < batch["seg_len"][..., None]
    assert torch.allclose(preds[0][mask], preds[1][mask], atol=1e-5)
    assert torch.allclose(reconstruction_loss(preds[0], batch["seg"], batch["seg_len"], m.cfg),
                          reconstruction_loss(preds[1], batch["seg"], batch["seg_len"], m.cfg), atol=1e-6)
