"""model.reward_loss_weight: the Meta-World reward MSE's weight inside the world-model loss."""
from __future__ import annotations

import pytest
import torch

from dicp_ray.config.load import config_from_dict, replace
from dicp_ray.config.schema import ConfigError, ExperimentConfig
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer
from dicp_ray.train.runs import run_identity


def _continuous_batch(B=4, T=5, D=11, A=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"ctx_obs": torch.randn(B, T, D, generator=g), "ctx_action": torch.rand(B, T, A, generator=g) * 2 - 1,
             "ctx_reward": torch.rand(B, T, generator=g) * 10, "ctx_next_obs": torch.randn(B, T, D, generator=g),
             "query_obs": torch.randn(B, D, generator=g), "query_action": torch.rand(B, A, generator=g) * 2 - 1}
    targets = {"target_action": batch["query_action"], "target_reward": torch.rand(B, generator=g) * 10,
               "target_next_obs": torch.randn(B, D, generator=g)}
    return batch, targets


@pytest.mark.parametrize("weight", [1.0, 0.01])
def test_weight_scales_only_the_reward_term(weight):
    spec = dict(world_model=True, obs_dim=11, discrete_actions=False, num_actions=4, num_obs_classes=None,
                reward_classes=None, reward_max=10.0, context_len=6, num_layers=1, num_heads=2, embed_dim=16,
                mlp_dim=32)
    torch.manual_seed(0)
    model = DICPTransformer(ModelSpec(**spec, reward_loss_weight=weight)).eval()
    batch, targets = _continuous_batch()
    _, losses = model(batch, targets, world_model_weight=0.5)
    expected = losses["loss_action"] + 0.5 * (weight * losses["loss_reward"] + losses["loss_next_obs"])
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_reward"].item() > 1.0  # reported in reward units whatever the weight


def test_default_keeps_run_identities_and_other_weights_change_them():
    config = config_from_dict({"env": {"name": "ML1", "task": "reach-v3"}})
    before = run_identity(config.to_dict(), 0, "d")
    assert "reward_loss_weight" not in before["model"]
    after = run_identity(replace(config, {"model.reward_loss_weight": 0.01}).to_dict(), 0, "d")
    assert after["model"]["reward_loss_weight"] == 0.01 and after != before


def test_weight_must_be_positive():
    with pytest.raises(ConfigError, match="model.reward_loss_weight = 0.0"):
        replace(ExperimentConfig(), {"model.reward_loss_weight": 0.0})
