"""A pipeline sweep (sweep.kind: pipeline, the shape of tune_configs/ml1_all.yaml): one whole pipeline per ML1
task as Tune trials on the local Ray, a per-task table with a mean row, resumption, and a failing trial."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dicp_ray.config.load import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "tune_configs"


@pytest.fixture(scope="module")
def sweep_run(ray_local, tmp_path_factory):
    from dicp_ray.tune import run_sweep

    out = tmp_path_factory.mktemp("pipeline_sweep")
    config = load_config(CONFIGS / "sweeps" / "pipeline_ml1_smoke.yaml")
    return config, out, run_sweep(config, out)


def test_each_task_runs_a_whole_pipeline(sweep_run):
    config, out, results = sweep_run
    assert results.num_errors == 0 and len(results) == 2
    for task in ("reach-v3", "push-v3"):
        run = out / "runs" / f"task={task}"
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["config"]["env"]["task"] == task
        assert set(summary["methods"]) == {"policy", "plan"}
        assert (run / "train" / "split_0" / "model.pt").is_file() and (run / "dataset" / "manifest.json").is_file()
        assert "stage wall times" in (run / "pipeline.log").read_text()  # the child's own output is kept


def test_table_has_one_row_per_task_and_the_mean(sweep_run):
    _, out, results = sweep_run
    table = pd.read_csv(out / "sweep" / "sweep_results.csv")
    assert list(table["env.task"]) == ["push-v3", "reach-v3", "mean of 2/2"]
    assert "error" not in table.columns
    for column in ("success_final_policy", "success_final_plan", "success_once_last_plan"):
        assert table[column].between(0, 1).all()
        assert table[column].iloc[2] == pytest.approx(table[column].iloc[:2].mean())
    reported = {r.config["env.task"]: r.metrics["success_mean_plan"] for r in results}
    for task, value in reported.items():  # Tune's metrics are the pipeline's own summary
        summary = json.loads((out / "runs" / f"task={task}" / "eval" / "summary.json").read_text())
        assert value == pytest.approx(sum(summary["methods"]["plan"]["success_mean"]) / summary["num_episodes"])
    assert (out / "sweep" / "sweep_bars.png").stat().st_size > 0


def test_rerun_resumes_without_rerunning_trials(sweep_run):
    from dicp_ray.tune import run_sweep

    config, out, _ = sweep_run
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/pipeline.log")}
    again = run_sweep(config, out)
    assert again.num_errors == 0 and len(again) == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/pipeline.log")} == logs


def test_a_failing_pipeline_fails_its_trial_with_the_log_tail(ray_local, tmp_path):
    from dicp_ray.tune import run_sweep

    config = load_config(CONFIGS / "sweeps" / "pipeline_ml1_smoke.yaml", ["sweep.grid={env.task: [reach-v3]}"])
    run = tmp_path / "runs" / "task=reach-v3"
    run.mkdir(parents=True)
    # A run directory of another config: the child pipeline refuses it (before starting any work).
    other = load_config(CONFIGS / "ml1_smoke.yaml", ["collect.num_streams=1", "collect.minibatch_size=50"])
    (run / "run.json").write_text(json.dumps({"config": other.to_dict()}))
    results = run_sweep(config, tmp_path)
    assert results.num_errors == 1
    message = str(results.errors[0])
    assert "exited with code" in message and "different env/collect/model/train config" in message
    table = pd.read_csv(tmp_path / "sweep" / "sweep_results.csv", keep_default_na=False)
    assert list(table["env.task"]) == ["reach-v3"] and "exited with code" in table["error"][0]  # no mean row


def test_a_changed_grid_is_refused_on_resume(sweep_run):
    from dicp_ray.config.schema import ConfigError
    from dicp_ray.tune import run_sweep

    config, out, _ = sweep_run
    grown = load_config(CONFIGS / "sweeps" / "pipeline_ml1_smoke.yaml",
                        ["sweep.grid={env.task: [reach-v3, push-v3, sweep-v3]}"])
    with pytest.raises(ConfigError, match=r"other settings \(sweep.grid;"):
        run_sweep(grown, out)
    with pytest.raises(ConfigError, match=r"other settings \(eval.num_episodes;"):
        run_sweep(load_config(CONFIGS / "sweeps" / "pipeline_ml1_smoke.yaml", ["eval.num_episodes=4"]), out)


def test_a_second_pipeline_on_a_directory_in_use_is_refused(tmp_path):
    from dicp_ray.config.schema import ConfigError
    from dicp_ray.pipeline import exclusive_output, run_pipeline

    with exclusive_output(tmp_path):
        with pytest.raises(ConfigError, match="in use by another dicp-ray pipeline"):
            run_pipeline(load_config(CONFIGS / "ml1_smoke.yaml"), tmp_path)
