"""Acting and planning in context with the Meta-World IDT (``dicp_ray.models.idt_continuous.IDTTransformer``).

What it is
    ``IDTAgent`` acts on N tasks in lockstep as the release's ``evaluate_in_context`` does
    (``release:metaworld/model/idt.py:77-150``), with the acting loop of the grid-world agent it extends
    (``dicp_ray.agents.idt_grid.GridIDTAgent``: the same context, snapshots and decisions): every c =
    ``block_len`` steps Making-Decisions reads a sliding, time-ordered window of the newest n = context_len / c
    blocks ([R, o, zd] per block, the current block's zd left out) and gives the block's decision distribution;
    c independent samples z_0..z_{c-1} of it drive Decisions-to-Go for the block's c steps; the finished block is
    reviewed into its zd. Every episode starts at return-to-go ``return_target`` (``spec.return_target`` = 10 x
    horizon = 1000 on Meta-World, ``:90``), and each block starts at the previous block's return-to-go minus that
    block's rewards (``:139``). ``act`` samples the action head's Gaussian, unclipped (the env clips; the caller
    records the executed action).

    ``plan_action`` is DICP-IDT's depth-1 sampled search inside Decisions-to-Go (``greedy_search``, ``:371-411``;
    SPEC §5): L = ``num_samples`` candidates, the policy mean then L-1 samples of the policy Gaussian, each scored
    by the reward Decisions-to-Go predicts at the candidate's action token after o_t; the best is executed (ties:
    the mean). Ours: candidates are clipped to [-1, 1] before scoring (docs/fidelity.md row 14).

    When to plan (``plan_ready``, ``:103``): for the whole block, iff at its first step the agent had taken at
    least ``context_len`` steps (the release's ``step >= n_transit``) and, with ``second_half_only`` (every
    Meta-World config; the release always), the block starts after step horizon // 2 (``step % horizon >
    beam_start = 50``): at horizon 100 and c = 10 the blocks starting at 60, 70, 80 and 90.

How it is used (through ``dicp_ray.agents.agent.HierarchicalAgent`` or directly)
    agent = IDTAgent(model.eval(), horizon=100, return_target=torch.full((N,), 1000.0), generator=g)
    agent.start_episode()
    a = agent.plan_action(obs, 10) if agent.plan_ready else agent.act(obs); agent.observe(a, reward, next_obs)
"""
from __future__ import annotations

import torch
from torch import Tensor

from dicp_ray.agents.idt_grid import GridIDTAgent
from dicp_ray.models.idt_continuous import IDTTransformer


def _normal(shape, generator, like: Tensor) -> Tensor:
    """float64 standard normals drawn on the generator's device, cast to `like` (as plan.py draws them)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(like)


class IDTAgent(GridIDTAgent):
    """IDT / DICP-IDT acting of an ``IDTTransformer`` on N tasks (module docstring). Per step: ``act(obs)`` or
    ``plan_action(obs, num_samples)`` -> (N, A) actions, then ``observe(action, reward, next_obs)``; call
    ``start_episode()`` before each episode. Deterministic for a generator state."""

    def __init__(self, model: IDTTransformer, horizon: int, return_target, generator: torch.Generator | None = None,
                 sample_decisions: bool = True, second_half_only: bool = True):
        if model.spec.discrete_actions:
            raise ValueError("IDTAgent is the continuous (Meta-World) IDT's agent; grid IDTs use GridIDTAgent")
        self.second_half_only = second_half_only
        super().__init__(model, horizon, return_target, generator, sample_decisions)

    def _empty_context(self) -> dict[str, Tensor]:
        N, Z, D = self.num_tasks, self.model.spec.z_dim, self.model.spec.obs_dim
        zeros = dict(device=self.device, dtype=self.dtype)
        return {"return_to_go": torch.zeros(N, 0, **zeros), "obs": torch.zeros(N, 0, D, **zeros),
                "z_dists": torch.zeros(N, 0, 2 * Z, **zeros)}

    @property
    def plan_ready(self) -> bool:
        """Whether the current block is planned: at its first step >= context_len steps were taken and (with
        ``second_half_only``) it starts after step horizon // 2 of the episode (the release's rule)."""
        j = (self.t or 0) % self.model.spec.block_len
        block_start = (self.t or 0) - j
        return (self.steps_taken - j >= self.model.spec.context_len
                and (not self.second_half_only or block_start > self.horizon // 2))

    # -- acting ------------------------------------------------------------------
    def start_episode(self) -> None:
        if self.t not in (None, self.horizon) and self.t != 0:
            raise RuntimeError(f"start_episode() in the middle of an episode (step {self.t} of {self.horizon})")
        spec, N, zeros = self.model.spec, self.num_tasks, dict(device=self.device, dtype=self.dtype)
        c, D, A = spec.block_len, spec.obs_dim, spec.num_actions
        self.t = 0
        self._block = {"obs": torch.zeros(N, c, D, **zeros), "action": torch.zeros(N, c, A, **zeros),
                       "reward": torch.zeros(N, c, **zeros), "next_obs": torch.zeros(N, c, D, **zeros)}

    @torch.no_grad()
    def _step_tokens(self, obs) -> Tensor:
        """Record o_t (deciding at a block start) -> the block's DtG tokens up to o_t (N, 4j + 2, E)."""
        if self.t is None or self.t >= self.horizon:
            raise RuntimeError("call start_episode() before acting in a new episode")
        j, blk = self.t % self.model.spec.block_len, self._block
        blk["obs"][:, j] = torch.as_tensor(obs).to(self.device, self.dtype).reshape(self.num_tasks, -1)
        if j == 0:
            self._decide()
        return self.model.low_level_tokens(self.z, blk["obs"][:, : j + 1], blk["action"][:, :j],
                                           blk["reward"][:, :j])

    @torch.no_grad()
    def policy(self, obs) -> tuple[Tensor, Tensor]:
        """(N, D) observations -> the action Gaussian's (mean, log_std), each (N, A), at o_t (once per step)."""
        return self.model.action_head(self.model.decisions_to_go(self._step_tokens(obs))[:, -1])

    def act(self, obs) -> Tensor:
        """(N, D) observations -> (N, A) samples mean + std * N(0, 1), unclipped, like plan.sample_policy_action."""
        mean, log_std = self.policy(obs)
        return mean + log_std.exp() * _normal(mean.shape, self.generator, mean)

    @torch.no_grad()
    def plan_action(self, obs, num_samples: int = 10) -> Tensor:
        """DICP-IDT, depth 1: (N, D) observations -> (N, A) the best of L = `num_samples` candidates (the policy
        mean, then L-1 samples of its Gaussian, clipped to [-1, 1]) by the reward predicted at the candidate's
        action token after o_t; ties go to the mean (the release sorts unstably)."""
        spec = self.model.spec
        if not spec.world_model:
            raise ValueError("IDTAgent.plan_action needs an IDT trained with the world model (model.world_model=true)")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        tokens = self._step_tokens(obs)                                                   # (N, P, E), ends at o_t
        mean, log_std = self.model.action_head(self.model.decisions_to_go(tokens)[:, -1])  # (N, A) each
        N, L, A = mean.shape[0], num_samples, spec.num_actions
        noise = _normal((N, L - 1, A), self.generator, mean)
        cands = torch.cat([mean[:, None], mean[:, None] + log_std.exp()[:, None] * noise], dim=1).clamp(-1.0, 1.0)
        reward = self.predicted_rewards(tokens, cands)                                    # (N, L)
        best = reward.argmax(dim=1)                                                       # first max wins
        return cands[torch.arange(N, device=best.device), best]

    @torch.no_grad()
    def predicted_rewards(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """DtG tokens up to o_t (N, P, E) and candidate actions (N, L, A) -> predicted rewards (N, L) of (o_t, a)."""
        N, L = actions.shape[:2]
        act_tokens = self.model.embed_action(actions.flatten(0, 1).to(self.dtype))                # (N*L, E)
        seq = torch.cat([tokens.repeat_interleave(L, dim=0), act_tokens[:, None]], dim=1)         # (N*L, P+1, E)
        return self.model.reward_head(self.model.decisions_to_go(seq)[:, -1]).view(N, L)

    @torch.no_grad()
    def world_preds(self, action) -> dict:
        """The world model's predictions (``reward``, ``next_obs`` with that head) for `action` (N, A) at the current
        step t, whose observation `act` / `plan_action` has recorded: Decisions-to-Go's block tokens up to o_t, then
        the action's token. Used by dicp_ray.agents.agent (Meta-World's adapter predicts evaluation rewards)."""
        j, blk = self.t % self.model.spec.block_len, self._block
        tokens = self.model.low_level_tokens(self.z, blk["obs"][:, : j + 1], blk["action"][:, :j], blk["reward"][:, :j])
        action_token = self.model.embed_action(torch.as_tensor(action).to(self.device, self.dtype))
        hidden = self.model.decisions_to_go(torch.cat([tokens, action_token[:, None]], dim=1))[:, -1]
        return self.model._world_preds(hidden)

    @torch.no_grad()
    def observe(self, action, reward, next_obs) -> None:
        """Record the outcome of step t; reviews a finished block and closes a finished episode."""
        c, j, blk = self.model.spec.block_len, self.t % self.model.spec.block_len, self._block
        blk["action"][:, j] = torch.as_tensor(action).to(self.device, self.dtype).reshape(self.num_tasks, -1)
        blk["reward"][:, j] = torch.as_tensor(reward).to(self.device, self.dtype).reshape(-1)
        blk["next_obs"][:, j] = torch.as_tensor(next_obs).to(self.device, self.dtype).reshape(self.num_tasks, -1)
        self.t, self.steps_taken = self.t + 1, self.steps_taken + 1
        if j == c - 1:
            zd = self.model.review(blk["obs"], blk["action"], blk["reward"], blk["next_obs"])   # (N, 2Z)
            self._context["z_dists"] = torch.cat([self._context["z_dists"], zd[:, None].to(self.dtype)], dim=1)
            self._last_block_reward = blk["reward"].sum(dim=1)
        if self.t == self.horizon:
            self.num_finished += 1
            self._snapshot = self._copy_context()


__all__ = ["IDTAgent"]
