"""The one training loop: a group of M >= 1 runs (split seeds of a config) in a Ray Train worker or in this process.

    run_loop(loop_configs, LocalBackend("cpu"))        # train.backend = local: Ray is never imported
    train_loop_per_worker({"members": loop_configs})   # train.backend = ray: the TorchTrainer's function

`dicp_ray.train.train_models` builds the loop configs (one per run, checked before anything starts) and picks
the backend. Every step each member samples its own windows, the group takes one optimizer step
(`dicp_ray.train.model_group.ModelGroup`), and the per-member losses stay on the device until a log interval. Every
``log_every_steps`` rank 0 writes each member's TensorBoard scalars and one progress line with an ETA; every
``checkpoint_every_steps`` (and at the end) it measures each member's held-out metrics and checkpoints all
members through the backend (`dicp_ray.train.backends`). A re-run continues from the last checkpoint. Past
``train.deadline_unix_s`` the loop stops after the current step (at least one per call) and checkpoints there,
marked ``stopped_at_deadline``; `dicp_ray.train.launch` treats that run as unfinished (a re-run continues it).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.console import ProgressFile
from dicp_ray.models.checkpoints import build_model
from dicp_ray.train.backends import (
    Member,
    MetricMeans,
    RayBackend,
    _all_gather,
    _rng_state,
    deadline_reached,
    heldout_batches,
    tune_allocator,
    write_member_checkpoint,
)
from dicp_ray.train.batches import make_window_sampler, model_spec_from_config, windows_to_batch
from dicp_ray.train.model_group import ModelGroup
from dicp_ray.train.runs import CRASH_ENV_VAR
from dicp_ray.train.step import evaluate_batches

logger = logging.getLogger(__name__)


class _Run:
    """Everything the loop of one rank holds: the group, its members and the bookkeeping between steps."""

    def __init__(self, loop_configs: list[dict], backend):
        from dicp_ray.data.history import HistoryDataset

        self.loop_configs, self.backend = loop_configs, backend
        config: ExperimentConfig = loop_configs[0]["config"]
        self.train, rank, world = config.train, backend.rank, backend.world_size
        tune_allocator()
        torch.set_num_threads(self.train.cpus_per_worker)
        datasets = [HistoryDataset.open(lc["dataset_dir"], task_ids=lc["train_task_ids"], verify=False)
                    for lc in loop_configs]
        for lc, dataset in zip(loop_configs, datasets):
            assert set(lc["test_task_ids"]).isdisjoint(dataset.task_ids), "a test task in the training data"
        self.spec = model_spec_from_config(config, datasets[0])
        models = []
        for _ in loop_configs:
            torch.manual_seed(self.train.seed)  # identical initial weights on every rank, as a lone run
            models.append(build_model(self.spec))
        self.batch_per_rank = self.train.batch_size // world
        self.group = ModelGroup(models, self.train, backend.device, world, compile=self.train.compile,
                                models_per_pass=models_per_pass(self.spec, self.batch_per_rank, backend.device))
        self.members = [Member(lc, make_window_sampler(lc["config"], ds, seed=[self.train.seed, rank],
                                                       device=backend.device), [], None)
                        for lc, ds in zip(loop_configs, datasets)]
        self.start_step, self.resumed = self._restore()
        crash = loop_configs[0].get("crash_at_step")
        marker = None if crash is None else backend.crash_marker(loop_configs[0], crash)
        self.crash_at_step = None if marker is None or marker.exists() else crash
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            if not logging.getLogger().handlers:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            for member in self.members:
                member.heldout = heldout_batches(member.loop_config, self.spec, self.batch_per_rank, backend.device)
                member.writer = SummaryWriter(str(Path(member.loop_config["output_dir"]) / "tb"),
                                              purge_step=self.start_step or None)
            logger.info("rank 0/%d: training %d %s model(s) steps %d -> %d on %s, %d windows/step each", world,
                        len(self.members), self.spec.layout, self.start_step, self.train.num_steps, backend.device,
                        self.train.batch_size)

    def _restore(self) -> tuple[int, list[int]]:
        """Continue from the backend's checkpoint -> (step to continue from, steps resumed at so far)."""
        seed, rank, world = self.train.seed, self.backend.rank, self.backend.world_size
        with self.backend.restore(self.loop_configs) as dirs:
            states = None if dirs is None else [
                torch.load(d / "state.pt", map_location="cpu", weights_only=True) for d in dirs]
        if states is None:
            torch.manual_seed(seed * 1000 + rank)  # per-rank dropout
            return 0, []
        for lc, state in zip(self.loop_configs, states):
            if state["run_identity"] != lc["run_identity"]:
                raise RuntimeError(f"checkpoint of another run: {state['run_identity']}")
        steps = {int(s["step"]) for s in states}
        if len(steps) != 1:
            raise RuntimeError(f"the group's checkpoints are at different steps {sorted(steps)}")
        self.group.load_member_states(states)
        step = steps.pop()
        if len(states[0]["rng"]) == world:
            torch.set_rng_state(states[0]["rng"][rank]["torch"])
            if "cuda" in states[0]["rng"][rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(states[0]["rng"][rank]["cuda"])
            for member, state in zip(self.members, states):
                member.sampler._rng.bit_generator.state = state["rng"][rank]["sampler"]
        else:  # another worker count: fresh but deterministic streams
            torch.manual_seed(seed * 1000 + rank + 1_000_003 * step)
            for member in self.members:
                fresh = np.random.default_rng([seed, rank, step])
                member.sampler._rng.bit_generator.state = fresh.bit_generator.state
        return step, [*states[0]["resumed_at_steps"], step]

    # -- one interval ------------------------------------------------------------
    def log(self, means: MetricMeans, step: int, clock: dict) -> list[dict]:
        """Every member's interval metrics (a collective on every rank); rank 0 writes TensorBoard + progress."""
        now = time.perf_counter()
        rate = self.train.batch_size * (step - clock["step"]) / max(now - clock["time"], 1e-9)  # per model
        lr = self.group.scheduler.get_last_lr()[0]
        tokens = self.spec.context_len + int(self.spec.world_model)
        metrics = []
        for values in means.read(self.backend.world_size):
            m = {f"train/{k}": v for k, v in values.items()}
            m.update({"train/lr": lr, "train/samples_per_s": rate, "train/tokens_per_s": rate * tokens})
            metrics.append(m)
        clock.update(time=now, step=step)
        if self.backend.rank == 0:
            for member, m in zip(self.members, metrics):
                for key, value in m.items():
                    member.writer.add_scalar(key, value, step)
            eta = (now - clock["start"]) / (step - self.start_step) * (self.train.num_steps - step)
            loss = [m["train/loss"] for m in metrics]
            acc = [m.get("train/acc_action", float("nan")) for m in metrics]
            group = f" ({len(metrics)} models: mean; loss {min(loss):.4f}-{max(loss):.4f})" if len(metrics) > 1 else ""
            logger.info("step %d/%d loss %.4f acc_action %.3f lr %.2e%s | %.0f windows/s | ETA %s", step,
                        self.train.num_steps, float(np.mean(loss)), float(np.mean(acc)), lr, group,
                        rate * len(metrics), format_eta(eta))
        return metrics

    def checkpoint(self, metrics: list[dict], step: int, stopped_at_deadline: bool = False) -> None:
        """Every rank calls this at the same steps; rank 0 adds held-out metrics and writes every member."""
        rngs = _all_gather([_rng_state(m.sampler) for m in self.members], self.backend.world_size)  # collective
        weight = self.train.world_model_weight
        if self.backend.rank == 0:
            for i, member in enumerate(self.members):
                if member.heldout:
                    scores = evaluate_batches(self.group.member_model(i), member.heldout, weight)
                    metrics[i].update({f"heldout/{k}": v for k, v in scores.items()})
                    for key, value in scores.items():
                        member.writer.add_scalar(f"heldout/{key}", value, step)
                member.writer.flush()

        def write(i: int, ckpt_dir: Path) -> None:
            model = self.group.member_model(i)
            write_member_checkpoint(ckpt_dir, model, self.group.member_state(i), step, [r[i] for r in rngs],
                                    self.resumed, self.loop_configs[i], stopped_at_deadline)

        if len(metrics) == 1:
            report = {"step": step, **metrics[0]}
        else:
            report = {"step": step, **{f"{Path(lc['output_dir']).name}/{k}": v
                                       for lc, m in zip(self.loop_configs, metrics) for k, v in m.items()}}
        self.backend.save(self.loop_configs, step, report, write)


def run_loop(loop_configs: list[dict[str, Any]], backend) -> None:
    """Train the group of `loop_configs` (one per run, same model shape and train settings) on `backend`."""
    r = _Run(loop_configs, backend)
    train, spec = r.train, r.spec
    means, now = MetricMeans(), time.perf_counter()
    clock = {"start": now, "time": now, "step": r.start_step}
    progress = (ProgressFile(Path(loop_configs[0]["output_dir"]) / "progress.json", train.num_steps)
                if backend.rank == 0 else None)  # the driver's progress bar (dicp_ray.console.watch_progress)
    for step in range(r.start_step, train.num_steps):
        pairs = []
        for member in r.members:
            windows = member.sampler.sample(r.batch_per_rank)
            if step == r.start_step:
                leaked = set(member.loop_config["test_task_ids"]).intersection(windows["task_id"].tolist())
                assert not leaked, f"sampled windows of test tasks {sorted(leaked)}"
            pairs.append(member_batch(windows, spec, backend.device))
        if step == r.crash_at_step:
            backend.crash_marker(loop_configs[0], step).parent.mkdir(parents=True, exist_ok=True)
            backend.crash_marker(loop_configs[0], step).touch()
            raise RuntimeError(f"{CRASH_ENV_VAR}: simulated crash at step {step}")
        means.add(r.group.step(pairs))
        done = step + 1
        if progress is not None:
            progress.update(done)
        metrics = None
        stop = done < train.num_steps and deadline_reached(train.deadline_unix_s, backend.world_size, backend.device)
        if done % train.log_every_steps == 0 or done == train.num_steps or stop:
            metrics = r.log(means, done, clock)
        if done % train.checkpoint_every_steps == 0 or done == train.num_steps or stop:
            r.checkpoint(metrics or [{} for _ in r.members], done, stopped_at_deadline=stop)
        if stop:
            if backend.rank == 0:
                logger.info("train.deadline_unix_s passed: stopped at step %d of %d (%.1f%%); a re-run continues",
                            done, train.num_steps, 100 * done / train.num_steps)
            break
    for member in r.members:
        if member.writer is not None:
            member.writer.close()


def member_batch(windows: dict, spec, device: torch.device) -> tuple[dict, dict]:
    """One member's (batch, targets) on `device`: windows gathered there already (data.device_windows) become the
    batch in place; host windows are converted on the host and copied over (`_to_device`)."""
    if isinstance(windows["obs"], torch.Tensor):
        return windows_to_batch(windows, spec.layout, spec.world_model, device)
    return _to_device(windows_to_batch(windows, spec.layout, spec.world_model), device)


def _to_device(pair: tuple[dict, dict], device: torch.device) -> tuple[dict, dict]:
    """Host batch -> device. CUDA: through pinned memory with non-blocking copies, so the host queues the next
    step while the GPU still runs this one (a plain copy from pageable memory waits for the GPU every step)."""
    if device.type != "cuda":
        return pair if device.type == "cpu" else tuple({k: v.to(device) for k, v in d.items()} for d in pair)
    return tuple({k: v.pin_memory().to(device, non_blocking=True) for k, v in d.items()} for d in pair)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop of one rank: ``loop_config`` is one run's loop config or ``{"members": [...]}``."""
    run_loop(loop_config.get("members", [loop_config]), RayBackend())


def models_per_pass(spec, batch_size: int, device, budget_bytes: float | None = None) -> int:
    """How many models of a group one forward/backward pass may hold: a rough activation estimate (~1.4 GB
    per paper AD model at batch 512: attention probabilities and ~1K floats per token per layer) against
    half the GPU's memory, or 2 GiB on a CPU (where stacking buys little: the step is compute-bound)."""
    tokens = spec.context_len + 1
    per_model = 4 * batch_size * tokens * spec.num_layers * (
        3 * spec.num_heads * tokens + 12 * spec.embed_dim + 6 * spec.mlp_dim)
    device = torch.device(device)
    if budget_bytes is None:
        budget_bytes = (0.5 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                        else 2 * 2 ** 30)
    return max(1, int(budget_bytes // per_model))


def format_eta(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["run_loop", "train_loop_per_worker", "format_eta", "member_batch"]
