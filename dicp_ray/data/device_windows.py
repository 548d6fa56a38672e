"""Training windows gathered on the training device: the dataset stays there, only B random numbers cross over.

    sampler = DeviceWindowSampler(dataset, window_len=80, seed=[0, 0], device="cuda")
    windows = sampler.sample(512)      # dict of torch tensors on the device, shapes of WindowSampler.sample

Same windows as `dicp_ray.data.history.WindowSampler` for the same seed, value for value (tested on CPU
tensors): the random draws (window index -> history, first row) are the numpy sampler's own code and RNG, on the
host (B integers per step); only the gather of the B x k rows runs as torch indexing on the device, from one
tensor per column holding every shard of the dataset. Checkpoints store the same numpy RNG state, so a run may
resume with either sampler.

Memory: the columns a window carries, converted to the window dtypes (grid worlds: 36 bytes per transition,
~290 MB for the paper's Darkroom dataset of 8.1M transitions). Copies are cached per (dataset directory, device,
columns), so the members of a stacked group (`dicp_ray.train.model_group`) share one copy whatever their split
seeds. Windows that must be reordered per history (the IDTs' samplers) stay on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dicp_ray.data.history import HistoryDataset, WindowSampler


@dataclass
class _DeviceColumns:
    """Every shard of a dataset, concatenated per column on one device, and where each task's shard starts."""

    columns: dict[str, torch.Tensor]
    first_row: dict[int, int]


_CACHE: dict[tuple, _DeviceColumns] = {}


def _device_columns(sampler: WindowSampler, device: torch.device) -> _DeviceColumns:
    key = (sampler.dataset.path, str(device), tuple(sampler._columns))
    if key not in _CACHE:
        whole = HistoryDataset.open(sampler.dataset.path, verify=False)
        sizes = [len(whole.shard_columns(p)["reward"]) for p in range(len(whole.task_ids))]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        columns = {}
        for name in sampler._columns:
            dtype = sampler.window_dtype(name)
            host = np.concatenate([whole.shard_columns(p)[name].astype(dtype, copy=False)
                                   for p in range(len(whole.task_ids))])
            columns[name] = torch.from_numpy(host).to(device)
        _CACHE[key] = _DeviceColumns(columns, {int(t): int(s) for t, s in zip(whole.task_ids, starts)})
    return _CACHE[key]


def clear_device_cache() -> None:
    """Drop every cached device copy (e.g. between benchmark rows)."""
    _CACHE.clear()


class DeviceWindowSampler(WindowSampler):
    """`WindowSampler` whose ``sample`` returns torch tensors on `device`, gathered there (see the module doc)."""

    def __init__(self, dataset: HistoryDataset, window_len: int, seed: int | Sequence[int], *,
                 device: str | torch.device, align: int = 1, extra_columns: Sequence[str] = ()):
        super().__init__(dataset, window_len, seed, align=align, extra_columns=extra_columns)
        self.device = torch.device(device)
        store = _device_columns(self, self.device)
        self._columns_on_device = store.columns
        # the dataset row where each of THIS dataset's shards starts (by shard position), and its task id
        self._shard_start = np.array([store.first_row[int(t)] for t in dataset.task_ids], np.int64)
        self._steps = torch.arange(window_len, device=self.device)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        history, first_row = self.draw(batch_size)
        index = self.dataset.index
        rows = torch.from_numpy(self._shard_start[index["shard"][history]] + first_row).to(self.device)
        rows = rows[:, None] + self._steps                                               # (B, k)
        out = {name: values[rows] for name, values in self._columns_on_device.items()}
        out["task_id"] = torch.from_numpy(index["task_id"][history].astype(np.int64)).to(self.device)
        return out


__all__ = ["DeviceWindowSampler", "clear_device_cache"]
