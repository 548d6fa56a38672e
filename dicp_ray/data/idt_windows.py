"""Training windows of the two IDTs: return-sorted whole histories (grid worlds, the release's layout) and whole
episodes with relabelled returns-to-go (Meta-World), both ``WindowSampler`` subclasses over a ``HistoryDataset``.

Used by ``dicp_ray.train.batches.make_window_sampler``; the models themselves live in ``dicp_ray.models``.
"""
from __future__ import annotations

import numpy as np

from dicp_ray.data.history import WindowSampler


class EpisodeWindowSampler(WindowSampler):
    """Uniformly random windows of `num_episodes` consecutive whole episodes of one history.

    ``data.WindowSampler`` with windows aligned to episode starts: ``sample(B)`` returns its columns plus
    ``step (B, k)``, and every (history, first episode) pair is equally likely. Needs histories that start at an
    episode start and hold episodes of exactly `horizon` steps, as the grid worlds' and Meta-World's do (checked on
    every batch).
    """

    def __init__(self, dataset, num_episodes: int, horizon: int, seed):
        if num_episodes < 1 or horizon < 1:
            raise ValueError(f"num_episodes and horizon must be >= 1, got {num_episodes}, {horizon}")
        self.horizon = horizon
        try:
            super().__init__(dataset, num_episodes * horizon, seed, align=horizon, extra_columns=("step",))
        except ValueError as err:
            raise ValueError(f"{err} ({num_episodes} episodes of {horizon} steps); use fewer context episodes "
                             "or collect more steps") from None

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        out, k = super().sample(batch_size), self.window_len
        if not np.array_equal(out["step"], np.broadcast_to(np.arange(k) % self.horizon, (batch_size, k))):
            raise ValueError(f"{self.dataset.path}: IDT windows need histories of whole {self.horizon}-step "
                             "episodes starting at step 0; a sampled window does not line up with episodes")
        return out


def relabel_windows(windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sort each window's episodes by ascending return and relabel its return-to-go (vectorised, numpy).

    `windows` holds whole episodes of equal length H (``EpisodeWindowSampler.sample``): per-step arrays of shape
    (B, k, ...) with k = E * H, among them ``step`` (B, k) = position in the episode and ``reward``. Returns a
    new dict: every per-step array with its episodes reordered by ascending return (ties keep their order),
    ``return_to_go (B, k) float32`` = the window's best episode return minus the rewards collected earlier in
    the same episode (so every episode starts at the best return and the best one ends at its last reward), and
    ``episode_return (B, E)`` in the new order. Other entries (``task_id``) are passed through.
    """
    step = np.asarray(windows["step"])
    B, k = step.shape
    H = int(step.max()) + 1 if step.size else 0
    if H == 0 or k % H or not np.array_equal(step, np.broadcast_to(np.arange(k) % H, (B, k))):
        raise ValueError("relabel_windows needs windows of whole episodes of equal length starting at step 0")
    E = k // H
    reward = np.asarray(windows["reward"], np.float32)
    returns = reward.reshape(B, E, H).sum(axis=2, dtype=np.float64)              # (B, E)
    order = np.argsort(returns, axis=1, kind="stable")                            # ascending, ties in time order
    rows = (order[:, :, None] * H + np.arange(H)).reshape(B, k)                   # new step -> old step
    out = {}
    for name, values in windows.items():
        values = np.asarray(values)
        if values.shape[:2] == (B, k):
            index = rows.reshape(B, k, *([1] * (values.ndim - 2)))
            out[name] = np.take_along_axis(values, index, axis=1)
        else:
            out[name] = values
    sorted_returns = np.take_along_axis(returns, order, axis=1)
    episode_reward = out["reward"].astype(np.float64).reshape(B, E, H)
    earlier = np.cumsum(episode_reward, axis=2) - episode_reward                 # collected before step t
    out["return_to_go"] = (sorted_returns[:, -1, None, None] - earlier).reshape(B, k).astype(np.float32)
    out["episode_return"] = sorted_returns.astype(np.float32)
    return out


def best_episode_return(dataset) -> float:
    """The highest episode return in a ``data.HistoryDataset`` (float64 sums of its float32 rewards over the rows
    of each (stream, episode)): continuous IDT's return target, computed on the train tasks' histories."""
    best = -np.inf
    for position in range(len(dataset.task_ids)):
        columns = dataset.shard_columns(position)
        stream, episode = np.asarray(columns["stream"]), np.asarray(columns["episode"])
        if stream.size == 0:
            continue
        starts = np.flatnonzero(np.r_[True, (np.diff(stream) != 0) | (np.diff(episode) != 0)])
        best = max(best, float(np.add.reduceat(np.asarray(columns["reward"], np.float64), starts).max()))
    if not np.isfinite(best):
        raise ValueError(f"{dataset.path}: no episodes to take a return target from")
    return best


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
