"""IDT on the grid worlds as the authors' release trains it: whole-history windows and the three-module layout.

What it is
    The discrete-action In-context Decision Transformer (Huang et al., 2024) restated from the release
    (``release:gridworld/model/idt.py``, ``release:gridworld/dataset.py:207-267``). Three causal stacks
    (``dicp_ray.models.blocks.CausalStack``: model.py's pre-norm RoPE blocks), each with its own embedding tables; cells
    (``x * 9 + y``), actions and reward classes are looked up in ``nn.Embedding`` tables, as in the release:

    * Reviewing-Decisions (RD) reads a block of c = ``spec.block_len`` steps, one token per step =
      E(o) + E(a) + E(r) + E'(o'), and emits the block's decision distribution (mean, log-variance) of 2 * z_dim
      numbers at its last token.
    * Making-Decisions (MD) reads three tokens per block, [R, o, zd]: the return-to-go and the observation at the
      block start, then the embedded RD distribution zd of that block. It predicts the block's decision
      distribution (mean, log-variance) at the o token, so block i sees the RD output of blocks < i only.
    * Decisions-to-Go (DtG) reads one block, four tokens per step, [z_j, o_j, a_j, r_j]; z_j is an independent
      sample of the block's decision distribution for every step j (std = exp(log-variance / 2)). It predicts
      a_j at o_j's token and, with ``spec.world_model`` (DICP-IDT), the reward class and the next cell of
      (o_j, a_j) at a_j's token. It sees nothing outside its block: the other blocks reach it through z.

    Losses: cross-entropy of the action, and with the world model of the reward class and the next cell, at every
    step of every block (``DICPTransformer.compute_losses``); there is no loss on z.

Training windows (``HistoryWindowSampler``, restating ``release:gridworld/dataset.py:207-267``)
    Per history (one stream of one task, its whole length: the release reads the first 1000 steps of every
    stream, which is the whole stream of our Darkroom collection):
      1. return-to-go of step t = the rewards of its episode from t to the episode end;
      2. the episodes are reordered by ascending return (a stable sort: ties keep time order; the release's
         ``np.argsort`` is not stable, so equal-return episodes may come in another order there);
      3. every step's return-to-go is raised by (best return-to-go of the whole history - its episode's
         return), so every episode starts at the history's best return and the best one ends at its last reward.
    A window is then k = ``context_len`` consecutive rows of the sorted history starting at ANY row, so its
    blocks of c steps straddle episode ends, exactly as the release's ``__getitem__`` slices.

Choices where the release leaves room
    Returns-to-go are embedded unscaled (``spec.return_scale`` = 1 on the grid worlds), as in the release.
    The eval-mode forward (held-out losses) uses each block's mean decision; train mode samples, as the
    release always does. The backbone is model.py's block (final RMSNorm, GPT-2 init), as for AD.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dicp_ray.models.blocks import CausalStack
from dicp_ray.models.idt_base import IDTBase
from dicp_ray.models.spec import ModelSpec

GRID_CELLS_PER_ROW = 9  # grid observations (x, y) -> cell x * 9 + y (dicp_ray.envs.cell_index)


# ----------------------------------------------------------------------------- training windows


def grid_cells(obs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Grid observations (..., 2) (float or int coordinates) -> cells (...,) long (x * 9 + y)."""
    obs = torch.as_tensor(obs)
    if obs.dim() == 0 or obs.shape[-1] != 2:
        raise ValueError(f"grid observations must have shape (..., 2), got {tuple(obs.shape)}")
    obs = obs.round().long() if obs.dtype.is_floating_point else obs.long()
    return obs[..., 0] * GRID_CELLS_PER_ROW + obs[..., 1]


# ----------------------------------------------------------------------------- the model
class GridIDT(IDTBase):
    """Reviewing-Decisions + Making-Decisions + Decisions-to-Go in the release's layout (module docstring).

    Batch: ``ctx_obs (B,k) long`` cells, ``ctx_action (B,k) long``, ``ctx_reward (B,k)`` (0 / 1),
    ``ctx_next_obs (B,k) long`` cells, ``ctx_return_to_go (B,k) float``; targets as ``DICPTransformer``'s but at
    every step. Preds: ``action_logits (B,k,A)``, with the world model ``reward_logits (B,k,2)`` and
    ``next_obs_logits (B,k,C)``, and the decision distributions ``z_mean`` / ``z_log_var`` (B, k/c, Z).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, discrete=True)
        C, A, E, Z, R = spec.num_obs_classes, spec.num_actions, spec.embed_dim, spec.z_dim, spec.reward_classes
        # Reviewing-Decisions: summed per-step embeddings -> 2Z at the block's last step.
        self.rd_obs, self.rd_action = nn.Embedding(C, E), nn.Embedding(A, E)
        self.rd_reward, self.rd_next_obs = nn.Embedding(R, E), nn.Embedding(C, E)
        self.reviewing_decisions = CausalStack(spec)
        self.head_review = nn.Linear(E, 2 * Z)
        # Making-Decisions: [R, o, zd] per block -> 2Z at the o token.
        self.md_return, self.md_obs, self.md_z = nn.Linear(1, E), nn.Embedding(C, E), nn.Linear(2 * Z, E)
        self.making_decisions = CausalStack(spec)
        self.head_decision = nn.Linear(E, 2 * Z)
        # Decisions-to-Go: [z, o, a, r] per step.
        self.embed_z, self.embed_obs = nn.Linear(Z, E), nn.Embedding(C, E)
        self.embed_action, self.embed_reward = nn.Embedding(A, E), nn.Embedding(R, E)
        self.decisions_to_go = CausalStack(spec)
        self.head_action = nn.Linear(E, A)
        if spec.world_model:
            self.head_reward = nn.Linear(E, R)
            self.head_next_obs = nn.Linear(E, C)
        self._init_parameters()

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Refuse, by name, weights of the grid IDT dicp_ray had before this layout (one token per block)."""
        if "embed_decision.weight" in state_dict:
            raise RuntimeError("this checkpoint holds the earlier per-window grid IDT (dicp_ray before the "
                               "release's layout, dicp_ray/models/idt_grid.py); retrain it with the current dicp_ray")
        return super().load_state_dict(state_dict, *args, **kwargs)

    # -- the three modules -------------------------------------------------------
    def review(self, obs, action, reward, next_obs) -> torch.Tensor:
        """Blocks (..., c) cells, actions, reward classes, next cells -> decision distributions (..., 2Z)."""
        lead, c = obs.shape[:-1], obs.shape[-1]
        tokens = (self.rd_obs(obs) + self.rd_action(action) + self.rd_reward(reward.long())
                  + self.rd_next_obs(next_obs)).reshape(-1, c, self.spec.embed_dim)
        return self.head_review(self.reviewing_decisions(tokens)[:, -1]).reshape(*lead, 2 * self.spec.z_dim)

    def low_level_tokens(self, z, obs, action, reward) -> torch.Tensor:
        """One block's DtG tokens: z (N, T, Z) samples, cells (N, T), actions (N, Ta), rewards (N, Tr) with
        T >= Ta >= Tr >= Ta - 1 >= T - 2 -> (N, L, E) = [z_0, o_0, a_0, r_0, z_1, ...] up to the last given."""
        N, T = obs.shape
        Ta, Tr = action.shape[1], reward.shape[1]
        if not (T - 1 <= Tr <= Ta <= T):
            raise ValueError(f"low_level_tokens: {T} obs, {Ta} actions and {Tr} rewards do not form a prefix")
        parts = [self.embed_z(z[:, :T].to(self._param_dtype())), self.embed_obs(obs),
                 self.embed_action(F.pad(action, (0, T - Ta))), self.embed_reward(F.pad(reward.long(), (0, T - Tr)))]
        tokens = torch.stack(parts, dim=2).reshape(N, 4 * T, -1)
        return tokens[:, : 4 * T - 2 + (Ta - T + 1) + (Tr - T + 1)]

    # -- training forward ------------------------------------------------------
    def forward(self, batch: dict, targets: dict | None = None, world_model_weight: float = 1.0):
        obs, action, reward = batch["ctx_obs"], batch["ctx_action"], batch["ctx_reward"]
        next_obs, rtg = batch["ctx_next_obs"], batch["ctx_return_to_go"]
        B, k = action.shape
        c, Z = self.spec.block_len, self.spec.z_dim
        if k % c:
            raise ValueError(f"IDT windows must hold whole blocks of {c} steps, got {k} steps")
        n = k // c

        def blocks(x):
            return x.reshape(B, n, c)

        ob, ab, rb, nb = blocks(obs), blocks(action), blocks(reward.long()), blocks(next_obs)
        z_dists = self.review(ob, ab, rb, nb)                                             # (B, n, 2Z)
        mean, log_var = self.decide(rtg[:, ::c], ob[:, :, 0], z_dists)                    # (B, n, Z)
        std = (log_var / 2).exp()
        mean_c, std_c = (x.unsqueeze(2).expand(B, n, c, Z) for x in (mean, std))
        z = mean_c + std_c * torch.randn_like(mean_c) if self.training else mean_c        # (B, n, c, Z)
        tokens = self.low_level_tokens(z.reshape(B * n, c, Z), ob.reshape(B * n, c), ab.reshape(B * n, c),
                                       rb.reshape(B * n, c))
        hidden = self.decisions_to_go(tokens)                                             # (B*n, 4c, E)
        h_obs = hidden[:, 1::4].reshape(B, k, -1)
        h_act = hidden[:, 2::4].reshape(B, k, -1)
        preds = {**self._action_preds(h_obs), **self._world_preds(h_act), "z_mean": mean, "z_log_var": log_var}
        losses = None if targets is None else self.compute_losses(preds, targets, world_model_weight)
        return preds, losses


__all__ = ["GridIDT", "grid_cells"]
