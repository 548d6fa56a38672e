"""Acting in context with the continuous (Meta-World) IDT: ``IDTAgent`` over a batch of tasks in lockstep.

Split out of `dicp_ray.models.idt_continuous` (the model and its training windows); `dicp_ray.agents.agent.HierarchicalAgent` drives it.
"""
from __future__ import annotations

import torch

from dicp_ray.models.idt_continuous import IDTTransformer


# ----------------------------------------------------------------------------- acting in context
def _normal(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """float64 standard normals drawn on the generator's device, cast to `like` (as plan.py draws them)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(like)


class IDTAgent:
    """In-context acting of an IDTTransformer on N tasks in lockstep (every episode lasts `horizon` steps).

    ``start_episode()`` before each episode, then per step ``act(obs)`` -> (N, A) actions (sampled from the
    action head's Gaussian; ``policy(obs)`` gives its (mean, log_std)) or ``plan_action(obs, L)`` (world model:
    depth-1 sampled search), and ``observe(action, reward, next_obs)``. A new
    decision z is taken every ``block_len`` steps, the finished block is reviewed into z, and the context is
    the newest E-1 finished episodes sorted by ascending return followed by the current one, E =
    ``context_len // horizon``. `return_target` (N,) is every episode's initial return-to-go.
    `sample_decisions=False` uses each decision's mean instead of a sample (then the action logits are exactly
    those of the model's eval-mode forward on the same window). Deterministic for a generator state.
    ``num_finished`` counts the finished episodes in the context (at most E-1).
    """

    def __init__(self, model: IDTTransformer, horizon: int, return_target: torch.Tensor,
                 generator: torch.Generator | None = None, sample_decisions: bool = True):
        spec = model.spec
        if model.training:
            raise ValueError("call model.eval() before acting: dropout would make it random")
        if horizon % spec.block_len or spec.context_len % horizon:
            raise ValueError(f"horizon {horizon} must be a multiple of block_len {spec.block_len} and divide "
                             f"context_len {spec.context_len}")
        param = next(model.parameters())
        self.model, self.horizon, self.generator, self.sample_decisions = model, horizon, generator, sample_decisions
        self.device, self.dtype = param.device, param.dtype
        self.target = torch.as_tensor(return_target).to(self.device, self.dtype).reshape(-1)
        self.num_tasks = self.target.shape[0]
        self.context_episodes = spec.context_len // horizon
        self.finished: dict[str, torch.Tensor] | None = None    # (N, m, ...) with m <= E-1, oldest first
        self.current: dict[str, torch.Tensor] | None = None
        self.t, self.z = 0, None

    def start_episode(self) -> None:
        N, H, D, Z = self.num_tasks, self.horizon, self.model.spec.obs_dim, self.model.spec.z_dim
        zeros = dict(device=self.device, dtype=self.dtype)
        action = torch.zeros(N, H, self.model.spec.num_actions, **zeros)
        self.current = {"obs": torch.zeros(N, H, D, **zeros), "next_obs": torch.zeros(N, H, D, **zeros),
                        "action": action,
                        "reward": torch.zeros(N, H, **zeros), "return_to_go": torch.zeros(N, H, **zeros),
                        "z": torch.zeros(N, H // self.model.spec.block_len, Z, **zeros)}
        self.t, self.z = 0, None

    def finished_episodes(self) -> dict[str, torch.Tensor] | None:
        """A copy of the finished episodes in context (None before the first ends), for `restore_finished`."""
        return None if self.finished is None else {name: x.clone() for name, x in self.finished.items()}

    def restore_finished(self, episodes: dict[str, torch.Tensor] | None) -> None:
        """Go back to a copy of `finished_episodes()`, dropping the episode in progress; the next `act` starts one."""
        self.finished = None if episodes is None else {name: x.clone() for name, x in episodes.items()}
        self.current, self.t, self.z = None, 0, None

    @property
    def num_finished(self) -> int:
        """Finished episodes in the context (0 .. E-1): the context is full at E-1."""
        return 0 if self.finished is None else int(self.finished["obs"].shape[1])

    @torch.no_grad()
    def policy(self, obs):
        """Record the observation of step t (and, at a block start, take a decision) -> (mean, log_std), each
        (N, A). Call once per step (or `act` / `plan_action`)."""
        return self.model.action_head(self.model.decisions_to_go(self._step_tokens(obs))[:, -1])

    def _step_tokens(self, obs) -> torch.Tensor:
        """Record o_t (and decide at a block start) -> the block's DtG tokens up to o_t, (N, 2 (t mod c) + 2, E)."""
        if self.current is None or self.t >= self.horizon:
            raise RuntimeError("call start_episode() before acting in a new episode")
        c, t, cur = self.model.spec.block_len, self.t, self.current
        cur["obs"][:, t] = torch.as_tensor(obs).to(self.device, self.dtype)
        cur["return_to_go"][:, t] = self.target - cur["reward"][:, :t].sum(dim=1)
        if t % c == 0:
            self.z = self._decide()
        b0 = t - t % c
        return self.model.low_level_tokens(self.z, cur["obs"][:, b0:t + 1], cur["action"][:, b0:t],
                                           cur["reward"][:, b0:t])

    def act(self, obs) -> torch.Tensor:
        """(N, D) observation -> (N, A) samples mean + std * N(0, 1), unclipped, like plan.sample_policy_action."""
        mean, log_std = self.policy(obs)
        return mean + log_std.exp() * _normal(mean.shape, self.generator, mean)

    @torch.no_grad()
    def plan_action(self, obs, num_samples: int) -> torch.Tensor:
        """DICP-IDT, continuous actions, depth 1: (N, D) observation -> (N, A) the best of L = `num_samples`
        candidates (the policy mean, then L-1 samples of the policy Gaussian, all clipped to [-1, 1]) by the reward
        Decisions-to-Go predicts at the candidate's query-action token after o_t; ties go to the mean."""
        spec = self.model.spec
        if not spec.world_model:
            raise ValueError("IDTAgent.plan_action needs an IDT with the world model")
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
    def predicted_rewards(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """DtG tokens up to o_t (N, P, E) and candidate actions (N, L, A) -> predicted rewards (N, L) of (o_t, a)."""
        N, L = actions.shape[:2]
        act_tokens = self.model.embed_action(self.model._action_features(actions.flatten(0, 1)))  # (N*L, E)
        seq = torch.cat([tokens.repeat_interleave(L, dim=0), act_tokens[:, None]], dim=1)         # (N*L, P+1, E)
        return self.model.reward_head(self.model.decisions_to_go(seq)[:, -1]).view(N, L)

    @torch.no_grad()
    def world_preds(self, action) -> dict:
        """The world model's predictions (``reward``/``next_obs`` or their ``_logits``) for `action` (N,) | (N, A) at the
        current step t, whose observation `act` / `plan_action` has recorded: Decisions-to-Go's tokens of the block up
        to o_t, then the action's token (the query-action position). Used by dicp_ray.agents.agent (Meta-World's adapter)."""
        c, t, cur = self.model.spec.block_len, self.t, self.current
        b0 = t - t % c
        tokens = self.model.low_level_tokens(self.z, cur["obs"][:, b0:t + 1], cur["action"][:, b0:t], cur["reward"][:, b0:t])
        action = torch.as_tensor(action).to(self.device)
        action = action.to(self.dtype) if action.dtype.is_floating_point else action
        action_token = self.model.embed_action(self.model._action_features(action))
        hidden = self.model.decisions_to_go(torch.cat([tokens, action_token[:, None]], dim=1))[:, -1]
        return self.model._world_preds(hidden)

    @torch.no_grad()
    def observe(self, action, reward, next_obs) -> None:
        """Record the outcome of step t; reviews a finished block and closes a finished episode."""
        c, t, cur = self.model.spec.block_len, self.t, self.current
        cur["action"][:, t] = torch.as_tensor(action).to(self.device, cur["action"].dtype)
        cur["reward"][:, t] = torch.as_tensor(reward).to(self.device, self.dtype)
        cur["next_obs"][:, t] = torch.as_tensor(next_obs).to(self.device, self.dtype)
        self.t = t = t + 1
        if t % c == 0:
            s = slice(t - c, t)
            cur["z"][:, t // c - 1] = self.model.review(cur["obs"][:, s], cur["action"][:, s], cur["reward"][:, s],
                                                        cur["next_obs"][:, s])
        if t == self.horizon:
            self._finish_episode()

    def context_window(self) -> dict[str, torch.Tensor]:
        """The finished episodes of the context, sorted by ascending return: (N, m, ...) tensors (m may be 0)."""
        if self.finished is None:
            return {}
        returns = self.finished["reward"].sum(dim=2)                                   # (N, m)
        order = torch.sort(returns, dim=1, stable=True).indices

        def gather(x):
            index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
            return torch.gather(x, 1, index)

        return {name: gather(x) for name, x in self.finished.items()}

    def _decide(self) -> torch.Tensor:
        """Sample (or take the mean of) the decision of the block starting at step t -> (N, Z)."""
        c, t, cur, N = self.model.spec.block_len, self.t, self.current, self.num_tasks
        past = self.context_window()
        rtg, obs, z_done = [cur["return_to_go"][:, : t + 1: c]], [cur["obs"][:, : t + 1: c]], [cur["z"][:, : t // c]]
        if past:
            rtg.insert(0, past["return_to_go"][:, :, ::c].reshape(N, -1))
            obs.insert(0, past["obs"][:, :, ::c].reshape(N, -1, self.model.spec.obs_dim))
            z_done.insert(0, past["z"].reshape(N, -1, self.model.spec.z_dim))
        mean, log_std = self.model.decide(torch.cat(rtg, 1), torch.cat(obs, 1), torch.cat(z_done, 1))
        mean, log_std = mean[:, -1], log_std[:, -1]
        if not self.sample_decisions:
            return mean
        gen_device = self.generator.device if self.generator is not None else "cpu"
        noise = torch.randn(mean.shape, generator=self.generator, device=gen_device, dtype=torch.float64)
        return mean + log_std.exp() * noise.to(mean)

    def _finish_episode(self) -> None:
        keep = self.context_episodes - 1
        if keep > 0:
            episode = {name: x.unsqueeze(1) for name, x in self.current.items()}
            if self.finished is not None:
                episode = {name: torch.cat([self.finished[name], x], dim=1)[:, -keep:]
                           for name, x in episode.items()}
            self.finished = episode
        self.current = None


__all__ = ["IDTAgent"]
