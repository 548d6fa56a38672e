"""Integration tests for dicp_ray.collect: real PPO learners as Ray tasks on the shared local Ray.

The grid-world default is the population learner (dicp_ray/collect/population_learner.py), so the end-to-end tests
below run it; ``learn_task`` and ``test_rllib_learner_end_to_end`` keep the RLlib learner covered
(``collect.learner=rllib``). Tiny scale: 3 Darkroom tasks x 4 streams x 3 updates of 20 steps. Checks that
the histories are complete, ordered, replay exactly in a fresh env (true terminal next_obs, oracle labels),
that every PPO update held exactly rollout_steps consecutive steps of each stream, and that resuming after
damage or a SIGKILL gives the byte-identical dataset of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dicp_ray.envs  # noqa: F401  (registers the gymnasium ids)
from dicp_ray.collect.driver import collect_histories, collection_task_ids
from dicp_ray.collect.fingerprint import data_fingerprint
from dicp_ray.collect.rllib_learner import SB3InitPPOModule, build_learner_config, learn_task
from dicp_ray.config.load import config_from_dict
from dicp_ray.data import history as data_history
from dicp_ray.data import shards as data_shards

pytestmark = pytest.mark.filterwarnings("ignore:.*Overriding environment rllib-single-agent-env-v0")

STREAMS, ROLLOUT, UPDATES, HORIZON = 4, 20, 3, 20
TINY = {"env": {"name": "Darkroom", "max_train_tasks": 2, "max_test_tasks": 1},
        "collect": {"num_streams": STREAMS, "rollout_steps": ROLLOUT, "minibatch_size": 40, "num_epochs": 2,
                    "env_steps_per_task": STREAMS * ROLLOUT * UPDATES},
        "model": {"context_episodes": 1}, "resources": {"num_cpus": 2}}


def tiny_config(**collect):
    return config_from_dict({**TINY, "collect": {**TINY["collect"], **collect}})


def shard_hashes(path) -> dict[str, str]:
    shards = Path(path) / data_shards.SHARD_DIR
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.glob("*.arrow"))}


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("collect") / "dataset")
    collect_histories(tiny_config(), path, progress=False)
    return path


def replay_mismatches(history: dict, env_id: str, task_id: int) -> int:
    """Step a fresh env with the recorded actions; count any obs/reward/next_obs/flag/oracle difference."""
    env, bad = gym.make(env_id, task_id=task_id), 0
    for t in range(len(history["action"])):
        if history["step"][t] == 0:
            obs, _ = env.reset()
        bad += int(not np.array_equal(obs, history["obs"][t]))
        bad += int(env.unwrapped.optimal_action() != history["optimal_action"][t])
        obs, reward, terminated, truncated, _ = env.step(int(history["action"][t]))
        bad += int(reward != history["reward"][t]) + int(not np.array_equal(obs, history["next_obs"][t]))
        bad += int(terminated != history["terminated"][t]) + int(truncated != history["truncated"][t])
    return bad


def test_rllib_learner_end_to_end(ray_local, tmp_path):
    """``collect.learner=rllib``: the RLlib path still writes complete, aligned, replayable histories."""
    config = tiny_config(learner="rllib")
    path = collect_histories(config, str(tmp_path / "rllib"), progress=False)
    ds = data_history.HistoryDataset.open(path)
    assert ds.manifest["collect_config"]["learner"] == "rllib" and ds.num_histories == 3 * STREAMS
    assert all(data_shards.read_sidecar(path, t)["updates_aligned"] for t in ds.task_ids)
    for i in range(ds.num_histories):
        assert replay_mismatches(ds.history(i), "dicp_ray/Darkroom-v0", int(ds.index["task_id"][i])) == 0


def test_learner_config_matches_the_paper_mapping():
    config = tiny_config()
    ppo = build_learner_config(config, task_id=5)
    assert (ppo.lr, ppo.lambda_, ppo.clip_param) == (3e-4, 0.95, 0.2)
    assert (ppo.vf_loss_coeff, ppo.entropy_coeff) == (0.5, 0.0)
    assert ppo.vf_clip_param == float("inf") and not ppo.use_kl_loss
    assert (ppo.grad_clip, ppo.grad_clip_by, ppo.gamma) == (0.5, "global_norm", 0.99)
    assert (ppo.num_epochs, ppo.minibatch_size) == (2, 40)
    assert ppo.train_batch_size_per_learner == STREAMS * ROLLOUT               # rollout_steps * num_streams
    assert (ppo.num_env_runners, ppo.num_envs_per_env_runner) == (0, STREAMS)
    assert ppo.rollout_fragment_length == ROLLOUT and ppo.gym_env_vectorize_mode == "vector_entry_point"
    assert ppo.num_learners == 0 and ppo.seed == config.collect.seed + 5
    model = ppo.model_config
    assert (list(model["fcnet_hiddens"]), model["fcnet_activation"], model["vf_share_layers"]) == (
        [64, 64], "tanh", False)
    # SB3's MlpPolicy init: the first policy is uniform up to ~1e-2 in every cell (RLlib's default is not).
    spec = ppo.rl_module_spec
    assert spec.module_class is SB3InitPPOModule
    module = dataclasses.replace(spec, observation_space=gym.spaces.Box(0, 8, (2,), np.float32),
                                 action_space=gym.spaces.Discrete(5), model_config=model).build()
    cells = torch.tensor([[4.0, 4.0], [0.0, 0.0], [8.0, 8.0], [2.0, 7.0]])
    with torch.no_grad():
        probs = torch.softmax(module.forward_inference({"obs": cells})["action_dist_inputs"], -1)
    assert torch.allclose(probs, torch.full_like(probs, 0.2), atol=0.02), probs
    # dataclasses.replace skips validate(), which already rejects sac on the (discrete) grid worlds.
    sac = dataclasses.replace(config, collect=dataclasses.replace(config.collect, algorithm="sac"))
    with pytest.raises(ValueError, match="sac.*continuous"):
        build_learner_config(sac, 0)


@pytest.mark.parametrize("bootstrap", [None, True])
def test_source_ppo_value_target_at_the_horizon(ray_local, bootstrap):
    """RLlib's own GAE connector on real sampled episodes: by default (the release) the value target of an
    episode's last step is its reward alone; with collect.bootstrap_at_horizon it adds gamma * V(s_T)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.evaluation.postprocessing import Postprocessing

    algo = build_learner_config(tiny_config(bootstrap_at_horizon=bootstrap), task_id=41).build_algo()
    try:
        episodes = algo.env_runner.sample()
        assert [len(e) for e in episodes] == [HORIZON] * STREAMS and all(e.is_truncated for e in episodes)
        assert all(bool(e.is_terminated) == (bootstrap is None) for e in episodes)   # the learner's view only
        learner = algo.learner_group._learner
        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={},
                                           metrics=learner.metrics)[DEFAULT_MODULE_ID]
        with torch.no_grad():
            values = learner.module[DEFAULT_MODULE_ID].compute_values(batch)        # V of every row
    finally:
        algo.stop()
    # Each episode is HORIZON real rows + RLlib's appended bootstrap row, whose value is V(s_T).
    last = torch.arange(STREAMS) * (HORIZON + 1) + HORIZON - 1
    target, reward = batch[Postprocessing.VALUE_TARGETS][last], batch[Columns.REWARDS][last]
    v_final = values[last + 1]
    assert (v_final.abs() > 1e-3).all()  # so a bootstrap, if any, would show
    if bootstrap is None:
        torch.testing.assert_close(target, reward, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(target, reward + 0.99 * v_final, atol=1e-5, rtol=0)


def test_horizon_rule_enters_the_data_fingerprint():
    default, explicit, boot = (tiny_config(), tiny_config(bootstrap_at_horizon=False),
                               tiny_config(bootstrap_at_horizon=True))
    assert not default.bootstraps_at_horizon and boot.bootstraps_at_horizon
    assert data_fingerprint(default) == data_fingerprint(explicit) != data_fingerprint(boot)


def test_histories_are_complete_ordered_and_aligned(first_run):
    config = tiny_config()
    ds = data_history.HistoryDataset.open(first_run)
    assert ds.task_ids == collection_task_ids(config) and len(ds.task_ids) == 3
    assert ds.num_histories == 3 * STREAMS
    assert ds.index["length"].tolist() == [ROLLOUT * UPDATES] * ds.num_histories
    for i in range(ds.num_histories):
        h = ds.history(i)
        assert h["episode"].tolist() == np.repeat(np.arange(ROLLOUT * UPDATES // HORIZON), HORIZON).tolist()
        assert h["step"].tolist() == np.tile(np.arange(HORIZON), ROLLOUT * UPDATES // HORIZON).tolist()
        assert h["truncated"].tolist() == (h["step"] == HORIZON - 1).tolist() and not h["terminated"].any()
        within = h["step"][1:] != 0
        np.testing.assert_array_equal(h["next_obs"][:-1][within], h["obs"][1:][within])
        assert np.all(h["obs"][h["step"] == 0] == 4)                     # every episode starts at the centre
        # The stored final next_obs is the real last cell one move from the last obs, not the reset (4, 4).
        last = h["step"] == HORIZON - 1
        assert np.all(np.abs(h["next_obs"][last] - h["obs"][last]).sum(axis=1) <= 1)
    manifest = ds.manifest
    assert manifest["complete"] and manifest["schema_version"] == data_shards.SCHEMA_VERSION
    assert manifest["collect_config"]["num_streams"] == STREAMS and manifest["provenance"]["versions"]["ray"]
    for task_id in ds.task_ids:
        sidecar = data_shards.read_sidecar(first_run, task_id)
        assert sidecar["updates_aligned"] and sidecar["num_updates"] == UPDATES
        assert sidecar["curve"]["env_steps"] == [STREAMS * ROLLOUT * (u + 1) for u in range(UPDATES)]
    assert os.path.getsize(os.path.join(first_run, "source_returns.png")) > 0
    assert os.listdir(os.path.join(first_run, "tb"))


def test_histories_replay_exactly_in_a_fresh_env(first_run):
    ds = data_history.HistoryDataset.open(first_run)
    for i in range(ds.num_histories):
        task_id = int(ds.index["task_id"][i])
        assert replay_mismatches(ds.history(i), "dicp_ray/Darkroom-v0", task_id) == 0


def test_episodes_spanning_updates_are_stitched_and_aligned(ray_local, tmp_path):
    """rollout_steps 10 < horizon 20: every episode spans two PPO updates (two RLlib episode chunks)."""
    config = tiny_config(rollout_steps=10, minibatch_size=20, env_steps_per_task=STREAMS * 40)
    sidecar = learn_task(config, 7, str(tmp_path))
    assert sidecar["updates_aligned"] and sidecar["num_updates"] == 4 and sidecar["num_rows"] == STREAMS * 40
    assert data_shards.read_sidecar(str(tmp_path), 7) == sidecar                  # the sidecar on disk
    data_shards.write_manifest(str(tmp_path), env_name="Darkroom", obs_dim=2, num_actions=5, action_type="discrete",
                        task_ids=[7], shards=[sidecar], collect_config={}, seeds={}, provenance={},
                        fingerprint="t", complete=True)
    ds = data_history.HistoryDataset.open(str(tmp_path))
    for i in range(ds.num_histories):
        h = ds.history(i)
        assert h["step"].tolist() == list(range(HORIZON)) * 2
        assert replay_mismatches(h, "dicp_ray/Darkroom-v0", 7) == 0


def test_key_to_door_oracle_labels_use_the_key_state(ray_local, tmp_path):
    config = config_from_dict({**TINY, "env": {"name": "DarkKeyToDoor"},
                               "collect": {**TINY["collect"], "rollout_steps": 50,
                                           "env_steps_per_task": 400}})
    task_id = 40 * 81 + 41                                   # key on the start cell (4,4), door next to it
    sidecar = learn_task(config, task_id, str(tmp_path))
    data_shards.write_manifest(str(tmp_path), env_name="DarkKeyToDoor", obs_dim=2, num_actions=5,
                        action_type="discrete", task_ids=[task_id], shards=[sidecar], collect_config={},
                        seeds={}, provenance={}, fingerprint="t", complete=True)
    ds = data_history.HistoryDataset.open(str(tmp_path))
    assert sum(ds.history(i)["reward"].sum() for i in range(ds.num_histories)) > 0   # some keys were found
    for i in range(ds.num_histories):
        assert replay_mismatches(ds.history(i), "dicp_ray/DarkKeyToDoor-v0", task_id) == 0


def test_resume_recollects_only_missing_or_corrupt_shards(first_run, tmp_path):
    path = str(tmp_path / "dataset")
    shutil.copytree(first_run, path)
    shards = Path(path) / data_shards.SHARD_DIR
    names = sorted(p.name for p in shards.glob("*.arrow"))
    deleted, corrupted, untouched = names
    (shards / deleted).unlink()
    raw = bytearray((shards / corrupted).read_bytes())
    raw[100] ^= 0xFF
    (shards / corrupted).write_bytes(bytes(raw))
    (shards / f".{untouched}.tmp-1-dead").write_bytes(b"left by a killed writer")
    untouched_stat = (shards / untouched).stat()
    assert not data_shards.dataset_is_complete(path)

    collect_histories(tiny_config(), path, progress=False)
    assert shard_hashes(path) == shard_hashes(first_run)
    after = (shards / untouched).stat()
    assert (after.st_ino, after.st_mtime_ns) == (untouched_stat.st_ino, untouched_stat.st_mtime_ns)
    assert (shards / corrupted).stat().st_mtime_ns > untouched_stat.st_mtime_ns
    assert not [p for p in os.listdir(shards) if ".tmp-" in p]
    assert data_shards.dataset_is_complete(path)
    data_history.HistoryDataset.open(path)


def test_same_seed_gives_a_byte_identical_dataset(first_run, tmp_path):
    path = str(tmp_path / "again")
    collect_histories(tiny_config(), path, progress=False)
    hashes = shard_hashes(path)
    assert hashes == shard_hashes(first_run) and len(set(hashes.values())) == 3
    manifest, reference = (json.loads((Path(p) / "manifest.json").read_text()) for p in (path, first_run))
    assert manifest["shards"] == reference["shards"]


def test_changed_settings_refuse_to_mix_into_an_existing_dataset(first_run, tmp_path):
    path = str(tmp_path / "dataset")
    shutil.copytree(first_run, path)
    with pytest.raises(ValueError, match="different env/collect settings"):
        collect_histories(tiny_config(num_epochs=3), path, progress=False)


def _running_learner_pids() -> list[int]:
    """Worker processes of OUR raylet that are executing a learner task right now (from /proc)."""
    from ray._private.worker import _global_node

    raylet = _global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        learner = (b"ray::_learn_task_remote", b"ray::learn_population")
        if parent == raylet and title.startswith(learner):
            pids.append(int(entry))
    return pids


def test_sigkilled_learner_is_retried_by_ray(first_run, tmp_path):
    path, errors = str(tmp_path / "learner_killed"), []

    def run():
        try:
            collect_histories(tiny_config(), path, progress=False)
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    killed, deadline = [], time.monotonic() + 60
    while not killed and thread.is_alive() and time.monotonic() < deadline:
        for pid in _running_learner_pids()[:1]:
            os.kill(pid, signal.SIGKILL)                                   # a learner, mid-run
            killed.append(pid)
        time.sleep(0.02)
    thread.join(timeout=180)
    assert killed and not thread.is_alive() and not errors, (killed, errors)
    assert shard_hashes(path) == shard_hashes(first_run)                  # the retry wrote the same bytes
    data_history.HistoryDataset.open(path)


def test_sigkill_mid_collection_then_rerun_gives_the_clean_dataset(first_run, ray_local, tmp_path):
    path = str(tmp_path / "killed")
    config = {**TINY, "resources": {"num_cpus": 1}}          # its own local Ray: one learner at a time
    code = ("import json, sys; from dicp_ray.config.load import config_from_dict; "
            "from dicp_ray.collect.driver import collect_histories; "
            "collect_histories(config_from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(config), path], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((Path(path) / data_shards.SHARD_DIR).glob("*.json")):
            assert proc.poll() is None, "collect exited before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)                                  # the driver, mid-run
        proc.wait()
    finally:
        time.sleep(1)
        try:  # Ray's agents of that driver outlive a SIGKILL; they are in the session we started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not data_shards.dataset_is_complete(path)
    collect_histories(tiny_config(), path, progress=False)                # the same command again
    assert shard_hashes(path) == shard_hashes(first_run)
    data_history.HistoryDataset.open(path)
