"""Where the training loop (dicp_ray/train/loop.py) keeps its state: backends, checkpoints, metrics.

Each member of the group is one run exactly as a lone `dicp-ray train` of its split seed: its own windows
(sampler seeded [train.seed, rank]), weights (initialised with train.seed), AdamW state, cosine schedule,
held-out metrics, TensorBoard run (``<output>/tb``) and checkpoints holding ``state.pt`` (weights, optimizer,
scheduler, step, per-rank RNG states), a self-describing ``model.pt`` and ``meta.json``. The members take their
optimizer steps together (`dicp_ray.train.model_group.ModelGroup`: stacked weights when M > 1).

Backends differ only in where checkpoints go and how a run is resumed:
  * ray: every ``checkpoint_every_steps`` every rank calls ``ray.train.report``; rank 0 attaches one checkpoint
    directory (a lone run's files, or one sub-directory per member named like its output directory); Ray
    Train restores it after a worker failure or when the same command is re-run.
  * local: each member's checkpoint is written to ``<output>/checkpoints/checkpoint_<step>`` (renamed into
    place: atomic), the newest two kept; a re-run resumes every member from the newest step all of them hold.

Data-parallel ranks (Ray, train.num_workers > 1) average gradients with one all-reduce per step.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.models.checkpoints import save_checkpoint
from dicp_ray.train.batches import make_window_sampler, windows_to_batch
from dicp_ray.train.runs import member_dir
from dicp_ray.train.step import TRAIN_TAGS

logger = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------------------- process setup
def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of unmapping it: a training step allocates the same large
    attention tensors (53 MB at batch 512, k = 80) every step, and mmap/munmap of each cost ~490K page faults
    per step. M_MMAP_MAX = 0 serves every allocation from the heap (the mmap threshold cannot be raised above
    32 MB), M_TRIM_THRESHOLD = 1 GiB stops returning its top to the OS. Same maths; returns False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------- backends
class LocalBackend:
    """This process, no Ray: checkpoints under each member's ``<output>/checkpoints``."""

    rank, world_size = 0, 1

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    @contextlib.contextmanager
    def restore(self, loop_configs: list[dict]) -> Iterator[list[Path] | None]:
        yield latest_local_checkpoints(loop_configs)

    def save(self, loop_configs: list[dict], step: int, metrics: dict, write: Callable[[int, Path], None]) -> None:
        for i, lc in enumerate(loop_configs):
            root = Path(lc["output_dir"]) / "checkpoints"
            tmp, final = root / f".tmp-checkpoint_{step:08d}-{os.getpid()}", root / f"checkpoint_{step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write(i, tmp)
            shutil.rmtree(final, ignore_errors=True)  # a re-run after a crash at this very step
            os.replace(tmp, final)
            for old in sorted(root.glob("checkpoint_*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def crash_marker(loop_config: dict, step: int) -> Path:
        return Path(loop_config["output_dir"]) / "checkpoints" / f".test_crash_at_{step}"


class RayBackend:
    """A Ray Train worker: `ray.train.report` with one checkpoint directory for the whole group."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def restore(self, loop_configs: list[dict]) -> Iterator[list[Path] | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as root:
            yield [member_dir(Path(root), loop_configs, i) for i in range(len(loop_configs))]

    def save(self, loop_configs: list[dict], step: int, metrics: dict, write: Callable[[int, Path], None]) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                for i in range(len(loop_configs)):
                    target = member_dir(Path(tmp), loop_configs, i)
                    target.mkdir(exist_ok=True)
                    write(i, target)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")

    @staticmethod
    def crash_marker(loop_config: dict, step: int) -> Path:
        return Path(loop_config["output_dir"]) / "ray_train" / f".test_crash_at_{step}"


def latest_local_checkpoints(loop_configs: list[dict]) -> list[Path] | None:
    """Each member's local checkpoint at the newest step that every member holds, or None (start at 0)."""
    from dicp_ray.train.runs import checkpoint_steps

    steps = [checkpoint_steps(Path(lc["output_dir"]) / "checkpoints", lc["run_identity"],
                              lc["config"].train.num_steps) for lc in loop_configs]
    common = set.intersection(*(set(s) for s in steps))
    if not common:
        if any(steps):
            logger.warning("the members' checkpoints share no step: the group starts from step 0")
        return None
    step = max(common)
    return [steps[i][step] for i in range(len(loop_configs))]


# ------------------------------------------------------------------------------------------- run state
def _rng_state(sampler) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": sampler._rng.bit_generator.state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def write_member_checkpoint(ckpt_dir: Path, model, state: dict, step: int, rng: list, resumed_at_steps: list[int],
                            loop_config: dict, stopped_at_deadline: bool = False) -> None:
    """state.pt (resumable state), model.pt (self-describing, for evaluation) and meta.json of one member.
    `stopped_at_deadline`: train.deadline_unix_s ended this call of the loop before num_steps (model.pt says so)."""
    config: ExperimentConfig = loop_config["config"]
    identity = loop_config["run_identity"]
    torch.save({**state, "step": step, "rng": rng, "resumed_at_steps": resumed_at_steps,
                "run_identity": identity}, ckpt_dir / "state.pt")
    extra = {"env_name": config.env.name, "split_seed": loop_config["split_seed"],
             "dataset_id": loop_config["dataset_id"], "variant": config.model.variant,
             "world_model": config.model.world_model, "step": step, "resumed_at_steps": resumed_at_steps,
             "config": config.to_dict(), "train_task_ids": list(loop_config["train_task_ids"]),
             "test_task_ids": list(loop_config["test_task_ids"]), "run_identity": identity,
             "provenance": loop_config["provenance"], "data_schema_version": _data_schema_version(),
             "num_steps": config.train.num_steps, "stopped_at_deadline": bool(stopped_at_deadline)}
    save_checkpoint(str(ckpt_dir / "model.pt"), model, extra=extra)
    (ckpt_dir / "meta.json").write_text(json.dumps({"step": step, "run_identity": identity}))


def deadline_reached(deadline_unix_s: float | None, world_size: int, device) -> bool:
    """Whether the wall clock passed train.deadline_unix_s; with several ranks rank 0's clock decides for all
    (one tiny broadcast per step), so every rank stops at the same step."""
    import time

    if deadline_unix_s is None:
        return False
    reached = time.time() >= deadline_unix_s
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            flag = torch.tensor([float(reached)], device=device)
            dist.broadcast(flag, src=0)
            reached = bool(flag.item())
    return reached


class MetricMeans:
    """Per-step losses of every member summed on the device (no host sync per step); read per interval."""

    def __init__(self):
        self.keys, self.sums, self.count = None, None, 0

    def add(self, losses: list[dict[str, torch.Tensor]]) -> None:
        if self.keys is None:  # the TRAIN_TAGS these models report (continuous models have no accuracies)
            self.keys = tuple(k for k in TRAIN_TAGS if k in losses[0])
        values = torch.stack([torch.stack([l[k] for k in self.keys]) for l in losses])   # (M, tags)
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def read(self, world_size: int) -> list[dict[str, float]]:
        import torch.distributed as dist

        means = self.sums / self.count
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(means)
            means = means / world_size
        self.sums, self.count = None, 0
        return [dict(zip(self.keys, row)) for row in means.tolist()]


def heldout_batches(loop_config: dict, spec, batch_size: int, device) -> list:
    """Fixed windows of TEST-task histories (the same at every checkpoint), or [] if the data has none."""
    from dicp_ray.data.history import HistoryDataset

    config: ExperimentConfig = loop_config["config"]
    if not loop_config["heldout_task_ids"]:
        return []
    dataset = HistoryDataset.open(loop_config["dataset_dir"], task_ids=loop_config["heldout_task_ids"],
                                  verify=False)
    sampler = make_window_sampler(config, dataset, seed=[config.train.seed, 2 ** 31])  # not a rank's
    return [windows_to_batch(sampler.sample(batch_size), spec.layout, spec.world_model, device)
            for _ in range(config.train.eval_batches)]


@dataclass
class Member:
    """One run of the group: its config, data stream and (rank 0) held-out batches and TensorBoard writer."""

    loop_config: dict[str, Any]
    sampler: Any
    heldout: list
    writer: Any


def _data_schema_version() -> int:
    """The dataset schema this code trains on; evaluation refuses grid models trained on another one."""
    from dicp_ray.data.shards import SCHEMA_VERSION

    return SCHEMA_VERSION
