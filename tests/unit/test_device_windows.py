"""DeviceWindowSampler (dicp_ray/data/device_windows.py) on CPU tensors: the numpy sampler's windows, value for
value, and the same model batches; a group's members share one device copy of the dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dicp_ray.collect.scripted import write_scripted_dataset
from dicp_ray.data.device_windows import DeviceWindowSampler, clear_device_cache
from dicp_ray.data.history import HistoryDataset, WindowSampler
from dicp_ray.envs import split_tasks
from dicp_ray.train.batches import windows_to_batch


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    train, test = split_tasks("Darkroom", 0)
    path = str(tmp_path_factory.mktemp("device_windows") / "dataset")
    write_scripted_dataset(path, "Darkroom", sorted(train[:5] + test[:2]), 3, 6, fingerprint="test")
    return path


@pytest.mark.parametrize("subset", [None, "train"])
def test_same_windows_as_the_numpy_sampler(dataset_dir, subset):
    task_ids = None if subset is None else split_tasks("Darkroom", 0)[0][:5][::-1][:3]
    dataset = HistoryDataset.open(dataset_dir, task_ids=task_ids, verify=False)
    host = WindowSampler(dataset, 40, seed=[3, 0])
    device = DeviceWindowSampler(dataset, 40, seed=[3, 0], device="cpu")
    for batch_size in (1, 17, 64):
        expected, got = host.sample(batch_size), device.sample(batch_size)
        assert set(got) == set(expected)
        for name, values in expected.items():
            assert isinstance(got[name], torch.Tensor) and got[name].dtype == torch.from_numpy(values).dtype
            np.testing.assert_array_equal(got[name].numpy(), values, err_msg=name)
    assert host._rng.bit_generator.state == device._rng.bit_generator.state       # checkpoints resume either


@pytest.mark.parametrize("layout", ["ad", "dpt"])
def test_same_model_batches(dataset_dir, layout):
    dataset = HistoryDataset.open(dataset_dir, verify=False)
    host = WindowSampler(dataset, 20, seed=1)
    device = DeviceWindowSampler(dataset, 20, seed=1, device="cpu")
    for world_model in (True, False):
        expected = windows_to_batch(host.sample(32), layout, world_model)
        got = windows_to_batch(device.sample(32), layout, world_model)
        for part_expected, part_got in zip(expected, got):
            assert set(part_expected) == set(part_got)
            for key, value in part_expected.items():
                torch.testing.assert_close(part_got[key], value, rtol=0, atol=0, msg=key)


def test_members_share_one_device_copy(dataset_dir):
    """Two members reading different task subsets (different split seeds) gather from the same tensors."""
    clear_device_cache()
    tasks = HistoryDataset.open(dataset_dir, verify=False).task_ids
    a, b = (DeviceWindowSampler(HistoryDataset.open(dataset_dir, task_ids=ids, verify=False), 20, seed=0,
                                device="cpu") for ids in (tasks[:3], tasks[2:]))
    assert all(a._columns_on_device[k] is b._columns_on_device[k] for k in a._columns_on_device)
