"""Training windows of both IDTs (grid worlds and Meta-World), as the release's ``IDTDataset`` builds them
(``release:gridworld/dataset.py:207-267``, ``release:metaworld/dataset.py:64-157``, the same code): every history
sorted by episode return with its return-to-go relabelled to the history's best return, and windows of k rows that
start anywhere (``HistoryWindowSampler``, a ``WindowSampler`` over a ``HistoryDataset``; ``sort_history``).
Per history (one stream of one task, whole episodes of `horizon` steps from step 0):
  1. return-to-go of step t = the rewards of its episode from t to the episode end;
  2. the episodes are reordered by ascending return (stable: ties keep time order; the release's ``np.argsort``
     is not stable, so equal-return episodes may come in another order there);
  3. every step's return-to-go is raised by (the highest return-to-go of the whole history - its episode's
     return), so every episode starts at the history's best return and the best one ends at its last reward.
A window is k consecutive rows of the sorted history starting at ANY row, so its blocks of c steps straddle
episode ends, exactly as the release's ``__getitem__`` slices.

Used by ``dicp_ray.train.batches.make_window_sampler``; the models themselves live in ``dicp_ray.models``.
"""
from __future__ import annotations

import numpy as np

from dicp_ray.data.history import WindowSampler


def sort_history(reward: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewards (..., T) of histories of whole `horizon`-step episodes -> (rows (..., T), return_to_go (..., T)
    float32): ``rows[..., i]`` is the original row at position i of the return-sorted history and
    ``return_to_go[..., i]`` its relabelled return-to-go (module docstring, steps 1-3)."""
    reward = np.asarray(reward, np.float64)
    T = reward.shape[-1]
    if T == 0 or T % horizon:
        raise ValueError(f"a history of {T} steps is not whole episodes of {horizon} steps")
    episodes = reward.reshape(*reward.shape[:-1], T // horizon, horizon)
    rtg = np.flip(np.cumsum(np.flip(episodes, axis=-1), axis=-1), axis=-1)          # step 1
    order = np.argsort(rtg[..., 0], axis=-1, kind="stable")                         # step 2
    rtg = np.take_along_axis(rtg, order[..., None], axis=-2)
    best = rtg.max(axis=(-2, -1), keepdims=True)
    rtg = rtg + (best - rtg[..., :1])                                                # step 3
    rows = (order[..., None] * horizon + np.arange(horizon)).reshape(reward.shape)
    return rows, rtg.reshape(reward.shape).astype(np.float32)


class HistoryWindowSampler(WindowSampler):
    """The release's IDT windows: k rows of a return-sorted, return-to-go-relabelled history, starting anywhere.

    ``sample(B)`` returns ``WindowSampler``'s columns (rows taken in sorted order) plus ``return_to_go (B, k)``.
    The sort is computed once per history at construction (O(rows) memory: one int64 and one float32 per row).
    Needs histories of whole `horizon`-step episodes starting at step 0 (checked on the ``step`` column).
    """

    def __init__(self, dataset, window_len: int, horizon: int, seed):
        super().__init__(dataset, window_len, seed)
        self.horizon = horizon
        self._rows, self._rtg = [], []
        index = dataset.index
        for position in range(len(dataset.task_ids)):
            columns = dataset.shard_columns(position)
            n = columns["reward"].shape[0]
            rows, rtg = np.arange(n, dtype=np.int64), np.zeros(n, np.float32)
            histories = np.flatnonzero(index["shard"] == position)
            for L in np.unique(index["length"][histories]):                 # equal lengths: one numpy call
                group = histories[index["length"][histories] == L]
                at = index["start"][group, None] + np.arange(L)                 # (h, L) rows of each history
                if "step" in columns and not np.array_equal(columns["step"][at], np.broadcast_to(
                        np.arange(L) % horizon, at.shape)):
                    raise ValueError(f"{dataset.path}: IDT needs histories of whole {horizon}-step episodes "
                                     f"starting at step 0; a history of task {int(index['task_id'][group[0]])} "
                                     "does not line up")
                r, g = sort_history(columns["reward"][at], horizon)
                rows[at], rtg[at] = r + at[:, :1], g
            self._rows.append(rows)
            self._rtg.append(rtg)

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        index, k = self.dataset.index, self.window_len
        window = self._rng.integers(0, int(self._cumulative[-1]), size=batch_size)
        slot = np.searchsorted(self._cumulative, window, side="right")
        history = self._history[slot]
        first = index["start"][history] + window - (self._cumulative[slot] - self._num_windows[slot])
        shard = index["shard"][history]
        out = self._empty(batch_size)
        out["return_to_go"] = np.empty((batch_size, k), np.float32)
        for shard_pos in np.unique(shard):
            members = np.flatnonzero(shard == shard_pos)
            sorted_pos = first[members, None] + np.arange(k)                      # (b, k) in sorted order
            rows = self._rows[shard_pos][sorted_pos]
            columns = self.dataset.shard_columns(int(shard_pos))
            for name in self._columns:
                out[name][members] = columns[name][rows]
            out["return_to_go"][members] = self._rtg[shard_pos][sorted_pos]
        out["task_id"] = index["task_id"][history].astype(np.int64)
        return out
