"""One in-context agent: a trained model acting on a batch of tasks, episode after episode, keeping its own context.

What it is
    ``make_agent(model, num_tasks, ...)`` returns the agent of the model's layout, behind one interface:

        actions = agent.act(obs)                       # (N, D) -> (N,) long | (N, A) float; obs becomes the query
        agent.observe(action, reward, next_obs, episode_end)   # the executed transition goes into the context
        reward, next_obs = agent.predict(action)       # the world model at the query (Meta-World's eval phase)
        state = agent.snapshot(); agent.restore(state, rows)   # freeze / restore contexts (Meta-World's adapt)

    * ``TransformerAgent`` (AD, DPT; discrete or continuous): each task's context is its last k-1 observed
      transitions across episode boundaries, exactly like a training window. Mode "policy" samples the policy;
      mode "plan" runs DICP's search (``plan_discrete``: beam search for AD and DPT; ``plan_continuous``: sampled
      search) once the context is full (``should_plan``), and samples before. Rows whose contexts differ in length
      or in the plan decision are acted on in groups, one batched model call per group, in sorted group order
      (a fixed order of random draws): in lockstep (``dicp-ray evaluate``) that is always one group.
    * ``HierarchicalAgent`` (IDT): drives ``dicp_ray.models.idt_continuous.IDTAgent`` (Meta-World) or
      ``dicp_ray.agents.idt_grid.GridIDTAgent`` (grid worlds, the release's IDT) -- one over the whole batch in
      lockstep, or one per task (``lockstep=False``, Meta-World's evaluation episodes end at different steps per
      env); both keep the release's sliding, time-ordered block context. Mode "plan": on Meta-World
      ``IDTAgent.plan_action`` (depth-1 sampled search) on the blocks that start once k steps were taken and (with
      plan.second_half_only) after step horizon // 2 (``IDTAgent.plan_ready``); on the grid worlds DICP-IDT's beam
      search inside Decisions-to-Go (``GridIDTAgent.plan_action``) once k steps were taken. Meta-World's adapter
      drops an unfinished episode from a frozen context (``whole_episodes``). Episodes must end after exactly
      `horizon` steps.

    The agent counts steps per task and knows where episodes end from ``observe(..., episode_end)``;
    ``planned`` says which rows' last action was planned, ``num_decisions`` / ``num_planned`` count them.

How it is used
    dicp_ray.evaluate (the in-context loop on our vector envs), dicp_ray.evaluate.metaworld_adapter (Meta-World's
    MetaLearningAgent protocol) and benchmarks/bench_plan.py drive models through this module only.

What to expect
    Deterministic for a generator state; the same random draws, in the same order, as the hand-written loops it
    replaced (tests/unit/test_agent.py re-derives them). Actions are returned unclipped; the caller passes what
    the env executed (e.g. Meta-World's clipped action) back to ``observe``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dicp_ray.agents.context import TransitionHistory, group_rows
from dicp_ray.agents.idt_continuous import IDTAgent
from dicp_ray.agents.idt_grid import GridIDTAgent
from dicp_ray.agents.plan import (
    PlannerSettings,
    plan_continuous,
    plan_discrete,
    sample_policy_action,
    should_plan,
    should_plan_continuous,
)

MODES = ("policy", "plan")


def check_agent_options(model, mode: str, horizon: int, settings: PlannerSettings) -> None:
    """Refuse what an agent of `model` cannot do, before any env exists: a clear ValueError naming the option."""
    spec = model.spec
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not known: choose one of {', '.join(MODES)}")
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive int, got {horizon!r}")
    if mode == "plan" and not spec.world_model:
        raise ValueError(f"mode 'plan' needs a world model, but this {spec.layout!r} model has world_model=False: "
                         "use mode 'policy'")
    if spec.layout != "idt":
        return
    if horizon % spec.block_len or spec.context_len % horizon:
        raise ValueError(f"IDT needs episodes whose length is a multiple of its block length {spec.block_len} and "
                         f"divides its context length {spec.context_len}, got {horizon} steps")
    if mode == "plan" and not spec.discrete_actions and settings.depth != 1:
        raise ValueError(f"IDT's sampled search is depth 1 only, got plan depth {settings.depth}")


def make_agent(model, num_tasks: int, *, mode: str = "policy", horizon: int, settings: PlannerSettings | None = None,
               generator: torch.Generator | None = None, obs_table: Tensor | None = None,
               return_target=None, lockstep: bool = True) -> "InContextAgent":
    """The in-context agent of `model`'s layout over `num_tasks` tasks (see the module docstring).

    `obs_table` (C, D): the observation of every next-observation class (discrete world models; plan mode).
    `return_target` (N,): IDT's initial return-to-go of every episode (default: ``spec.return_target``).
    `lockstep=False`: tasks may end episodes at different steps (IDT: one IDTAgent per task).
    """
    settings = settings if settings is not None else PlannerSettings()
    check_agent_options(model, mode, horizon, settings)
    if model.training:
        raise ValueError("call model.eval() before acting: dropout would make the agent random")
    cls = HierarchicalAgent if model.spec.layout == "idt" else TransformerAgent
    return cls(model, num_tasks, mode=mode, horizon=horizon, settings=settings, generator=generator,
               obs_table=obs_table, return_target=return_target, lockstep=lockstep)


class InContextAgent:
    """What every agent shares: N tasks, the mode, per-task step counters and decision counts."""

    whole_episodes = False  # True: the context holds whole episodes only (an unfinished one is dropped)

    def __init__(self, model, num_tasks: int, *, mode: str, horizon: int, settings: PlannerSettings,
                 generator: torch.Generator | None, **_):
        param = next(model.parameters())
        self.model, self.num_tasks, self.mode, self.horizon = model, int(num_tasks), mode, horizon
        self.settings, self.generator = settings, generator
        self.device, self.dtype = param.device, param.dtype
        self.discrete = bool(model.spec.discrete_actions)
        self.t = np.zeros(self.num_tasks, np.int64)          # steps observed in each task's current episode
        self.planned = np.zeros(self.num_tasks, bool)        # was each row's last action planned?
        self.num_decisions = self.num_planned = 0

    def _rows(self, rows) -> np.ndarray:
        return np.arange(self.num_tasks) if rows is None else np.asarray(rows, np.int64).reshape(-1)

    def _tensor(self, x, dtype=None) -> Tensor:
        """Numpy / tensor input on the agent's device, cast to `dtype` (default: keep integers, else model dtype)."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if dtype is None:
            dtype = x.dtype if not x.dtype.is_floating_point else self.dtype
        return x.to(self.device, dtype)

    def _count(self, planned: np.ndarray) -> None:
        self.planned = planned
        self.num_decisions += len(planned)
        self.num_planned += int(planned.sum())

    def _advance(self, rows: np.ndarray, episode_end) -> None:
        self.t[rows] += 1
        ended = rows[np.broadcast_to(np.asarray(episode_end, bool), rows.shape)]
        self.t[ended] = 0

    def _decode(self, preds: dict) -> tuple[Tensor, Tensor | None]:
        """World-model head outputs -> (reward (B,), next observation (B, D) or None): values for regression
        heads; for class heads the argmax (the reward class is the reward, next-obs classes via obs_table)."""
        reward = preds.get("reward")
        if reward is None and "reward_logits" in preds:
            reward = preds["reward_logits"].argmax(-1).to(self.dtype)
        next_obs = preds.get("next_obs")
        if next_obs is None and "next_obs_logits" in preds and self.obs_table is not None:
            next_obs = self.obs_table[preds["next_obs_logits"].argmax(-1)]
        return reward, next_obs


class TransformerAgent(InContextAgent):
    """AD or DPT (DICPTransformer): a sliding context of the last k-1 observed transitions per task."""

    def __init__(self, model, num_tasks: int, *, obs_table: Tensor | None = None, **kwargs):
        super().__init__(model, num_tasks, **kwargs)
        spec = model.spec
        self.k = spec.context_len
        self.obs_table = None if obs_table is None else self._tensor(obs_table)
        if self.mode == "plan" and self.discrete and self.obs_table is None:
            raise ValueError("plan mode with discrete actions needs obs_table (the observation of every cell)")
        self.history = TransitionHistory(self.num_tasks, self.k - 1, spec.obs_dim,
                                         None if self.discrete else spec.num_actions, self.device)
        self.query = torch.zeros(self.num_tasks, spec.obs_dim, device=self.device)

    def _plans_now(self, steps_done: int, t: int) -> bool:
        """The release's planning start: grid worlds from the k-th real step on, Meta-World from the k-th with
        its second-half rule (`plan.should_plan` / `should_plan_continuous`; `steps_done` is uncapped)."""
        if self.discrete:
            return should_plan(self.settings, self.k, steps_done, t, self.horizon, discrete=True)
        return should_plan_continuous(self.settings, self.k, steps_done, t, self.horizon)

    def _groups(self, rows: np.ndarray):
        """[(rows, context)] of rows sharing a context length and a plan decision, in sorted key order."""
        num_ctx = self.history.num_ctx()
        for _, group in group_rows([(int(num_ctx[i]), bool(self.planned[i])) for i in rows]):
            yield rows[group], self.history.context(rows[group])

    @torch.no_grad()
    def act(self, obs) -> Tensor:
        obs = self._tensor(obs, torch.float32)
        planned = np.array([self.mode == "plan" and self._plans_now(int(n), int(t))
                            for n, t in zip(self.history.total, self.t)], bool)
        self.planned, self.query = planned, obs
        actions = None
        for rows, context in self._groups(np.arange(self.num_tasks)):
            query = obs if len(rows) == self.num_tasks else obs[torch.as_tensor(rows, device=self.device)]
            if not planned[rows[0]]:
                action = sample_policy_action(self.model, context, query, self.generator)
            elif self.discrete:
                steps_left = torch.as_tensor(self.horizon - self.t[rows], device=self.device)
                action = plan_discrete(self.model, context, query, steps_left, self.obs_table, self.settings,
                                       self.generator)
            else:
                action = plan_continuous(self.model, context, query, self.settings, self.generator)
            if len(rows) == self.num_tasks:
                actions = action
                break
            if actions is None:
                actions = action.new_zeros((self.num_tasks, *action.shape[1:]))
            actions[torch.as_tensor(rows, device=self.device)] = action
        self._count(planned)
        return actions

    @torch.no_grad()
    def observe(self, action, reward, next_obs, episode_end=False, rows=None) -> None:
        """The transition (last query obs, `action`, `reward`, `next_obs`) of `rows` (default all) into the context."""
        rows = self._rows(rows)
        index = torch.as_tensor(rows, device=self.device)
        self.history.append(rows, (self.query[index], action, reward, next_obs))
        self._advance(rows, episode_end)

    @torch.no_grad()
    def predict(self, action, rows=None) -> tuple[Tensor, Tensor | None]:
        """The world model's reward (R,) and next observation (R, D) (None without that head) of `action` (R, ...)
        at the last query of `rows`, in the groups of the last ``act``."""
        rows = self._rows(rows)
        action = self._tensor(action, torch.long if self.discrete else self.dtype)
        position = {int(r): j for j, r in enumerate(rows)}
        rewards, next_obs = [None] * len(rows), [None] * len(rows)
        for group, context in self._groups(rows):
            at = torch.as_tensor([position[int(r)] for r in group], device=self.device)
            query = self.query[torch.as_tensor(group, device=self.device)]
            reward, nxt = self._decode(self.model(context.as_batch(query, action[at]))[0])
            for j, r in enumerate(at.tolist()):
                rewards[r] = reward[j]
                next_obs[r] = None if nxt is None else nxt[j]
        return torch.stack(rewards), (None if next_obs[0] is None else torch.stack(next_obs))

    def snapshot(self) -> TransitionHistory:
        return self.history.copy()

    def restore(self, snapshot: TransitionHistory, rows=None) -> None:
        """Rows go back to their contexts in `snapshot`, at the start of an episode."""
        rows = self._rows(rows)
        self.history.restore_rows(snapshot, rows)
        self.t[rows] = 0

    def context(self, row: int, snapshot: TransitionHistory | None = None) -> dict[str, np.ndarray]:
        """Task `row`'s context (or its context in `snapshot`) as numpy arrays, oldest first."""
        return (snapshot or self.history).window_of(row)


class HierarchicalAgent(InContextAgent):
    """IDT: ``dicp_ray.agents.idt_continuous.IDTAgent`` (Meta-World) or ``GridIDTAgent`` over the whole batch
    (lockstep) or one per task."""

    whole_episodes = True

    def __init__(self, model, num_tasks: int, *, return_target=None, lockstep: bool = True, **kwargs):
        super().__init__(model, num_tasks, **kwargs)
        self.obs_table = None if kwargs.get("obs_table") is None else self._tensor(kwargs["obs_table"])
        if return_target is None:
            if model.spec.return_target is None:
                raise ValueError("this continuous IDT checkpoint has no model_spec.return_target (the initial "
                                 "return-to-go): retrain it with this version of dicp_ray")
            return_target = torch.full((self.num_tasks,), float(model.spec.return_target))
        target = torch.as_tensor(return_target).to(self.device).reshape(-1)
        if len(target) != self.num_tasks:
            raise ValueError(f"return_target has {len(target)} values for {self.num_tasks} tasks")
        self.lockstep = lockstep
        cls = GridIDTAgent if self.discrete else IDTAgent
        self.whole_episodes = not self.discrete   # the grid IDT's context slides in time, across episodes
        extra = {} if self.discrete else {"second_half_only": self.settings.second_half_only}
        self.agents = ([cls(model, self.horizon, target, self.generator, **extra)] if lockstep else
                       [cls(model, self.horizon, target[i:i + 1], self.generator, **extra)
                        for i in range(self.num_tasks)])
        self.in_episode = np.zeros(len(self.agents), bool)

    def _positions(self, rows: np.ndarray) -> list[tuple[int, slice]]:
        """[(IDTAgent index, slice of the `rows`-ordered inputs it takes)]; lockstep needs every row at once."""
        if not self.lockstep:
            return [(int(r), slice(p, p + 1)) for p, r in enumerate(rows)]
        if len(rows) != self.num_tasks:
            raise ValueError("a lockstep IDT agent steps all its tasks together: pass rows=None "
                             "(or build it with lockstep=False)")
        return [(0, slice(None))]

    @torch.no_grad()
    def act(self, obs) -> Tensor:
        obs, planned, actions = self._tensor(obs, torch.float32), np.zeros(self.num_tasks, bool), []
        for j, at in self._positions(np.arange(self.num_tasks)):
            agent = self.agents[j]
            if not self.in_episode[j]:
                agent.start_episode()
                self.in_episode[j] = True
            if self.discrete:   # DICP-IDT on the grid worlds: once k steps were taken (dicp_ray.agents.idt_grid)
                planned[at] = plan = self.mode == "plan" and agent.plan_ready
                action = (agent.plan_action(obs[at], self.settings.beam_width, self.settings.use_cache) if plan
                          else agent.act(obs[at]))
            else:               # DICP-IDT on Meta-World: blocks after step horizon // 2, once k steps were taken
                planned[at] = plan = self.mode == "plan" and agent.plan_ready
                action = agent.plan_action(obs[at], self.settings.num_samples) if plan else agent.act(obs[at])
            actions.append(action)
        self._count(planned)
        return actions[0] if self.lockstep else torch.cat(actions)

    @torch.no_grad()
    def observe(self, action, reward, next_obs, episode_end=False, rows=None) -> None:
        rows = self._rows(rows)
        ends = np.broadcast_to(np.asarray(episode_end, bool), rows.shape)
        for i in rows[ends]:
            if self.t[i] != self.horizon - 1:
                raise RuntimeError(f"task {i}'s episode ended after {self.t[i] + 1} steps: IDT needs episodes of "
                                   f"exactly horizon = {self.horizon} steps")
        action, reward, next_obs = (self._tensor(x) for x in (action, reward, next_obs))
        for j, at in self._positions(rows):
            self.agents[j].observe(action[at], reward[at], next_obs[at].reshape(len(reward[at]), -1))
        for j, _ in self._positions(rows):
            if self.t[0 if self.lockstep else j] + 1 == self.horizon:
                self.in_episode[j] = False                   # IDTAgent closed the episode into its context
        self._advance(rows, ends)

    @torch.no_grad()
    def predict(self, action, rows=None) -> tuple[Tensor, Tensor | None]:
        rows = self._rows(rows)
        action = self._tensor(action, torch.long if self.discrete else self.dtype)
        outs = [self._decode(self.agents[j].world_preds(action[at])) for j, at in self._positions(rows)]
        reward = torch.cat([o[0] for o in outs])
        return reward, (None if outs[0][1] is None else torch.cat([o[1] for o in outs]))

    def snapshot(self) -> list:
        """Every IDTAgent's finished episodes (the episode in progress is not part of the context)."""
        return [agent.finished_episodes() for agent in self.agents]

    def restore(self, snapshot: list, rows=None) -> None:
        rows = self._rows(rows)
        for j, _ in self._positions(rows):
            self.agents[j].restore_finished(snapshot[j])     # the next act starts a new episode
            self.in_episode[j] = False
        self.t[rows] = 0

    def context(self, row: int, snapshot: list | None = None) -> dict[str, np.ndarray]:
        """Task `row`'s Making-Decisions context, oldest block first (as of the last finished episode with
        `snapshot`): return_to_go (m,), obs (m,) cells or (m, D), z_dists (m', 2Z) as numpy arrays."""
        j, b = (0, row) if self.lockstep else (row, 0)
        agent = self.agents[j]
        window = snapshot[j] if snapshot is not None else agent.context_window()
        return {name: window[name][b].cpu().numpy() for name in ("return_to_go", "obs", "z_dists")}


__all__ = ["make_agent", "check_agent_options", "InContextAgent", "TransformerAgent", "HierarchicalAgent", "MODES"]
