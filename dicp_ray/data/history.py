"""Reading learning histories and sampling training windows: ``HistoryDataset`` (memory-mapped, sha256-checked
Arrow shards of a dataset directory), ``WindowSampler`` (vectorised k-transition windows) and ``WindowBatches``.

The on-disk format itself (schema, shards, sidecars, manifest) is `dicp_ray.data.shards`.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import torch

from dicp_ray.data.shards import SHARD_DIR, _exists, _join, _resolve, _sha256, read_manifest, shard_name

# ----------------------------------------------------------------------------------------------------------

def _open_table(fs: pafs.FileSystem, path: str, is_local: bool) -> pa.Table:
    """Memory-map a local shard (zero-copy); other filesystems are read through a random-access file."""
    source = pa.memory_map(path, "r") if is_local else fs.open_input_file(path)
    try:
        return ipc.open_file(source).read_all()
    finally:
        # The mapped region stays alive while the table's buffers do; closing frees the file descriptor,
        # so thousands of shards never exhaust the process's descriptor limit.
        if is_local:
            source.close()


def _numpy_views(table: pa.Table) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of every column except the bit-packed bools (those would need a copy)."""
    views = {}
    for name in table.column_names:
        column = table.column(name)
        array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if pa.types.is_fixed_size_list(array.type):
            views[name] = array.flatten().to_numpy(zero_copy_only=True).reshape(len(array), -1)
        elif not pa.types.is_boolean(array.type):
            views[name] = array.to_numpy(zero_copy_only=True)
    return views


def read_shard_columns(path: str) -> dict[str, np.ndarray]:
    """Every column of one shard file (``.../shards/task_XXXXX.arrow``) as numpy arrays: zero-copy views, the bool
    columns copied. For tools that read a single shard without its dataset (no manifest, no checksum)."""
    fs, file, is_local = _resolve(path)
    table = _open_table(fs, file, is_local)
    columns = _numpy_views(table)
    for name in set(table.column_names) - set(columns):
        columns[name] = table.column(name).to_numpy()
    return columns


def read_shard_episodes(path: str) -> dict[str, np.ndarray]:
    """One shard's per-episode ``return`` and, where the shard has a ``success`` column (Meta-World), ``success``
    at any step of the episode, each (streams, episodes); streams of equal length, as a collection writes them."""
    columns = read_shard_columns(path)
    at = (columns["stream"], columns["episode"])
    shape = (int(at[0].max()) + 1, int(at[1].max()) + 1)
    out = {"return": np.zeros(shape)}
    np.add.at(out["return"], at, columns["reward"])
    if "success" in columns:
        out["success"] = np.zeros(shape)
        np.maximum.at(out["success"], at, columns["success"])
    return out


def _pick_task_ids(manifest: dict, path: str, task_ids: Sequence[int] | None) -> list[int]:
    available = [int(t) for t in manifest["task_ids"]]
    if task_ids is None:
        return available
    wanted = [int(t) for t in task_ids]
    if not wanted:
        raise ValueError(f"no task ids requested from {path}: pass None for all of them")
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ValueError(f"{path} has no histories for task ids {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} missing; the dataset holds "
                         f"{len(available)} tasks, e.g. {available[:8]})")
    return wanted


class HistoryDataset:
    """Memory-mapped learning histories of a dataset directory (see the module docstring).

    ``index`` describes the histories (one per (task, stream)) with parallel int64 arrays ``task_id``,
    ``stream``, ``shard`` (position in ``task_ids``), ``start`` (first row in the shard) and ``length``.
    Action facts for the trainer: ``is_continuous``; ``num_actions`` (discrete, else None); ``action_dim``
    (continuous action length, else None); ``has_success`` (a Meta-World ``success`` column).
    """

    def __init__(self, path: str, manifest: dict, task_ids: list[int], tables: list[pa.Table]):
        self.path = path
        self.manifest = manifest
        self.env_name: str = manifest["env_name"]
        self.obs_dim: int = int(manifest["obs_dim"])
        self.num_actions: int | None = manifest.get("num_actions")
        self.env_task: str | None = manifest.get("env_task")
        self.task_ids = task_ids
        self._tables = tables
        action_type = tables[0].schema.field("action").type
        self.is_continuous: bool = pa.types.is_fixed_size_list(action_type)
        self.action_dim: int | None = action_type.list_size if self.is_continuous else None
        self.has_success: bool = "success" in tables[0].schema.names
        self._shards = [_numpy_views(table) for table in tables]
        parts = {k: [] for k in ("task_id", "stream", "shard", "start", "length")}
        for position, (task_id, columns) in enumerate(zip(task_ids, self._shards)):
            stream = columns["stream"]
            starts = np.flatnonzero(np.r_[True, stream[1:] != stream[:-1]])
            parts["start"].append(starts)
            parts["length"].append(np.diff(np.r_[starts, stream.size]))
            parts["stream"].append(stream[starts].astype(np.int64))
            parts["task_id"].append(np.full(starts.size, task_id, np.int64))
            parts["shard"].append(np.full(starts.size, position, np.int64))
        self.index = {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}

    @classmethod
    def open(cls, path: str, task_ids: Sequence[int] | None = None, verify: bool = True) -> HistoryDataset:
        """Validate the manifest, optionally verify sha256 of the opened shards, and memory-map them."""
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise ValueError(f"partial dataset at {path}: its collection did not finish (manifest "
                             "complete=false); re-run `dicp-ray collect` with the same output to finish it")
        chosen = _pick_task_ids(manifest, path, task_ids)
        entries = {int(s["task_id"]): s for s in manifest["shards"]}
        fs, root, is_local = _resolve(path)
        files = {t: entries[t]["file"] if t in entries else f"{SHARD_DIR}/{shard_name(t)}.arrow"
                 for t in chosen}
        missing = [files[t] for t in chosen if t not in entries or not _exists(fs, _join(root, files[t]))]
        if missing:
            raise ValueError(f"partial dataset at {path}: shard files missing, e.g. {missing[:3]} "
                             f"({len(missing)} in all); re-run `dicp-ray collect` to re-collect them")
        tables = []
        for task_id in chosen:
            file = _join(root, entries[task_id]["file"])
            if verify and _sha256(fs, file) != entries[task_id]["sha256"]:
                raise ValueError(f"corrupt shard {file}: its sha256 does not match the manifest; re-run "
                                 "`dicp-ray collect` with the same output, which re-collects it")
            tables.append(_open_table(fs, file, is_local))
        return cls(path, manifest, chosen, tables)

    @property
    def num_histories(self) -> int:
        return int(self.index["start"].size)

    @property
    def num_transitions(self) -> int:
        return int(self.index["length"].sum())

    @property
    def column_names(self) -> list[str]:
        return self._tables[0].column_names if self._tables else []

    def __len__(self) -> int:
        return self.num_histories

    def history(self, i: int) -> dict[str, np.ndarray]:
        """History ``i`` (one stream of one task) as zero-copy column views, plus ``task_id``."""
        if not 0 <= i < self.num_histories:
            raise IndexError(f"history {i} out of range: the dataset has {self.num_histories}")
        start, length = int(self.index["start"][i]), int(self.index["length"][i])
        position = int(self.index["shard"][i])
        out = {name: values[start:start + length] for name, values in self._shards[position].items()}
        for name in set(self.column_names) - set(out):                  # bools: copy just this slice
            out[name] = self._tables[position].column(name).slice(start, length).to_numpy()
        out["task_id"] = np.full(length, self.index["task_id"][i], np.int64)
        return out

    def shard_columns(self, position: int) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of the shard of ``task_ids[position]`` (all but the bool columns)."""
        return self._shards[position]


# Columns a training window carries, with the dtype it is returned in ("step" only when asked for).
WINDOW_COLUMNS = {"obs": np.float32, "action": None, "reward": np.float32, "next_obs": np.float32,
                  "optimal_action": np.int64, "success": np.float32}
_OPTIONAL_WINDOW_COLUMNS = {"step": np.int64}


class WindowSampler:
    """Uniformly random windows of ``window_len`` consecutive transitions, each inside one history.

    Every valid (history, start) pair is equally likely. ``sample(B)`` returns ``obs (B,k,D) float32,
    action (B,k) int64 | (B,k,A) float32, reward (B,k) float32, next_obs (B,k,D) float32,
    optimal_action (B,k) int64`` (grid worlds), ``success (B,k)`` (Meta-World) and ``task_id (B,) int64``.
    Deterministic for a seed; gathering is one fancy index per shard present in the batch.
    ``align`` > 1 lets windows start only every ``align`` rows of a history (IDT: at episode starts);
    ``extra_columns`` adds columns such as ``step``.
    """

    def __init__(self, dataset: HistoryDataset, window_len: int, seed: int | Sequence[int], *, align: int = 1,
                 extra_columns: Sequence[str] = ()):
        if window_len < 1 or align < 1:
            raise ValueError(f"window_len and align must be >= 1, got {window_len}, {align}")
        index = dataset.index
        eligible = np.flatnonzero(index["length"] >= window_len)
        if eligible.size == 0:
            longest = int(index["length"].max()) if index["length"].size else 0
            raise ValueError(f"no history of {dataset.path} holds a window of {window_len} transitions "
                             f"(longest: {longest}); use a shorter context or collect more steps")
        self.dataset = dataset
        self.window_len = window_len
        self.align = align
        self._history = eligible
        self._num_windows = (index["length"][eligible] - window_len) // align + 1
        self._cumulative = np.cumsum(self._num_windows)
        self._columns = [c for c in (*WINDOW_COLUMNS, *extra_columns) if c in dataset.column_names]
        self._rng = np.random.default_rng(seed)

    def draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The random part of `sample`: (history, first row of its window within its shard), each (B,)."""
        window = self._rng.integers(0, int(self._cumulative[-1]), size=batch_size)
        slot = np.searchsorted(self._cumulative, window, side="right")
        history = self._history[slot]
        offset = window - (self._cumulative[slot] - self._num_windows[slot])
        return history, self.dataset.index["start"][history] + offset * self.align

    def window_dtype(self, name: str) -> np.dtype:
        """The dtype column `name` has in a window (integer columns int64, float columns float32)."""
        fixed = {**WINDOW_COLUMNS, **_OPTIONAL_WINDOW_COLUMNS}.get(name)
        return np.dtype(fixed or (np.int64 if self.dataset.shard_columns(0)[name].dtype.kind in "iu" else np.float32))

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        index, k = self.dataset.index, self.window_len
        history, first_row = self.draw(batch_size)                        # (B,), (B,)
        shard = index["shard"][history]
        out = self._empty(batch_size)
        order = np.argsort(shard, kind="stable")
        groups, bounds = np.unique(shard[order], return_index=True)
        for shard_pos, lo, hi in zip(groups, bounds, np.r_[bounds[1:], batch_size]):
            members = order[lo:hi]
            rows = first_row[members, None] + np.arange(k)               # (b, k)
            columns = self.dataset.shard_columns(int(shard_pos))
            for name in self._columns:
                out[name][members] = columns[name][rows]
        out["task_id"] = index["task_id"][history].astype(np.int64)
        return out

    def _empty(self, batch_size: int) -> dict[str, np.ndarray]:
        first = self.dataset.shard_columns(0)
        return {name: np.empty((batch_size, self.window_len, *first[name].shape[1:]), self.window_dtype(name))
                for name in self._columns}


class WindowBatches(torch.utils.data.IterableDataset):
    """Endless batches of training windows for a ``DataLoader(ds, batch_size=None, num_workers=n)``.

    The dataset is opened lazily inside each worker (memory maps share the page cache, nothing is copied
    into the worker); worker ``w`` samples with seed ``[seed, w]``. Pass a per-rank ``seed`` under DDP.
    Batches are dicts of torch tensors with the shapes of ``WindowSampler.sample``.
    """

    def __init__(self, path: str, window_len: int, batch_size: int, seed: int,
                 task_ids: Sequence[int] | None = None, verify: bool = False):
        super().__init__()
        self.path, self.window_len, self.batch_size, self.seed = path, window_len, batch_size, seed
        self.task_ids = None if task_ids is None else [int(t) for t in task_ids]
        self.verify = verify

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        dataset = HistoryDataset.open(self.path, self.task_ids, verify=self.verify)
        sampler = WindowSampler(dataset, self.window_len, seed=[self.seed, worker])
        while True:
            yield {name: torch.from_numpy(values) for name, values in sampler.sample(self.batch_size).items()}
