"""Population learners writing shards (dicp_ray/collect/population_learner.py): split-independent bytes, learning.

The end-to-end ``collect_histories`` checks (complete, ordered, replayable histories, resume, SIGKILL) run
with the population learner in tests/integration/test_collect.py, where it is the grid-world default.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dicp_ray.collect.driver import collect_histories
from dicp_ray.collect.fingerprint import data_fingerprint, resolved_learner
from dicp_ray.collect.population_learner import learn_population, population_sizes
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import ConfigError
from dicp_ray.data import history as data_history
from dicp_ray.data import shards as data_shards

TINY = {"env": {"name": "Darkroom", "max_train_tasks": 2, "max_test_tasks": 1},
        "collect": {"num_streams": 4, "rollout_steps": 20, "minibatch_size": 40, "num_epochs": 2,
                    "env_steps_per_task": 240},
        "model": {"context_episodes": 1}, "resources": {"num_cpus": 2}}


def tiny_config(env=None, **collect):
    return config_from_dict({**TINY, "env": {**TINY["env"], **(env or {})},
                             "collect": {**TINY["collect"], **collect}})


def shard_bytes(path) -> dict[str, str]:
    shards = Path(path) / data_shards.SHARD_DIR
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.glob("*.arrow"))}


@pytest.mark.parametrize("env_name, rollout", [("Darkroom", 10), ("DarkKeyToDoor", 50)])
def test_shard_bytes_do_not_depend_on_the_population(tmp_path, env_name, rollout):
    """4 tasks as one population of 4 == two populations of 2 == populations of 1, byte for byte."""
    config = tiny_config({"name": env_name}, rollout_steps=rollout,
                         env_steps_per_task=4 * 150 if rollout == 50 else 4 * 60)
    tasks = [5, 17, 40, 66] if env_name == "Darkroom" else [40 * 81 + 41, 100, 12, 6000]
    sidecars = learn_population(config, tasks, str(tmp_path / "one"))
    assert [s["task_id"] for s in sidecars] == tasks and all(s["population_size"] == 4 for s in sidecars)
    learn_population(config, tasks[:2], str(tmp_path / "two"))
    learn_population(config, tasks[2:], str(tmp_path / "two"))
    learn_population(config, [tasks[2]], str(tmp_path / "single"))
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert one == two and len(set(one.values())) == 4
    name = data_shards.shard_name(tasks[2]) + ".arrow"
    assert shard_bytes(tmp_path / "single") == {name: one[name]}


def test_sidecar_curve_and_alignment(tmp_path):
    config = tiny_config(rollout_steps=10, minibatch_size=20)
    (sidecar,) = learn_population(config, [7], str(tmp_path))
    assert sidecar["num_updates"] == 6 and sidecar["updates_aligned"] and sidecar["num_rows"] == 240
    assert sidecar["curve"]["env_steps"] == [40 * (u + 1) for u in range(6)]
    # Episodes of 20 steps end on every second update of 10 steps.
    assert [r is None for r in sidecar["curve"]["return_mean"]] == [True, False] * 3
    assert data_shards.read_sidecar(str(tmp_path), 7) == sidecar
    assert sidecar["fingerprint"] == data_fingerprint(config)


def test_horizon_bootstrap_changes_the_learner_not_the_format(tmp_path):
    settings = {"num_streams": 20, "num_epochs": 10, "env_steps_per_task": 20 * 100}
    plain = learn_population(tiny_config(**settings), [30], str(tmp_path / "plain"))[0]
    boot = learn_population(tiny_config(bootstrap_at_horizon=True, **settings), [30],
                            str(tmp_path / "boot"))[0]
    assert plain["sha256"] != boot["sha256"] and plain["columns"] == boot["columns"]
    assert data_fingerprint(tiny_config()) != data_fingerprint(tiny_config(bootstrap_at_horizon=True))


def test_population_sizes_and_config_checks():
    assert population_sizes(3, 2, 0) == [2, 1]
    assert population_sizes(6561, 2, 0) == [81] * 81
    assert population_sizes(10, 16, 0) == [1] * 10
    assert population_sizes(10, 2, 4) == [4, 4, 2]
    assert population_sizes(0, 2, 0) == []
    # the learner is part of the dataset identity; the population size is not
    assert data_fingerprint(tiny_config()) == data_fingerprint(tiny_config(learner="population"))
    assert data_fingerprint(tiny_config()) != data_fingerprint(tiny_config(learner="rllib"))
    assert data_fingerprint(tiny_config()) == data_fingerprint(tiny_config(tasks_per_population=1))
    with pytest.raises(ConfigError, match="collect.learner"):
        tiny_config(learner="populaton")
    with pytest.raises(ConfigError, match="tasks_per_population"):
        tiny_config(tasks_per_population=-1)
    with pytest.raises(ConfigError, match="PPO only"):
        config_from_dict({"env": {"name": "ML1", "task": "reach-v3"},
                          "collect": {"learner": "population", "algorithm": "sac"}})
    assert population_sizes(30, 2, 0, max_size=4) == [4] * 7 + [2]
    meta_world = config_from_dict({"env": {"name": "ML1", "task": "reach-v3"}})
    assert resolved_learner(meta_world) == "population" and resolved_learner(tiny_config()) == "population"
    sac = config_from_dict({"env": {"name": "ML1", "task": "reach-v3"}, "collect": {"algorithm": "sac"}})
    assert resolved_learner(sac) == "rllib"


def test_population_learns_at_a_reduced_budget(tmp_path):
    """Paper PPO settings, 100 streams, 3 goals near the start, 10 updates (20K steps per task)."""
    config = config_from_dict({"env": {"name": "Darkroom"}, "model": {"context_episodes": 1},
                               "collect": {"num_streams": 100, "rollout_steps": 20, "minibatch_size": 50,
                                           "num_epochs": 20, "env_steps_per_task": 20_000}})
    tasks = [42, 22, 39]                                   # goals (4, 6), (2, 4), (4, 3); start (4, 4)
    for sidecar in learn_population(config, tasks, str(tmp_path)):
        curve = [r for r in sidecar["curve"]["return_mean"] if r is not None]
        first, last = sidecar["returns"]["first_10pct_mean"], sidecar["returns"]["last_10pct_mean"]
        assert last > first + 3 and curve[-1] > 5, (sidecar["task_id"], first, last, curve)


def test_collect_histories_resplit_gives_the_same_dataset(ray_local, tmp_path):
    """Through Ray: one population per task, then two tasks per population, same bytes."""
    one = collect_histories(tiny_config(tasks_per_population=1), str(tmp_path / "a"), progress=False)
    two = collect_histories(tiny_config(tasks_per_population=2), str(tmp_path / "b"), progress=False)
    assert shard_bytes(one) == shard_bytes(two) and len(shard_bytes(one)) == 3
    ds = data_history.HistoryDataset.open(two)
    assert ds.manifest["collect_config"]["learner"] == "population"
    assert np.unique(ds.index["task_id"]).tolist() == ds.task_ids


def test_local_process_pool_writes_the_same_dataset_as_ray(ray_local, tmp_path):
    """collect.backend local (a process pool, no Ray) and ray: byte-identical shards, the same sidecars and the
    same manifest apart from provenance; a re-run of the local backend over an unfinished dataset resumes it."""
    via_ray = collect_histories(tiny_config(), str(tmp_path / "ray"), progress=False)
    local = collect_histories(tiny_config(backend="local"), str(tmp_path / "local"), progress=False)
    assert shard_bytes(local) == shard_bytes(via_ray) and len(shard_bytes(local)) == 3
    manifests = [data_shards.read_manifest(p) for p in (local, via_ray)]
    for manifest in manifests:
        manifest.pop("provenance"), manifest.pop("created_at", None)
        for shard in manifest["shards"]:
            for key in ("wall_s", "cpu_s", "update_cpu_s"):
                shard.pop(key, None)
    assert manifests[0] == manifests[1]
    timing = ("wall_s", "cpu_s", "update_cpu_s")
    for task_id in manifests[0]["task_ids"]:
        sidecars = [data_shards.read_sidecar(p, task_id) for p in (local, via_ray)]
        assert [{k: v for k, v in s.items() if k not in timing} for s in sidecars] == [
            {k: v for k, v in sidecars[1].items() if k not in timing}] * 2
    first = data_shards.shard_name(manifests[0]["task_ids"][0]) + ".arrow"
    (Path(local) / data_shards.SHARD_DIR / first).write_bytes(b"damaged")     # as if killed mid-collection
    (Path(local) / "manifest.json").unlink()
    collect_histories(tiny_config(backend="local"), local, progress=False)
    assert shard_bytes(local) == shard_bytes(via_ray)


def test_local_backend_is_refused_for_rllib_learners():
    with pytest.raises(ConfigError, match="collect.backend"):
        tiny_config(backend="local", learner="rllib")
    with pytest.raises(ConfigError, match="collect.backend"):
        tiny_config(backend="lokal")
    assert data_fingerprint(tiny_config(backend="local")) == data_fingerprint(tiny_config())
