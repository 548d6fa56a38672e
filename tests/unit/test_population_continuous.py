"""Population PPO for continuous actions (Meta-World) against live Stable-Baselines3 PPO and against itself.

* one population update of N Gaussian learners == N SB3 ``PPO("MlpPolicy").train()`` calls on the same rollouts
  (SB3's own rollouts on real Meta-World reach-v3 with Meta-World's 39-number observation, each SB3 model's
  weights and log-std copied in, the same minibatch permutations), parameters to 1e-6;
* our Gaussian log-probability of SB3's buffered (unclipped) actions == SB3's buffered log-probs, and SB3's
  buffer holds unclipped samples while the env got them clipped;
* one population update == single-learner updates, bit for bit (N = 1 vs N = 3).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dicp_ray.collect.population_ppo import (
    Layout,
    PPOSettings,
    forward,
    gaussian_log_prob,
    init_params,
    make_optimizer,
    ppo_update,
)

sb3 = pytest.importorskip("stable_baselines3")
pytest.importorskip("metaworld")

STREAMS, STEPS, MINIBATCH, EPOCHS = 2, 100, 64, 3     # 200 samples: minibatches of 64, 64, 64, 8 (SB3's last)
OBS_DIM, ACT_DIM = 39, 4


def _sb3_model(task_id: int, seed: int):
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dicp_ray.envs.meta_world import ML1Env

    model = PPO("MlpPolicy", DummyVecEnv([lambda: ML1Env(task_id, task="reach-v3", observation="full")] * STREAMS),
                learning_rate=3e-4, n_steps=STEPS, batch_size=MINIBATCH, n_epochs=EPOCHS, gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, seed=seed,
                device="cpu")
    warnings.filterwarnings("ignore", "You have specified a mini-batch size")
    model.set_logger(configure(None, []))
    return model


def _rollout(model, rollouts: int) -> None:
    """SB3's own rollouts (its sampling, clipping, truncation bootstrap, GAE) into ``model.rollout_buffer``."""
    _, callback = model._setup_learn(10**6, callback=None)
    for _ in range(rollouts):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, STEPS)
    model.rollout_buffer.generator_ready = False


def _copy_weights(models, layout: Layout) -> torch.Tensor:
    """SB3 policies -> ``(N, P)`` population parameters, log-std included."""
    params = torch.zeros(len(models), layout.size)
    for row, model in enumerate(models):
        policy = model.policy
        actor = [policy.mlp_extractor.policy_net[0], policy.mlp_extractor.policy_net[2], policy.action_net]
        critic = [policy.mlp_extractor.value_net[0], policy.mlp_extractor.value_net[2], policy.value_net]
        for linears, layers in ((actor, layout.actor), (critic, layout.critic)):
            for linear, layer in zip(linears, layers):
                layout.weight(params[row:row + 1], layer)[0] = linear.weight.detach().t()
                layout.bias(params[row:row + 1], layer)[0] = linear.bias.detach()
        layout.log_std_of(params[row:row + 1])[0] = policy.log_std.detach()
    return params


def _flat(buffer, name: str) -> np.ndarray:
    array = getattr(buffer, name)
    return array.swapaxes(0, 1).reshape(STREAMS * STEPS, *array.shape[2:])


@pytest.fixture(scope="module")
def sb3_models():
    """Two SB3 learners on two reach goals, two rollouts each (the second from an updated policy)."""
    models = []
    for task_id, seed in ((3, 1), (17, 2)):
        torch.manual_seed(seed)
        model = _sb3_model(task_id, seed)
        _rollout(model, 1)
        model.train()                                   # a trained log-std (not all zeros) and policy
        policy = model.policy                           # a fresh Adam (SB3's own class and kwargs: eps 1e-5)
        policy.optimizer = policy.optimizer_class(policy.parameters(), lr=3e-4, **policy.optimizer_kwargs)
        _rollout(model, 1)
        models.append(model)
    return models


def test_gaussian_log_prob_and_buffer_semantics_equal_sb3(sb3_models):
    layout = Layout.build(OBS_DIM, ACT_DIM, (64, 64), continuous=True)
    params = _copy_weights(sb3_models, layout)
    assert layout.log_std_of(params).abs().max() > 1e-4           # the copied log-std is a trained one
    obs = torch.from_numpy(np.stack([_flat(m.rollout_buffer, "observations") for m in sb3_models]))
    actions = torch.from_numpy(np.stack([_flat(m.rollout_buffer, "actions") for m in sb3_models]))
    mean, values = forward(params, layout, obs)
    log_prob = gaussian_log_prob(mean, layout.log_std_of(params).unsqueeze(1), actions)
    expected = np.stack([_flat(m.rollout_buffer, "log_probs") for m in sb3_models])
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    # the buffer keeps the unclipped Gaussian sample (the env got it clipped to [-1, 1])
    assert (actions.abs() > 1).any()


def test_population_update_equals_sb3_train(sb3_models):
    """Two SB3 Gaussian learners on different goals with different shuffles == one population of two."""
    layout = Layout.build(OBS_DIM, ACT_DIM, (64, 64), continuous=True)
    before = _copy_weights(sb3_models, layout)
    params = before.clone().requires_grad_()
    perm_seeds = (11, 12)
    perms = []
    for seed in perm_seeds:
        np.random.seed(seed)
        perms.append(np.stack([np.random.permutation(STREAMS * STEPS) for _ in range(EPOCHS)]))
    batch = {"obs": np.stack([_flat(m.rollout_buffer, "observations") for m in sb3_models]),
             "actions": np.stack([_flat(m.rollout_buffer, "actions") for m in sb3_models]),
             "log_probs": np.stack([_flat(m.rollout_buffer, "log_probs") for m in sb3_models]),
             "advantages": np.stack([_flat(m.rollout_buffer, "advantages") for m in sb3_models]),
             "returns": np.stack([_flat(m.rollout_buffer, "returns") for m in sb3_models])}
    assert batch["advantages"].std() > 0.01 and batch["actions"].dtype == np.float32
    ppo = PPOSettings(EPOCHS, MINIBATCH, 0.2, 0.5, 0.01, 0.5)
    ppo_update(params, make_optimizer(params, 3e-4), layout, ppo,
               {k: torch.from_numpy(v) for k, v in batch.items()}, torch.from_numpy(np.stack(perms)))
    for model, seed in zip(sb3_models, perm_seeds):
        np.random.seed(seed)                           # SB3 draws one np.random.permutation per epoch
        model.train()
    expected = _copy_weights(sb3_models, layout)
    assert (expected - params.detach()).abs().max() < 1e-6
    assert (expected - before).abs().max() > 1e-4      # the update moved the weights (1e-6 is meaningful)
    log_std = layout.log_std_of(expected) - layout.log_std_of(before)
    assert log_std.abs().max() > 1e-5                  # ... the log-std included


def test_continuous_update_alone_equals_in_a_population_bit_for_bit():
    layout = Layout.build(OBS_DIM, ACT_DIM, (64, 64), continuous=True)
    n, size = 3, 400
    gen = torch.Generator().manual_seed(0)
    start = init_params(layout, [7, 8, 9])
    assert not layout.log_std_of(start).any()          # SB3's log_std_init = 0.0
    batch = {"obs": torch.randn(n, size, OBS_DIM, generator=gen),
             "actions": 1.5 * torch.randn(n, size, ACT_DIM, generator=gen),
             "log_probs": -4 * 1.4189 + 0.05 * torch.randn(n, size, generator=gen),
             "advantages": torch.randn(n, size, generator=gen),
             "returns": torch.randn(n, size, generator=gen)}
    perms = torch.stack([torch.stack([torch.randperm(size, generator=gen) for _ in range(3)])
                         for _ in range(n)])
    ppo = PPOSettings(3, 200, 0.2, 0.5, 0.01, 0.5)

    def run(rows: list[int]) -> torch.Tensor:
        params = start[rows].clone().requires_grad_()
        ppo_update(params, make_optimizer(params, 3e-4), layout, ppo, {k: v[rows] for k, v in batch.items()},
                   perms[rows])
        return params.detach()

    together = run(list(range(n)))
    assert not torch.equal(together, start)
    assert layout.log_std_of(together).abs().min() > 0
    for row in range(n):
        assert torch.equal(run([row]), together[row:row + 1]), row
