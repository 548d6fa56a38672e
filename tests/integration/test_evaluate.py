"""In-context evaluation end to end on Darkroom with a tiny untrained checkpoint (k = 2 episodes x 20 = 40).

Four episodes per run, so plan mode plans from step 40 (the release's step k) on: both code paths run.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from dicp_ray.config.load import config_from_dict, replace
from dicp_ray.envs import make_tasks, max_returns
from dicp_ray.evaluate.episodes import evaluate_in_context
from dicp_ray.evaluate.launch import run_evaluations
from dicp_ray.evaluate.results import format_results_table, mean_ci95, metric_tag, t_critical_95
from dicp_ray.models.checkpoints import save_checkpoint
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer

NUM_EPISODES = 4


def _config(**sections):
    data = {"name": "eval_test", "env": {"name": "Darkroom", "split_seeds": [0, 1]},
            "collect": {"num_streams": 10, "env_steps_per_task": 400},
            "model": {"context_episodes": 2, "num_layers": 1, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32},
            "plan": {"beam_width": 3, "depth": 3}, "eval": {"num_episodes": NUM_EPISODES, "seed": 0},
            "resources": {"num_cpus": 2}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def _write_checkpoint(path, config, split_seed: int, world_model: bool = True, layout: str = "ad") -> str:
    torch.manual_seed(0)
    spec = ModelSpec(layout=layout, world_model=world_model, context_len=config.context_len, num_layers=1,
                     num_heads=2, embed_dim=16, mlp_dim=32, reward_max=1.0, obs_scale=1.0 / 8)
    save_checkpoint(str(path), DICPTransformer(spec),
                    extra={"env_name": "Darkroom", "split_seed": split_seed, "variant": layout,
                           "world_model": world_model, "step": 0, "config": config.to_dict()})
    return str(path)


@pytest.fixture(scope="module")
def config():
    return _config()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("ckpt")
    return {seed: _write_checkpoint(root / f"split_{seed}.pt", config, seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, config, checkpoints):
    """Both modes on split seed 0, written to disk once for the tests below."""
    root = tmp_path_factory.mktemp("eval")
    return {mode: (evaluate_in_context(checkpoints[0], config, str(root / mode), mode=mode), root / mode)
            for mode in ("policy", "plan")}


@pytest.mark.parametrize("mode", ["policy", "plan"])
def test_results_files_have_tasks_by_episodes(written, mode):
    result, out = written[mode]
    num_tasks = len(result["task_ids"])
    assert num_tasks == 8  # Darkroom: 81 tasks, 90:10 split
    returns = np.array(result["returns"])
    assert returns.shape == (num_tasks, NUM_EPISODES)
    oracle = max_returns(make_tasks("Darkroom", result["task_ids"]))
    assert np.all(returns >= 0) and np.all(returns <= oracle[:, None])
    assert np.allclose(result["return_mean"], returns.mean(axis=0))
    assert np.all(np.array(result["return_ci_low"]) <= np.array(result["return_mean"]))
    assert result["oracle_max_return_mean"] == pytest.approx(oracle.mean())
    assert result["timing"]["decisions"] == num_tasks * NUM_EPISODES * 20
    # Plan mode plans from the release's step k = 40 on (ad.py:102): steps 40..79 of the history.
    assert result["timing"]["planned_decisions"] == (num_tasks * 40 if mode == "plan" else 0)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["returns"] == result["returns"] and on_disk["mode"] == mode
    assert on_disk["provenance"]["versions"]["torch"]
    with open(out / "returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["episode"]) for r in rows] == list(range(1, NUM_EPISODES + 1))
    assert float(rows[-1]["mean"]) == pytest.approx(result["return_mean"][-1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = events.Scalars(metric_tag(mode))
    assert [s.step for s in scalars] == list(range(1, NUM_EPISODES + 1))
    assert np.allclose([s.value for s in scalars], result["return_mean"])


def test_dicp_dpt_plans_once_the_context_is_full(tmp_path):
    """DICP-DPT (beam search over the query-first layout) runs in plan mode like DICP-AD: it plans from step k = 40 on,
    and its cached and reference planners take the same actions (same returns)."""
    config = _config(model={"variant": "dpt"})
    path = _write_checkpoint(tmp_path / "dpt.pt", config, 0, layout="dpt")
    cached = evaluate_in_context(path, config, None, mode="plan")
    assert cached["label"] == "DICP-DPT (plan)" and cached["timing"]["planned_decisions"] == 8 * 40
    reference = evaluate_in_context(path, replace(config, {"plan.use_cache": False}), None, mode="plan")
    assert reference["returns"] == cached["returns"]


def test_deterministic_for_a_seed(written, config, checkpoints):
    again = evaluate_in_context(checkpoints[0], config, None, mode="plan")
    assert again["returns"] == written["plan"][0]["returns"]
    other_seed = evaluate_in_context(checkpoints[0], replace(config, {"eval.seed": 1}), None, mode="policy")
    assert other_seed["returns"] != written["policy"][0]["returns"]


def test_checkpoint_config_is_the_default(written, checkpoints):
    result = evaluate_in_context(checkpoints[0], None, None, mode="policy")
    assert result["returns"] == written["policy"][0]["returns"]


def test_clear_errors(tmp_path, config, checkpoints):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate_in_context(str(tmp_path / "missing.pt"), config, mode="policy")
    permuted = replace(config, {"env.name": "DarkroomPermuted", "collect.env_steps_per_task": 1000,
                                "plan.depth": None})
    with pytest.raises(ValueError, match="trained on Darkroom"):
        evaluate_in_context(checkpoints[0], permuted, mode="policy")
    with pytest.raises(ValueError, match="variant"):
        evaluate_in_context(checkpoints[0], replace(config, {"model.variant": "dpt"}), mode="policy")
    with pytest.raises(ValueError, match="split seed"):
        evaluate_in_context(checkpoints[0], config, mode="policy", split_seed=1)
    model_free = _write_checkpoint(tmp_path / "ad.pt", config, 0, world_model=False)
    with pytest.raises(ValueError, match="world model"):
        evaluate_in_context(model_free, replace(config, {"model.world_model": False,
                                                         "eval.modes": ["policy"]}), mode="plan")
    with pytest.raises(ValueError, match="mode"):
        evaluate_in_context(checkpoints[0], config, mode="greedy")


def test_confidence_interval():
    assert t_critical_95(1) == pytest.approx(12.706, abs=1e-3)
    assert t_critical_95(30) == pytest.approx(2.0423, abs=1e-4)
    mean, low, high = mean_ci95(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and high[1] == low[1] == 2.0
    assert high[0] - mean[0] == pytest.approx(12.706, abs=1e-3)  # sd sqrt(2) / sqrt(2) = 1


def test_run_evaluations_over_two_split_seeds(ray_local, tmp_path, config, checkpoints):
    summary = run_evaluations(config, checkpoints, str(tmp_path))
    assert summary["split_seeds"] == [0, 1]
    for mode, label in (("policy", "AD + world model (policy)"), ("plan", "DICP-AD (plan)")):
        method = summary["methods"][mode]
        assert method["label"] == label and method["ci_over"] == "split_seeds"
        assert len(method["return_mean"]) == NUM_EPISODES
        per_split = np.array([method["per_split_return_mean"][s] for s in ("0", "1")])
        assert np.allclose(method["return_mean"], per_split.mean(axis=0))
        assert json.loads((tmp_path / f"split_1/{mode}/results.json").read_text())["split_seed"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["methods"].keys() == {"policy", "plan"}
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * NUM_EPISODES
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_results_table(summary)
    assert "DICP-AD (plan)" in table and "oracle" in table and "ep 4" in table

    # A second call finds every (split seed, mode) finished with the same checkpoint and settings.
    stamp = (tmp_path / "split_0/plan/results.json").stat().st_mtime_ns
    assert run_evaluations(config, checkpoints, str(tmp_path))["methods"] == summary["methods"]
    assert (tmp_path / "split_0/plan/results.json").stat().st_mtime_ns == stamp


def test_grid_model_trained_on_old_action_labels_is_refused(tmp_path, config):
    """A `dicp-ray train` checkpoint (it names its dataset) from before dataset schema 2 used other action labels."""
    path = _write_checkpoint(tmp_path / "old.pt", config, 0)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "dataset_id": "abc"}, path)
    with pytest.raises(ValueError, match="schema version 1.*0 \\+x"):
        evaluate_in_context(path, config, str(tmp_path / "out"), mode="policy")
    torch.save({**payload, "dataset_id": "abc", "data_schema_version": 2}, path)
    assert evaluate_in_context(path, config, None, mode="policy")["mode"] == "policy"
