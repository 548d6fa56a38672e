"""Population PPO (dicp_ray/collect/population_ppo.py) against live Stable-Baselines3 PPO and against itself.

* one population update of N learners == N SB3 ``PPO.train()`` calls on the same rollouts (each SB3 model's
  weights copied in, the same minibatch permutations), parameters to float tolerance;
* the same for SB3's GAE (``compute_returns_and_advantage``), with and without the truncation bootstrap;
* one population update == N single-learner updates, bit for bit (what makes shards population-independent).
"""
from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import dicp_ray.envs  # noqa: F401  (registers the gymnasium ids)
from dicp_ray.collect.population_ppo import Layout, PPOSettings, gae, init_params, make_optimizer, ppo_update

sb3 = pytest.importorskip("stable_baselines3")

STREAMS, STEPS, MINIBATCH, EPOCHS = 4, 20, 30, 3      # 80 samples: minibatches of 30, 30, 20 (SB3's last)


class _TerminalAtHorizon(gym.Wrapper):
    """The release's env contract: ``terminated`` at the horizon, so SB3 never bootstraps there."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated or truncated, False, info


def _sb3_model(task_id: int, seed: int, bootstrap: bool):
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    def make():
        env = gym.wrappers.DtypeObservation(gym.make("dicp_ray/Darkroom-v0", task_id=task_id), np.float32)
        return env if bootstrap else _TerminalAtHorizon(env)

    model = PPO("MlpPolicy", DummyVecEnv([make] * STREAMS), learning_rate=3e-4, n_steps=STEPS,
                batch_size=MINIBATCH, n_epochs=EPOCHS, gamma=0.99, gae_lambda=0.95, clip_range=0.2,
                ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, seed=seed, device="cpu")
    warnings.filterwarnings("ignore", "You have specified a mini-batch size")
    model.set_logger(configure(None, []))
    return model


def _rollout(model) -> None:
    """SB3's own rollout (its sampling, its bootstrap, its GAE) into ``model.rollout_buffer``."""
    _, callback = model._setup_learn(10**6, callback=None)   # as learn() does: reset, buffers, callback
    for _ in range(3):                       # a few rollouts, so the buffer holds a learnt-ish policy's data
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, STEPS)
    model.rollout_buffer.generator_ready = False


def _copy_weights(models, layout: Layout) -> torch.Tensor:
    """SB3 policies -> ``(N, P)`` population parameters (Linear ``(out, in)`` -> our ``(in, out)``)."""
    params = torch.zeros(len(models), layout.size)
    for row, model in enumerate(models):
        policy = model.policy
        actor = [policy.mlp_extractor.policy_net[0], policy.mlp_extractor.policy_net[2], policy.action_net]
        critic = [policy.mlp_extractor.value_net[0], policy.mlp_extractor.value_net[2], policy.value_net]
        for linears, layers in ((actor, layout.actor), (critic, layout.critic)):
            for linear, layer in zip(linears, layers):
                layout.weight(params[row:row + 1], layer)[0] = linear.weight.detach().t()
                layout.bias(params[row:row + 1], layer)[0] = linear.bias.detach()
    return params


def _flat(buffer, name: str) -> np.ndarray:
    """A RolloutBuffer array ``(T, S, ...)`` in SB3's minibatch order ``(S * T, ...)``."""
    array = getattr(buffer, name)
    return array.swapaxes(0, 1).reshape(STREAMS * STEPS, *array.shape[2:])


@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_equals_sb3(bootstrap):
    torch.manual_seed(0)
    model = _sb3_model(task_id=10, seed=0, bootstrap=bootstrap)
    _rollout(model)
    buf = model.rollout_buffer
    with torch.no_grad():
        last_values = model.policy.predict_values(torch.as_tensor(model._last_obs)).numpy().reshape(-1)
    t_major = lambda a: a.T                                                  # noqa: E731  (T, S) -> (S, T)
    adv, ret = gae(t_major(buf.rewards), t_major(buf.values), t_major(buf.episode_starts), last_values,
                   model._last_episode_starts, 0.99, 0.95)
    np.testing.assert_allclose(adv, t_major(buf.advantages), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret, t_major(buf.returns), rtol=1e-6, atol=1e-6)
    # Without the bootstrap the horizon step's reward is the env's (0 or 1); with it, it carries gamma*V.
    last = buf.rewards[STEPS - 1]
    assert np.all(np.isin(last, [0.0, 1.0])) != bootstrap


def test_population_update_equals_sb3_train():
    """Two SB3 learners on different tasks with different shuffles == one population of two."""
    models = []
    for task_id, seed in ((3, 1), (60, 2)):
        torch.manual_seed(seed)
        model = _sb3_model(task_id, seed, bootstrap=False)
        _rollout(model)
        models.append(model)
    layout = Layout.build(2, 5, (64, 64))
    params = _copy_weights(models, layout).requires_grad_()
    perm_seeds = (11, 12)
    perms = []
    for seed in perm_seeds:
        np.random.seed(seed)
        perms.append(np.stack([np.random.permutation(STREAMS * STEPS) for _ in range(EPOCHS)]))
    batch = {"obs": np.stack([_flat(m.rollout_buffer, "observations") for m in models]),
             "actions": np.stack([_flat(m.rollout_buffer, "actions")[:, 0] for m in models]).astype(np.int64),
             "log_probs": np.stack([_flat(m.rollout_buffer, "log_probs") for m in models]),
             "advantages": np.stack([_flat(m.rollout_buffer, "advantages") for m in models]),
             "returns": np.stack([_flat(m.rollout_buffer, "returns") for m in models])}
    advantages = batch["advantages"]
    assert advantages.std() > 0.01                     # real signal, not an all-zero rollout
    ppo = PPOSettings(EPOCHS, MINIBATCH, 0.2, 0.5, 0.01, 0.5)
    ppo_update(params, make_optimizer(params, 3e-4), layout, ppo,
               {k: torch.from_numpy(v) for k, v in batch.items()}, torch.from_numpy(np.stack(perms)))
    for model, seed in zip(models, perm_seeds):
        np.random.seed(seed)                           # SB3 draws one np.random.permutation per epoch
        model.train()
    expected = _copy_weights(models, layout)
    before = _copy_weights([_sb3_model(3, 1, False)], layout)
    assert (expected - params.detach()).abs().max() < 1e-6
    assert (expected[0] - before[0]).abs().max() > 1e-4  # the update moved the weights (1e-6 is meaningful)


def test_population_update_equals_single_learner_updates_bit_for_bit():
    layout = Layout.build(2, 5, (64, 64))
    n, size = 5, 100
    gen = torch.Generator().manual_seed(0)
    start = init_params(layout, [7, 8, 9, 10, 11])
    batch = {"obs": torch.randint(0, 9, (n, size, 2), generator=gen).float(),
             "actions": torch.randint(0, 5, (n, size), generator=gen),
             "log_probs": torch.full((n, size), -math.log(5)) + 0.05 * torch.randn(n, size, generator=gen),
             "advantages": torch.randn(n, size, generator=gen),
             "returns": torch.randn(n, size, generator=gen)}
    perms = torch.stack([torch.stack([torch.randperm(size, generator=gen) for _ in range(4)])
                         for _ in range(n)])
    ppo = PPOSettings(4, 25, 0.2, 0.5, 0.0, 0.5)

    def run(rows: list[int]) -> torch.Tensor:
        params = start[rows].clone().requires_grad_()
        ppo_update(params, make_optimizer(params, 3e-4), layout, ppo, {k: v[rows] for k, v in batch.items()},
                   perms[rows])
        return params.detach()

    together = run(list(range(n)))
    assert not torch.equal(together, start)
    for row in range(n):
        assert torch.equal(run([row]), together[row:row + 1]), row
    assert torch.equal(run([3, 1]), together[[3, 1]])


def test_init_is_sb3_mlp_policy_init_and_seeded_per_learner():
    layout = Layout.build(2, 5, (64, 64))
    params = init_params(layout, [0, 1, 0])
    assert torch.equal(params[0], params[2]) and not torch.equal(params[0], params[1])
    for layers, head_gain in ((layout.actor, 0.01), (layout.critic, 1.0)):
        for k, layer in enumerate(layers):
            weight = layout.weight(params[1:2], layer)[0]
            gain = head_gain if k == len(layers) - 1 else math.sqrt(2)
            small = min(layer.fan_in, layer.fan_out)      # orthogonal: the smaller Gram matrix is gain^2 I
            gram = weight.t() @ weight if layer.fan_out == small else weight @ weight.t()
            assert torch.allclose(gram, gain ** 2 * torch.eye(small), atol=1e-5)
            assert not layout.bias(params, layer).any()
    # the padding of every block is zero
    mask = torch.ones(layout.size, dtype=torch.bool)
    for layer in (*layout.actor, *layout.critic):
        mask[layer.bias:layer.bias + layer.fan_out] = False
        for r in range(layer.fan_in):
            start = layer.weight + r * layer.cols
            mask[start:start + layer.fan_out] = False
    assert not params[:, mask].any()
