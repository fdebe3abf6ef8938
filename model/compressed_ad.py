"""CompressedAD: Algorithm Distillation whose unbounded history lives in n_latent compressed tokens.

Training: a batch holds d compressed segments (right-aligned slots) and a decoder window; the segments are
folded by the encoder with gradients (optionally detached past the newest), and the decoder predicts the
action at every window position from [latents ; window].

Rollout (identical schedule): the window fills one transition per step; when it holds seg_len transitions,
latents <- encoder(latents, window) and the window empties. With the KV cache, a step costs one decoder
token and the latent prefix is encoded once per compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.compressor import Compressor
from model.config import ModelConfig
from model.decoder import ActionDecoder
from model.reconstruction import ReconstructionDecoder
from model.transformer import init_weights
from transition import N_FIELDS, STATE, state


@dataclass
class RolloutState:
    """Per-batch-of-envs memory of a rollout. All envs step in lockstep, so one window length for all."""

    buffer: torch.Tensor  # [E, seg_len, 6] transitions of the current raw window
    n_win: int = 0  # transitions currently in the window
    latents: torch.Tensor | None = None  # [E, n_latent, d], None before the first compression
    cache: list | None = None  # per-layer (k, v) of prefix + window tokens so far
    n_compressions: int = 0
    use_cache: bool = True
    extra: dict = field(default_factory=dict)


class CompressedAD(Compressor):
    def __init__(self, cfg: ModelConfig, aux_recon: bool = False):
        super().__init__(cfg)
        self.decoder = ActionDecoder(cfg, n_prefix=cfg.n_latent, max_len=cfg.seg_len)
        # Stage-2 auxiliary reconstruction head (model.aux_recon_weight > 0); absent otherwise.
        self.recon = ReconstructionDecoder(cfg) if aux_recon else None
        # model.memory_reads=decoder (RMT-style memory): a fold reads each transition's embedding plus this
        # projection of the decoder's hidden state at that step, computed over [latents ; segment] — what the
        # decoder made of the segment given the memory. Zero-initialised (after init_weights): training starts
        # from the plain fold and learns how much of the decoder's view to write into the memory.
        self.memory_in = nn.Linear(cfg.d_model, cfg.d_model) if cfg.memory_reads == "decoder" else None
        init_weights(self)
        if self.memory_in is not None:
            nn.init.zeros_(self.memory_in.weight)
            nn.init.zeros_(self.memory_in.bias)

    def fold_inputs(self, seg_emb, seg, latents, has):
        if self.memory_in is None:
            return seg_emb
        tokens = self.decoder.window_tokens(self.decoder.prev_embeddings(seg_emb), state(seg))
        h = self.decoder.hidden(tokens, prefix=None if latents is None else latents,
                                has_prefix=None if latents is None else has)
        return seg_emb + self.memory_in(h)

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        win, seg, seg_len = batch["win"], batch["seg"], batch["seg_len"]
        label_segments = self.cfg.label_segments and seg.shape[1] > 0
        # Truncated backpropagation through the folds: only the newest bptt_segments slots get gradients
        # (and, with label_segments, labels); older ones are folded from the real history without a graph.
        k_bptt = self.cfg.bptt_segments
        n_old = max(0, seg.shape[1] - k_bptt) if k_bptt is not None else 0
        label_segments = label_segments and seg.shape[1] > n_old
        latents, has, prefixes = self.compress(seg, seg_len, detach_old=self.cfg.detach_old_latents,
                                               return_prefixes=True, no_grad_slots=n_old)
        b, w = win.shape[:2]
        # The decoder window, plus (label_segments) every used compressed segment decoded as the window it
        # was in a rollout — from the latents that preceded it. Same encoder work, (d+1)x the labels.
        wins, prefix, has_p = [win], [latents], [has]
        rows = None
        static = self.static_path()
        if label_segments and static:
            # Every labelled slot decoded (unused ones are padding the loss masks by seg_len): fixed shapes.
            s = seg.shape[2]
            pad = max(w, s)
            wins = [torch.nn.functional.pad(win, (0, 0, 0, pad - w)),
                    torch.nn.functional.pad(seg[:, n_old:].flatten(0, 1), (0, 0, 0, pad - s))]
            prefix = [latents, torch.stack([p[0] for p in prefixes[n_old:]], dim=1).flatten(0, 1)]
            has_p = [has, torch.stack([p[1] for p in prefixes[n_old:]], dim=1).flatten(0, 1)]
        elif label_segments:
            s = seg.shape[2]
            used = seg_len > 0  # [B, D]
            used[:, :n_old] = False  # folded without gradients: not labelled either
            rows = used.nonzero(as_tuple=False)  # (sample, slot) pairs, sample-major
            pad = max(w, s)
            wins = [torch.nn.functional.pad(win, (0, 0, 0, pad - w)),
                    torch.nn.functional.pad(seg[rows[:, 0], rows[:, 1]], (0, 0, 0, pad - s))]
            pre_lat = torch.stack([p[0] for p in prefixes], dim=1)  # [B, D, n, d]
            pre_has = torch.stack([p[1] for p in prefixes], dim=1)  # [B, D]
            prefix = [latents, pre_lat[rows[:, 0], rows[:, 1]]]
            has_p = [has, pre_has[rows[:, 0], rows[:, 1]]]
        all_win = torch.cat(wins, dim=0)
        ctx = self.embed_transitions(all_win)
        tokens = self.decoder.window_tokens(self.decoder.prev_embeddings(ctx), state(all_win))
        all_prefix = None if latents is None else torch.cat(prefix, dim=0)
        logits = self.decoder(tokens, prefix=all_prefix, has_prefix=torch.cat(has_p, dim=0))
        out = {"logits": logits[:b, :w], "latents": latents, "has_latents": has}
        if label_segments and static:
            # [B, D, S, A]; unused slots hold the logits of padding (masked by seg_len in the loss)
            out["seg_logits"] = logits[b:, :seg.shape[2]].reshape(b, seg.shape[1] - n_old, seg.shape[2], -1)
        elif label_segments:
            seg_logits = logits.new_zeros(*seg.shape[:3], logits.shape[-1])
            seg_logits = seg_logits.index_put((rows[:, 0], rows[:, 1]), logits[b:, : seg.shape[2]])
            # [B, D - n_old, S, A]: the newest slots (the labelled ones); unused slots are zeros, masked by
            # seg_len in the loss (which aligns these with the batch's LAST slots)
            out["seg_logits"] = seg_logits[:, n_old:]
        if self.recon is not None and latents is not None:
            # Auxiliary reconstruction (inside forward so DDP sees every parameter it uses).
            out["recon_pred"] = self.recon(latents, seg, seg_len)
        return out

    # ---- teacher-forced replay of the rollout schedule ---------------------------------------------------
    @torch.no_grad()
    def rollout_logits(self, trans: torch.Tensor, memory_segments: int | None = None) -> torch.Tensor:
        """Logits [N, T, n_actions] of the action at every step of recorded histories trans [N, T, 6],
        each computed exactly as a rollout (`act` / `observe`) would have computed it had it taken the
        recorded actions: the window fills from empty, is folded into the latents when it holds seg_len
        transitions, and the decoder sees [latents ; window so far]. Window m (steps m*S .. m*S+S-1) is
        decoded in one causal pass from the latents of segments 0..m-1, which is what the KV-cached
        rollout computes one token at a time (tests/test_teacher_forced.py checks the equality).

        memory_segments=k rebuilds the latents of window m from only its last k segments (m-k .. m-1,
        folded from no memory); k=0 decodes every window without latents. None = the whole history.
        """
        n, t_len = trans.shape[:2]
        s = self.cfg.seg_len
        n_win = -(-t_len // s)
        pad = n_win * s - t_len  # the last, partial window is causal: its padding affects nothing before it
        segs = torch.nn.functional.pad(trans.long(), (0, 0, 0, pad)).view(n, n_win, s, N_FIELDS)
        emb = self.embed_transitions(segs)  # [N, n_win, S, d]
        full = torch.ones(n, s, dtype=torch.bool, device=trans.device)

        def fold(first: int, stop: int):
            """Latents after folding segments first .. stop-1 from no memory (None if the range is empty)."""
            lat = None
            for j in range(first, stop):
                has = torch.full((n,), lat is not None, dtype=torch.bool, device=trans.device)
                lat = self.encoder(lat, has, self.fold_inputs(emb[:, j], segs[:, j], lat, has), full)
            return lat

        prefixes = []
        if memory_segments is None:
            lat = None
            for m in range(n_win):
                prefixes.append(lat)
                if m < n_win - 1:
                    has = torch.full((n,), lat is not None, dtype=torch.bool, device=trans.device)
                    lat = self.encoder(lat, has, self.fold_inputs(emb[:, m], segs[:, m], lat, has), full)
        else:
            k = int(memory_segments)
            prefixes = [fold(max(0, m - k), m) if k > 0 else None for m in range(n_win)]
        zeros = emb.new_zeros(n, self.cfg.n_latent, emb.shape[-1])
        prefix = torch.stack([zeros if p is None else p for p in prefixes], dim=1)  # [N, n_win, n, d]
        has = torch.tensor([p is not None for p in prefixes], device=trans.device).expand(n, n_win)
        tokens = self.decoder.window_tokens(self.decoder.prev_embeddings(emb.flatten(0, 1)),
                                            state(segs.flatten(0, 1)))
        logits = self.decoder(tokens, prefix=prefix.flatten(0, 1), has_prefix=has.reshape(-1))
        return logits.view(n, n_win * s, -1)[:, :t_len]

    # ---- rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_rollout(self, n_envs: int, device, use_cache: bool = True) -> RolloutState:
        buf = torch.zeros(n_envs, self.cfg.seg_len, N_FIELDS, dtype=torch.long, device=device)
        return RolloutState(buffer=buf, use_cache=use_cache)

    @torch.no_grad()
    def act(self, st: RolloutState, states: torch.Tensor) -> torch.Tensor:
        """Logits [E, n_actions] for the current states [E, 2]. Call `observe` with the resulting
        transition before the next `act`."""
        e, d = states.shape[0], self.cfg.d_model
        if st.n_win == 0:
            prev = self.decoder.begin.expand(e, 1, d)
        else:
            prev = self.embed_transitions(st.buffer[:, st.n_win - 1: st.n_win])
        if st.use_cache:
            token = self.decoder.window_tokens(prev, states[:, None], start=st.n_win)
            logits, st.cache = self.decoder.step(token, st.cache)
            return logits
        # Recompute path (reference + benchmark): the whole window, and the prefix, every step.
        win = torch.cat([st.buffer[:, : st.n_win], _pad_state(states)], dim=1)
        tokens = self.decoder.window_tokens(self.decoder.prev_embeddings(self.embed_transitions(win)),
                                            state(win))
        has = torch.full((e,), st.latents is not None, dtype=torch.bool, device=states.device)
        return self.decoder(tokens, prefix=st.latents, has_prefix=has if st.latents is not None else None)[:, -1]

    @torch.no_grad()
    def observe(self, st: RolloutState, trans: torch.Tensor) -> None:
        """Append the transition [E, 6] just taken; compress when the window is full."""
        st.buffer[:, st.n_win] = trans.long()
        st.n_win += 1
        if st.n_win == self.cfg.seg_len:
            self._compress_window(st)

    def _compress_window(self, st: RolloutState) -> None:
        e = st.buffer.shape[0]
        has = torch.full((e,), st.latents is not None, dtype=torch.bool, device=st.buffer.device)
        mask = torch.ones(e, self.cfg.seg_len, dtype=torch.bool, device=st.buffer.device)
        seg_in = self.fold_inputs(self.embed_transitions(st.buffer), st.buffer, st.latents, has)
        st.latents = self.encoder(st.latents, has, seg_in, mask)
        st.n_win = 0
        st.n_compressions += 1
        st.cache = self.decoder.prefix_cache(st.latents) if st.use_cache else None


def _pad_state(states: torch.Tensor) -> torch.Tensor:
    """States [E, 2] -> a [E, 1, 6] pseudo-transition whose only read field is the state."""
    out = torch.zeros(states.shape[0], 1, N_FIELDS, dtype=torch.long, device=states.device)
    out[:, 0, STATE] = states.long()
    return out
