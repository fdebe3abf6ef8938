"""AD baseline (Laskin et al. 2022): the same decoder with no latents and a sliding window.

Training windows are `context_len` consecutive transitions (depth-0 batches). In rollout the model sees
the last context_len steps; the window slides every step, so positions shift and the whole window is
recomputed (cost per step is constant in the history length, but the history beyond the window is lost).
"""

from __future__ import annotations

import torch

from model.compressed_ad import RolloutState, _pad_state
from model.compressor import TransitionEmbedding
from model.config import ModelConfig
from model.decoder import ActionDecoder
from model.transformer import init_weights
from transition import N_FIELDS


class AD(TransitionEmbedding):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = ActionDecoder(cfg, n_prefix=0, max_len=cfg.context_len)
        init_weights(self)

    def forward(self, batch: dict) -> dict:
        win = batch["win"]
        tokens = self.decoder.tokens(self.embed_transitions(win), win)
        return {"logits": self.decoder(tokens)}

    @torch.no_grad()
    def rollout_logits(self, trans: torch.Tensor, memory_segments: int | None = None,
                       chunk: int = 4096) -> torch.Tensor:
        """Logits [N, T, n_actions] of the action at every step of recorded histories trans [N, T, 6], each
        computed as `act` computes it in a rollout: from the window of the last context_len steps (fewer at
        the start), read at its LAST position. Steps t < context_len are the prefixes of the first window
        (one causal pass); every later step is the last position of its own window trans[t-L+1 .. t],
        evaluated `chunk` windows at a time. AD has no compressed memory: memory_segments must be None."""
        if memory_segments is not None:
            raise ValueError("AD has no compressed memory to probe (memory_segments applies to CompressedAD)")
        n, t_len = trans.shape[:2]
        L = self.cfg.context_len
        trans = trans.long()
        first = self.forward({"win": trans[:, :min(L, t_len)]})["logits"]  # steps 0 .. min(L, T)-1
        if t_len <= L:
            return first
        out = [first]
        per = max(1, chunk // n)  # windows per history in one pass
        for a in range(1, t_len - L + 1, per):  # window start a gives the action at step a + L - 1
            b = min(a + per, t_len - L + 1)
            wins = trans[:, a:b + L - 1].unfold(1, L, 1).permute(0, 1, 3, 2)  # [N, b-a, L, 6]
            lg = self.forward({"win": wins.reshape(-1, L, N_FIELDS)})["logits"][:, -1]
            out.append(lg.view(n, b - a, -1))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def init_rollout(self, n_envs: int, device, use_cache: bool = False) -> RolloutState:
        # Holds the last context_len - 1 transitions: with the current state they make a full window.
        buf = torch.zeros(n_envs, max(self.cfg.context_len - 1, 1), N_FIELDS, dtype=torch.long, device=device)
        return RolloutState(buffer=buf, use_cache=False)

    @torch.no_grad()
    def act(self, st: RolloutState, states: torch.Tensor) -> torch.Tensor:
        win = torch.cat([st.buffer[:, : st.n_win], _pad_state(states)], dim=1)
        return self.forward({"win": win})["logits"][:, -1]

    @torch.no_grad()
    def observe(self, st: RolloutState, trans: torch.Tensor) -> None:
        cap = self.cfg.context_len - 1
        if cap == 0:
            return
        if st.n_win < cap:
            st.buffer[:, st.n_win] = trans.long()
            st.n_win += 1
        else:  # slide: drop the oldest transition
            st.buffer = torch.cat([st.buffer[:, 1:], trans.long()[:, None]], dim=1)
