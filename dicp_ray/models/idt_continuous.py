"""IDT for continuous actions (Meta-World): the In-context Decision Transformer (Huang et al., ICML 2024), our layout.

The grid-world (discrete) IDT is the release's layout in ``dicp_ray.models.idt_grid`` (``GridIDT``, acting and DICP-IDT
planning in ``dicp_ray.agents.idt_grid``); this module keeps our own layout, which the release's Meta-World IDT
(``release:metaworld/model/idt.py``) does not share, and ``CausalStack``, the backbone of both.

What it is
    A hierarchical in-context agent: three small causal Transformers built from model.py's blocks
    (pre-norm RMSNorm, rotary positions, SwiGLU MLP, SDPA attention), each ``spec.num_layers`` deep:

    * Making-Decisions (MD) reads one token per block of c = ``spec.block_len`` steps across the whole
      multi-episode context, token i = embed(return-to-go at the block start, observation at the block
      start, z of block i-1), and predicts a diagonal Gaussian over the block's high-level decision z_i.
    * Decisions-to-Go (DtG) reads the block's low-level tokens ``z_i, o_0, a_0, o_1 (+r_0), a_1, ...`` and
      predicts action a_t at o_t's token; with ``spec.world_model`` (DICP-IDT) it also predicts the reward and
      the next observation of (o_t, a_t) at a_t's token, the "query action".
    * Reviewing-Decisions (RD) encodes a finished block's transitions (o, a, r, o') into z (``spec.z_dim``),
      which MD reads as the previous decision of the next block.

    The action vector is embedded as it is, the action head is a diagonal Gaussian (mean and learned log-std
    clamped to model.py's [LOG_STD_MIN, LOG_STD_MAX], Gaussian NLL), the reward is regressed (clipped to
    [0, ``spec.reward_max``]) and so is the next observation, i.e. exactly AD's continuous heads and losses
    (model.py), read at IDT's token positions.

    Training windows hold ``context_episodes`` whole episodes of one history (``EpisodeWindowSampler``); their
    episodes are sorted by ascending return and the return-to-go relabelled so every episode starts at the best
    return of the window (``relabel_windows``; SPEC §4). ``train.windows_to_batch(windows, "idt", ...)`` turns
    them into the batch ``IDTTransformer.forward`` reads. ``IDTAgent`` acts in context on a batch of tasks, and
    ``IDTAgent.plan_action`` is DICP-IDT's depth-1 sampled search.

How it is used
    model = build_model(spec)                      # spec.layout == "idt", continuous (dicp_ray.models.transformer.build_model)
    preds, losses = model(batch, targets)          # same loss keys as AD: loss, loss_action, ...
    agent = IDTAgent(model, horizon, return_target=torch.as_tensor(spec.return_target), generator=gen)
    agent.start_episode(); a = agent.act(obs); agent.observe(a, reward, next_obs)   # once per step
    a = agent.plan_action(obs, num_samples=10)     # world model: instead of act (DICP-IDT)

Batch (B windows of k = E * H transitions, E episodes of H steps, k a multiple of c):
    ``ctx_obs (B,k,D), ctx_action (B,k,A), ctx_reward (B,k), ctx_next_obs (B,k,D), ctx_return_to_go (B,k)``, all
    float; targets ``target_action (B,k,A)``, and with the world model ``target_reward (B,k)`` and
    ``target_next_obs (B,k,D)``. Every step is a prediction target. Preds: ``action_mean``/``action_log_std``,
    ``reward`` / ``next_obs``, ``z_mean``/``z_log_std``.

Choices that are ours where the paper (and SPEC §4) is silent
    * One MD token per block (a linear embedding of the concatenated return-to-go, observation and previous z,
      plus a "no previous decision" flag on the window's first block), not one token per quantity.
    * z is continuous: RD outputs it deterministically, MD predicts a Gaussian (log-std clamped like AD's
      continuous policy). Training samples z_i with the reparameterisation trick and DtG acts on it, so the
      action loss trains all three modules end to end; there is no separate loss on z (as in the authors'
      release). A forward in eval mode uses the mean; ``IDTAgent`` samples by default.
    * DtG sees only its own block (all cross-episode information reaches it through z); the previous reward is
      folded into the observation token, so a block has 2c + 1 tokens. Rewards enter tokens unscaled (as in AD).
    * The world-model heads predict every step of every block (AD predicts one query per window).
    * Windows start at an episode start and hold whole episodes (AD windows start anywhere); the sort and the
      relabelling are per window, ties keep their time order, and the return-to-go of step t is the window's
      best return minus the rewards collected earlier in that episode. Returns-to-go are scaled by
      ``spec.return_scale`` = 1 / (10 x horizon) before embedding (train.model_spec_from_config), so they lie
      in [0, 1].
    * Acting, return target: the initial return-to-go of every episode is ``spec.return_target`` = the best
      episode return in the training data of the split's train tasks (``best_episode_return``, fixed when the
      model is built, so it is stored in the checkpoint and deterministic), the same for every test task
      (Meta-World has no known maximum; the release uses 10 x horizon).
    * Acting, context: the newest E-1 finished episodes sorted by ascending return, then the current episode,
      i.e. laid out like a training window (the release slides a window of blocks in time order instead).
    * Acting: ``act`` samples mean + std * N(0, 1) without clipping, like AD's ``plan.sample_policy_action``
      (the env clips; the caller records the executed, clipped action).
    * DICP-IDT: ``plan_action`` scores L candidates -- the policy mean and L-1 Gaussian samples, clipped to
      [-1, 1] -- by the reward DtG predicts at the candidate's query-action token after o_t, and returns the
      best (ties: the mean). Depth 1, as the paper plans Meta-World; the high-level decision z of the block is
      the one the agent already took (sampled), not searched over. Evaluation plans once the context holds E-1
      finished episodes (IDT's context is whole episodes), and with plan.second_half_only from the middle of
      each episode. AD's ``should_plan`` instead waits for k-1 transitions, i.e. the last step of episode E-1,
      so in a side-by-side run DICP-IDT starts planning up to one episode earlier than DICP-AD.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dicp_ray.models.blocks import CausalStack
from dicp_ray.models.idt_base import IDTBase
from dicp_ray.models.spec import LOG_STD_MAX, LOG_STD_MIN, ModelSpec
from dicp_ray.models.transformer import DICPTransformer

# ----------------------------------------------------------------------------- training windows


# ----------------------------------------------------------------------------- the model


class IDTTransformer(IDTBase):
    """Making-Decisions + Decisions-to-Go + Reviewing-Decisions (see the module docstring)."""

    # Feature encoding as DICPTransformer's (it reads self.spec and embed_transition, defined here too).
    _param_dtype = DICPTransformer._param_dtype
    _action_features = DICPTransformer._action_features
    _obs_features = DICPTransformer._obs_features

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, discrete=False)
        D, A, E, Z = spec.obs_dim, spec.action_in_dim, spec.embed_dim, spec.z_dim
        # Reviewing-Decisions: one token per transition (o, a, r, o'), z read at the block's last token.
        self.embed_transition = nn.Linear(2 * D + A + 1, E)
        self.reviewing_decisions = CausalStack(spec)
        self.head_review = nn.Linear(E, Z)
        # Making-Decisions: one token per block (return-to-go, obs, previous z, first-block flag).
        self.embed_decision = nn.Linear(1 + D + Z + 1, E)
        self.making_decisions = CausalStack(spec)
        self.head_decision = nn.Linear(E, 2 * Z)                        # Gaussian (mean, log_std) of z
        # Decisions-to-Go: z, then (o_t with r_{t-1}) and a_t tokens.
        self.embed_z = nn.Linear(Z, E)
        self.embed_obs = nn.Linear(D + 1, E)
        self.embed_action = nn.Linear(A, E)
        self.decisions_to_go = CausalStack(spec)
        self.head_action = nn.Linear(E, 2 * A)                          # (mean, log_std)
        if spec.world_model:
            self.head_reward = nn.Linear(E, spec.reward_classes or 1)
        if spec.has_next_obs_head:
            self.head_next_obs = nn.Linear(E, spec.num_obs_classes or D)
        self._init_parameters()

    # -- the three modules -------------------------------------------------------
    def review(self, obs, action, reward, next_obs) -> torch.Tensor:
        """Blocks (..., c, D), (..., c) | (..., c, A), (..., c), (..., c, D) -> their decisions z (..., Z)."""
        lead, c = obs.shape[:-2], obs.shape[-2]
        feats = torch.cat([self._obs_features(obs), self._action_features(action),
                           reward.to(self._param_dtype()).unsqueeze(-1), self._obs_features(next_obs)], dim=-1)
        hidden = self.reviewing_decisions(self.embed_transition(feats.reshape(-1, c, feats.shape[-1])))
        return self.head_review(hidden[:, -1]).reshape(*lead, self.spec.z_dim)

    def decide(self, return_to_go, obs, z_done) -> tuple[torch.Tensor, torch.Tensor]:
        """Block starts (B, L) return-to-go, (B, L, D) observation, and the reviewed z (B, >= L-1, Z) of the
        blocks before each -> mean and log-std (B, L, Z) of every block's decision (causal over blocks)."""
        B, L = return_to_go.shape
        dtype = self._param_dtype()
        z_prev = torch.cat([z_done.new_zeros(B, 1, self.spec.z_dim, dtype=dtype), z_done[:, : L - 1].to(dtype)],
                           dim=1)
        first = torch.zeros(B, L, 1, dtype=dtype, device=obs.device)
        first[:, 0] = 1.0
        rtg = return_to_go.to(dtype).unsqueeze(-1) * self.spec.return_scale
        feats = torch.cat([rtg, self._obs_features(obs), z_prev, first], dim=-1)
        mean, log_std = self.head_decision(self.making_decisions(self.embed_decision(feats))).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def low_level_tokens(self, z, obs, action, reward) -> torch.Tensor:
        """Decisions-to-Go input of blocks: z (N, Z), obs (N, T, D), action (N, T') | (N, T', A) with T' in {T-1, T},
        reward (N, >= T-1) -> (N, 1 + T + T', E) = z, o_0, a_0, o_1 (+r_0), a_1, ... (o_t at 1 + 2t)."""
        N, T = obs.shape[:2]
        Ta = action.shape[1]
        if Ta not in (T - 1, T):
            raise ValueError(f"low_level_tokens needs T or T-1 actions for T={T} observations, got {Ta}")
        prev_reward = torch.cat([reward.new_zeros(N, 1), reward[:, : T - 1]], dim=1).to(self._param_dtype())
        obs_tokens = self.embed_obs(torch.cat([self._obs_features(obs), prev_reward.unsqueeze(-1)], dim=-1))
        act_tokens = self.embed_action(self._action_features(action))                 # (N, Ta, E)
        if Ta < T:
            act_tokens = torch.cat([act_tokens, act_tokens.new_zeros(N, T - Ta, act_tokens.shape[-1])], dim=1)
        pairs = torch.stack([obs_tokens, act_tokens], dim=2).reshape(N, 2 * T, -1)[:, : T + Ta]
        return torch.cat([self.embed_z(z.to(self._param_dtype())).unsqueeze(1), pairs], dim=1)

    # -- training forward ------------------------------------------------------
    def forward(self, batch: dict, targets: dict | None = None, world_model_weight: float = 1.0):
        """Returns (preds, losses or None): ``action_logits (B,k,A)``, with the world model ``reward_logits
        (B,k,C)`` and ``next_obs_logits (B,k,81)``, and the decision Gaussians ``z_mean``/``z_log_std``
        (B, k/c, Z); continuous actions: ``action_mean``/``action_log_std (B,k,A)``, ``reward (B,k)`` and
        ``next_obs (B,k,D)``. Train mode samples each block's z; eval mode uses the mean."""
        obs, action, reward = batch["ctx_obs"], batch["ctx_action"], batch["ctx_reward"]
        next_obs, rtg = batch["ctx_next_obs"], batch["ctx_return_to_go"]
        B, k = action.shape[:2]
        c, D, Z = self.spec.block_len, self.spec.obs_dim, self.spec.z_dim
        if k % c:
            raise ValueError(f"IDT windows must hold whole blocks of {c} steps, got {k} steps")
        n = k // c

        def blocks(x):
            return x.reshape(B, n, c, *x.shape[2:])

        ob, ab, rb, nb = blocks(obs), blocks(action), blocks(reward), blocks(next_obs)
        z_done = (self.review(ob[:, :-1], ab[:, :-1], rb[:, :-1], nb[:, :-1]) if n > 1  # (B, n-1, Z)
                  else obs.new_zeros(B, 0, Z))
        mean, log_std = self.decide(rtg[:, ::c], ob[:, :, 0], z_done)                 # (B, n, Z)
        z = mean + log_std.exp() * torch.randn_like(mean) if self.training else mean
        tokens = self.low_level_tokens(z.reshape(B * n, Z), ob.reshape(B * n, c, D),
                                       ab.reshape(B * n, c, *ab.shape[3:]), rb.reshape(B * n, c))
        hidden = self.decisions_to_go(tokens)                                          # (B*n, 2c+1, E)
        h_obs = hidden[:, 1::2].reshape(B, k, -1)     # o_t tokens: the action of step t
        h_act = hidden[:, 2::2].reshape(B, k, -1)     # a_t tokens: reward and next obs / cell of (o_t, a_t)
        preds = {**self._action_preds(h_obs), **self._world_preds(h_act), "z_mean": mean, "z_log_std": log_std}
        losses = None if targets is None else self.compute_losses(preds, targets, world_model_weight)
        return preds, losses




__all__ = ["IDTTransformer"]
