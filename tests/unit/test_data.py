"""Unit tests for dicp_ray.data (no Ray): shard round-trip, manifest checks, window sampling."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from dicp_ray.data import history, shards

STREAMS, EPISODES, HORIZON = 3, 4, 5


def make_columns(task_id: int, streams: int = STREAMS, episodes: int = EPISODES) -> dict[str, np.ndarray]:
    """Synthetic histories whose values encode (task, stream, global step) so windows can be checked."""
    n_per_stream = episodes * HORIZON
    n = streams * n_per_stream
    stream = np.repeat(np.arange(streams), n_per_stream)
    t = np.tile(np.arange(n_per_stream), streams)                    # global step within the stream
    code = task_id * 10_000 + stream * 1_000 + t
    obs = np.stack([code, -code], axis=1).astype(np.float32)
    return {"stream": stream, "episode": t // HORIZON, "step": t % HORIZON, "obs": obs,
            "action": code % 5, "reward": (code % 3 == 0).astype(np.float32), "next_obs": obs + 0.5,
            "terminated": np.zeros(n, bool), "truncated": t % HORIZON == HORIZON - 1,
            "optimal_action": (code + 1) % 5}


def make_dataset(root, task_ids=(3, 7), complete=True) -> str:
    path = str(root / "dataset")
    sidecars = [shards.write_shard(path, t, make_columns(t), {"note": "synthetic"}) for t in task_ids]
    shards.write_manifest(path, env_name="Darkroom", obs_dim=2, num_actions=5, action_type="discrete",
                        task_ids=list(task_ids), shards=sidecars, collect_config={},
                        seeds={"collect_seed": 0}, provenance={}, fingerprint="unit", complete=complete)
    return path


def test_write_shard_roundtrip_and_sidecar(tmp_path):
    path = make_dataset(tmp_path)
    sidecar = json.loads((tmp_path / "dataset/shards/task_00003.json").read_text())
    assert sidecar["num_rows"] == STREAMS * EPISODES * HORIZON and sidecar["num_streams"] == STREAMS
    assert sidecar["note"] == "synthetic" and sidecar["returns"]["num_episodes"] == STREAMS * EPISODES
    assert not [p for p in os.listdir(tmp_path / "dataset/shards") if ".tmp-" in p]
    table = ipc.open_file(pa.memory_map(str(tmp_path / "dataset/shards/task_00003.arrow"))).read_all()
    assert table.schema.names == ["stream", "episode", "step", "obs", "action", "reward", "next_obs",
                                  "terminated", "truncated", "optimal_action"]
    assert table.schema.field("obs").type == pa.list_(pa.float32(), 2)
    assert table.schema.field("action").type == pa.int64()
    assert table.schema.field("stream").type == pa.int32()

    ds = history.HistoryDataset.open(path)
    assert ds.env_name == "Darkroom" and ds.obs_dim == 2 and ds.num_actions == 5
    assert ds.task_ids == [3, 7] and ds.num_histories == 2 * STREAMS
    expected = make_columns(7)
    h = ds.history(STREAMS + 1)                                        # task 7, stream 1
    rows = expected["stream"] == 1
    for name in ("obs", "next_obs", "reward", "action", "optimal_action", "step", "truncated"):
        np.testing.assert_array_equal(h[name], expected[name][rows].astype(h[name].dtype))
    assert h["obs"].dtype == np.float32 and h["task_id"][0] == 7
    assert not h["obs"].flags.owndata                                  # a view into the memory map
    assert ds.index["length"].tolist() == [EPISODES * HORIZON] * (2 * STREAMS)


def test_write_shard_rejects_unsorted_or_incomplete_columns(tmp_path):
    cols = make_columns(0)
    with pytest.raises(ValueError, match="missing"):
        shards.write_shard(str(tmp_path), 0, {k: v for k, v in cols.items() if k != "reward"}, {})
    shuffled = {k: v[::-1] for k, v in cols.items()}
    with pytest.raises(ValueError, match="sorted"):
        shards.write_shard(str(tmp_path), 0, shuffled, {})


def test_shard_bytes_are_deterministic(tmp_path):
    a = shards.write_shard(str(tmp_path / "a"), 5, make_columns(5), {})
    b = shards.write_shard(str(tmp_path / "b"), 5, make_columns(5), {})
    assert a["sha256"] == b["sha256"]
    assert shards.shard_is_valid(str(tmp_path / "a"), 5)


def test_window_sampler_shapes_consecutive_and_within_one_history(tmp_path):
    ds = history.HistoryDataset.open(make_dataset(tmp_path))
    k = 7
    batch = history.WindowSampler(ds, window_len=k, seed=0).sample(256)
    assert batch["obs"].shape == (256, k, 2) and batch["obs"].dtype == np.float32
    assert batch["next_obs"].shape == (256, k, 2) and batch["next_obs"].dtype == np.float32
    assert batch["action"].shape == (256, k) and batch["action"].dtype == np.int64
    assert batch["reward"].shape == (256, k) and batch["reward"].dtype == np.float32
    assert batch["optimal_action"].shape == (256, k) and batch["optimal_action"].dtype == np.int64
    assert batch["task_id"].shape == (256,) and batch["task_id"].dtype == np.int64
    code = batch["obs"][..., 0].astype(np.int64)
    assert np.all(np.diff(code, axis=1) == 1)                          # consecutive steps of one stream
    assert np.all(code[:, 0] // 10_000 == batch["task_id"])           # from the right task
    assert np.all((code[:, 0] % 1_000) + k <= EPISODES * HORIZON)     # never crosses into the next stream
    np.testing.assert_array_equal(batch["action"], code % 5)
    np.testing.assert_array_equal(batch["next_obs"], batch["obs"] + 0.5)
    starts = code[:, 0] % 1_000                                         # every start position gets drawn
    assert set(starts.tolist()) == set(range(EPISODES * HORIZON - k + 1))


def test_window_sampler_is_deterministic_and_rejects_long_windows(tmp_path):
    ds = history.HistoryDataset.open(make_dataset(tmp_path))
    a = history.WindowSampler(ds, 5, seed=1).sample(32)
    b = history.WindowSampler(ds, 5, seed=1).sample(32)
    c = history.WindowSampler(ds, 5, seed=2).sample(32)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["obs"], c["obs"])
    with pytest.raises(ValueError, match="window"):
        history.WindowSampler(ds, EPISODES * HORIZON + 1, seed=0)


def test_window_batches_in_dataloader_workers(tmp_path):
    path = make_dataset(tmp_path)
    loader = torch.utils.data.DataLoader(history.WindowBatches(path, window_len=4, batch_size=8, seed=0),
                                         batch_size=None, num_workers=0)
    batch = next(iter(loader))
    assert batch["obs"].shape == (8, 4, 2) and batch["action"].dtype == torch.int64


def test_corrupt_shard_is_detected(tmp_path):
    path = make_dataset(tmp_path)
    shard = tmp_path / "dataset/shards/task_00007.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"corrupt shard .*task_00007.arrow.*re-run"):
        history.HistoryDataset.open(path)
    assert not shards.shard_is_valid(path, 7) and shards.shard_is_valid(path, 3)
    history.HistoryDataset.open(path, task_ids=[3])                       # only opened shards are verified
    history.HistoryDataset.open(path, verify=False)


def test_partial_datasets_give_clear_errors(tmp_path):
    path = make_dataset(tmp_path)
    os.remove(tmp_path / "dataset/manifest.json")
    with pytest.raises(FileNotFoundError, match="dicp-ray collect"):
        history.HistoryDataset.open(path)
    assert not shards.dataset_is_complete(path)

    path = make_dataset(tmp_path, complete=False)
    with pytest.raises(ValueError, match="partial dataset"):
        history.HistoryDataset.open(path)
    assert not shards.dataset_is_complete(path)

    path = make_dataset(tmp_path)
    assert shards.dataset_is_complete(path)
    os.remove(tmp_path / "dataset/shards/task_00003.arrow")
    with pytest.raises(ValueError, match="partial dataset.*task_00003"):
        history.HistoryDataset.open(path)
    assert not shards.dataset_is_complete(path)


def test_foreign_or_newer_datasets_are_rejected(tmp_path):
    path = make_dataset(tmp_path)
    manifest_path = tmp_path / "dataset/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version"):
        history.HistoryDataset.open(path)
    manifest_path.write_text(json.dumps({"some": "other tool"}))
    with pytest.raises(ValueError, match="not a dicp_ray dataset"):
        history.HistoryDataset.open(path)


def test_requested_task_ids_restrict_the_dataset(tmp_path):
    path = make_dataset(tmp_path, task_ids=(3, 7, 11))
    ds = history.HistoryDataset.open(path, task_ids=[11, 3])
    assert ds.task_ids == [11, 3] and set(ds.index["task_id"].tolist()) == {3, 11}
    batch = history.WindowSampler(ds, 3, seed=0).sample(64)
    assert set(batch["task_id"].tolist()) <= {3, 11}
    with pytest.raises(ValueError, match=r"task ids \[5, 9\]"):
        history.HistoryDataset.open(path, task_ids=[3, 5, 9])


def test_remove_shard_deletes_leftovers(tmp_path):
    path = make_dataset(tmp_path)
    shard_dir = tmp_path / "dataset/shards"
    (shard_dir / ".task_00003.arrow.tmp-123-abcd").write_bytes(b"half")
    shards.remove_shard(path, 3)
    assert sorted(os.listdir(shard_dir)) == ["task_00007.arrow", "task_00007.json"]
    assert shards.read_sidecar(path, 3) is None and not shards.shard_is_valid(path, 3)


def test_read_shard_columns_returns_every_column_as_written(tmp_path):
    make_dataset(tmp_path)
    columns = history.read_shard_columns(str(tmp_path / "dataset/shards/task_00007.arrow"))
    expected = make_columns(7)
    assert set(columns) == set(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(columns[name], values, err_msg=name)
    assert columns["truncated"].dtype == bool and columns["obs"].shape == expected["obs"].shape


def test_read_shard_episodes_sums_each_streams_episode_rewards(tmp_path):
    make_dataset(tmp_path)
    episodes = history.read_shard_episodes(str(tmp_path / "dataset/shards/task_00003.arrow"))
    columns = make_columns(3)
    expected = np.zeros((STREAMS, EPISODES))
    for stream, episode, reward in zip(columns["stream"], columns["episode"], columns["reward"]):
        expected[stream, episode] += reward
    assert set(episodes) == {"return"}                                   # no success column on the grid
    np.testing.assert_array_equal(episodes["return"], expected)


def test_memory_maps_hold_no_file_descriptors(tmp_path):
    """Thousands of shards (Key-to-Door: 6,561) must not exhaust the descriptor limit."""
    path = make_dataset(tmp_path, task_ids=tuple(range(20)))
    before = len(os.listdir("/proc/self/fd"))
    ds = history.HistoryDataset.open(path)
    assert len(os.listdir("/proc/self/fd")) == before
    assert history.WindowSampler(ds, 4, seed=0).sample(8)["obs"].shape == (8, 4, 2)
