"""CompressedAD: Algorithm Distillation whose unbounded history lives in n_latent compressed tokens.

Training: a batch holds d compressed segments (right-aligned slots) and a decoder window; the segments are
folded by the encoder with gradients (optionally detached past the newest), and the decoder predicts the
action at every window position from [latents ; window].

Rollout (identical schedule): the window fills one transition per step; when it holds seg_len transitions,
latents <- encoder(latents, oldest seg_len - keep_recent of the window) and the newest keep_recent stay
(model.keep_recent; 0: the window empties). With the KV cache, a step costs one decoder token; the latent
prefix and the keep_recent kept tokens are encoded once per compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.compressor import Compressor
from model.config import ModelConfig
from model.decoder import ActionDecoder
from model.reconstruction import ReconstructionDecoder
from model.transformer import init_weights
from transition import N_FIELDS, STATE, action


@dataclass
class RolloutState:
    """Per-batch-of-envs memory of a rollout. All envs step in lockstep, so one window length for all."""

    buffer: torch.Tensor  # [E, seg_len, 6] transitions of the current raw window
    n_win: int = 0  # transitions currently in the window
    latents: torch.Tensor | None = None  # [E, n_latent, d], None before the first compression
    cache: list | None = None  # per-layer (k, v) of prefix + window tokens so far
    n_compressions: int = 0
    use_cache: bool = True


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
        tokens = self.decoder.tokens(seg_emb, seg)
        h = self.decoder.hidden(tokens, prefix=latents, has_prefix=has)
        return seg_emb + self.memory_in(h)

    def fold(self, latents, seg: torch.Tensor, seg_emb: torch.Tensor) -> torch.Tensor:
        """One fold of the rollout schedule: the full segment seg [E, F, 6] (embedded: seg_emb) into the
        latents every env has (None before the first fold)."""
        has = torch.full(seg.shape[:1], latents is not None, dtype=torch.bool, device=seg.device)
        full = torch.ones(seg.shape[:2], dtype=torch.bool, device=seg.device)
        return self.encoder(latents, has, self.fold_inputs(seg_emb, seg, latents, has), full)

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        win, seg, seg_len = batch["win"], batch["seg"], batch["seg_len"]
        b, w = win.shape[:2]
        keep = self.cfg.keep_recent
        # Truncated backpropagation through the folds: only the newest bptt_segments slots get gradients
        # (and, with label_segments, labels); older ones are folded from the real history without a graph.
        k_bptt = self.cfg.bptt_segments
        n_old = max(0, seg.shape[1] - k_bptt) if k_bptt is not None else 0
        label_segments = self.cfg.label_segments and seg.shape[1] > n_old
        carried = "memory" in batch  # sampler.memory=carry: the memory before the first slot, from the last batch
        init = (batch["memory"], batch["has_memory"]) if carried else None
        latents, has, prefixes = self.compress(seg, seg_len, detach_old=self.cfg.detach_old_latents,
                                               return_prefixes=True, no_grad_slots=n_old, init=init)
        # The decoder window, plus (label_segments) every used compressed segment decoded as the window it
        # was in a rollout — from the latents that preceded it. Same encoder work, (d+1)x the labels.
        wins, prefix, has_p = [win], [latents], [has]
        if label_segments:
            if keep:  # kept window: slot j decoded with the keep_recent transitions after it
                seg = self.slot_windows(seg, win)
            labelled, s = seg[:, n_old:], seg.shape[2]  # [B, D', S, 6]: the slots folded with gradients
            used = seg_len[:, n_old:] > 0  # [B, D']
            pre_lat = torch.stack([p[0] for p in prefixes[n_old:]], dim=1)  # [B, D', n, d]: slot's memory
            pre_has = torch.stack([p[1] for p in prefixes[n_old:]], dim=1)  # [B, D']
            # static: every labelled slot decoded (unused ones are padding the loss masks by seg_len), fixed
            # shapes; else only the used (sample, slot) pairs, sample-major.
            static = self.static_path()
            rows = None if static else used.nonzero(as_tuple=True)
            pad = max(w, s)
            wins = [F.pad(win, (0, 0, 0, pad - w)), F.pad(_pick(labelled, rows), (0, 0, 0, pad - s))]
            prefix.append(_pick(pre_lat, rows))
            has_p.append(_pick(pre_has, rows))
        all_win = torch.cat(wins, dim=0)
        tokens = self.decoder.tokens(self.embed_transitions(all_win), all_win)
        all_prefix = None if latents is None else torch.cat(prefix, dim=0)
        logits = self.decoder(tokens, prefix=all_prefix, has_prefix=torch.cat(has_p, dim=0))
        out = {"logits": logits[:b, :w], "latents": latents, "has_latents": has}
        if label_segments:
            # [B, D', S, A], aligned with the batch's LAST D' slots; unused slots hold the logits of padding
            # (static) or zeros, masked by seg_len in the loss
            seg_logits = logits[b:, :s]
            if static:
                out["seg_logits"] = seg_logits.reshape(*used.shape, s, -1)
            else:
                zeros = seg_logits.new_zeros(*used.shape, s, seg_logits.shape[-1])
                out["seg_logits"] = zeros.index_put(rows, seg_logits)
        if keep:
            # Each action is labelled once, where a rollout predicts it: a window after the history's first
            # starts with keep_recent transitions an earlier window already predicted (positions < keep).
            pos = torch.arange(w, device=win.device)
            out["win_mask"] = (pos < batch["win_len"][:, None]) & (pos >= keep * has[:, None])
            if label_segments:
                pos = torch.arange(s, device=win.device)
                out["seg_target"] = action(labelled).long()
                out["seg_mask"] = used[..., None] & (pos >= keep * pre_has[..., None])
        if carried and seg.shape[1] > 0:
            # What the lane's next window needs: the memory after this sample's oldest fold (no graph).
            after = torch.stack([p[0] for p in prefixes[1:]] + [latents], dim=1).detach()  # [B, D, n, d]
            first = (seg.shape[1] - (seg_len > 0).sum(1)).clamp(max=seg.shape[1] - 1)  # first used slot
            out["next_memory"] = after[torch.arange(b, device=after.device), first]
        if self.recon is not None and latents is not None:
            # Auxiliary reconstruction (inside forward so DDP sees every parameter it uses).
            out["recon_pred"] = self.recon(latents, batch["seg"], seg_len)
        return out

    def slot_windows(self, seg: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """seg [B, D, F, 6] (rollout schedule: used slots exactly F = fold_len long, consecutive, right-aligned
        and followed by the window win [B, S, 6]) -> [B, D, S, 6]: slot j as the raw window a rollout had
        when it folded it, i.e. the slot followed by the first keep_recent transitions after it."""
        f, s = seg.shape[2], self.cfg.seg_len
        if f != self.cfg.fold_len:
            raise ValueError(f"kept window: segment slots hold {f} transitions, model.seg_len - model.keep_recent "
                             f"= {self.cfg.fold_len}; cut the batch with the rollout schedule at this model's "
                             "keep_recent")
        seq = torch.cat([seg.flatten(1, 2), win], dim=1)  # [B, D*F + S, 6]
        return seq.unfold(1, s, f)[:, : seg.shape[1]].transpose(-1, -2)  # window starts 0, F, .., (D-1)F

    # ---- teacher-forced replay of the rollout schedule ---------------------------------------------------
    @torch.no_grad()
    def rollout_logits(self, trans: torch.Tensor, memory_segments: int | None = None) -> torch.Tensor:
        """Logits [N, T, n_actions] of the action at every step of recorded histories trans [N, T, 6],
        each computed exactly as a rollout (`act` / `observe`) would have computed it had it taken the
        recorded actions (docs/design.md §7.1): window m is decoded in one causal pass from the latents of
        segments 0..m-1, which is what the KV-cached rollout computes one token at a time
        (tests/test_teacher_forced.py checks the equality).

        memory_segments=k rebuilds the latents of window m from only its last k segments (m-k .. m-1,
        folded from no memory); k=0 decodes every window without latents. None = the whole history.
        """
        n, t_len = trans.shape[:2]
        s, f, keep = self.cfg.seg_len, self.cfg.fold_len, self.cfg.keep_recent
        # Window m covers steps [m*F, m*F + S) and predicts S actions (m = 0) or its last F (keep_recent = S - F
        # were predicted by window m-1); segment j = steps [j*F, (j+1)*F) = the first F steps of window j.
        n_win = max(1, -(-(t_len - keep) // f))
        pad = (n_win - 1) * f + s - t_len  # the last, partial window is causal: its padding affects nothing before it
        padded = F.pad(trans.long(), (0, 0, 0, pad))
        wins = padded.unfold(1, s, f).transpose(-1, -2)  # [N, n_win, S, 6], overlapping by keep_recent
        emb = self.embed_transitions(wins)  # [N, n_win, S, d]
        if memory_segments is None:  # window m's memory: window m-1's with segment m-1 folded in
            prefixes = [None]
            for m in range(n_win - 1):
                prefixes.append(self.fold(prefixes[-1], wins[:, m, :f], emb[:, m, :f]))
        else:  # window m's memory folded afresh from segments m-k .. m-1
            prefixes = []
            for m in range(n_win):
                lat = None
                for j in range(max(0, m - int(memory_segments)), m):
                    lat = self.fold(lat, wins[:, j, :f], emb[:, j, :f])
                prefixes.append(lat)
        zeros = emb.new_zeros(n, self.cfg.n_latent, emb.shape[-1])
        prefix = torch.stack([zeros if p is None else p for p in prefixes], dim=1)  # [N, n_win, n, d]
        has = torch.tensor([p is not None for p in prefixes], device=trans.device).expand(n, n_win)
        tokens = self.decoder.tokens(emb.flatten(0, 1), wins.flatten(0, 1))
        logits = self.decoder(tokens, prefix=prefix.flatten(0, 1), has_prefix=has.reshape(-1))
        logits = logits.view(n, n_win, s, -1)
        # each step from the window that predicts it
        return torch.cat([logits[:, 0], logits[:, 1:, keep:].flatten(1, 2)], dim=1)[:, :t_len]

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
        tokens = self.decoder.tokens(self.embed_transitions(win), win)
        has = torch.full((e,), st.latents is not None, dtype=torch.bool, device=states.device)
        return self.decoder(tokens, prefix=st.latents, has_prefix=has)[:, -1]

    @torch.no_grad()
    def observe(self, st: RolloutState, trans: torch.Tensor) -> None:
        """Append the transition [E, 6] just taken. A full window folds its oldest fold_len transitions; the
        newest keep_recent stay as the start of the next window (positions 0 .. keep_recent-1, re-encoded
        after the new latent prefix)."""
        st.buffer[:, st.n_win] = trans.long()
        st.n_win += 1
        if st.n_win < self.cfg.seg_len:
            return
        f, keep = self.cfg.fold_len, self.cfg.keep_recent
        seg = st.buffer[:, :f]
        st.latents = self.fold(st.latents, seg, self.embed_transitions(seg))
        st.n_compressions += 1
        if keep:
            st.buffer[:, :keep] = st.buffer[:, f:].clone()
        st.n_win = keep
        st.cache = self.decoder.prefix_cache(st.latents) if st.use_cache else None
        if st.use_cache and keep:
            kept = st.buffer[:, :keep]
            tokens = self.decoder.tokens(self.embed_transitions(kept), kept)
            st.cache = self.decoder.extend(tokens, st.cache)


def _pick(x: torch.Tensor, rows: tuple | None) -> torch.Tensor:
    """x [B, D', ...] -> its (sample, slot) pairs `rows` (None: all of them) as [N, ...]."""
    return x.flatten(0, 1) if rows is None else x[rows]


def _pad_state(states: torch.Tensor) -> torch.Tensor:
    """States [E, 2] -> a [E, 1, 6] pseudo-transition whose only read field is the state."""
    out = torch.zeros(states.shape[0], 1, N_FIELDS, dtype=torch.long, device=states.device)
    out[:, 0, STATE] = states.long()
    return out


class LatentCarry:
    """sampler.memory=carry (docs/design.md §4.4, carried memory): the memory each batch row (a lane of
    schedules.carry_specs) carries from one micro-batch to the next: the one the lane's previous sample left
    after its oldest fold (stale by one optimizer step per fold it went through, and without a graph). A row
    whose memory is not held (the first batch after a start or a resume, or a lane that moved to another
    history) gets it folded exactly from step 0 of its history with the current weights, so the first memory
    after a resume is a pure function of (seed, step, weights)."""

    def __init__(self, dataset):
        self.dataset = dataset  # the HistoryBatches the batches come from (memory_batch: the exact fold's input)
        self.hist = self.index = self.latents = None  # per row: history, memory index j (= L_j), latents

    def attach(self, net: CompressedAD, batch: dict) -> dict:
        """`batch` plus 'memory' [B, n, d] / 'has_memory' [B]: L_{window - depth} of each row."""
        hist, need = batch["hist"], batch["window"] - batch["depth"]
        b = hist.shape[0]
        mem = torch.zeros(b, net.cfg.n_latent, net.cfg.d_model, device=batch["win"].device)
        has = need > 0
        hit = torch.zeros_like(has)
        if self.latents is not None and self.latents.shape[0] == b:
            hit = has & (self.hist == hist) & (self.index == need)
            mem = torch.where(hit[:, None, None], self.latents.to(mem.dtype), mem)
        miss = (has & ~hit).nonzero(as_tuple=True)[0]
        if miss.numel():
            ref = self.dataset.memory_batch(hist[miss].cpu().numpy(), need[miss].cpu().numpy())
            with torch.no_grad():
                lat, _ = net.compress(ref["seg"].to(mem.device), ref["seg_len"].to(mem.device))
            mem[miss] = lat.to(mem.dtype)
        return {**batch, "memory": mem, "has_memory": has}

    def update(self, batch: dict, out: dict) -> None:
        """Keep the memory after each row's oldest fold, L_{window - depth + 1}, for the lane's next window."""
        if "next_memory" not in out:
            self.latents = None
            return
        self.hist = batch["hist"]
        # rows without a fold (window 0) hold nothing the next window could need
        self.index = torch.where(batch["depth"] > 0, batch["window"] - batch["depth"] + 1, -1)
        self.latents = out["next_memory"].detach()
