"""Evaluate every (split seed x mode) of a config's checkpoints, on Ray or in this process, and summarise them.

    from dicp_ray.evaluate.launch import run_evaluations
    summary = run_evaluations(config, {0: "runs/demo/train/split_0/model.pt"}, "runs/demo/eval")

``eval.backend`` picks where the runs go: ``ray`` = one Ray task each, in parallel (GPUs shared by two runs);
``local`` = one after another in this process, without Ray (a bare GPU box). Either way every run is
``dicp_ray.evaluate.episodes.evaluate_in_context`` writing ``<out>/split_<s>/<mode>/results.json``, a run whose
results.json matches the checkpoint and settings is reused (so a re-run resumes), and the summary over split
seeds (``summary.{json,csv}``, ``learning_curves.png``; ``dicp_ray.evaluate.results``) is written last.
Everything that can be checked (checkpoints exist, env/variant agree, planning has a world model) is checked
before Ray starts.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.console import watch_progress
from dicp_ray.evaluate.episodes import (
    _check_compatible,
    _check_mode,
    _fingerprint,
    _resolve_split_seed,
    evaluate_in_context,
    file_sha256,
)
from dicp_ray.evaluate.results import RESULTS_FILE, aggregate_results, write_summary
from dicp_ray.models.checkpoints import load_checkpoint

logger = logging.getLogger(__name__)


def _finished_result(out: Path, fingerprint: dict) -> dict | None:
    try:
        result = json.loads((out / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("fingerprint") == fingerprint else None


def _precheck(config: ExperimentConfig, checkpoints: dict[int, str], modes: tuple[str, ...]) -> dict:
    """Fail before Ray starts: missing checkpoints, env/variant mismatches, planning without world model."""
    if not checkpoints:
        raise ValueError("run_evaluations needs at least one {split_seed: checkpoint_path}")
    digests = {}
    for seed, path in checkpoints.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint for split seed {seed} not found: {path}")
        model, payload = load_checkpoint(path)
        for mode in modes:
            _check_compatible(payload, model.spec, config, mode, path)
        _resolve_split_seed(payload, int(seed), config, path)
        digests[seed] = file_sha256(path)
    return digests


def run_evaluations(config: ExperimentConfig, checkpoints: dict[int, str], output_dir: str,
                    modes: tuple[str, ...] | list[str] | None = None) -> dict:
    """Evaluate every (split seed, mode) on eval.backend, then aggregate; writes summary.{json,csv} + PNG."""
    modes = tuple(config.eval.modes if modes is None else modes)
    for mode in modes:
        _check_mode(mode)
    out = Path(output_dir).resolve()
    digests = _precheck(config, checkpoints, modes)
    results: dict[tuple[int, str], dict] = {}
    pending = {}
    for seed, path in sorted(checkpoints.items()):
        for mode in modes:
            run_dir = out / f"split_{seed}" / mode
            done = _finished_result(run_dir, _fingerprint(config, digests[seed], mode, int(seed)))
            if done is not None:
                logger.info("evaluate: split %d %s already finished in %s, reusing it", seed, mode, run_dir)
                results[(seed, mode)] = done
                continue
            pending[(seed, mode)] = (os.path.abspath(path), str(run_dir))
    if pending:
        files = [Path(run_dir) / "progress.json" for _, run_dir in pending.values()]
        for f in files:
            f.unlink(missing_ok=True)  # left by an interrupted run: its episodes are run again
        with watch_progress(files, len(files) * config.eval.num_episodes, "evaluate", "episode"):
            run = _run_local if config.eval.backend == "local" else _run_on_ray
            results.update(run(config, pending))
    summary = aggregate_results(config, results, modes)
    write_summary(out, summary)
    return summary


def _run_local(config: ExperimentConfig, pending: dict) -> dict:
    """The pending runs one after another in this process (eval.backend = local; Ray is never imported)."""
    results = {}
    for (seed, mode), (path, run_dir) in pending.items():
        results[(seed, mode)] = evaluate_in_context(path, config, run_dir, mode, int(seed))
        logger.debug("evaluate: split %d %s finished (%d/%d)", seed, mode, len(results), len(pending))
    return results


def _run_on_ray(config: ExperimentConfig, pending: dict) -> dict:
    """The pending runs as Ray tasks, all in flight at once (eval.backend = ray)."""
    import ray

    from dicp_ray.runtime import init_ray

    init_ray(config.resources)
    task = ray.remote(num_cpus=1)(evaluate_in_context).options(num_gpus=_gpus_per_task(config))
    refs = {task.remote(path, config, run_dir, mode, int(seed)): (seed, mode)
            for (seed, mode), (path, run_dir) in pending.items()}
    results, remaining = {}, list(refs)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        results[refs[ready[0]]] = ray.get(ready[0])
        logger.debug("evaluate: split %d %s finished (%d/%d)", *refs[ready[0]], len(refs) - len(remaining),
                     len(refs))
    return results


def _gpus_per_task(config: ExperimentConfig) -> float:
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if config.eval.device == "cuda" and not has_gpu:
        raise ValueError("eval.device = 'cuda' but the Ray cluster has no GPUs: use --set eval.device=auto")
    return 0.5 if has_gpu and config.eval.device != "cpu" else 0


__all__ = ["run_evaluations"]
