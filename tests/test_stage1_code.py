"""Issue 12, a stage-1 code that can be read back: the one-hot state features of the shared embedding
(model.state_features), the position-addressed slot initialisation (every (latent, head) reads its own
segment position, its own query token does not distract it) and the linear readout of the reconstruction
decoder (model.recon_linear_readout). The learning test with a constant encoder is in test_pretrain.py
(parametrised with the readout); the measured effect of each change: docs/design.md §5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import EncoderCheckpointError, check_architecture
from model.config import ConfigError, ModelConfig
from model.embeddings import featurize, input_features
from model.encoder_pretrainer import EncoderPretrainer
from model.reconstruction import ReconstructionDecoder, recon_out_dim

G = 9


def _cfg(**kw) -> ModelConfig:
    base = {"grid_size": G, "d_model": 64, "n_head": 4, "n_layer": 1, "enc_n_layer": 2, "n_latent": 5, "seg_len": 20,
            "dropout": 0.0, "recon_loss": "ce", "recon_decoder": "causal", "max_compression_depth": 3}
    return ModelConfig(**(base | kw))


def _transitions(shape) -> torch.Tensor:
    t = torch.randint(0, G, (*shape, 6))
    t[..., 2] = torch.randint(0, 5, shape)
    t[..., 3] = torch.randint(0, 2, shape)
    return t


def test_onehot_state_features_extend_the_scalar_ones_with_each_coordinate():
    trans = _transitions((3, 7))
    scalar, onehot = _cfg(state_features="scalar"), _cfg(state_features="onehot")
    assert torch.equal(input_features(trans, scalar), featurize(trans, G))
    f = input_features(trans, onehot)
    assert f.shape == (3, 7, onehot.in_dim) and onehot.in_dim == scalar.feat_dim + 4 * G
    assert torch.equal(f[..., :scalar.feat_dim], featurize(trans, G))
    codes = f[..., scalar.feat_dim:].view(3, 7, 4, G)
    assert torch.equal(codes.argmax(-1), trans[..., [0, 1, 4, 5]]) and torch.equal(codes.sum(-1), torch.ones(3, 7, 4))
    # The shared embedding (an encoder-checkpoint weight) reads exactly these features.
    net = EncoderPretrainer(onehot)
    assert net.embed_context.in_features == onehot.in_dim
    assert net.embed_transitions(trans).shape == (3, 7, onehot.d_model)


def test_state_features_is_part_of_the_encoder_contract_and_old_checkpoints_read_as_scalar():
    saved = _cfg(state_features="scalar").arch_dict()
    del saved["state_features"]  # an encoder written before the key existed
    check_architecture({"model": saved}, _cfg(state_features="scalar"), "old.pt")
    with pytest.raises(EncoderCheckpointError, match="state_features: checkpoint=scalar current=onehot"):
        check_architecture({"model": saved}, _cfg(state_features="onehot"), "old.pt")
    with pytest.raises(ConfigError, match="model.state_features='binary'"):
        _cfg(state_features="binary").validate()


def test_keep_recent_is_part_of_the_encoder_contract_and_old_checkpoints_read_as_zero():
    """The fold length seg_len - keep_recent is what stage 1 trained the encoder to fold: a stage 2 that
    folds other lengths is refused in one line; a checkpoint written before the key folded whole windows."""
    saved = _cfg().arch_dict()
    del saved["keep_recent"]
    check_architecture({"model": saved}, _cfg(), "old.pt")
    with pytest.raises(EncoderCheckpointError, match="keep_recent: checkpoint=0 current=10") as ei:
        check_architecture({"model": saved}, _cfg(keep_recent=10), "old.pt")
    assert "\n" not in str(ei.value)
    assert _cfg(keep_recent=5).fold_len == 15 and _cfg().fold_len == 20
    with pytest.raises(ConfigError, match="model.keep_recent=20 must be in"):
        _cfg(keep_recent=20).validate()


def test_slot_init_gives_every_latent_head_its_own_segment_position_and_not_its_query_token():
    """At step 0 head h of latent i in the encoder's first block attends to one segment position, a
    different one for each (i, h), with the segment length = n_latent x n_head (the quick preset's shape). The
    query tokens are keys too: before the negated code, head 0 of every latent spent half its attention on
    its own query token and read back every 4th position at ~0.6 accuracy instead of ~1.0."""
    cfg = _cfg(pretrain_slot_init=True, state_features="onehot")
    torch.manual_seed(0)
    net = EncoderPretrainer(cfg).eval()
    enc, s, n, h = net.encoder, cfg.seg_len, cfg.n_latent, cfg.n_head
    seg = _transitions((16, s))
    with torch.no_grad():
        emb = net.embed_transitions(seg)
        x = enc.blocks[0].ln1(torch.cat([emb + enc.seg_pos, enc.queries.expand(16, -1, -1)], 1))
        attn = enc.blocks[0].attn
        q, k = attn._heads(attn.q(x)), attn._heads(attn.kv(x).chunk(2, -1)[0])
        w = (q[:, :, s:] @ k.transpose(-1, -2) / (cfg.d_model // h) ** 0.5).softmax(-1).mean(0)  # [h, n, S + n]
    on_queries = w[..., s:].sum(-1)
    assert (on_queries < 0.05).all(), on_queries
    top = w[..., :s].max(-1)
    assert (top.values > 0.5).all(), top.values
    slots = top.indices.T.flatten()  # [(latent i, head h)], latent-major
    assert len(set(slots.tolist())) == n * h  # every position of the segment has its own reader


def test_linear_readout_adds_a_per_position_map_of_the_latents_and_keeps_the_decoder_causal():
    cfg = _cfg(recon_linear_readout=True)
    torch.manual_seed(0)
    dec = ReconstructionDecoder(cfg).eval()
    assert dec.readout.in_features == cfg.n_latent * cfg.d_model
    assert dec.readout.out_features == cfg.max_compression_depth * cfg.seg_len * recon_out_dim(cfg)
    seg = _transitions((4, 2, cfg.seg_len))
    seg_len = torch.tensor([[20, 20], [0, 12], [15, 20], [0, 20]])
    lat = torch.randn(4, cfg.n_latent, cfg.d_model)
    with torch.no_grad():
        base = dec(lat, seg, seg_len)
        nudged = lat.clone()
        nudged[:, 0, 0] += 1.0
        plain = dec.readout
        dec.readout = None
        without = dec(lat, seg, seg_len)
        dec.readout = plain
        moved = dec(nudged, seg, seg_len)
        changed = seg.clone()
        changed[:, 1, 10:] = (changed[:, 1, 10:] + 1) % 2
        later = dec(lat, changed, seg_len)
    # Slot k of D decodes with its age's maps: the newest slot uses age 0's.
    r = dec.readout(lat.flatten(1)).view(4, cfg.max_compression_depth, cfg.seg_len, -1)
    assert torch.allclose(base - without, r[:, [1, 0]], atol=1e-5)
    assert not torch.allclose(moved, base)  # every position can read every latent
    # Teacher forcing still leaks nothing forward: positions before 10 of slot 1 are unchanged.
    assert torch.equal(later[:, 0], base[:, 0]) and torch.equal(later[:, 1, :10], base[:, 1, :10])
    assert not torch.allclose(later[:, 1, 11:], base[:, 1, 11:])


def test_linear_readout_reaches_every_field_of_the_field_decoder():
    """recon_decoder=causal_fields: the readout's logits are added to each field's head (before its argmax is
    fed on): with the readout's weights zeroed the output is the plain decoder's, with them set every field moves."""
    cfg = _cfg(recon_linear_readout=True, recon_decoder="causal_fields")
    torch.manual_seed(0)
    dec = ReconstructionDecoder(cfg).eval()
    seg = _transitions((2, 1, cfg.seg_len))
    seg_len = torch.full((2, 1), cfg.seg_len)
    lat = torch.randn(2, cfg.n_latent, cfg.d_model)
    with torch.no_grad():
        torch.nn.init.zeros_(dec.readout.weight)
        torch.nn.init.zeros_(dec.readout.bias)
        zero = dec(lat, seg, seg_len, teacher_fields=True)
        readout, dec.readout = dec.readout, None
        plain = dec(lat, seg, seg_len, teacher_fields=True)
        dec.readout = readout
        torch.nn.init.normal_(dec.readout.bias)
        moved = dec(lat, seg, seg_len, teacher_fields=True)
    assert torch.equal(zero, plain)
    bias = dec.readout.bias.view(cfg.max_compression_depth, cfg.seg_len, -1)[0]  # the newest slot: age 0
    assert torch.allclose(moved - plain, bias.expand_as(moved), atol=1e-5)  # teacher-forced: a pure offset


def test_linear_readout_reads_back_a_linear_code_of_every_position():
    """The readout's reason to exist, on a toy: latents that are a fixed random linear code of the segment's
    actions (uniform over 5: chance 0.2). 150 Adam steps of the decoder reach > 0.9 action accuracy at
    every position, which needs each position to address its own part of the code."""
    torch.manual_seed(0)
    cfg = _cfg(recon_linear_readout=True, recon_decoder="parallel", seg_len=10, n_latent=2, d_model=32, n_head=2)
    dec = ReconstructionDecoder(cfg)
    code = torch.randn(cfg.seg_len * 5, cfg.n_latent * cfg.d_model) / 5
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)

    def batch(n):
        seg = _transitions((n, 1, cfg.seg_len))
        lat = (F.one_hot(seg[:, 0, :, 2], 5).float().flatten(1) @ code).view(n, cfg.n_latent, cfg.d_model)
        return lat, seg, torch.full((n, 1), cfg.seg_len)

    for _ in range(150):
        lat, seg, seg_len = batch(64)
        logits = dec(lat, seg, seg_len)[..., 2 * G: 2 * G + 5]  # 'ce' layout: sx, sy (G each), a, r, nsx, nsy
        loss = F.cross_entropy(logits.reshape(-1, 5), seg[..., 2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lat, seg, seg_len = batch(256)
    with torch.no_grad():
        acc = (dec(lat, seg, seg_len)[..., 2 * G: 2 * G + 5].argmax(-1) == seg[..., 2]).float().mean((0, 1))
    assert (acc > 0.9).all(), acc


# ---- task-relevant targets (model.recon_task_weight) ------------------------------------------------------
def _tr(s, a, r, ns):
    return [s[0], s[1], a, r, ns[0], ns[1]]


def test_task_targets_are_the_newest_reward_cell_and_every_visited_cell_never_padding():
    from model.task_targets import task_targets

    g = 4
    seg = torch.zeros(3, 2, 3, 6, dtype=torch.long)
    # sample 0: reward seen at (1, 2) in the older slot, then at (3, 3) in the newer one -> the newer
    seg[0, 0, :2] = torch.tensor([_tr((0, 0), 1, 0, (1, 0)), _tr((1, 2), 0, 1, (1, 2))])
    seg[0, 1, :1] = torch.tensor([_tr((3, 2), 3, 1, (3, 3))])
    seg[0, 1, 1:] = torch.tensor(_tr((2, 2), 0, 1, (2, 2)))  # padding: must count for nothing
    # sample 1: no reward at all; sample 2: depth 1 (slot 0 unused), reward at (0, 1)
    seg[1, 1, :3] = torch.tensor([_tr((0, 0), 0, 0, (0, 0)), _tr((0, 0), 1, 0, (1, 0)), _tr((1, 0), 3, 0, (1, 1))])
    seg[2, 1, :1] = torch.tensor([_tr((0, 0), 3, 1, (0, 1))])
    seg_len = torch.tensor([[2, 1], [0, 3], [0, 1]])
    goal, visited = task_targets(seg, seg_len, g)
    assert goal.tolist() == [[3, 3], [g, g], [0, 1]]
    cells = [sorted(torch.nonzero(v)[:, 0].tolist()) for v in visited]
    assert cells[0] == sorted({0, 1 * g, 1 * g + 2, 3 * g + 2, 3 * g + 3})
    assert cells[1] == [0, 1 * g, 1 * g + 1]
    assert cells[2] == [0, 1]


def test_pretraining_with_task_targets_logs_them_beside_their_baselines(tiny, tmp_path):
    import pretrain_encoder

    out = pretrain_encoder.main(tiny.compose("pretrain", "pretrain_steps=6", "model.recon_task_weight=0.5",
                                             "diag_every=3", run_dir=tmp_path / "p"))
    for key in ("task_goal_acc", "task_visited_acc", "task_visited_f1", "baseline_task_goal_acc",
                "baseline_task_visited_acc", "ablation_task_goal_acc"):
        assert 0.0 <= out[key] <= 1.0, (key, out)
    ck = torch.load(tmp_path / "p" / "encoder-pretrained-final.pt", weights_only=True)
    assert set(ck) >= {"encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"}
    assert not any("task" in k for k in ck), "the task head is not an encoder weight"
    with pytest.raises(ConfigError, match="recon_task_weight=-1"):
        pretrain_encoder.main(tiny.compose("pretrain", "model.recon_task_weight=-1", run_dir=tmp_path / "bad"))


def test_a_model_config_saved_before_state_features_builds_the_scalar_embedding():
    """model.pt / encoder checkpoints written before the key: no state_features in their config -> scalar."""
    saved = {"name": "ad_compressed", "d_model": 32, "n_head": 2, "n_latent": 3, "seg_len": 8}
    cfg = ModelConfig.from_cfg(saved, {"grid_size": G, "n_actions": 5})
    assert cfg.state_features == "scalar" and cfg.in_dim == cfg.feat_dim == 10
