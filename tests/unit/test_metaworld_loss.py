"""The Meta-World model loss and planning start as the authors' release (issue #14, deviations rows 6 and 12).

* Action loss: ``GaussianNLLLoss(full=True, reduction="mean")`` over batch x action dims
  (release:metaworld/model/ad.py:34), not the sum over action dims dicp_ray used before.
* Next-observation regression: off by default on Meta-World (release ``learn_transition: False``), on with
  ``model.next_obs_loss: true``; the grid worlds keep their 81-class next-cell loss.
* Old checkpoints (written before these spec fields) load with the old loss and still act and plan.
* Continuous planning starts where the release's does (release:metaworld/model/ad.py:113).
"""
from __future__ import annotations

import types

import pytest
import torch

from dicp_ray.agents.plan import PlannerSettings, plan_continuous, sample_policy_action, should_plan_continuous
from dicp_ray.config.load import load_config
from dicp_ray.config.schema import ConfigError
from dicp_ray.models.checkpoints import build_model, load_checkpoint, save_checkpoint
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import _gaussian_nll
from dicp_ray.train.batches import model_spec_from_config
from dicp_ray.train.runs import run_identity

META_WORLD = types.SimpleNamespace(is_continuous=True, obs_dim=11, action_dim=4)   # what the dataset reports
SMALL = ["model.num_layers=1", "model.num_heads=2", "model.embed_dim=16", "model.mlp_dim=32",
         "model.context_episodes=1"]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # tests/conftest.py
    yield


def ml1(*overrides: str):
    return load_config("tune_configs/ml1_smoke.yaml", list(overrides))


def batch(B=6, T=7, D=11, A=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"ctx_obs": torch.randn(B, T, D, generator=g), "ctx_action": torch.rand(B, T, A, generator=g) * 2 - 1,
              "ctx_reward": torch.rand(B, T, generator=g) * 10, "ctx_next_obs": torch.randn(B, T, D, generator=g),
              "query_obs": torch.randn(B, D, generator=g), "query_action": torch.rand(B, A, generator=g) * 2 - 1}
    targets = {"target_action": inputs["query_action"], "target_reward": torch.rand(B, generator=g) * 10,
               "target_next_obs": torch.randn(B, D, generator=g)}
    return inputs, targets


def test_gaussian_nll_is_torchs_full_gaussian_nll_with_mean_reduction():
    mean = torch.tensor([[0.1, -0.4, 0.9, 0.0], [0.5, 0.5, -1.0, 0.3]])
    log_std = torch.tensor([[-1.0, 0.0, 0.5, -4.9], [0.2, -0.3, 1.9, 0.0]])
    target = torch.tensor([[0.0, -1.0, 1.0, 0.01], [1.0, 0.2, -0.5, 0.3]])
    release = torch.nn.GaussianNLLLoss(full=True, reduction="mean")(mean, target, (2 * log_std).exp())
    torch.testing.assert_close(_gaussian_nll(mean, log_std, target), release)
    torch.testing.assert_close(_gaussian_nll(mean, log_std, target, "sum"), 4 * release)   # the old loss


def test_meta_world_models_train_the_releases_loss_by_default():
    # (IDT shares compute_losses and the head rule: tests/unit/test_idt_continuous.py)
    spec = model_spec_from_config(ml1(*SMALL), META_WORLD)
    assert (spec.action_nll, spec.next_obs_loss, spec.has_next_obs_head) == ("mean", False, False)
    torch.manual_seed(0)
    model = build_model(spec)
    assert not hasattr(model, "head_next_obs")                              # no head, as the release
    inputs, targets = batch()
    preds, losses = model.train()(inputs, targets, world_model_weight=0.5)
    assert "next_obs" not in preds and set(losses) == {"loss", "loss_action", "loss_reward"}
    release = torch.nn.GaussianNLLLoss(full=True, reduction="mean")(
        preds["action_mean"], targets["target_action"], (2 * preds["action_log_std"]).exp())
    torch.testing.assert_close(losses["loss_action"], release)
    torch.testing.assert_close(losses["loss"], losses["loss_action"] + 0.5 * losses["loss_reward"])


def test_next_obs_loss_switch_and_the_grid_worlds_next_cell_loss():
    spec = model_spec_from_config(ml1(*SMALL, "model.next_obs_loss=true"), META_WORLD)
    assert spec.next_obs_loss and spec.has_next_obs_head
    torch.manual_seed(0)
    inputs, targets = batch()
    preds, losses = build_model(spec).train()(inputs, targets, world_model_weight=0.5)
    assert preds["next_obs"].shape == (6, 11) and "loss_next_obs" in losses
    torch.testing.assert_close(losses["loss"], losses["loss_action"]
                               + 0.5 * (losses["loss_reward"] + losses["loss_next_obs"]))
    grid = load_config("tune_configs/smoke.yaml")
    assert grid.next_obs_loss and grid.model.next_obs_loss is None           # None = on for the grid worlds
    with pytest.raises(ConfigError, match="model.next_obs_loss = false"):
        load_config("tune_configs/smoke.yaml", ["model.next_obs_loss=false"])
    with pytest.raises(ValueError, match="next_obs_loss=False"):
        ModelSpec(next_obs_loss=False)                                       # 81-class grid spec


def test_the_loss_change_changes_meta_world_run_identities_only():
    before = run_identity(ml1().to_dict(), 0, "d")["model"]
    assert (before["action_nll"], before["next_obs_loss"]) == ("mean", False)   # no run before #14 had these
    assert run_identity(ml1("model.next_obs_loss=false").to_dict(), 0, "d")["model"]["next_obs_loss"] is False
    assert run_identity(ml1("model.next_obs_loss=true").to_dict(), 0, "d")["model"]["next_obs_loss"] is True
    grid = run_identity(load_config("tune_configs/smoke.yaml").to_dict(), 0, "d")["model"]
    assert not {"action_nll", "next_obs_loss"} & set(grid)                  # grid identities as before
    assert grid == run_identity(load_config("tune_configs/smoke.yaml", ["model.next_obs_loss=true"]).to_dict(),
                                0, "d")["model"]


def test_checkpoints_written_before_the_loss_fields_load_with_the_old_loss_and_act(tmp_path):
    spec = model_spec_from_config(ml1(*SMALL, "model.next_obs_loss=true"), META_WORLD)
    torch.manual_seed(0)
    model = build_model(ModelSpec(**{**vars(spec), "action_nll": "sum"}))
    path = tmp_path / "old.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    for key in ("next_obs_loss", "action_nll"):                             # what an old checkpoint holds
        del payload["model_spec"][key]
    torch.save(payload, path)
    old, _ = load_checkpoint(path)
    assert (old.spec.action_nll, old.spec.next_obs_loss) == ("sum", True) and hasattr(old, "head_next_obs")
    inputs, targets = batch()
    preds, losses = old(inputs, targets)
    torch.testing.assert_close(losses["loss_action"], _gaussian_nll(preds["action_mean"], preds["action_log_std"],
                                                                    targets["target_action"], "sum"))
    context = {k[4:]: v for k, v in inputs.items() if k.startswith("ctx_")}
    gen = torch.Generator().manual_seed(0)
    assert sample_policy_action(old, context, inputs["query_obs"], gen).shape == (6, 4)
    for depth in (1, 2):                                                    # it has a next-obs head: depth 2 too
        assert plan_continuous(old, context, inputs["query_obs"], PlannerSettings(depth=depth, num_samples=3),
                               gen).shape == (6, 4)


def test_continuous_search_without_a_next_obs_head_plans_at_depth_1_only():
    spec = model_spec_from_config(ml1(*SMALL), META_WORLD)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    inputs, _ = batch()
    context = {k[4:]: v for k, v in inputs.items() if k.startswith("ctx_")}
    for use_cache in (True, False):
        action = plan_continuous(model, context, inputs["query_obs"],
                                 PlannerSettings(depth=1, num_samples=5, use_cache=use_cache),
                                 torch.Generator().manual_seed(1))
        assert action.shape == (6, 4) and action.abs().max() <= 1
    with pytest.raises(ValueError, match="next_obs_loss"):
        plan_continuous(model, context, inputs["query_obs"], PlannerSettings(depth=2), torch.Generator())
    with pytest.raises(ConfigError, match="model.next_obs_loss=true"):
        ml1("plan.depth=2", "eval.modes=[policy,plan]")
    assert ml1("plan.depth=2", "eval.modes=[policy,plan]", "model.next_obs_loss=true").plan_depth == 2


@pytest.mark.parametrize("second_half_only", [True, False])
def test_continuous_planning_starts_at_the_releases_step(second_half_only):
    # release:metaworld/model/ad.py:113, restated: `step` counts every env step of the run from 0 (the release's
    # eval loop index), n_transit = k = 1000, position = step % horizon, beam_start = 50; the release always has
    # the second-half condition, `second_half_only=False` drops it.
    k, horizon = 1000, 100
    settings = PlannerSettings(depth=1, second_half_only=second_half_only)
    for step in range(3 * k):
        release = step >= k and (not second_half_only or step % horizon > 50)
        assert should_plan_continuous(settings, k, step, step % horizon, horizon) == release, step
    planned = [t for t in range(horizon) if should_plan_continuous(settings, k, k + t, t, horizon)]
    assert planned == (list(range(51, 100)) if second_half_only else list(range(100)))   # 49 per episode
    assert not should_plan_continuous(settings, k, k - 1, horizon - 1, horizon)   # the window is full here


def test_evaluate_refuses_deep_search_on_a_checkpoint_without_next_obs_head(tmp_path):
    from dicp_ray.evaluate.episodes import _check_compatible

    config = ml1(*SMALL, "model.next_obs_loss=true", "plan.depth=2")      # a config that allows depth 2 ...
    reward_only = model_spec_from_config(ml1(*SMALL), META_WORLD)         # ... and a checkpoint that cannot
    payload = {"env_name": "ML1", "config": config.to_dict(), "variant": "ad"}
    with pytest.raises(ValueError, match="needs a next-observation head"):
        _check_compatible(payload, reward_only, config, "plan", "model.pt")
    _check_compatible(payload, reward_only, config, "policy", "model.pt")
    _check_compatible(payload, model_spec_from_config(config, META_WORLD), config, "plan", "model.pt")
