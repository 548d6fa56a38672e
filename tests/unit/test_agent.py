"""Unit tests of dicp_ray.agents.agent, the one in-context agent, on the real grid-world vector envs.

The agent driving AD and DPT (policy and plan) and IDT (policy) on a tiny checkpoint each takes exactly the actions
of a hand-written in-context loop that calls the planner and IDTAgent directly (the loops evaluate.py had before the
agent existed); per-row use (groups, predict, snapshot / restore, lockstep refusal) and option errors.
"""
from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch

from dicp_ray.agents.agent import HierarchicalAgent, TransformerAgent, check_agent_options, make_agent
from dicp_ray.agents.idt_grid import GridIDTAgent
from dicp_ray.agents.plan import Context, PlannerSettings, plan_discrete, sample_policy_action, should_plan
from dicp_ray.envs import GRID_SPECS, cell_obs, split_tasks
from dicp_ray.evaluate.episodes import run_episodes
from dicp_ray.models.checkpoints import build_model, load_checkpoint, save_checkpoint
from dicp_ray.models.spec import ModelSpec

HORIZON, EPISODES, K = 20, 4, 40           # Darkroom: context of 2 episodes, planning from step 39 on
SETTINGS = PlannerSettings(beam_width=3, depth=3)
OBS_TABLE = torch.as_tensor(np.stack([cell_obs(c) for c in range(81)]), dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random checkpoint per layout (unit-scale weights, so that actions and plans vary), saved and loaded."""
    root, paths = tmp_path_factory.mktemp("agent_ckpt"), {}
    for layout in ("ad", "dpt", "idt"):
        torch.manual_seed(0)
        spec = ModelSpec(layout=layout, context_len=K, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
                         reward_max=1.0, obs_scale=1.0 / 8, block_len=10, return_scale=1.0 / HORIZON)
        model = build_model(spec)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        paths[layout] = str(root / f"{layout}.pt")
        save_checkpoint(paths[layout], model, {"variant": layout})
    return paths


def load(path):
    return load_checkpoint(path)[0].eval()


class Recorder:
    """Darkroom's 8 test tasks of split 0 as one vector env, keeping every action it was given."""

    def __init__(self):
        _, test_ids = split_tasks("Darkroom", 0, 0.9)
        self.env = gymnasium.make_vec(GRID_SPECS["Darkroom"].env_id, num_envs=len(test_ids),
                                      vectorization_mode="vector_entry_point", task_ids=test_ids)
        self.num_envs, self.horizon, self.actions = self.env.num_envs, self.env.horizon, []

    def max_returns(self):
        return self.env.max_returns()

    def reset(self):
        return self.env.reset()

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        return self.env.step(action)


@torch.no_grad()
def hand_written_loop(model, env, mode: str, generator) -> int:
    """The in-context loop without the agent: whole histories, context = their last k-1 rows, the planner or the
    policy called directly. Returns the number of planned decisions."""
    N, k, total, planned, step = env.num_envs, model.spec.context_len, EPISODES * env.horizon, 0, 0
    hist = Context(torch.zeros(N, total, 2), torch.zeros(N, total, dtype=torch.long), torch.zeros(N, total),
                   torch.zeros(N, total, 2))
    for _ in range(EPISODES):
        obs, _ = env.reset()
        for t in range(env.horizon):
            start = max(0, step - (k - 1))
            context, query = hist.map(lambda x, start=start, step=step: x[:, start:step]), torch.as_tensor(obs, dtype=torch.float32)
            if mode == "plan" and should_plan(SETTINGS, k, step, t, env.horizon, discrete=True):  # release: step >= k
                action = plan_discrete(model, context, query, torch.full((N,), env.horizon - t), OBS_TABLE, SETTINGS,
                                       generator)
                planned += N
            else:
                action = sample_policy_action(model, context, query, generator)
            next_obs, reward, _, _, _ = env.step(action.numpy())
            for column, value in zip(hist.tensors(), (obs, action, reward, next_obs)):
                column[:, step] = torch.as_tensor(value).to(column.dtype)
            obs, step = next_obs, step + 1
    return planned


@torch.no_grad()
def hand_written_idt_loop(model, env, mode: str, generator) -> int:
    """The grid IDT's loop without the agent interface (GridIDTAgent called directly); returns planned decisions."""
    agent = GridIDTAgent(model, env.horizon, torch.as_tensor(env.max_returns(), dtype=torch.float32), generator)
    planned = 0
    for _ in range(EPISODES):
        obs, _ = env.reset()
        agent.start_episode()
        for _ in range(env.horizon):
            query = torch.as_tensor(obs, dtype=torch.float32)
            if mode == "plan" and agent.plan_ready:
                action = agent.plan_action(query, SETTINGS.beam_width, SETTINGS.use_cache)
                planned += env.num_envs
            else:
                action = agent.act(query)
            next_obs, reward, _, _, _ = env.step(action.numpy())
            agent.observe(action, torch.as_tensor(reward), torch.as_tensor(next_obs))
            obs = next_obs
    return planned


@pytest.mark.parametrize("layout,mode", [("ad", "policy"), ("ad", "plan"), ("dpt", "policy"), ("dpt", "plan"),
                                         ("idt", "policy"), ("idt", "plan")])
def test_agent_acts_like_the_hand_written_loop(layout, mode, checkpoints, one_thread):
    model = load(checkpoints[layout])
    ours, reference = Recorder(), Recorder()
    target = torch.as_tensor(ours.max_returns(), dtype=torch.float32) if layout == "idt" else None
    agent = make_agent(model, ours.num_envs, mode=mode, horizon=HORIZON, settings=SETTINGS,
                       generator=torch.Generator().manual_seed(5), obs_table=OBS_TABLE, return_target=target)
    assert isinstance(agent, HierarchicalAgent if layout == "idt" else TransformerAgent)
    returns, successes = run_episodes(agent, ours, EPISODES)
    if layout == "idt":
        planned = hand_written_idt_loop(model, reference, mode, torch.Generator().manual_seed(5))
    else:
        planned = hand_written_loop(model, reference, mode, torch.Generator().manual_seed(5))
    assert returns.shape == (8, EPISODES) and successes is None
    np.testing.assert_array_equal(np.stack(ours.actions), np.stack(reference.actions))
    assert agent.num_planned == planned == (8 * (EPISODES * HORIZON - K) if mode == "plan" else 0)
    assert agent.num_decisions == 8 * EPISODES * HORIZON and (agent.t == 0).all()
    assert len({a.tobytes() for a in ours.actions}) > 10                       # not a constant policy


def test_rows_act_in_groups_and_snapshots_restore(checkpoints, one_thread):
    """Rows with different context lengths act in groups (each like a batch of its own); predict decodes the
    world model's classes; restore brings a row's context back and restarts its episode."""
    model = load(checkpoints["dpt"])
    g = torch.Generator().manual_seed(0)
    agent = make_agent(model, 3, mode="plan", horizon=100, settings=SETTINGS, generator=g, obs_table=OBS_TABLE)
    obs = torch.randint(0, 9, (3, 2)).float()
    for step in range(K + 2):                                  # row 2 restarts from an empty context at step 10
        action = agent.act(obs)
        next_obs = torch.randint(0, 9, (3, 2)).float()
        agent.observe(action, torch.zeros(3), next_obs)
        if step == 9:
            empty = make_agent(model, 3, mode="plan", horizon=100, settings=SETTINGS, obs_table=OBS_TABLE).snapshot()
            agent.restore(empty, rows=[2])
            assert agent.t.tolist() == [10, 10, 0] and agent.context(2)["obs"].shape == (0, 2)
        obs = next_obs
    assert agent.history.num_ctx().tolist() == [K - 1, K - 1, 32] and agent.t.tolist() == [42, 42, 32]
    assert agent.planned.tolist() == [True, True, False]
    # The same draws, group by group, reproduce the agent's actions on the rows' own contexts.
    state = g.get_state()
    actions = agent.act(obs)
    g.set_state(state)
    ctx = [agent.history.context(np.array(rows)) for rows in ([0, 1], [2])]
    sampled = sample_policy_action(model, ctx[1], obs[2:], g)     # groups in sorted (length, plan) order
    planned = plan_discrete(model, ctx[0], obs[:2], torch.full((2,), 58), OBS_TABLE, SETTINGS, g)
    assert torch.equal(actions, torch.cat([planned, sampled]))
    reward, next_obs = agent.predict(actions)
    with torch.no_grad():
        preds = model(ctx[0].as_batch(obs[:2], actions[:2]))[0]
    assert torch.equal(reward[:2], preds["reward_logits"].argmax(-1).float())
    assert torch.equal(next_obs[:2], OBS_TABLE[preds["next_obs_logits"].argmax(-1)])


def test_lockstep_idt_refuses_rows_and_options_are_checked(checkpoints):
    idt, ad = load(checkpoints["idt"]), load(checkpoints["ad"])
    agent = make_agent(idt, 2, horizon=HORIZON, return_target=torch.tensor([5.0, 6.0]))
    agent.act(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="lockstep"):
        agent.observe(torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1, 2), rows=[0])
    per_task = make_agent(idt, 2, horizon=HORIZON, return_target=torch.tensor([5.0, 6.0]), lockstep=False)
    per_task.act(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="ended after 1 steps"):
        per_task.observe(torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2, 2), episode_end=True)
    with pytest.raises(ValueError, match="block length 10"):
        check_agent_options(idt, "policy", 15, SETTINGS)
    assert make_agent(idt, 2, mode="plan", horizon=HORIZON, return_target=torch.zeros(2)).mode == "plan"  # DICP-IDT
    with pytest.raises(ValueError, match="mode 'greedy'"):
        make_agent(ad, 2, mode="greedy", horizon=HORIZON)
    with pytest.raises(ValueError, match="obs_table"):
        make_agent(ad, 2, mode="plan", horizon=HORIZON)
    with pytest.raises(ValueError, match="eval"):
        make_agent(ad.train(), 2, horizon=HORIZON)
