"""Meta-World end to end at smoke scale on real MuJoCo: population PPO histories (the default PPO learner) ->
Ray Train (continuous AD on ML1, the release-layout IDT on ML10, Gaussian actions and reward regression) ->
in-context evaluation (policy and DICP's sampled search) with success metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicp_ray.config.load import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "tune_configs"


@pytest.fixture(scope="module", params=["ml1_smoke", "ml10_smoke"])
def pipeline_run(request, ray_local, tmp_path_factory):
    from dicp_ray.pipeline import run_pipeline

    out = tmp_path_factory.mktemp(request.param)
    config = load_config(CONFIGS / f"{request.param}.yaml")
    return config, out, run_pipeline(config, out)


def test_checkpoint_is_a_continuous_world_model_of_the_train_tasks(pipeline_run):
    from dicp_ray.envs import split_tasks
    from dicp_ray.models.checkpoints import load_checkpoint

    config, out, _ = pipeline_run
    model, payload = load_checkpoint(str(out / "train" / "split_0" / "model.pt"))
    spec = model.spec
    assert not spec.discrete_actions and spec.num_actions == 4 and spec.obs_dim == 11
    assert spec.reward_classes is None and spec.num_obs_classes is None  # regression heads
    assert spec.layout == config.model.variant == ("idt" if config.env.name == "ML10" else "ad")
    assert spec.backbone == "release"                                     # model.backbone auto on Meta-World
    if spec.layout == "idt":                                              # the release's Meta-World IDT
        assert spec.return_target == 1000.0 and hasattr(model, "md_return")
    train_ids, test_ids = split_tasks(config.env.name, 0)
    assert set(payload["train_task_ids"]) <= set(train_ids)
    assert set(payload["train_task_ids"]).isdisjoint(test_ids)


def test_evaluation_reports_success_per_episode_and_at_least_once(pipeline_run):
    config, out, summary = pipeline_run
    assert set(summary["methods"]) == {"policy", "plan"}
    for mode, method in summary["methods"].items():
        result = json.loads((out / "eval" / "split_0" / mode / "results.json").read_text())
        successes = np.array(result["successes"])
        assert successes.shape == (config.env.max_test_tasks, config.eval.num_episodes)
        assert set(np.unique(successes)) <= {0.0, 1.0}
        once = np.maximum.accumulate(successes, axis=1).mean(axis=0)
        np.testing.assert_allclose(result["success_once_so_far_mean"], once)
        np.testing.assert_allclose(result["success_mean"], successes.mean(axis=0))
        assert np.all(np.diff(result["success_once_so_far_mean"]) >= 0)
        assert len(method["success_mean"]) == config.eval.num_episodes
    assert (out / "eval" / "learning_curves.png").stat().st_size > 1000


def test_sampled_search_sweep_over_candidates(pipeline_run, tmp_path):
    """Tune sweeps plan.num_samples (L) on the Meta-World checkpoint and ranks trials by success."""
    from dicp_ray.evaluate.sweep_report import PLAN_METRIC_META_WORLD
    from dicp_ray.tune import run_sweep

    config, out, _ = pipeline_run
    if config.env.name != "ML1":
        pytest.skip("one Meta-World sweep is enough")
    sweep = load_config(CONFIGS / "sweeps" / "plan_ml1_smoke.yaml")
    results = run_sweep(sweep, tmp_path, checkpoint=str(out / "train" / "split_0" / "model.pt"))
    assert len(results) == 2 and results.num_errors == 0
    frame = results.get_dataframe()
    assert sorted(frame["config/plan.num_samples"]) == [1, 4]
    assert ((frame[PLAN_METRIC_META_WORLD] >= 0) & (frame[PLAN_METRIC_META_WORLD] <= 1)).all()
    assert len((tmp_path / "sweep" / "sweep_results.csv").read_text().splitlines()) == 3
