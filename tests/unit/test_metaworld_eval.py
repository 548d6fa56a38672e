"""Unit tests of dicp_ray.evaluate.metaworld (the adapter to metaworld.evaluation) on real MuJoCo, tiny scale.

Checks that Meta-World's test goals for split seed s are our test ids of split s with the same observations
and dynamics, that the agent's contexts hold exactly what our env records (rewards from Timestep at the right
positions, episode ends), the evaluation-phase reward tokens and reset, that it acts exactly like
``dicp_ray.evaluate.run_episodes`` driving the same model, the same for the IDT adapter (``MetaWorldIDTAgent``,
frozen episodes restored on reset), and the CLI's error paths (all raised before any
env is built).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dicp_ray.agents.agent import make_agent as make_in_context_agent
from dicp_ray.agents.plan import Context, PlannerSettings
from dicp_ray.envs.meta_world import ML1Env
from dicp_ray.evaluate import metaworld as MWE
from dicp_ray.evaluate import metaworld_adapter as MWA
from dicp_ray.models.checkpoints import load_checkpoint


def make_test_envs(task: str, split_seed: int, meta_batch_size: int, steps: int):
    import metaworld

    envs = metaworld.make_ml_envs(task, seed=split_seed, meta_batch_size=meta_batch_size, split="test",
                                  max_episode_steps=steps, terminate_on_success=False, task_select="pseudorandom")
    envs.call("toggle_sample_tasks_on_reset", False)
    return envs


def world(model, past: Context, query, action):
    """The world model's reward and next observation for `action` at `query` after the context `past`."""
    with torch.no_grad():
        preds, _ = model(past.as_batch(query, action))
    return preds["reward"], preds.get("next_obs")  # None: no next-observation head (Meta-World default)


def load(path):
    model, _ = load_checkpoint(path)
    return model.eval()


@pytest.mark.parametrize("task,split_seed", [("reach-v3", 0), ("reach-v3", 1), ("hammer-v3", 0)])
def test_metaworld_test_goals_are_our_test_ids_with_identical_observations(task, split_seed):
    envs = make_test_envs(task, split_seed, meta_batch_size=2, steps=20)
    try:
        envs.call("sample_tasks")
        obs, _ = envs.reset()
        ids = MWE.current_task_ids(envs, "ML1", task, split_seed)
        assert len(set(ids)) == 2 and all(split_seed * 100 + 50 <= i < split_seed * 100 + 100 for i in ids)
        ours = [ML1Env(i, task=task, horizon=20) for i in ids]
        dim = ours[0].obs_dim
        assert dim == (18 if task == "hammer-v3" else 11)
        for env, mw_env, row in zip(ours, envs.envs, MWA.model_observation(obs, dim)):
            np.testing.assert_array_equal(mw_env.unwrapped._last_rand_vec, env.meta_world_env._last_rand_vec)
            np.testing.assert_array_equal(env.reset()[0], row)
            np.testing.assert_array_equal(mw_env.unwrapped._target_pos, env.meta_world_env._target_pos)  # goal
            np.testing.assert_array_equal(mw_env.unwrapped._get_pos_objects(), env.meta_world_env._get_pos_objects())
        rng = np.random.default_rng(split_seed)
        for _t in range(25):                                   # across the 20-step truncation (SAME_STEP reset)
            action = np.clip(rng.uniform(-1.5, 1.5, (2, 4)), -1, 1).astype(np.float32)
            obs, reward, _, truncated, info = envs.step(action)
            for i, env in enumerate(ours):
                mine, my_reward, _, my_truncated, _ = env.step(action[i])
                assert my_reward == reward[i] and my_truncated == truncated[i]
                if my_truncated:
                    np.testing.assert_array_equal(mine, info["final_obs"][i][:dim].astype(np.float32))
                    mine = env.reset()[0]
                np.testing.assert_array_equal(mine, obs[i, :dim].astype(np.float32))
        assert 39 - dim > 0 and np.all(obs[:, -3:] == 0)      # goal hidden in the 39 numbers too
    finally:
        envs.close()


class RecordingAgent(MWA.MetaWorldAgent):
    """Keeps what metalearning_evaluation passed: every Timestep, and the envs' goals at init()."""

    def __init__(self, *args, envs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.timesteps, self.envs, self.goals = [], envs, []

    def init(self):
        super().init()
        self.goals.append(MWE.current_task_ids(self.envs, "ML1", "reach-v3", 0))

    def step(self, timestep):
        self.timesteps.append(timestep)
        super().step(timestep)


@pytest.mark.parametrize("key", ["world_model", "no_world_model", "world_model_next_obs"])
def test_adaptation_context_equals_what_our_env_records(key, tiny_meta_world_checkpoints, one_thread):
    from metaworld.evaluation import metalearning_evaluation

    model, steps = load(tiny_meta_world_checkpoints[key]), 20
    envs = make_test_envs("reach-v3", 0, meta_batch_size=2, steps=steps)
    agent = RecordingAgent(model, horizon=steps, seed=3, envs=envs)
    try:
        success, _, _ = metalearning_evaluation(agent, envs, num_evals=1, adaptation_episodes=2,
                                                evaluation_episodes=1)
    finally:
        envs.close()
    assert 0.0 <= success <= 1.0 and len(agent.goals) == 1 and len(agent.timesteps) == 2 * steps
    for i, task_id in enumerate(agent.goals[0]):
        ctx = agent.context(i, frozen=True)
        assert ctx["obs"].shape == (2 * steps, 11)                       # k-1 = 199 > 40: all kept
        env = ML1Env(task_id, task="reach-v3", horizon=steps)
        obs, _ = env.reset()
        for t in range(2 * steps):
            np.testing.assert_array_equal(ctx["obs"][t], obs)
            np.testing.assert_array_equal(ctx["action"][t], agent.timesteps[t].action[i])
            assert np.all(np.abs(ctx["action"][t]) <= 1)
            next_obs, reward, _, truncated, _ = env.step(ctx["action"][t])
            assert ctx["reward"][t] == np.float32(reward) == np.float32(agent.timesteps[t].reward[i])
            assert truncated == bool(agent.timesteps[t].truncated[i]) == (t % steps == steps - 1)
            if not truncated:
                np.testing.assert_array_equal(ctx["next_obs"][t], next_obs)
                obs = next_obs
                continue
            # Episode end: Meta-World gives the agent the reset obs, not the final one. A world model that
            # predicts next observations stores its prediction; the others (Meta-World's default) the obs again.
            assert agent.has_next_obs_head == (key == "world_model_next_obs")
            if agent.has_next_obs_head:
                past = Context(*(torch.as_tensor(ctx[c][None, :t]) for c in ("obs", "action", "reward",
                                                                            "next_obs")))
                _, predicted = world(model, past, torch.as_tensor(ctx["obs"][None, t]),
                                            torch.as_tensor(ctx["action"][None, t]))
                np.testing.assert_allclose(ctx["next_obs"][t], predicted[0].numpy(), rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(ctx["next_obs"][t], ctx["obs"][t])
            assert not np.array_equal(ctx["next_obs"][t], next_obs)
            obs, _ = env.reset()


def fake_obs(rng, n):
    return rng.normal(size=(n, 39))


class Step:
    """A metaworld.evaluation.Timestep look-alike (the agent reads attributes only)."""

    def __init__(self, observation, action, reward, terminated, truncated):
        self.observation, self.action, self.reward = observation, action, reward
        self.terminated, self.truncated, self.aux_policy_outputs = terminated, truncated, {}


@pytest.mark.parametrize("eval_reward", ["predicted", "zero"])
def test_eval_phase_reward_tokens_reset_and_init(eval_reward, tiny_meta_world_checkpoints, one_thread):
    model, rng, n = load(tiny_meta_world_checkpoints["world_model"]), np.random.default_rng(0), 3
    agent = MWA.MetaWorldAgent(model, horizon=4, eval_reward=eval_reward, seed=0)
    agent.init()
    obs = fake_obs(rng, n)
    for t in range(6):                                               # adaptation: episodes of 4 steps
        actions, aux = agent.adapt_action(obs)
        assert actions.dtype == np.float32 and actions.shape == (n, 4) and not aux["planned"].any()
        done = np.full(n, t % 4 == 3)
        agent.step(Step(obs, actions, np.arange(n) + 10.0 * t, np.zeros(n, bool), done))
        obs = fake_obs(rng, n)
    agent.adapt()                                # step 6 was not an episode end: stored as one (predicted)
    frozen = [agent.context(i, frozen=True) for i in range(n)]
    assert all(len(c["reward"]) == 6 for c in frozen)
    np.testing.assert_array_equal(frozen[1]["reward"], [1, 11, 21, 31, 41, 51])
    agent.reset(np.ones(n, bool))
    contexts, queries, actions = [], [], []
    for _t in range(3):                                               # an evaluation episode
        queries.append(obs[0, :11].astype(np.float32))
        actions.append(agent.eval_action(obs)[0])
        contexts.append(agent.context(0))                            # what action t was chosen with
        obs = fake_obs(rng, n)
        agent.reset(np.zeros(n, bool))                               # no episode ended: a no-op
    ctx = agent.context(0)
    assert len(ctx["reward"]) == 6 + 2                               # the 3rd waits for its next obs
    for t in range(2):
        if eval_reward == "zero":
            assert ctx["reward"][6 + t] == 0
            continue
        past = Context(*(torch.as_tensor(contexts[t][c][None]) for c in ("obs", "action", "reward", "next_obs")))
        predicted, _ = world(model, past, torch.as_tensor(queries[t][None]), torch.as_tensor(actions[t][None]))
        assert ctx["reward"][6 + t] == pytest.approx(float(predicted.clamp(0, 10)), abs=1e-6)
    if eval_reward == "predicted":
        assert ctx["reward"][6:8].max() > 0                          # distinguishable from "zero"
    np.testing.assert_array_equal(ctx["obs"][6:8], np.stack(queries[:2]))
    np.testing.assert_array_equal(ctx["next_obs"][6], queries[1])
    agent.reset(np.array([True, False, False]))                      # env 0's episode ended
    for c in ("obs", "action", "reward", "next_obs"):
        np.testing.assert_array_equal(agent.context(0)[c], frozen[0][c])
    assert len(agent.context(1)["reward"]) == 8
    agent.init()                                                     # a new round forgets everything
    with pytest.raises(RuntimeError, match="no observation"):
        agent.context(0)
    agent.adapt_action(obs)
    assert len(agent.context(0)["reward"]) == 0


def test_protocol_misuse_and_options_are_refused(tiny_meta_world_checkpoints):
    wm, plain = load(tiny_meta_world_checkpoints["world_model"]), load(tiny_meta_world_checkpoints["no_world_model"])
    with pytest.raises(ValueError, match="needs a world model"):
        MWA.MetaWorldAgent(plain, mode="plan")
    with pytest.raises(ValueError, match="reward head"):
        MWA.MetaWorldAgent(plain, eval_reward="predicted")
    assert MWA.MetaWorldAgent(plain).eval_reward == "zero" and MWA.MetaWorldAgent(wm).eval_reward == "predicted"
    agent, rng = MWA.MetaWorldAgent(wm), np.random.default_rng(1)
    obs = fake_obs(rng, 2)
    with pytest.raises(RuntimeError, match="without a preceding adapt_action"):
        agent.step(Step(obs, np.zeros((2, 4)), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool)))
    actions, _ = agent.adapt_action(obs)
    with pytest.raises(ValueError, match="not the observation"):
        agent.step(Step(obs + 1, actions, np.zeros(2), np.zeros(2, bool), np.zeros(2, bool)))
    with pytest.raises(RuntimeError, match="before step"):
        agent.adapt_action(obs)
    with pytest.raises(ValueError, match="batch of 3"):
        agent.eval_action(fake_obs(rng, 3))


def adapt_on_reach(agent, steps: int, horizon: int) -> tuple[int, list, list]:
    """Drive `agent` through `steps` adaptation steps on Meta-World's first reach-v3 test goal of split 0 (episodes
    of `horizon`) -> (our task id of that goal, the actions it took, whether each was planned)."""
    envs = make_test_envs("reach-v3", 0, meta_batch_size=1, steps=horizon)
    try:
        envs.call("sample_tasks")
        task_id = MWE.current_task_ids(envs, "ML1", "reach-v3", 0)[0]
        agent.init()
        obs, _ = envs.reset()
        mw_actions, planned = [], []
        for _ in range(steps):
            action, aux = agent.adapt_action(obs)
            next_obs, reward, terminated, truncated, _ = envs.step(action)
            agent.step(Step(obs, action, reward, terminated, truncated))
            mw_actions.append(action[0])
            planned.append(bool(aux["planned"][0]))
            obs = next_obs
    finally:
        envs.close()
    return task_id, mw_actions, planned


@pytest.mark.parametrize("mode,second_half", [("policy", False), ("plan", False), ("plan", True)])
def test_agent_acts_exactly_like_evaluate_run_episodes(mode, second_half, tiny_meta_world_checkpoints, one_thread):
    """Two 150-step episodes (k = 200) on the same goal with the same seed: Meta-World's env driven through the
    adapter and our env driven by evaluate.run_episodes (the loop of `dicp-ray evaluate`) execute identical
    actions, planned where the release plans (release:metaworld/model/ad.py:113)."""
    import gymnasium

    from dicp_ray.envs import meta_world
    from dicp_ray.evaluate.episodes import run_episodes

    model, horizon, steps = load(tiny_meta_world_checkpoints["world_model"]), 150, 300
    settings = PlannerSettings(depth=1, num_samples=4, second_half_only=second_half)
    agent = MWA.MetaWorldAgent(model, mode=mode, settings=settings, horizon=horizon, seed=7)
    task_id, mw_actions, planned = adapt_on_reach(agent, steps, horizon=horizon)
    # The release's rule, restated: global step >= n_transit (k) and, in the second half, position > horizon / 2.
    k = model.spec.context_len
    assert planned == [mode == "plan" and t >= k and (not second_half or t % horizon > horizon // 2)
                       for t in range(steps)]
    assert sum(planned) == {"policy": 0, "plan": 74 if second_half else 100}[mode]   # steps 226.. / 200..

    # Our env, whose first episode ends at the next observation the adapter stored (Meta-World never shows it
    # the true final one: with no next-observation head, its own observation again).
    stored = agent.context(0)                          # the last k-1 of the `steps` stored transitions
    end = horizon - 1 - (steps - len(stored["obs"]))
    np.testing.assert_array_equal(stored["next_obs"][end], stored["obs"][end])
    ours = FinalObsRecorder(gymnasium.make_vec(meta_world.env_id("ML1"), num_envs=1,
                                               vectorization_mode="vector_entry_point", task_ids=[task_id],
                                               task="reach-v3", horizon=horizon),
                            final_obs={horizon - 1: stored["next_obs"][end]})
    learner = make_in_context_agent(model, 1, mode=mode, horizon=horizon, settings=settings,
                                    generator=torch.Generator().manual_seed(7))
    run_episodes(learner, ours, steps // horizon)
    num_planned = learner.num_planned
    ours.env.close()
    assert num_planned == agent.num_planned == sum(planned)
    np.testing.assert_array_equal(np.stack(ours.actions), np.stack(mw_actions))


# ----------------------------------------------------------------------------- IDT
class FinalObsRecorder:
    """Our vector env for a rollout loop, keeping the executed actions; `final_obs` replaces the next observation
    of the given global steps (what the adapter stored there: Meta-World never shows it the true one; None: the
    observation acted on, repeated, which the adapter stores for a model without next-observation head)."""

    def __init__(self, env, final_obs=None):
        self.env, self.num_envs, self.horizon, self.actions = env, env.num_envs, env.horizon, []
        self.final_obs, self.true_final_obs = final_obs or {}, {}

    def reset(self):
        out = self.env.reset()
        self.last_obs = out[0][0].copy()
        return out

    def step(self, action):
        next_obs, *rest = self.env.step(action)
        step = len(self.actions)
        self.actions.append(rest[-1]["action"][0])
        if step in self.final_obs:
            self.true_final_obs[step] = next_obs[0].copy()
            next_obs = next_obs.copy()
            stored = self.final_obs[step]
            next_obs[0] = self.last_obs if stored is None else stored
        self.last_obs = next_obs[0].copy()
        return (next_obs, *rest)


@pytest.mark.parametrize("mode,second_half", [("policy", False), ("plan", False), ("plan", True)])
def test_idt_agent_acts_exactly_like_evaluate_run_episodes(mode, second_half, tiny_meta_world_idt_checkpoints,
                                                            one_thread):
    """2.7 episodes of 100 steps on the same goal with the same seed: Meta-World's env driven through the IDT
    adapter and our env driven by evaluate.run_episodes execute identical actions, given that the reference's
    episodes end at the next observation the adapter stored (its own observation: no next-observation head), and
    plan where the release's IDT plans (release:metaworld/model/idt.py:103: blocks starting at step >= k and, in
    the second half, at a position > 50)."""
    import gymnasium

    from dicp_ray.envs import meta_world
    from dicp_ray.evaluate.episodes import run_episodes

    model, horizon, steps = load(tiny_meta_world_idt_checkpoints["world_model"]), 100, 270
    k, c = model.spec.context_len, model.spec.block_len
    assert (k, c) == (200, 10) and not model.spec.has_next_obs_head
    settings = PlannerSettings(depth=1, num_samples=4, second_half_only=second_half)
    agent = MWA.MetaWorldIDTAgent(model, mode=mode, settings=settings, horizon=horizon, seed=7)
    task_id, mw_actions, planned = adapt_on_reach(agent, steps, horizon=horizon)
    block_start = [t - t % c for t in range(steps)]
    assert planned == [mode == "plan" and b >= k and (not second_half or b % horizon > 50) for b in block_start]
    assert sum(planned) == {"policy": 0, "plan": 10 if second_half else 70}[mode]      # steps 260.. / 200..
    idt = agent.learner.agents[0]
    assert idt.num_finished == 2 and idt.t == steps - 2 * horizon - 1   # last step pending
    stored = agent.context(0)                                           # the newest k / c = 20 blocks
    assert stored["obs"].shape == (20, 11) and stored["z_dists"].shape == (19, 2 * model.spec.z_dim)
    assert stored["return_to_go"][-7] == model.spec.return_target == 1000.0       # episode 3's first block

    ours = FinalObsRecorder(gymnasium.make_vec(meta_world.env_id("ML1"), num_envs=1,
                                               vectorization_mode="vector_entry_point", task_ids=[task_id],
                                               task="reach-v3", horizon=horizon),
                            final_obs={horizon - 1: None, 2 * horizon - 1: None})
    learner = make_in_context_agent(model, 1, mode=mode, horizon=horizon, settings=settings,
                                    generator=torch.Generator().manual_seed(7))
    run_episodes(learner, ours, 3)
    num_planned = learner.num_planned
    ours.env.close()
    assert num_planned == {"policy": 0, "plan": 40 if second_half else 100}[mode]
    assert agent.num_planned == sum(planned)
    np.testing.assert_array_equal(np.stack(ours.actions[:steps]), np.stack(mw_actions))


@pytest.mark.parametrize("key,eval_reward", [("world_model", "predicted"), ("world_model", "zero"),
                                             ("no_world_model", "zero")])
def test_idt_eval_phase_frozen_context_reward_tokens_and_reset(key, eval_reward, tiny_meta_world_idt_checkpoints,
                                                              one_thread):
    from dicp_ray.agents.idt_continuous import IDTAgent

    model, rng, n, horizon = load(tiny_meta_world_idt_checkpoints[key]), np.random.default_rng(0), 2, 20
    agent = MWA.MetaWorldIDTAgent(model, horizon=horizon, eval_reward=eval_reward, seed=0)
    target = model.spec.return_target
    agent.init()
    obs = fake_obs(rng, n)
    adapt_obs = []
    for t in range(2 * horizon + 3):                       # adaptation: 2 whole episodes and 3 steps of a third
        adapt_obs.append(MWA.model_observation(obs, 11))
        actions, aux = agent.adapt_action(obs)
        assert actions.dtype == np.float32 and actions.shape == (n, 4) and not aux["planned"].any()
        done = np.full(n, t % horizon == horizon - 1)
        agent.step(Step(obs, actions, np.arange(n) + 0.1 * t, np.zeros(n, bool), done))
        obs = fake_obs(rng, n)
    agent.adapt()                                          # the unfinished third episode is dropped
    frozen = [agent.context(i, frozen=True) for i in range(n)]
    assert all(len(f["return_to_go"]) == 4 and len(f["z_dists"]) == 4 for f in frozen)   # 2 episodes x 2 blocks
    np.testing.assert_array_equal(frozen[0]["obs"], np.stack(adapt_obs[:2 * horizon:10])[:, 0])
    reward = 1 + 0.1 * np.arange(2 * horizon)                                             # env 1's rewards
    np.testing.assert_allclose(frozen[1]["return_to_go"], [target, target - reward[:10].sum(), target,
                                                           target - reward[20:30].sum()], rtol=1e-6)

    agent.reset(np.ones(n, bool))
    start_obs, start_state = obs, agent.generator.get_state()
    first, rewards_seen = agent.eval_action(start_obs), []
    for t in range(11):                                    # an evaluation episode: a block and one step
        if t:
            agent.eval_action(obs)
        rewards_seen.append(agent._p_reward.copy())
        obs = fake_obs(rng, n)
        agent.reset(np.zeros(n, bool))                     # no episode ended: a no-op
    own = np.array([r[0] for r in rewards_seen[:10]])
    block = agent.learner.agents[0]._block
    np.testing.assert_array_equal(block["reward"][0].numpy(), own)   # the block holds the rewards IDT was given
    if eval_reward == "zero":
        assert np.all(own == 0)
    else:
        assert np.all((own >= 0) & (own <= 10)) and own.max() > 0
        # the same reward by IDTAgent's own world model: a fresh agent on the frozen context, same draws
        ref_gen = torch.Generator()
        ref_gen.set_state(start_state)
        ref = IDTAgent(model, horizon, torch.full((1,), target), ref_gen)
        ref.restore_finished(agent.frozen[0])
        ref.start_episode()
        action = ref.act(torch.as_tensor(MWA.model_observation(start_obs, 11)[:1])).clamp(-1, 1)
        np.testing.assert_array_equal(action[0].numpy(), first[0])
        predicted = ref.world_preds(action)["reward"][0].clamp(0, 10)
        assert own[0] == pytest.approx(float(predicted), abs=1e-6)
    ctx = agent.context(0)                                 # the return-to-go falls by the rewards IDT was given
    assert len(ctx["return_to_go"]) == 6
    np.testing.assert_allclose(ctx["return_to_go"][4:], [target, target - own.sum()], rtol=1e-5)

    agent.reset(np.array([True, False]))                   # env 0's episode ended: back to the frozen context
    for name in frozen[0]:
        np.testing.assert_array_equal(agent.context(0)[name], frozen[0][name])
    assert agent.learner.agents[0].t is None and len(agent.context(1)["return_to_go"]) == 6
    agent.reset(np.ones(n, bool))                          # a new episode acts like the first one did
    agent.generator.set_state(start_state)
    np.testing.assert_array_equal(agent.eval_action(start_obs), first)
    agent.init()                                           # a new round forgets everything
    with pytest.raises(RuntimeError, match="no observation"):
        agent.context(0)


def test_idt_options_and_layouts_are_checked(tiny_meta_world_idt_checkpoints, tiny_meta_world_checkpoints):
    idt, idt_plain = (load(tiny_meta_world_idt_checkpoints[k]) for k in ("world_model", "no_world_model"))
    ad = load(tiny_meta_world_checkpoints["world_model"])
    assert isinstance(MWA.make_agent(idt), MWA.MetaWorldIDTAgent) and type(MWA.make_agent(ad)) is MWA.MetaWorldAgent
    with pytest.raises(ValueError, match="use MetaWorldIDTAgent"):
        MWA.MetaWorldAgent(idt)
    with pytest.raises(ValueError, match="needs a continuous-action 'idt' model"):
        MWA.MetaWorldIDTAgent(ad)
    with pytest.raises(ValueError, match="needs a world model"):
        MWA.MetaWorldIDTAgent(idt_plain, mode="plan")
    with pytest.raises(ValueError, match="block length 10 and divides its context length 200"):
        MWA.MetaWorldIDTAgent(idt, horizon=30)
    with pytest.raises(ValueError, match="depth 1 only"):
        MWA.MetaWorldIDTAgent(idt, mode="plan", settings=PlannerSettings(depth=2))
    assert MWA.MetaWorldIDTAgent(idt_plain).eval_reward == "zero"
    agent, rng = MWA.MetaWorldIDTAgent(idt, horizon=20), np.random.default_rng(1)
    obs = fake_obs(rng, 1)
    actions, _ = agent.adapt_action(obs)
    with pytest.raises(RuntimeError, match="ended after 1 steps"):        # episodes must last the horizon
        agent.step(Step(obs, actions, np.zeros(1), np.zeros(1, bool), np.ones(1, bool)))


# ----------------------------------------------------------------------------- checks and CLI errors
def test_meta_batch_size_must_split_the_test_goals():
    assert MWE.check_meta_batch_size("ML1", 10) == 10 and MWE.check_meta_batch_size("ML10", 25) == 25
    with pytest.raises(ValueError, match="multiple of the 5 test task classes"):
        MWE.check_meta_batch_size("ML10", 7)
    with pytest.raises(ValueError, match="must divide its 50 goals"):
        MWE.check_meta_batch_size("ML1", 3)
    with pytest.raises(ValueError, match="positive int"):
        MWE.check_meta_batch_size("ML1", 0)


@pytest.fixture
def no_envs(monkeypatch):
    """Any attempt to build Meta-World envs fails the test: errors must come first."""
    import metaworld

    def refuse(*args, **kwargs):
        raise AssertionError("envs were built before the arguments were checked")

    monkeypatch.setattr(metaworld, "make_ml_envs", refuse)


def grid_checkpoint(tmp_path, layout: str) -> str:
    from dicp_ray.config.load import config_from_dict
    from dicp_ray.models.checkpoints import build_model, save_checkpoint
    from dicp_ray.models.spec import ModelSpec

    spec = ModelSpec(layout=layout, obs_dim=2, num_actions=5, context_len=20, num_layers=1, num_heads=2,
                     embed_dim=8, mlp_dim=16, block_len=10)
    config = config_from_dict({"env": {"name": "Darkroom"}, "model": {"variant": layout},
                               "eval": {"modes": ["policy"]}})
    path = str(tmp_path / f"{layout}.pt")
    save_checkpoint(path, build_model(spec), {"config": config.to_dict(), "env_name": "Darkroom"})
    return path


def run_cli(capsys, *argv):
    from dicp_ray.cli import main

    code = main(["mw-eval", *argv])
    return code, capsys.readouterr().err


def test_cli_errors_come_before_any_env_is_built(tmp_path, capsys, no_envs, tiny_meta_world_checkpoints,
                                                 tiny_meta_world_idt_checkpoints):
    wm, plain = tiny_meta_world_checkpoints["world_model"], tiny_meta_world_checkpoints["no_world_model"]
    idt, idt_plain = tiny_meta_world_idt_checkpoints["world_model"], tiny_meta_world_idt_checkpoints["no_world_model"]
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["--checkpoint", str(tmp_path)], "does not exist"),
        (["--checkpoint", grid_checkpoint(tmp_path, "ad")], "trained on Darkroom, not Meta-World"),
        (["--checkpoint", grid_checkpoint(tmp_path, "idt")], "trained on Darkroom, not Meta-World"),
        (["--checkpoint", idt_plain, "--mode", "plan"], "needs a world model"),
        (["--checkpoint", idt, "--max-episode-steps", "30"], "multiple of its block length 10"),
        (["--checkpoint", plain, "--mode", "plan"], "needs a world model"),
        (["--checkpoint", plain, "--eval-reward", "predicted"], "--eval-reward predicted needs a world model"),
        (["--checkpoint", wm, "--meta-batch-size", "3"], "must divide its 50 goals"),
        (["--checkpoint", wm, "--num-evals", "0"], "--num-evals = 0 must be >= 1"),
        (["--checkpoint", wm, "--split-seed", "1"], "trained on split seed 0"),
        (["--checkpoint", wm, "--output", str(tmp_path / "nope" / "r.json")], "existing directory"),
    ]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cases.append((["--checkpoint", str(tmp_path / "bad.pt")], "not a readable torch checkpoint"))
    for argv, message in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.startswith("dicp-ray mw-eval: error:"), (argv, err)
    with pytest.raises(SystemExit):
        run_cli(capsys, "--checkpoint", wm, "--mode", "beam")
    assert not list(tmp_path.glob("*.json"))


def test_result_of_a_tiny_run_is_strict_json(tmp_path, tiny_meta_world_checkpoints, one_thread):
    result = MWE.score_checkpoint(tiny_meta_world_checkpoints["no_world_model"], num_evals=1,
                                  adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=10)
    json.dumps(result, allow_nan=False)
    assert result["settings"]["eval_reward"] == "zero" and result["settings"]["final_obs"] == "repeated obs"
    assert len(result["task_ids_per_round"]) == 1 and 50 <= result["task_ids_per_round"][0][0] < 100
    assert result["notes"] == ["max_episode_steps = 10, the model was trained on 100-step episodes"]
    assert "reach-v3" in MWE.format_table(result)
