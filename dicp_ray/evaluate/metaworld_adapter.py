"""A dicp_ray Meta-World checkpoint as Meta-World's ``MetaLearningAgent`` (the protocol of ``metaworld.evaluation``).

What it is
    ``MetaWorldAgent`` wraps a trained continuous AD checkpoint and ``MetaWorldIDTAgent`` a continuous IDT one (each
    with or without world model; ``make_agent`` picks by layout). Both drive the model through ``dicp_ray.agents.agent``
    -- the same in-context agent ``dicp-ray evaluate`` drives -- and only translate the protocol:
    init / adapt_action / step / adapt / eval_action / reset. ``dicp_ray.evaluate.metaworld.score_checkpoint`` runs it.

What the adapter does, env by env
* Observation: Meta-World's 39 numbers sliced to the model's ``spec.obs_dim`` (11, or 18 for two-object tasks)
  and cast to float32, which is exactly what `dicp_ray.envs.meta_world` returns for the same goal (tested).
* Action: the agent's (policy sample; mode "plan": DICP's sampled search once the context is full, with
  ``plan.second_half_only`` from step ``horizon // 2`` of each env's episode), clipped to [-1, 1] as float32;
  the context stores that clipped action (what our training data stores). AD acts on all envs in groups of
  equal context length and plan decision (one group in the adaptation phase); IDT keeps one ``IDTAgent`` per env
  (``lockstep=False``: evaluation episodes end at success at different steps per env).
* Context: a transition's next_obs is the observation of the next call for that env, so the agent observes
  each step one call late. Tested: identical actions to ``dicp_ray.evaluate.run_episodes`` on the same goal.

Deviations from ``dicp-ray evaluate`` that the protocol forces (documented in README.md as well):

1. **Final observation of an episode.** Meta-World's vector envs reset in the same step (SAME_STEP autoreset):
   the observation after the last step of an episode is the next episode's first one, and the true final
   observation (``infos["final_obs"]``) is never passed to the agent. The last transition of every
   adaptation episode therefore stores the world model's next-observation prediction (models with a
   world model trained with ``model.next_obs_loss: true``) or repeats its own observation (models without a
   next-observation head: Meta-World's default, as the release). ``dicp-ray evaluate`` stores the true one.
2. **No rewards in evaluation episodes.** The adaptation context is frozen at ``adapt()``. During an
   evaluation episode the episode's own transitions are appended to it with reward = the world model's
   predicted reward clipped to [0, 10] (``eval_reward="predicted"``, the default when the model has a reward
   head) or 0 (``eval_reward="zero"``, the default without a world model). ``reset(mask)`` (Meta-World calls
   it when an episode ends) drops the evaluation episode's transitions and restarts from the frozen context,
   so evaluation episodes never see each other. IDT's context is whole episodes: ``adapt()`` drops an
   unfinished one, and adaptation episodes must last exactly ``horizon`` steps.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dicp_ray.agents.agent import MODES, check_agent_options
from dicp_ray.agents.agent import make_agent as make_in_context_agent
from dicp_ray.agents.plan import PlannerSettings
from dicp_ray.envs.meta_world_tasks import HORIZON

EVAL_REWARDS = ("predicted", "zero")
REWARD_RANGE = (0.0, 10.0)             # Meta-World v2 rewards


def model_observation(observations, obs_dim: int) -> np.ndarray:
    """Meta-World's (N, 39) observations -> the model's (N, obs_dim) float32 ones: hand, gripper and the
    first obs_dim - 4 object numbers, cast exactly as `dicp_ray.envs.meta_world.MetaWorldEnv` does."""
    obs = np.asarray(observations)
    if obs.ndim != 2 or obs.shape[1] < obs_dim:
        raise ValueError(f"observations must be (num_envs, >= {obs_dim}), got shape {obs.shape}")
    return obs[:, :obs_dim].astype(np.float32)


class MetaWorldAgent:
    """Meta-World's ``MetaLearningAgent`` around a continuous AD model (``MetaWorldIDTAgent``: IDT).

    ``settings``: the planner's settings (mode "plan"); ``horizon``: the envs' episode length (the
    second-half rule of ``should_plan``); ``eval_reward``: "predicted" | "zero" | None (predicted when the
    model has a reward head); ``on_init``: called at every ``init()`` (score_checkpoint records the goals).
    The number of envs is taken from the first observation batch after ``init()``; ``learner`` is the
    ``dicp_ray.agents.agent`` agent of the current round.
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
        self.has_next_obs_head = bool(spec.has_next_obs_head and spec.num_obs_classes is None)
        if mode == "plan" and not self.has_reward_head:
            raise ValueError("mode 'plan' needs a world model with a reward regression head; this model has "
                             f"world_model={spec.world_model}: use mode 'policy'")
        if eval_reward is None:
            eval_reward = "predicted" if self.has_reward_head else "zero"
        if eval_reward not in EVAL_REWARDS:
            raise ValueError(f"eval_reward {eval_reward!r} is not known: choose one of {', '.join(EVAL_REWARDS)}")
        if eval_reward == "predicted" and not self.has_reward_head:
            raise ValueError("eval_reward='predicted' needs a world model with a reward head: use 'zero'")
        self.settings = settings if settings is not None else PlannerSettings(depth=1)
        try:
            check_agent_options(model, mode, horizon, self.settings)
        except ValueError as err:
            hint = " (use --max-episode-steps 100, the training episode length)" if "episodes whose" in str(err) else ""
            raise ValueError(f"{err}{hint}") from None
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.mode, self.eval_reward, self.horizon = mode, eval_reward, horizon
        self.obs_dim, self.act_dim = spec.obs_dim, spec.num_actions
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.on_init = on_init
        self.num_decisions = self.num_planned = 0
        self._clear()

    # -- state --------------------------------------------------------------
    def _clear(self) -> None:
        self.learner = None                      # the in-context agent of this round
        self.frozen = None                       # its contexts, frozen at adapt()
        self._num_envs: int | None = None

    def _ensure(self, num_envs: int) -> None:
        if self._num_envs is None:
            n = self._num_envs = num_envs
            self.learner = make_in_context_agent(self.model, n, mode=self.mode, horizon=self.horizon,
                                                 settings=self.settings, generator=self.generator, lockstep=False)
            self.frozen = self.learner.snapshot()
            self._pending = np.zeros(n, bool)                # an action whose transition is not stored yet
            self._reward_known = np.zeros(n, bool)
            self._p_obs = np.zeros((n, self.obs_dim), np.float32)
            self._p_action = np.zeros((n, self.act_dim), np.float32)
            self._p_reward = np.zeros(n, np.float32)
        elif num_envs != self._num_envs:
            raise ValueError(f"the agent holds {self._num_envs} envs since init(), got a batch of {num_envs}")

    def _obs(self, observations) -> np.ndarray:
        obs = model_observation(observations, self.obs_dim)
        self._ensure(obs.shape[0])
        return obs

    def context(self, env: int, frozen: bool = False) -> dict[str, np.ndarray]:
        """Env `env`'s current context (or the frozen adaptation context) as numpy arrays, oldest first."""
        if self.learner is None:
            raise RuntimeError("the agent has seen no observation since init()")
        return self.learner.context(env, self.frozen if frozen else None)

    # -- acting ---------------------------------------------------------------
    def _act(self, obs: np.ndarray, evaluating: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._pending.any() and not evaluating and not self._reward_known[self._pending].all():
            raise RuntimeError("adapt_action called again before step() reported the previous action's reward")
        rows = np.flatnonzero(self._pending)                 # they waited for this observation
        if len(rows):
            self.learner.observe(self._p_action[rows], self._p_reward[rows], obs[rows], rows=rows)
        self._pending[:] = False
        action = self.learner.act(obs).float().clamp(-1.0, 1.0)   # what the env executes and the context stores
        rewards = np.zeros(len(obs), np.float32)
        if evaluating and self.eval_reward == "predicted":
            reward, _ = self.learner.predict(action)
            rewards[:] = reward.float().clamp(*REWARD_RANGE).cpu().numpy()
        actions = action.cpu().numpy()
        planned = self.learner.planned.copy()
        self.num_decisions += len(obs)
        self.num_planned += int(planned.sum())
        self._p_obs[:], self._p_action[:], self._p_reward[:] = obs, actions, rewards
        self._pending[:], self._reward_known[:] = True, evaluating
        return actions, planned

    def _finish(self, rows: np.ndarray) -> None:
        """Close the episodes of `rows`: their last step gets the predicted next observation (or repeats its own)."""
        if not len(rows):
            return
        next_obs = self._p_obs[rows].copy()
        if self.has_next_obs_head:
            next_obs = self.learner.predict(self._p_action[rows], rows)[1].float().cpu().numpy()
        self.learner.observe(self._p_action[rows], self._p_reward[rows], next_obs, episode_end=True, rows=rows)
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
        self._finish(np.flatnonzero(done))

    def adapt(self) -> None:
        """End of the adaptation phase: freeze every env's context. A pending transition is stored as an episode
        end (the next phase starts with a reset); IDT drops an unfinished episode instead (whole episodes only)."""
        if self._num_envs is None:
            return
        if not self.learner.whole_episodes:
            self._finish(np.flatnonzero(self._pending & self._reward_known))
        self._pending[:] = False
        self.frozen = self.learner.snapshot()
        self.learner.restore(self.frozen)                   # every env starts a new episode

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
            self.learner.restore(self.frozen, rows)
            self._pending[rows] = False


class MetaWorldIDTAgent(MetaWorldAgent):
    """``MetaWorldAgent`` for a continuous IDT checkpoint: one ``dicp_ray.models.idt_continuous.IDTAgent`` per env (through
    ``dicp_ray.agents.agent.HierarchicalAgent``, lockstep=False), all drawing from the adapter's one generator in env order.

    Every episode's return-to-go starts at ``spec.return_target``. In an evaluation episode the reward IDT observes
    (reward token and return-to-go decrement) is the world model's predicted reward at the executed action, clipped
    to [0, 10] (``eval_reward="predicted"``), or 0 ("zero"). ``horizon`` (the envs' episode length) must be a
    multiple of the model's block length and divide its context length; adaptation episodes must last exactly
    ``horizon`` steps. Mode "plan": ``IDTAgent.plan_action`` (depth 1) on the blocks after step 50 once k steps were taken (IDTAgent.plan_ready).
    """

    LAYOUT = "idt"

    def __init__(self, model, **kwargs):
        if model.spec.layout == "idt" and model.spec.return_target is None:
            raise ValueError("this continuous IDT checkpoint has no model_spec.return_target (the initial "
                             "return-to-go): retrain it with this version of dicp_ray")
        super().__init__(model, **kwargs)


def make_agent(model, **kwargs) -> MetaWorldAgent:
    """The adapter for `model`'s layout: ``MetaWorldIDTAgent`` for IDT, else ``MetaWorldAgent`` (AD)."""
    return (MetaWorldIDTAgent if model.spec.layout == "idt" else MetaWorldAgent)(model, **kwargs)


__all__ = ["MetaWorldAgent", "MetaWorldIDTAgent", "make_agent", "model_observation", "EVAL_REWARDS", "REWARD_RANGE"]
