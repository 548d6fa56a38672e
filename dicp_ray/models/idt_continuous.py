"""IDT for continuous actions (Meta-World) as the authors' release builds it (``release:metaworld/model/idt.py``).

What it is
    The In-context Decision Transformer (Huang et al., ICML 2024) with the release's Meta-World layout; the
    grid-world IDT (``dicp_ray.models.idt_grid.GridIDT``) is the same three modules over cells. Three causal
    stacks (``blocks.CausalStack``, ``spec.num_layers`` deep; ``spec.backbone`` "release" = the release's
    TinyLlama blocks, the ``auto`` choice on Meta-World), each with its own linear embeddings of the raw
    observation, action, reward and return-to-go vectors:

    * Reviewing-Decisions (RD) reads a block of c = ``spec.block_len`` steps, one token per step =
      L(o) + L(a) + L(r) + L'(o') (``release:metaworld/model/idt.py:183-198``), and emits the block's decision
      distribution (mean, log-variance), 2 * z_dim numbers, at its last token.
    * Making-Decisions (MD) reads three tokens per block, [R, o, zd] (``:213-237``): the return-to-go and the
      observation at the block start, then the embedded RD distribution zd of that block. It predicts the
      block's decision distribution at the o token, so block i sees the RD output of blocks < i only.
    * Decisions-to-Go (DtG) reads one block, four tokens per step, [z_j, o_j, a_j, r_j] (``:269-299``); z_j is an
      independent sample of the block's decision distribution for every step j (std = exp(log-variance / 2),
      ``:152-157``). It predicts a_j at o_j's token (a Gaussian: mean and log-std) and, with ``spec.world_model``
      (DICP-IDT), the reward (and with ``spec.next_obs_loss`` the next observation) of (o_j, a_j) at a_j's token.
      It sees nothing outside its block: the other blocks reach it through z.

    Losses (``DICPTransformer.compute_losses``, as continuous AD): Gaussian action NLL averaged over the batch and
    the action dims, reward MSE with the prediction clipped to [0, ``spec.reward_max``], next-observation MSE only
    with ``spec.next_obs_loss``; at every step of every block; no loss on z (as the release).

    Training windows: ``dicp_ray.data.idt_windows.HistoryWindowSampler`` (the release's ``IDTDataset``): each
    history sorted by episode return, its return-to-go relabelled to the history's best return, windows of
    k = ``context_len`` rows starting anywhere. Acting: ``dicp_ray.agents.idt_continuous.IDTAgent``.

Where it is ours (kept on purpose)
    * The action head's second half is a log-std clamped to [LOG_STD_MIN, LOG_STD_MAX] (continuous AD's head);
      the release predicts a log-variance, unclamped. Same family of Gaussians.
    * Returns-to-go are multiplied by ``spec.return_scale`` before embedding; Meta-World sets 1.0, the
      release's raw return-to-go (up to 10 x horizon = 1000).
    * The eval-mode forward (held-out losses) uses each block's mean decision; train mode samples, as the
      release always does. ``IDTAgent`` samples (``sample_decisions=False`` uses the mean).

How it is used
    model = build_model(spec)        # spec.layout == "idt", continuous actions (models.checkpoints.build_model)
    preds, losses = model(batch, targets)

Batch: ``ctx_obs (B,k,D), ctx_action (B,k,A), ctx_reward (B,k), ctx_next_obs (B,k,D), ctx_return_to_go (B,k)``
(floats, k a multiple of c); targets ``target_action (B,k,A)`` and with the world model ``target_reward (B,k)``
(``target_next_obs (B,k,D)``). Preds: ``action_mean``/``action_log_std (B,k,A)``, ``reward (B,k)``
(``next_obs``), ``z_mean``/``z_log_var (B,k/c,Z)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dicp_ray.models.blocks import CausalStack
from dicp_ray.models.idt_base import IDTBase
from dicp_ray.models.spec import ModelSpec

# Parameter names only dicp_ray's earlier continuous IDT had (one MD token per block, 2c+1 DtG tokens).
_EARLIER_LAYOUT_KEYS = ("embed_decision.weight", "embed_transition.weight")


class IDTTransformer(IDTBase):
    """Reviewing-Decisions + Making-Decisions + Decisions-to-Go in the release's Meta-World layout (module doc)."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, discrete=False)
        D, A, E, Z = spec.obs_dim, spec.num_actions, spec.embed_dim, spec.z_dim
        # Reviewing-Decisions: summed per-step embeddings -> 2Z at the block's last step.
        self.rd_obs, self.rd_action = nn.Linear(D, E), nn.Linear(A, E)
        self.rd_reward, self.rd_next_obs = nn.Linear(1, E), nn.Linear(D, E)
        self.reviewing_decisions = CausalStack(spec)
        self.head_review = nn.Linear(E, 2 * Z)
        # Making-Decisions: [R, o, zd] per block -> 2Z at the o token.
        self.md_return, self.md_obs, self.md_z = nn.Linear(1, E), nn.Linear(D, E), nn.Linear(2 * Z, E)
        self.making_decisions = CausalStack(spec)
        self.head_decision = nn.Linear(E, 2 * Z)
        # Decisions-to-Go: [z, o, a, r] per step.
        self.embed_z, self.embed_obs = nn.Linear(Z, E), nn.Linear(D, E)
        self.embed_action, self.embed_reward = nn.Linear(A, E), nn.Linear(1, E)
        self.decisions_to_go = CausalStack(spec)
        self.head_action = nn.Linear(E, 2 * A)                           # (mean, log_std)
        if spec.world_model:
            self.head_reward = nn.Linear(E, 1)
        if spec.has_next_obs_head:
            self.head_next_obs = nn.Linear(E, D)
        self._init_parameters()

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self._param_dtype())

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Refuse, by name, weights of the continuous IDT dicp_ray had before the release's layout."""
        if any(key in state_dict for key in _EARLIER_LAYOUT_KEYS):
            raise RuntimeError("this checkpoint holds dicp_ray's earlier continuous IDT (one Making-Decisions token "
                               "per block, before the release's Meta-World layout, dicp_ray/models/idt_continuous.py);"
                               " retrain it with the current dicp_ray")
        return super().load_state_dict(state_dict, *args, **kwargs)

    # -- the three modules -------------------------------------------------------
    def review(self, obs, action, reward, next_obs) -> torch.Tensor:
        """Blocks (..., c, D), (..., c, A), (..., c), (..., c, D) -> decision distributions (..., 2Z)."""
        lead, c = obs.shape[:-2], obs.shape[-2]
        f = self._f
        tokens = (self.rd_obs(f(obs)) + self.rd_action(f(action)) + self.rd_reward(f(reward).unsqueeze(-1))
                  + self.rd_next_obs(f(next_obs))).reshape(-1, c, self.spec.embed_dim)
        return self.head_review(self.reviewing_decisions(tokens)[:, -1]).reshape(*lead, 2 * self.spec.z_dim)

    def low_level_tokens(self, z, obs, action, reward) -> torch.Tensor:
        """One block's DtG tokens: z (N, T, Z) samples, obs (N, T, D), actions (N, Ta, A), rewards (N, Tr) with
        T >= Ta >= Tr >= Ta - 1 >= T - 2 -> (N, L, E) = [z_0, o_0, a_0, r_0, z_1, ...] up to the last given."""
        N, T = obs.shape[:2]
        Ta, Tr = action.shape[1], reward.shape[1]
        if not (T - 1 <= Tr <= Ta <= T):
            raise ValueError(f"low_level_tokens: {T} obs, {Ta} actions and {Tr} rewards do not form a prefix")
        f, E = self._f, self.spec.embed_dim

        def pad(x):                                                      # (N, t, E) -> (N, T, E)
            return torch.cat([x, x.new_zeros(N, T - x.shape[1], E)], dim=1)

        parts = [self.embed_z(f(z[:, :T])), self.embed_obs(f(obs)), pad(self.embed_action(f(action))),
                 pad(self.embed_reward(f(reward).unsqueeze(-1)))]
        tokens = torch.stack(parts, dim=2).reshape(N, 4 * T, E)
        return tokens[:, : 4 * T - 2 + (Ta - T + 1) + (Tr - T + 1)]

    # -- training forward ------------------------------------------------------
    def forward(self, batch: dict, targets: dict | None = None, world_model_weight: float = 1.0):
        """Returns (preds, losses or None); see the module docstring. Train mode samples z, eval mode uses means."""
        obs, action, reward = batch["ctx_obs"], batch["ctx_action"], batch["ctx_reward"]
        next_obs, rtg = batch["ctx_next_obs"], batch["ctx_return_to_go"]
        B, k = action.shape[:2]
        c, Z = self.spec.block_len, self.spec.z_dim
        if k % c:
            raise ValueError(f"IDT windows must hold whole blocks of {c} steps, got {k} steps")
        n = k // c

        def blocks(x):
            return x.reshape(B, n, c, *x.shape[2:])

        ob, ab, rb, nb = blocks(obs), blocks(action), blocks(reward), blocks(next_obs)
        z_dists = self.review(ob, ab, rb, nb)                                             # (B, n, 2Z)
        mean, log_var = self.decide(rtg[:, ::c], ob[:, :, 0], z_dists)                    # (B, n, Z)
        mean_c, std_c = (x.unsqueeze(2).expand(B, n, c, Z) for x in (mean, (log_var / 2).exp()))
        z = mean_c + std_c * torch.randn_like(mean_c) if self.training else mean_c        # (B, n, c, Z)
        tokens = self.low_level_tokens(z.reshape(B * n, c, Z), ob.flatten(0, 1), ab.flatten(0, 1),
                                       rb.flatten(0, 1))
        hidden = self.decisions_to_go(tokens)                                             # (B*n, 4c, E)
        h_obs = hidden[:, 1::4].reshape(B, k, -1)      # o_j tokens: the action of step j
        h_act = hidden[:, 2::4].reshape(B, k, -1)      # a_j tokens: reward (and next obs) of (o_j, a_j)
        preds = {**self._action_preds(h_obs), **self._world_preds(h_act), "z_mean": mean, "z_log_var": log_var}
        losses = None if targets is None else self.compute_losses(preds, targets, world_model_weight)
        return preds, losses


__all__ = ["IDTTransformer"]
