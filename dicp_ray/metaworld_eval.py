"""Score a dicp_ray Meta-World checkpoint with Meta-World's own evaluation code (``metaworld.evaluation``).

What it does
    ``MetaWorldAgent`` wraps a trained continuous AD checkpoint and ``MetaWorldIDTAgent`` a continuous IDT one
    (each with or without world model; ``make_agent`` picks by layout) in Meta-World's ``MetaLearningAgent``
    protocol, and ``score_checkpoint`` builds the test envs with
    ``metaworld.make_ml_envs(..., split="test", task_select="pseudorandom")`` and runs
    ``metaworld.evaluation.metalearning_evaluation`` on it: per round, every env samples its next test goal,
    the agent acts for ``adaptation_episodes`` episodes and sees their rewards (its in-context phase), then
    ``adapt()`` freezes that context and ``evaluation`` runs ``evaluation_episodes`` episodes per task name
    that end at success (``terminate_on_success``) and give the agent no rewards.

How to run it
    dicp-ray mw-eval --checkpoint runs/ml1/train/split_0/model.pt --mode plan --output mw_eval.json

    from dicp_ray.metaworld_eval import score_checkpoint
    result = score_checkpoint("model.pt", mode="policy", num_evals=10)   # result["success_mean"], ...

The AD agent, env by env (all envs are batched into one model call per step for each group of envs that share
a context length and a plan/sample decision, plus one world-model call for the predicted reward tokens of
evaluation steps; in the adaptation phase that is always one group):

* Observation: Meta-World's 39 numbers sliced to the model's ``spec.obs_dim`` (11, or 18 for two-object tasks)
  and cast to float32, which is exactly what `dicp_ray.envs.meta_world` returns for the same goal (tested).
* Action: sampled from the policy (mode "policy"), or DICP's sampled search ``plan_continuous`` with the
  checkpoint config's ``PlannerSettings`` once the window is full (and with ``plan.second_half_only`` only
  from step ``max_episode_steps // 2`` of each episode on, step counted per env), exactly as
  ``dicp_ray.evaluate._rollout_continuous`` does. Returned clipped to [-1, 1] as float32; the context stores
  that clipped action (what our training data stores).
* Context: each env's last k-1 transitions (k = ``spec.context_len``) across episode boundaries, as in
  ``_rollout_continuous``. A transition's next_obs is the observation of the next call for that env.

The IDT agent (``MetaWorldIDTAgent``) keeps one ``dicp_ray.idt.IDTAgent`` per env (evaluation episodes end at
success at different steps per env, and IDTAgent steps its batch in lockstep; one small model call per env and
step) and drives it exactly as ``dicp_ray.evaluate._rollout_idt_continuous`` does (same observation and clipped
action as above; every episode's return-to-go starts at ``spec.return_target``; mode "plan" is
``IDTAgent.plan_action``, depth 1, once the context holds E-1 finished episodes, with ``second_half_only`` per
env; tested: identical actions). Its context is whole episodes: ``adapt()`` freezes each env's finished
episodes, and episodes must last exactly the agent's ``horizon`` (a multiple of the block length dividing the
context length). The deviations below apply to it in the same way: the episode's last step observes the predicted
next observation (or its own repeated), and in evaluation episodes the reward IDT observes (reward token and
return-to-go decrement) is the predicted one clipped to [0, 10], or 0.

Deviations from ``dicp-ray evaluate`` that the protocol forces (documented in README.md as well):

1. **Final observation of an episode.** Meta-World's vector envs reset in the same step (SAME_STEP autoreset):
   the observation after the last step of an episode is the next episode's first one, and the true final
   observation (``infos["final_obs"]``) is never passed to the agent. The last transition of every
   adaptation episode therefore stores the world model's next-observation prediction (models with a
   world model) or repeats its own observation (models without). ``dicp-ray evaluate`` stores the true one.
2. **No rewards in evaluation episodes.** The adaptation context is frozen at ``adapt()``. During an
   evaluation episode the episode's own transitions are appended to it with reward = the world model's
   predicted reward clipped to [0, 10] (``eval_reward="predicted"``, the default when the model has a reward
   head) or 0 (``eval_reward="zero"``, the default without a world model). ``reset(mask)`` (Meta-World calls
   it when an episode ends) drops the evaluation episode's transitions and restarts from the frozen context,
   so evaluation episodes never see each other.
3. **Scoring.** Evaluation episodes end at success, so success = success at the episode's end and returns
   are those of shortened episodes; goals come in Meta-World's pseudorandom order (a shuffle per env, seeded
   by the split seed). ``evaluation`` counts episodes per TASK NAME, not per env: with more than one env per
   task class (``meta_batch_size`` > 1 for ML1, > 5 for ML10) it keeps the first ``evaluation_episodes``
   episodes to END, and episodes that succeed end first, so the success rate is biased upwards. The default
   ``meta_batch_size`` is therefore one env per test class (1 for ML1, 5 for ML10), which counts every
   episode; a larger one logs a warning and records it in the result's ``notes``.

The split seed means what it means everywhere in dicp_ray (Meta-World's benchmark seed): the goals Meta-World
evaluates for split seed s are our ML1 test ids 50..99 (ML10: 500..749) of split s. ``score_checkpoint``
checks that for every goal it is given, and records each round's task ids in the result.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from dicp_ray.envs.meta_world_tasks import HORIZON, VARIATIONS_PER_TYPE, num_tasks, num_train_tasks
from dicp_ray.idt import IDTAgent
from dicp_ray.plan import Context, PlannerSettings, plan_continuous, sample_policy_action, should_plan

logger = logging.getLogger(__name__)

MODES = ("policy", "plan")
EVAL_REWARDS = ("predicted", "zero")
NUM_TEST_CLASSES = {"ML1": 1, "ML10": 5}
REWARD_RANGE = (0.0, 10.0)             # Meta-World v2 rewards
RESULT_FORMAT = "dicp_ray.mw_eval"


# ----------------------------------------------------------------------------- per-env transition history
class _History:
    """Every env's newest transitions (obs, action, reward, next_obs) in numpy buffers of 2 * window rows;
    when a row's buffer is full its newest `window` transitions move to the front (amortised O(1))."""

    def __init__(self, num_envs: int, window: int, obs_dim: int, act_dim: int):
        cap = max(2 * window, 1)
        self.window = window
        self.obs = np.zeros((num_envs, cap, obs_dim), np.float32)
        self.action = np.zeros((num_envs, cap, act_dim), np.float32)
        self.reward = np.zeros((num_envs, cap), np.float32)
        self.next_obs = np.zeros((num_envs, cap, obs_dim), np.float32)
        self.length = np.zeros(num_envs, np.int64)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.obs, self.action, self.reward, self.next_obs

    def append(self, i: int, values) -> None:
        if self.window == 0:
            return
        cap = self.obs.shape[1]
        if self.length[i] == cap:
            for a in self.arrays():
                a[i, :self.window] = a[i, cap - self.window:]
            self.length[i] = self.window
        for a, v in zip(self.arrays(), values):
            a[i, self.length[i]] = v
        self.length[i] += 1

    def num_ctx(self) -> np.ndarray:
        """(N,) transitions each env's context holds now: min(length, k-1)."""
        return np.minimum(self.length, self.window)

    def window_of(self, i: int) -> tuple[np.ndarray, ...]:
        n, end = int(min(self.length[i], self.window)), int(self.length[i])
        return tuple(a[i, end - n:end] for a in self.arrays())

    def context(self, rows: np.ndarray, device: torch.device) -> Context:
        """The contexts of `rows` (all of the same length) as one batched Context on `device`."""
        parts = [self.window_of(int(i)) for i in rows]
        return Context(*(torch.as_tensor(np.stack([p[c] for p in parts]), device=device) for c in range(4)))

    def copy(self) -> "_History":
        out = object.__new__(_History)
        out.window = self.window
        out.obs, out.action, out.reward, out.next_obs = (a.copy() for a in self.arrays())
        out.length = self.length.copy()
        return out

    def restore_rows(self, source: "_History", rows: np.ndarray) -> None:
        for mine, theirs in zip((*self.arrays(), self.length), (*source.arrays(), source.length)):
            mine[rows] = theirs[rows]


def model_observation(observations, obs_dim: int) -> np.ndarray:
    """Meta-World's (N, 39) observations -> the model's (N, obs_dim) float32 ones: hand, gripper and the
    first obs_dim - 4 object numbers, cast exactly as `dicp_ray.envs.meta_world.MetaWorldEnv` does."""
    obs = np.asarray(observations)
    if obs.ndim != 2 or obs.shape[1] < obs_dim:
        raise ValueError(f"observations must be (num_envs, >= {obs_dim}), got shape {obs.shape}")
    return obs[:, :obs_dim].astype(np.float32)


def _groups(keys: list[tuple]) -> list[tuple[tuple, np.ndarray]]:
    """[(key, rows)] for rows sharing a key, in sorted key order (a fixed order of random draws)."""
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return [(key, np.asarray(out[key])) for key in sorted(out)]


# ----------------------------------------------------------------------------- the agent
class MetaWorldAgent:
    """Meta-World's ``MetaLearningAgent`` (init / adapt_action / step / adapt / eval_action / reset) around a
    continuous AD model; see the module docstring for what each call does to the per-env contexts.

    ``settings``: the planner's settings (mode "plan"); ``horizon``: the envs' episode length (the
    second-half rule of ``should_plan``); ``eval_reward``: "predicted" | "zero" | None (predicted when the
    model has a reward head); ``on_init``: called at every ``init()`` (score_checkpoint records the goals).
    The number of envs is taken from the first observation batch after ``init()``.
    """

    LAYOUT = "ad"

    def __init__(self, model, *, mode: str = "policy", settings: PlannerSettings | None = None,
                 horizon: int = HORIZON, eval_reward: str | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", on_init: Callable[[], None] | None = None):
        spec = model.spec
        if spec.layout != self.LAYOUT or spec.discrete_actions:
            hint = " (IDT: use MetaWorldIDTAgent or make_agent)" if spec.layout == "idt" else ""
            raise ValueError(f"{type(self).__name__} needs a continuous-action {self.LAYOUT!r} model, got layout "
                             f"{spec.layout!r} with {'discrete' if spec.discrete_actions else 'continuous'} "
                             f"actions{hint}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not known: choose one of {', '.join(MODES)}")
        self.has_reward_head = bool(spec.world_model and spec.reward_classes is None)
        self.has_next_obs_head = bool(spec.world_model and spec.num_obs_classes is None)
        if mode == "plan" and not self.has_reward_head:
            raise ValueError("mode 'plan' needs a world model with a reward regression head; this model has "
                             f"world_model={spec.world_model}: use mode 'policy'")
        if eval_reward is None:
            eval_reward = "predicted" if self.has_reward_head else "zero"
        if eval_reward not in EVAL_REWARDS:
            raise ValueError(f"eval_reward {eval_reward!r} is not known: choose one of {', '.join(EVAL_REWARDS)}")
        if eval_reward == "predicted" and not self.has_reward_head:
            raise ValueError("eval_reward='predicted' needs a world model with a reward head: use 'zero'")
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.mode, self.eval_reward, self.horizon = mode, eval_reward, horizon
        self.settings = settings if settings is not None else PlannerSettings(depth=1)
        self.k, self.obs_dim, self.act_dim = spec.context_len, spec.obs_dim, spec.num_actions
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.on_init = on_init
        self.num_decisions = self.num_planned = 0
        self._clear()

    # -- state --------------------------------------------------------------
    def _clear(self) -> None:
        self._hist: _History | None = None       # the working contexts
        self._frozen: _History | None = None     # the adaptation contexts, frozen at adapt()
        self._num_envs: int | None = None

    def _ensure(self, num_envs: int) -> None:
        if self._num_envs is None:
            n = num_envs
            self._num_envs = n
            self._new_state(n)
            self._t = np.zeros(n, np.int64)                  # step index within each env's episode
            self._pending = np.zeros(n, bool)                # an action whose transition is not stored yet
            self._reward_known = np.zeros(n, bool)
            self._p_obs = np.zeros((n, self.obs_dim), np.float32)
            self._p_action = np.zeros((n, self.act_dim), np.float32)
            self._p_reward = np.zeros(n, np.float32)
        elif num_envs != self._num_envs:
            raise ValueError(f"the agent holds {self._num_envs} envs since init(), got a batch of {num_envs}")

    # Layout-specific state (MetaWorldIDTAgent overrides these): build it, freeze it at adapt(), restore rows.
    def _new_state(self, n: int) -> None:
        self._hist = _History(n, self.k - 1, self.obs_dim, self.act_dim)
        self._frozen = self._hist.copy()

    def _freeze(self) -> None:
        self._frozen = self._hist.copy()

    def _restore(self, rows: np.ndarray) -> None:
        self._hist.restore_rows(self._frozen, rows)

    def _obs(self, observations) -> np.ndarray:
        obs = model_observation(observations, self.obs_dim)
        self._ensure(obs.shape[0])
        return obs

    def context(self, env: int, frozen: bool = False) -> dict[str, np.ndarray]:
        """Env `env`'s current context (or the frozen adaptation context) as numpy arrays, oldest first."""
        hist = self._frozen if frozen else self._hist
        if hist is None:
            raise RuntimeError("the agent has seen no observation since init()")
        return dict(zip(("obs", "action", "reward", "next_obs"), (a.copy() for a in hist.window_of(env))))

    # -- the model ----------------------------------------------------------
    @torch.no_grad()
    def _world(self, context: Context, query: torch.Tensor, action: torch.Tensor):
        """World-model predictions for `action` at `query`: reward (B,) and next observation (B, D) or None."""
        preds, _ = self.model(context.as_batch(query, action))
        return preds.get("reward"), preds.get("next_obs")

    @torch.no_grad()
    def _act(self, obs: np.ndarray, evaluating: bool) -> tuple[np.ndarray, np.ndarray]:
        hist = self._hist
        if self._pending.any() and not evaluating and not self._reward_known[self._pending].all():
            raise RuntimeError("adapt_action called again before step() reported the previous action's reward")
        for i in np.flatnonzero(self._pending):               # they waited for this observation
            hist.append(i, (self._p_obs[i], self._p_action[i], self._p_reward[i], obs[i]))
        self._pending[:] = False
        num_ctx = hist.num_ctx()
        plan = [self.mode == "plan" and should_plan(self.settings, self.k, int(n), int(t), self.horizon)
                for n, t in zip(num_ctx, self._t)]
        actions = np.zeros((len(obs), self.act_dim), np.float32)
        rewards = np.zeros(len(obs), np.float32)
        for (_, planned), rows in _groups([(int(n), p) for n, p in zip(num_ctx, plan)]):
            context = hist.context(rows, self.device)
            query = torch.as_tensor(obs[rows], device=self.device)
            if planned:
                action = plan_continuous(self.model, context, query, self.settings, self.generator)
                self.num_planned += len(rows)
            else:
                action = sample_policy_action(self.model, context, query, self.generator)
            action = action.float().clamp(-1.0, 1.0)          # what the env executes and the data stores
            if evaluating and self.eval_reward == "predicted":
                reward, _ = self._world(context, query, action)
                rewards[rows] = reward.float().clamp(*REWARD_RANGE).cpu().numpy()
            actions[rows] = action.cpu().numpy()
        self.num_decisions += len(obs)
        self._p_obs[:], self._p_action[:], self._p_reward[:] = obs, actions, rewards
        self._pending[:], self._reward_known[:] = True, evaluating
        self._t += 1
        return actions, np.asarray(plan, bool)

    def _finish(self, rows: np.ndarray) -> None:
        """Store the pending transitions of `rows` whose episode ended: next_obs predicted, or obs repeated."""
        next_obs = self._p_obs[rows].copy()
        if self.has_next_obs_head and len(rows):
            hist = self._hist
            for (_,), group in _groups([(int(n),) for n in hist.num_ctx()[rows]]):
                env_rows = rows[group]
                _, predicted = self._world(hist.context(env_rows, self.device),
                                           torch.as_tensor(self._p_obs[env_rows], device=self.device),
                                           torch.as_tensor(self._p_action[env_rows], device=self.device))
                next_obs[group] = predicted.float().cpu().numpy()
        for j, i in enumerate(rows):
            self._hist.append(i, (self._p_obs[i], self._p_action[i], self._p_reward[i], next_obs[j]))
        self._pending[rows] = False

    # -- Meta-World's MetaLearningAgent protocol -------------------------------
    def init(self) -> None:
        """A new round (new goals): forget every context."""
        self._clear()
        if self.on_init is not None:
            self.on_init()

    def adapt_action(self, observations) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Adaptation phase: (num_envs, 4) float32 actions in [-1, 1], and {"planned": (num_envs,) bool}."""
        actions, planned = self._act(self._obs(observations), evaluating=False)
        return actions, {"planned": planned}

    def step(self, timestep) -> None:
        """The reward (and episode end) of the last adapt_action; completes or queues its transition."""
        obs = self._obs(timestep.observation)
        if not self._pending.all():
            raise RuntimeError("step() without a preceding adapt_action for every env")
        if not np.array_equal(obs, self._p_obs):
            raise ValueError("timestep.observation is not the observation adapt_action acted on")
        self._p_action[:] = np.clip(np.asarray(timestep.action, np.float32), -1.0, 1.0)
        self._p_reward[:] = np.asarray(timestep.reward, np.float32)
        self._reward_known[:] = True
        done = np.logical_or(np.asarray(timestep.terminated, bool), np.asarray(timestep.truncated, bool))
        if done.any():
            self._finish(np.flatnonzero(done))
            self._t[done] = 0

    def adapt(self) -> None:
        """End of the adaptation phase: freeze every env's context (a pending transition is stored as an
        episode end: the next phase starts with a reset)."""
        if self._num_envs is None:
            return
        self._finish(np.flatnonzero(self._pending & self._reward_known))
        self._pending[:] = False
        self._t[:] = 0
        self._freeze()

    def eval_action(self, observations) -> np.ndarray:
        """Evaluation phase: actions from the frozen context + this episode's transitions (reward tokens:
        predicted or 0, see eval_reward)."""
        return self._act(self._obs(observations), evaluating=True)[0]

    def reset(self, env_mask) -> None:
        """A new evaluation episode for the envs in `env_mask`: back to their frozen adaptation context."""
        mask = np.asarray(env_mask, bool).reshape(-1)
        self._ensure(len(mask))
        rows = np.flatnonzero(mask)
        if len(rows):
            self._restore(rows)
            self._pending[rows] = False
            self._t[rows] = 0


class MetaWorldIDTAgent(MetaWorldAgent):
    """``MetaWorldAgent`` for a continuous IDT checkpoint: one ``dicp_ray.idt.IDTAgent`` (N = 1) per env, driven
    step by step exactly as ``dicp_ray.evaluate._rollout_idt_continuous`` drives its batched one.

    Design: one IDTAgent per env, all drawing from the adapter's one generator in env order. IDTAgent keeps a
    single step counter for its whole batch, while evaluation episodes end (at success) at different steps per
    env; separate agents keep every env's episode, block and decision state right at the cost of one small model
    call per env and step (``meta_batch_size`` is one env per test class by default: 1 for ML1, 5 for ML10).

    Per env: ``start_episode`` at an episode's first observation; a step's ``observe(action, reward, next_obs)``
    waits for the next observation (as the AD path's transitions do); at an adaptation episode's end (SAME_STEP
    autoreset) it is called with the world model's predicted next observation (or the observation repeated),
    which closes the episode into the context. Mode "plan": ``IDTAgent.plan_action`` (L = ``settings.num_samples``,
    depth 1) once the context holds E-1 finished episodes, with ``second_half_only`` from step ``horizon // 2``,
    else ``act``. ``adapt()`` freezes each agent's finished episodes (an unfinished episode is dropped: IDT's
    context is whole episodes); ``reset(mask)`` restores them and the next call starts a fresh episode. In an
    evaluation episode the reward IDT observes (reward token and return-to-go decrement) is the world model's
    predicted reward at the executed action, clipped to [0, 10] (``eval_reward="predicted"``), or 0 ("zero").
    ``horizon`` (the envs' episode length) must be a multiple of the model's block length and divide its
    context length; adaptation episodes must last exactly ``horizon`` steps.
    """

    LAYOUT = "idt"

    def __init__(self, model, *, mode: str = "policy", settings: PlannerSettings | None = None,
                 horizon: int = HORIZON, **kwargs):
        super().__init__(model, mode=mode, settings=settings, horizon=horizon, **kwargs)
        spec = self.model.spec
        if spec.return_target is None:
            raise ValueError("this continuous IDT checkpoint has no model_spec.return_target (the best training "
                             "return): retrain it with this version of dicp_ray")
        if horizon % spec.block_len or self.k % horizon:
            raise ValueError(f"IDT needs episodes whose length is a multiple of its block length {spec.block_len} "
                             f"and divides its context length {self.k}, got {horizon} steps: use "
                             "--max-episode-steps 100 (the training episode length)")
        if mode == "plan" and self.settings.depth != 1:
            raise ValueError(f"IDT's sampled search is depth 1 only, got plan depth {self.settings.depth}")
        self.return_target = float(spec.return_target)

    # -- state: one IDTAgent per env --------------------------------------------
    def _clear(self) -> None:
        super()._clear()
        self.agents: list[IDTAgent] = []
        self._frozen_episodes: list[dict[str, torch.Tensor] | None] = []

    def _new_state(self, n: int) -> None:
        target = torch.full((1,), self.return_target, device=self.device)
        self.agents = [IDTAgent(self.model, self.horizon, target, self.generator) for _ in range(n)]
        self._frozen_episodes = [None] * n

    def _freeze(self) -> None:
        self._frozen_episodes = [agent.finished_episodes() for agent in self.agents]

    def _restore(self, rows: np.ndarray) -> None:
        for i in rows:  # the next call starts a new episode from the frozen context
            self.agents[int(i)].restore_finished(self._frozen_episodes[int(i)])

    def context(self, env: int, frozen: bool = False) -> dict[str, np.ndarray]:
        """Env `env`'s finished episodes in time order (m x horizon rows), then (unless `frozen`: the episodes
        frozen at adapt()) the current episode's observed steps: obs, action, reward, next_obs, return_to_go."""
        if self._num_envs is None:
            raise RuntimeError("the agent has seen no observation since init()")
        agent = self.agents[env]
        finished = self._frozen_episodes[env] if frozen else agent.finished
        shapes = {"obs": (self.obs_dim,), "action": (self.act_dim,), "reward": (), "next_obs": (self.obs_dim,),
                  "return_to_go": ()}
        out = {}
        for name, shape in shapes.items():
            parts = [np.zeros((0, *shape), np.float32)]
            if finished is not None:
                parts.append(finished[name][0].reshape(-1, *shape).cpu().numpy())
            if not frozen and agent.current is not None:
                parts.append(agent.current[name][0, :agent.t].cpu().numpy())
            out[name] = np.concatenate(parts).astype(np.float32)
        return out

    # -- the model ----------------------------------------------------------
    @torch.no_grad()
    def _idt_world(self, agent: IDTAgent, action: torch.Tensor):
        """The world model's reward (1,) and next observation (1, D) (None without that head) for `action`
        (1, A) at the agent's current step t, whose observation (and decision) the agent has taken already: the
        Decisions-to-Go tokens of the block up to o_t, then the action's token (the query-action position)."""
        model, cur, t = agent.model, agent.current, agent.t
        b0 = t - t % model.spec.block_len
        tokens = model.low_level_tokens(agent.z, cur["obs"][:, b0:t + 1], cur["action"][:, b0:t],
                                        cur["reward"][:, b0:t])
        action_token = model.embed_action(model._action_features(action.to(agent.device, agent.dtype)))
        hidden = model.decisions_to_go(torch.cat([tokens, action_token[:, None]], dim=1))[:, -1]
        return model.reward_head(hidden), (model.next_obs_head(hidden) if self.has_next_obs_head else None)

    def _observe(self, i: int, next_obs) -> None:
        """Give env i's agent its pending step (action, reward, next observation)."""
        self.agents[i].observe(torch.as_tensor(self._p_action[i:i + 1]), torch.as_tensor(self._p_reward[i:i + 1]),
                               torch.as_tensor(next_obs).reshape(1, self.obs_dim))

    @torch.no_grad()
    def _act(self, obs: np.ndarray, evaluating: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._pending.any() and not evaluating and not self._reward_known[self._pending].all():
            raise RuntimeError("adapt_action called again before step() reported the previous action's reward")
        for i in np.flatnonzero(self._pending):               # they waited for this observation
            self._observe(int(i), obs[i])
        self._pending[:] = False
        n = len(obs)
        actions = np.zeros((n, self.act_dim), np.float32)
        rewards = np.zeros(n, np.float32)
        planned = np.zeros(n, bool)
        for i, agent in enumerate(self.agents):
            if agent.current is None:
                agent.start_episode()
            query = torch.as_tensor(obs[i:i + 1], device=self.device)
            planned[i] = self.mode == "plan" and should_plan(self.settings, agent.context_episodes,
                                                             agent.num_finished, agent.t, self.horizon)
            if planned[i]:
                action = agent.plan_action(query, self.settings.num_samples)
                self.num_planned += 1
            else:
                action = agent.act(query)
            action = action.float().clamp(-1.0, 1.0)          # what the env executes and the context stores
            if evaluating and self.eval_reward == "predicted":
                reward, _ = self._idt_world(agent, action)
                rewards[i] = reward.float().clamp(*REWARD_RANGE).cpu().numpy()[0]
            actions[i] = action[0].cpu().numpy()
        self.num_decisions += n
        self._p_obs[:], self._p_action[:], self._p_reward[:] = obs, actions, rewards
        self._pending[:], self._reward_known[:] = True, evaluating
        self._t += 1
        return actions, planned

    def _finish(self, rows: np.ndarray) -> None:
        """Close the episodes of `rows`: their last step gets the predicted next observation (or repeats its own)."""
        for i in (int(r) for r in rows):
            agent = self.agents[i]
            if agent.current is None or agent.t != self.horizon - 1:
                steps = 0 if agent.current is None else agent.t + 1
                raise RuntimeError(f"env {i}'s episode ended after {steps} steps: IDT needs adaptation episodes of "
                                   f"exactly horizon = {self.horizon} steps (the envs' max_episode_steps)")
            next_obs = self._p_obs[i]
            if self.has_next_obs_head:
                _, predicted = self._idt_world(agent, torch.as_tensor(self._p_action[i:i + 1]))
                next_obs = predicted.float().cpu().numpy()
            self._observe(i, next_obs)
        self._pending[rows] = False

    def adapt(self) -> None:
        """End of the adaptation phase: freeze every env's finished episodes (a pending, unfinished episode is
        dropped; metalearning_evaluation ends its adaptation at an episode end of every env)."""
        if self._num_envs is None:
            return
        self._pending[:] = False
        self._t[:] = 0
        for agent in self.agents:
            agent.current, agent.t, agent.z = None, 0, None
        self._freeze()


def make_agent(model, **kwargs) -> MetaWorldAgent:
    """The adapter for `model`'s layout: ``MetaWorldIDTAgent`` for IDT, else ``MetaWorldAgent`` (AD)."""
    return (MetaWorldIDTAgent if model.spec.layout == "idt" else MetaWorldAgent)(model, **kwargs)


# ----------------------------------------------------------------------------- checkpoint and envs
def load_checkpoint_for_metaworld(path: str, mode: str):
    """Load and check a checkpoint for scoring -> (model, payload, config); clear errors for what cannot be
    scored (missing file, not a dicp_ray checkpoint, not Meta-World, DPT, planning without world model, IDT
    planning deeper than 1, IDT without a stored return target)."""
    from dicp_ray.checkpoints import load_checkpoint
    from dicp_ray.config import config_from_dict
    from dicp_ray.envs.meta_world_tasks import observation_dim

    path = os.fspath(path)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not known: choose one of {', '.join(MODES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a model.pt written by `dicp-ray train`)")
    model, payload = load_checkpoint(path, map_location="cpu")
    spec = model.spec
    if not isinstance(payload.get("config"), dict):
        raise ValueError(f"checkpoint {path} stores no experiment config, so its benchmark is unknown")
    config = config_from_dict(payload["config"])
    if not config.env.is_meta_world or spec.discrete_actions:
        raise ValueError(f"checkpoint {path} was trained on {config.env.name}, not Meta-World (ML1 / ML10): "
                         "score it with `dicp-ray evaluate`")
    if spec.layout not in ("ad", "idt"):
        raise ValueError(f"checkpoint {path} has layout {spec.layout!r}: only the AD and IDT layouts are supported")
    if mode == "plan" and not spec.world_model:
        raise ValueError(f"mode 'plan' needs a world model, but checkpoint {path} was trained with "
                         "model.world_model=false: score it with mode 'policy'")
    if spec.layout == "idt" and mode == "plan" and config.plan_depth != 1:
        raise ValueError(f"mode 'plan': IDT's sampled search is depth 1 only, checkpoint {path} has plan.depth = "
                         f"{config.plan_depth}")
    if spec.layout == "idt" and spec.return_target is None:
        raise ValueError(f"checkpoint {path} is a continuous IDT without model_spec.return_target (the best "
                         "training return): retrain it with this version of dicp_ray")
    expected = observation_dim(config.env.name, config.env.task)
    if spec.obs_dim != expected:
        raise ValueError(f"checkpoint {path} has obs_dim {spec.obs_dim}, {config.env.name} "
                         f"{config.env.task or ''} observations have {expected}")
    return model, payload, config


def benchmark_name(config) -> str:
    """What ``metaworld.make_ml_envs`` calls the checkpoint's benchmark: the ML1 task name, or "ML10"."""
    return config.env.task if config.env.name == "ML1" else config.env.name


def check_meta_batch_size(env_name: str, meta_batch_size: int) -> int:
    """``meta_batch_size`` if Meta-World can split its test goals over that many envs, else a ValueError."""
    classes = NUM_TEST_CLASSES[env_name]
    if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be a positive int, got {meta_batch_size!r}")
    if meta_batch_size % classes:
        raise ValueError(f"meta_batch_size = {meta_batch_size} must be a multiple of the {classes} test task "
                         f"classes of {env_name} (one env per class or more), e.g. {classes}")
    per_class = meta_batch_size // classes
    if VARIATIONS_PER_TYPE % per_class:
        raise ValueError(f"meta_batch_size = {meta_batch_size} gives {per_class} envs per test class, which must "
                         f"divide its {VARIATIONS_PER_TYPE} goals: use {classes} x one of 1, 2, 5, 10, 25, 50")
    return meta_batch_size


def current_task_ids(envs, env_name: str, task: str | None, split_seed: int) -> list[int]:
    """Our global task id of the goal each env of a (sync) ``make_ml_envs(split="test")`` vector env is set to;
    a RuntimeError if one is not a test task of `split_seed` (it would not be the split we think it is)."""
    import pickle

    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    from dicp_ray.envs.meta_world_tasks import load_tasks

    tasks = load_tasks(env_name, task, split_seed)
    base, first_test = split_seed * num_tasks(env_name), num_train_tasks(env_name)
    lookup = {(t.env_name, np.asarray(pickle.loads(t.data)["rand_vec"], np.float64).tobytes()): base + index
              for index, t in enumerate(tasks.tasks) if index >= first_test}
    names = {cls.__name__: name for name, cls in ALL_V3_ENVIRONMENTS.items()}
    ids = []
    for i, env in enumerate(envs.envs):
        raw = env.unwrapped
        key = (names[type(raw).__name__], np.asarray(raw._last_rand_vec, np.float64).tobytes())
        if key not in lookup:
            raise RuntimeError(f"env {i} is set to a {key[0]} goal that is not a test task of {env_name} "
                               f"split seed {split_seed}")
        ids.append(lookup[key])
    return ids


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def score_checkpoint(checkpoint_path: str, *, mode: str = "policy", split_seed: int | None = None,
                     meta_batch_size: int | None = None, num_evals: int = 10, adaptation_episodes: int = 10,
                     evaluation_episodes: int = 3, max_episode_steps: int = HORIZON, device: str = "cpu",
                     seed: int = 0, eval_reward: str | None = None, num_threads: int | None = 1) -> dict:
    """Run ``metaworld.evaluation.metalearning_evaluation`` on a checkpoint's test goals -> result dict.

    Defaults: Meta-World's own (10 rounds, 10 adaptation and 3 evaluation episodes) with one env per test
    class (``meta_batch_size`` 1 for ML1, 5 for ML10: unbiased counting, see the module docstring), 100-step
    episodes as in training. ``split_seed`` defaults to the checkpoint's. Keys: ``success_mean``,
    ``return_mean``, ``success_per_task``, ``task_ids_per_round``, ``settings``, ``notes``, ``timing``.
    """
    import metaworld
    from metaworld.evaluation import metalearning_evaluation

    from dicp_ray.evaluate import _resolve_split_seed, file_sha256, planner_settings
    from dicp_ray.runtime import provenance

    wall_start = time.perf_counter()
    path = os.fspath(checkpoint_path)
    model, payload, config = load_checkpoint_for_metaworld(path, mode)
    split_seed = _resolve_split_seed(payload, split_seed, config, path)
    env_name, name = config.env.name, benchmark_name(config)
    classes = NUM_TEST_CLASSES[env_name]
    meta_batch_size = check_meta_batch_size(env_name, classes if meta_batch_size is None else meta_batch_size)
    for key, value in (("num_evals", num_evals), ("adaptation_episodes", adaptation_episodes),
                       ("evaluation_episodes", evaluation_episodes), ("max_episode_steps", max_episode_steps)):
        _check_positive(key, value)
    if max_episode_steps > 500:
        raise ValueError(f"max_episode_steps = {max_episode_steps}: Meta-World never steps past 500")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' but no CUDA device is visible: use --device cpu")
    settings = planner_settings(config)
    agent = make_agent(model, mode=mode, settings=settings, horizon=max_episode_steps,
                       eval_reward=eval_reward, seed=seed, device=device)
    notes = []
    if meta_batch_size > classes:
        notes.append(f"{meta_batch_size // classes} envs per test class: metaworld.evaluation keeps the first "
                     f"{evaluation_episodes} evaluation episodes to end per task name, and successful episodes "
                     "end first, so the success rate is biased upwards")
        logger.warning("mw-eval: %s", notes[-1])
    if max_episode_steps != config.env.horizon:
        notes.append(f"max_episode_steps = {max_episode_steps}, the model was trained on {config.env.horizon}-step "
                     "episodes")

    envs = metaworld.make_ml_envs(name, seed=split_seed, meta_batch_size=meta_batch_size, split="test",
                                  max_episode_steps=max_episode_steps, terminate_on_success=False,
                                  task_select="pseudorandom")
    rounds: list[list[int]] = []
    agent.on_init = lambda: rounds.append(current_task_ids(envs, env_name, config.env.task, split_seed))
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    loop_start = time.perf_counter()
    try:
        success, mean_return, per_task = metalearning_evaluation(
            agent, envs, num_evals=num_evals, adaptation_steps=1, adaptation_episodes=adaptation_episodes,
            evaluation_episodes=evaluation_episodes)
    finally:
        torch.set_num_threads(previous_threads)
        envs.close()
    loop_s = time.perf_counter() - loop_start
    leaked = {i for ids in rounds for i in ids} & set(payload.get("train_task_ids") or ())
    if leaked:
        raise RuntimeError(f"Meta-World evaluated goals {sorted(leaked)} that checkpoint {path} was trained on")
    result = {
        "format": RESULT_FORMAT, "evaluator": "metaworld.evaluation.metalearning_evaluation",
        "env": env_name, "task": config.env.task, "benchmark": name, "mode": mode, "split_seed": split_seed,
        "success_mean": float(success), "return_mean": float(mean_return),
        "success_per_task": {str(k): float(v) for k, v in sorted(per_task.items())},
        "task_ids_per_round": rounds, "world_model": bool(model.spec.world_model),
        "variant": model.spec.layout,
        **({"idt_return_target": float(model.spec.return_target)} if model.spec.layout == "idt" else {}),
        "settings": {"meta_batch_size": meta_batch_size, "num_evals": num_evals, "adaptation_steps": 1,
                     "adaptation_episodes": adaptation_episodes, "evaluation_episodes": evaluation_episodes,
                     "max_episode_steps": max_episode_steps, "task_select": "pseudorandom",
                     "terminate_on_success_in_evaluation": True, "eval_reward": agent.eval_reward,
                     "final_obs": "world-model prediction" if agent.has_next_obs_head else "repeated obs",
                     "context_len": model.spec.context_len, "device": device, "seed": seed,
                     "torch_threads": num_threads, "planner": vars(settings) if mode == "plan" else None},
        "notes": notes,
        "timing": {"wall_s": None, "evaluation_s": loop_s, "decisions": agent.num_decisions,
                   "planned_decisions": agent.num_planned,
                   "decisions_per_s": agent.num_decisions / max(loop_s, 1e-9)},
        "checkpoint": os.path.abspath(path), "checkpoint_sha256": file_sha256(path),
        "checkpoint_step": payload.get("step"), "provenance": provenance(),
    }
    for key in ("success_mean", "return_mean"):
        if not math.isfinite(result[key]):
            raise RuntimeError(f"metalearning_evaluation returned {key} = {result[key]}")
    result["timing"]["wall_s"] = time.perf_counter() - wall_start
    return result


def format_table(result: dict) -> str:
    """A few lines: what was scored, how, and the success rate / return overall and per task."""
    s = result["settings"]
    lines = [f"Meta-World {result['env']} {result['task'] or ''} test goals, split seed {result['split_seed']}, "
             f"mode {result['mode']} ({result['evaluator']})".replace("  ", " "),
             f"{s['num_evals']} rounds x {s['meta_batch_size']} envs: {s['adaptation_episodes']} adaptation "
             f"episodes, then {s['evaluation_episodes']} evaluation episodes per task (end at success; reward "
             f"tokens: {s['eval_reward']})"]
    width = max(len("mean over tasks"), *(len(t) for t in result["success_per_task"]))
    lines.append(f"{'task'.ljust(width)}  success")
    lines += [f"{task.ljust(width)}  {value:7.3f}" for task, value in result["success_per_task"].items()]
    lines.append(f"{'mean over tasks'.ljust(width)}  {result['success_mean']:7.3f}   "
                 f"(mean return {result['return_mean']:.2f}, {result['timing']['wall_s']:.0f} s)")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


__all__ = ["MetaWorldAgent", "MetaWorldIDTAgent", "make_agent", "score_checkpoint", "format_table",
           "load_checkpoint_for_metaworld", "check_meta_batch_size", "current_task_ids", "benchmark_name",
           "model_observation"]
