"""On-disk learning histories: Arrow IPC shards, sidecars and the manifest, written atomically and sha256-checked.

A dataset directory written by ``dicp-ray collect`` (``dicp_ray.collect.collect_histories``) looks like::

    <dataset>/manifest.json               written LAST; "complete": true once every shard is in place
    <dataset>/shards/task_00017.arrow     one Arrow IPC file per task (= per source learner)
    <dataset>/shards/task_00017.json      sidecar: task id, row/stream counts, sha256 of the shard, returns

Why Arrow IPC *file* format, uncompressed: it is columnar with a typed schema (fixed-size float32 lists for
observations), it can be memory-mapped and read zero-copy, so a random training window costs a page-cache
lookup instead of a decode and DataLoader workers on one host share one copy of the data; any Arrow tool
(pyarrow, polars, DuckDB, arrow-rs) reads it without our code; and pyarrow filesystems give s3://, gs:// and
shared mounts for free. Parquet would be smaller but has to be decompressed and decoded page by page and
cannot be memory-mapped, which is exactly the random access training needs.

Every file is written atomically (temporary name, fsync, rename; on object stores a temporary key and a
move), the sidecar only after its shard, and the manifest only after all shards, so a reader never sees a
half-written file and ``collect`` can resume after being killed at any moment: a shard counts only when its
sidecar exists and the shard's sha256 matches it.

Reading::

    ds = HistoryDataset.open("runs/demo/dataset")            # validates manifest + sha256 of every shard
    batch = WindowSampler(ds, window_len=80, seed=0).sample(512)   # obs (512, 80, 2) float32, ...

Column names and the Arrow schema live only here (``COLUMNS``, ``shard_schema``).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

# 2: grid actions in the release's labels (0 +x, 1 -x, 2 +y, 3 -y, 4 stay), the release's Key-to-Door oracle
#    after the door (a*), and source PPO without the horizon bootstrap by default (docs/fidelity.md).
#    Version-1 datasets are refused: their action columns mean other moves.
SCHEMA_VERSION = 2
DATASET_FORMAT = "dicp_ray.histories"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
_HASH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Column:
    name: str
    doc: str
    optional: bool = False


# The one list of columns (order = order in the files). Rows are transitions sorted by (stream, t).
COLUMNS = (
    Column("stream", "int32: stream (vector-env copy) id within the learner"),
    Column("episode", "int32: episode index within the stream"),
    Column("step", "int32: step index within the episode"),
    Column("obs", "fixed_size_list<float32>[obs_dim]: observation before the action"),
    Column("action", "int64 (discrete) | fixed_size_list<float32>[act_dim]: action sent to the env"),
    Column("reward", "float32"),
    Column("next_obs", "fixed_size_list<float32>[obs_dim]: the TRUE next observation, also at truncation"),
    Column("terminated", "bool"),
    Column("truncated", "bool"),
    Column("success", "float32: Meta-World only", optional=True),
    Column("optimal_action", "int64: grid worlds only, oracle action in obs (DPT label)", optional=True),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
_OPTIONAL = {c.name for c in COLUMNS if c.optional}


def shard_schema(obs_dim: int, action_dim: int | None = None, *, success: bool = False,
                 optimal_action: bool = False) -> pa.Schema:
    """Arrow schema of a shard; ``action_dim=None`` means a discrete (int64) action."""
    obs_type = pa.list_(pa.float32(), obs_dim)
    types = {
        "stream": pa.int32(), "episode": pa.int32(), "step": pa.int32(), "obs": obs_type,
        "action": pa.int64() if action_dim is None else pa.list_(pa.float32(), action_dim),
        "reward": pa.float32(), "next_obs": obs_type, "terminated": pa.bool_(), "truncated": pa.bool_(),
        "success": pa.float32(), "optimal_action": pa.int64(),
    }
    keep = {"success": success, "optimal_action": optimal_action}
    fields = [pa.field(c.name, types[c.name], nullable=False) for c in COLUMNS if keep.get(c.name, True)]
    return pa.schema(fields, metadata={"dicp_ray.format": DATASET_FORMAT,
                                       "dicp_ray.schema_version": str(SCHEMA_VERSION)})


def shard_name(task_id: int) -> str:
    return f"task_{task_id:05d}"


# ----------------------------------------------------------------------------------------------------------
# Filesystem helpers: local paths get fsync + os.replace; other pyarrow filesystems a temp key + move.
# ----------------------------------------------------------------------------------------------------------

def _resolve(path: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in str(path) and not str(path).startswith("file://"):
        fs, inner = pafs.FileSystem.from_uri(str(path))
        return fs, inner.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    local = str(path)[len("file://"):] if str(path).startswith("file://") else str(path)
    return pafs.LocalFileSystem(), os.path.abspath(local), True


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _atomic_write(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer, is_local: bool) -> None:
    directory, name = path.rsplit("/", 1)
    tmp = _join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fs.create_dir(directory, recursive=True)
    if is_local:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    else:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

def _check_columns(columns: dict[str, np.ndarray]) -> int:
    missing = [n for n in COLUMN_NAMES if n not in _OPTIONAL and n not in columns]
    unknown = [n for n in columns if n not in COLUMN_NAMES]
    if missing or unknown:
        raise ValueError(f"shard columns: missing {missing}, unknown {unknown}; "
                         f"expected {list(COLUMN_NAMES)}")
    num_rows = len(columns["stream"])
    bad = {n: len(v) for n, v in columns.items() if len(v) != num_rows}
    if bad or num_rows == 0:
        raise ValueError(f"shard columns must be non-empty and of equal length {num_rows}, got {bad}")
    stream, episode, step = (np.asarray(columns[n], np.int64) for n in ("stream", "episode", "step"))
    d_stream, d_episode, d_step = np.diff(stream), np.diff(episode), np.diff(step)
    next_step = (d_episode > 0) | ((d_episode == 0) & (d_step > 0))
    if not np.all((d_stream > 0) | ((d_stream == 0) & next_step)):
        raise ValueError("shard rows must be sorted by (stream, episode, step) without duplicates")
    return num_rows


def _to_arrow(name: str, values: np.ndarray, field: pa.Field) -> pa.Array:
    if pa.types.is_fixed_size_list(field.type):
        width = field.type.list_size
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if flat.size != len(values) * width:
            raise ValueError(f"column {name} must have shape (num_rows, {width}), got {np.shape(values)}")
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    return pa.array(np.asarray(values).astype(field.type.to_pandas_dtype(), copy=False), field.type)


def _returns_summary(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Episode returns of the shard: overall, and in the first / last 10% of each stream's history."""
    stream, episode = np.asarray(columns["stream"], np.int64), np.asarray(columns["episode"], np.int64)
    new_episode = np.r_[True, (np.diff(stream) != 0) | (np.diff(episode) != 0)]
    starts = np.flatnonzero(new_episode)
    returns = np.add.reduceat(np.asarray(columns["reward"], np.float64), starts)
    ep_stream = stream[starts]
    per_stream = np.bincount(ep_stream)[ep_stream]                 # episodes in each episode's stream
    position = np.arange(starts.size)
    rank = position - np.maximum.accumulate(np.where(np.r_[True, np.diff(ep_stream) != 0], position, 0))
    tenth = np.ceil(0.1 * per_stream)
    first, last = returns[rank < tenth], returns[rank >= per_stream - tenth]
    return {"num_episodes": int(returns.size), "mean": float(returns.mean()), "std": float(returns.std()),
            "min": float(returns.min()), "max": float(returns.max()),
            "first_10pct_mean": float(first.mean()) if first.size else None,
            "last_10pct_mean": float(last.mean()) if last.size else None}


def write_shard(dataset_dir: str, task_id: int, columns: dict[str, np.ndarray], extra: dict) -> dict:
    """Write ``shards/task_XXXXX.arrow`` then its ``.json`` sidecar, both atomically; returns the sidecar.

    ``columns`` maps column names (see ``COLUMNS``) to arrays with one row per transition, sorted by
    (stream, episode, step): obs/next_obs ``(N, obs_dim)``, action ``(N,)`` int or ``(N, act_dim)`` float.
    ``extra`` (JSON-serialisable) is merged into the sidecar, e.g. the learner's return curve.
    """
    num_rows = _check_columns(columns)
    obs_dim = int(np.shape(columns["obs"])[1])
    action = np.asarray(columns["action"])
    discrete = action.ndim == 1 and action.dtype.kind in "iu"
    action_dim = None if discrete else int(action.reshape(num_rows, -1).shape[1])
    schema = shard_schema(obs_dim, action_dim, success="success" in columns,
                          optimal_action="optimal_action" in columns)
    schema = schema.with_metadata({**schema.metadata, b"dicp_ray.task_id": str(task_id).encode()})
    batch = pa.record_batch([_to_arrow(f.name, columns[f.name], f) for f in schema], schema=schema)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema, options=ipc.IpcWriteOptions(compression=None)) as writer:
        writer.write_batch(batch)
    payload = sink.getvalue()

    fs, root, is_local = _resolve(dataset_dir)
    base = _join(root, SHARD_DIR, shard_name(task_id))
    _atomic_write(fs, base + ".arrow", payload, is_local)
    sidecar = {**extra, "task_id": int(task_id), "file": f"{SHARD_DIR}/{shard_name(task_id)}.arrow",
               "columns": schema.names, "num_rows": num_rows,
               "num_streams": int(np.unique(columns["stream"]).size),
               "sha256": hashlib.sha256(memoryview(payload)).hexdigest(),
               "returns": _returns_summary(columns)}
    _atomic_write(fs, base + ".json", _json_bytes(sidecar), is_local)
    return sidecar


def read_sidecar(dataset_dir: str, task_id: int) -> dict | None:
    """The sidecar of a task's shard, or None when it is missing or unreadable."""
    fs, root, _ = _resolve(dataset_dir)
    path = _join(root, SHARD_DIR, shard_name(task_id) + ".json")
    try:
        return _read_json(fs, path) if _exists(fs, path) else None
    except (OSError, ValueError):
        return None


def shard_is_valid(dataset_dir: str, task_id: int, fingerprint: str | None = None) -> bool:
    """True when the shard and its sidecar exist, the sha256 matches and (if given) the fingerprint too."""
    sidecar = read_sidecar(dataset_dir, task_id)
    if sidecar is None or (fingerprint is not None and sidecar.get("fingerprint") != fingerprint):
        return False
    fs, root, _ = _resolve(dataset_dir)
    path = _join(root, sidecar["file"])
    return _exists(fs, path) and _sha256(fs, path) == sidecar.get("sha256")


def _delete_files(dataset_dir: str, match) -> int:
    """Delete the files of the dataset root and ``shards/`` whose base name satisfies ``match``."""
    fs, root, _ = _resolve(dataset_dir)
    removed = 0
    for directory in (root, _join(root, SHARD_DIR)):
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.File and match(info.base_name):
                fs.delete_file(info.path)
                removed += 1
    return removed


def remove_shard(dataset_dir: str, task_id: int) -> None:
    """Delete a task's shard, sidecar and any temporary files left by an interrupted write of them."""
    names = {shard_name(task_id) + ".arrow", shard_name(task_id) + ".json"}
    _delete_files(dataset_dir, lambda base: base.split(".tmp-")[0].removeprefix(".") in names)


def remove_temp_files(dataset_dir: str) -> int:
    """Delete every temporary file of an interrupted write (only while no writer is active); returns count."""
    return _delete_files(dataset_dir, lambda base: base.startswith(".") and ".tmp-" in base)


def write_manifest(dataset_dir: str, *, env_name: str, obs_dim: int, num_actions: int | None,
                   action_type: str, task_ids: Sequence[int], shards: Sequence[dict], collect_config: dict,
                   seeds: dict, provenance: dict, fingerprint: str, complete: bool,
                   action_dim: int | None = None, env_task: str | None = None) -> dict:
    """Atomically write ``manifest.json``; ``shards`` are sidecars (only their file facts are kept).

    ``action_type`` is "discrete" (``num_actions`` choices, int64 column) or "continuous" (``action_dim``
    floats); ``env_task`` is the Meta-World ML1 task. Those two keys are written only when given, so
    grid-world manifests keep their layout.
    """
    if action_type not in ("discrete", "continuous"):
        raise ValueError(f"action_type must be 'discrete' or 'continuous', got {action_type!r}")
    optional = {k: v for k, v in (("action_dim", action_dim), ("env_task", env_task)) if v is not None}
    manifest = {
        "format": DATASET_FORMAT, "schema_version": SCHEMA_VERSION, "env_name": env_name, "obs_dim": obs_dim,
        "num_actions": num_actions, "action_type": action_type, **optional,
        "columns": shards[0].get("columns") if shards else None,
        "task_ids": [int(t) for t in task_ids], "fingerprint": fingerprint,
        "shards": [{k: s[k] for k in ("task_id", "file", "num_rows", "num_streams", "sha256")}
                   for s in shards],
        "collect_config": collect_config, "seeds": seeds, "provenance": provenance,
        "complete": bool(complete),
    }
    fs, root, is_local = _resolve(dataset_dir)
    _atomic_write(fs, _join(root, MANIFEST_FILE), _json_bytes(manifest), is_local)
    return manifest


def read_manifest(path: str) -> dict:
    """Read and check ``manifest.json`` (format + schema version); raises FileNotFoundError / ValueError."""
    fs, root, _ = _resolve(path)
    manifest_path = _join(root, MANIFEST_FILE)
    if not _exists(fs, manifest_path):
        has_shards = fs.get_file_info(_join(root, SHARD_DIR)).type == pafs.FileType.Directory
        state = "it holds shards of an unfinished collection" if has_shards else "there is no dataset there"
        raise FileNotFoundError(f"{path}: no {MANIFEST_FILE} ({state}); run `dicp-ray collect` with this "
                                "output to create or finish it")
    try:
        manifest = _read_json(fs, manifest_path)
    except ValueError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); re-run `dicp-ray collect`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path} is not a dicp_ray dataset ({MANIFEST_FILE} has no "
                         f"format={DATASET_FORMAT!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has dataset schema_version {manifest.get('schema_version')!r}, this "
                         f"dicp_ray reads version {SCHEMA_VERSION}: re-collect it with this version "
                         "(`dicp-ray collect`)")
    return manifest


def dataset_is_complete(path: str) -> bool:
    """Cheap check (no hashing): a valid, complete manifest whose shard files all exist."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return False
    if not manifest.get("complete"):
        return False
    fs, root, _ = _resolve(path)
    infos = fs.get_file_info([_join(root, s["file"]) for s in manifest["shards"]])
    return all(i.type == pafs.FileType.File for i in infos)


# ----------------------------------------------------------------------------------------------------------
# Reading


