"""Results of in-context evaluation: statistics, the files of a run, the summary over split seeds, plots, tables.

What it does
    One run (``dicp_ray.evaluate.evaluate_in_context``: one checkpoint, one mode) writes ``returns.csv``, TensorBoard
    scalars ``eval/<mode>/return_mean`` and ``results.json`` last (``write_run_outputs``). ``aggregate_results``
    turns the runs of several split seeds into per-method curves with 95% t-intervals (across split seeds, or
    across test tasks with one seed); ``write_summary`` writes ``summary.json``, ``summary.csv`` and
    ``learning_curves.png``; ``format_results_table`` prints the paper's table (return after episodes 1, 5, 10,
    25, 50). Meta-World runs add success rates (``success_metrics``).

How to use it
    from dicp_ray.evaluate.results import format_results_table, mean_ci95
    print(format_results_table(summary))          # summary = dicp_ray.evaluate.launch.run_evaluations(...)

What to expect
    Pure numpy / matplotlib (Agg canvas, headless) / TensorBoard writers; every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.runtime import provenance, write_text_atomic

RESULTS_FILE, RETURNS_CSV, TB_DIR = "results.json", "returns.csv", "tb"
SUMMARY_JSON, SUMMARY_CSV, CURVES_PNG = "summary.json", "summary.csv", "learning_curves.png"
RESULTS_SCHEMA_VERSION = 1
TABLE_EPISODES = (1, 5, 10, 25, 50)
# Two-sided 95% Student-t critical values for 1..9 degrees of freedom; from 10 on the Cornish-Fisher
# expansion below is within 1e-5 of the exact quantile.
_T975_SMALL_DF = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)


def metric_tag(mode: str) -> str:
    """TensorBoard tag of the mean return per episode index for `mode`."""
    return f"eval/{mode}/return_mean"


def method_label(variant: str, mode: str, world_model: bool = False) -> str:
    """'AD (policy)', 'AD + world model (policy)' (a DICP checkpoint acting without planning), 'DICP-AD (plan)'."""
    if mode == "plan":
        return f"DICP-{variant.upper()} (plan)"
    return f"{variant.upper()}{' + world model' if world_model else ''} (policy)"


# ----------------------------------------------------------------------------- statistics
def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975_SMALL_DF):
        return _T975_SMALL_DF[df - 1]
    z, v = 1.959963984540054, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def mean_ci95(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, ...) samples -> mean, low, high of a t-interval over axis 0 (zero width when n < 2)."""
    samples = np.asarray(samples, dtype=np.float64)
    n, mean = samples.shape[0], samples.mean(axis=0)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = t_critical_95(n - 1) * samples.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def success_metrics(successes: np.ndarray) -> dict:
    """(tasks, episodes) 0/1 -> per-episode success rate and the "succeeded at least once so far" rate (the
    authors' release reports the latter), each with a 95% t-interval over tasks."""
    once = np.maximum.accumulate(successes, axis=1)
    out = {"successes": successes.tolist()}
    for name, values in (("success", successes), ("success_once_so_far", once)):
        mean, low, high = mean_ci95(values)
        low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)  # a t-interval of 0/1 data can leave [0, 1]
        out.update({f"{name}_mean": mean.tolist(), f"{name}_ci_low": low.tolist(),
                    f"{name}_ci_high": high.tolist()})
    return out


# ----------------------------------------------------------------------------- writing
def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_run_outputs(out: Path, result: dict) -> None:
    """returns.csv and TensorBoard first, results.json last (its presence marks a finished run)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    oracle = result["oracle_max_return_mean"]
    rows = [[e + 1, m, lo, hi, "" if oracle is None else oracle] for e, (m, lo, hi) in
            enumerate(zip(result["return_mean"], result["return_ci_low"], result["return_ci_high"]))]
    write_text_atomic(out / RETURNS_CSV, _csv_text(["episode", "mean", "ci_low", "ci_high", "oracle"], rows))
    shutil.rmtree(out / TB_DIR, ignore_errors=True)  # a re-run replaces, never appends to, the curve
    writer = SummaryWriter(log_dir=str(out / TB_DIR))
    for episode, value in enumerate(result["return_mean"], start=1):
        writer.add_scalar(metric_tag(result["mode"]), value, episode)
    if oracle is not None:
        writer.add_scalar(f"eval/{result['mode']}/oracle_max_return", oracle, 1)
    for episode, value in enumerate(result.get("success_mean") or (), start=1):
        writer.add_scalar(f"eval/{result['mode']}/success", value, episode)
    writer.close()
    write_text_atomic(out / RESULTS_FILE,
                      json.dumps(result, indent=1, sort_keys=True, default=str, allow_nan=False))


# ----------------------------------------------------------------------------- aggregation and reports
def aggregate_results(config: ExperimentConfig, results: dict[tuple[int, str], dict],
                      modes: tuple[str, ...]) -> dict:
    """Per mode: mean return per episode over split seeds, 95% CI across seeds (over tasks with one seed)."""
    seeds = sorted({seed for seed, _ in results})
    methods = {}
    for mode in modes:
        runs = [results[(seed, mode)] for seed in seeds]
        curves = np.array([run["return_mean"] for run in runs])                        # (S, E)
        if len(runs) > 1:
            mean, low, high = mean_ci95(curves)
            ci_over = "split_seeds"
        else:
            mean, low, high = (np.asarray(runs[0][key]) for key in
                               ("return_mean", "return_ci_low", "return_ci_high"))
            ci_over = "tasks"
        methods[mode] = {
            "label": method_label(config.model.variant, mode, config.model.world_model),
            "return_mean": mean.tolist(),
            "ci_low": low.tolist(), "ci_high": high.tolist(), "ci_over": ci_over,
            "per_split_return_mean": {str(s): run["return_mean"] for s, run in zip(seeds, runs)},
            "decisions_per_s": float(np.mean([run["timing"]["decisions_per_s"] for run in runs])),
            "num_test_tasks": {str(s): len(run["task_ids"]) for s, run in zip(seeds, runs)},
            "training": {str(s): _training_reached(run) for s, run in zip(seeds, runs)},
        }
        for metric in ("success", "success_once_so_far"):  # Meta-World
            if f"{metric}_mean" in runs[0]:
                methods[mode].update(_aggregate_curves(runs, seeds, metric))
    oracles = [results[(seed, modes[0])]["oracle_max_return_mean"] for seed in seeds]
    oracle = None if None in oracles else float(np.mean(oracles))
    return {"format": "dicp_ray.eval_summary", "schema_version": RESULTS_SCHEMA_VERSION,
            "env": config.env.name, "variant": config.model.variant, "split_seeds": seeds,
            "num_episodes": config.eval.num_episodes, "oracle_max_return_mean": oracle, "methods": methods,
            "ci": "95% t-interval", "config": config.to_dict(), "provenance": provenance()}


def _training_reached(run: dict) -> dict:
    """How far the evaluated checkpoint was trained: its step, the run's train.num_steps, the fraction reached and
    whether train.deadline_unix_s stopped it (results of older checkpoints: None where unknown)."""
    step, total = run.get("checkpoint_step"), run.get("checkpoint_num_steps")
    fraction = None if not step or not total else round(step / total, 4)
    return {"step": step, "num_steps": total, "fraction": fraction,
            "stopped_at_deadline": run.get("checkpoint_stopped_at_deadline", False)}


def _aggregate_curves(runs: list[dict], seeds: list[int], metric: str) -> dict:
    """`metric`'s per-episode mean with a 95% CI over split seeds (over tasks when there is one seed)."""
    curves = np.array([run[f"{metric}_mean"] for run in runs])
    if len(runs) > 1:
        mean, low, high = mean_ci95(curves)
        low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    else:
        mean, low, high = (np.asarray(runs[0][f"{metric}_{key}"]) for key in ("mean", "ci_low", "ci_high"))
    return {f"{metric}_mean": mean.tolist(), f"{metric}_ci_low": low.tolist(), f"{metric}_ci_high": high.tolist(),
            f"per_split_{metric}_mean": {str(s): run[f"{metric}_mean"] for s, run in zip(seeds, runs)}}


def write_summary(out: Path, summary: dict) -> None:
    rows = []
    for mode, method in summary["methods"].items():
        for e, values in enumerate(zip(method["return_mean"], method["ci_low"], method["ci_high"])):
            oracle = summary["oracle_max_return_mean"]
            rows.append([method["label"], mode, e + 1, *values, "" if oracle is None else oracle])
    header = ["method", "mode", "episode", "mean", "ci_low", "ci_high", "oracle"]
    write_text_atomic(out / SUMMARY_CSV, _csv_text(header, rows))
    plot_learning_curves(summary, out / CURVES_PNG)
    write_text_atomic(out / SUMMARY_JSON,
                      json.dumps(summary, indent=1, sort_keys=True, default=str, allow_nan=False))


def plot_learning_curves(summary: dict, path: Path) -> None:
    """Return vs episode: one line and shaded 95% CI per method, dashed oracle line (headless Agg canvas).
    Meta-World adds a success panel: per-episode success (solid) and succeeded-at-least-once-so-far (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summary["methods"].values())
    with_success = any("success_mean" in m for m in methods)
    fig = Figure(figsize=(12.0 if with_success else 6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_success else 1, squeeze=False)[0]
    ax = axes[0]
    for method in methods:
        episodes = np.arange(1, len(method["return_mean"]) + 1)
        line, = ax.plot(episodes, method["return_mean"], label=method["label"])
        ax.fill_between(episodes, method["ci_low"], method["ci_high"], color=line.get_color(), alpha=0.2)
        if with_success:
            for metric, style, name in (("success", "-", "success"), ("success_once_so_far", "--", "once so far")):
                axes[1].plot(episodes, method[f"{metric}_mean"], style, color=line.get_color(),
                             label=f"{method['label']}: {name}")
                axes[1].fill_between(episodes, method[f"{metric}_ci_low"], method[f"{metric}_ci_high"],
                                     color=line.get_color(), alpha=0.12)
    if summary["oracle_max_return_mean"] is not None:
        ax.axhline(summary["oracle_max_return_mean"], color="black", linestyle="--", linewidth=1,
                   label="oracle max")
    seeds = ", ".join(str(s) for s in summary["split_seeds"])
    ax.set(xlabel="episode", ylabel="mean return over test tasks",
           title=f"{summary['env']}: in-context evaluation (split seeds {seeds})")
    if with_success:
        axes[1].set(xlabel="episode", ylabel="success rate over test tasks", ylim=(-0.02, 1.02),
                    title="success: per episode / succeeded at least once so far")
    for a in axes:
        a.xaxis.get_major_locator().set_params(integer=True)
        a.legend(loc="best", fontsize="small")
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def format_results_table(summary: dict) -> str:
    """Plain-text table: method x mean return (± 95% CI) after episodes 1, 5, 10, 25, 50 (and the last)."""
    num_episodes = summary["num_episodes"]
    episodes = [e for e in TABLE_EPISODES if e <= num_episodes]
    if num_episodes not in episodes:
        episodes.append(num_episodes)
    rows = [["method", *(f"ep {e}" for e in episodes)]]
    for method in summary["methods"].values():
        mean, low, high = (np.asarray(method[key]) for key in ("return_mean", "ci_low", "ci_high"))
        cells = [f"{mean[e - 1]:.2f} ± {(high[e - 1] - low[e - 1]) / 2:.2f}" for e in episodes]
        rows.append([method["label"], *cells])
    for method in summary["methods"].values():  # Meta-World: success rates, the paper's metric
        for metric, name in (("success", "success rate"), ("success_once_so_far", "succeeded at least once")):
            if f"{metric}_mean" in method:
                mean, low, high = (np.asarray(method[f"{metric}_{key}"]) for key in ("mean", "ci_low", "ci_high"))
                rows.append([f"{method['label']}: {name}",
                             *(f"{100 * mean[e - 1]:.0f}% ± {50 * (high[e - 1] - low[e - 1]):.0f}" for e in episodes)])
    if summary["oracle_max_return_mean"] is not None:
        rows.append(["oracle (max)", *(f"{summary['oracle_max_return_mean']:.2f}" for _ in episodes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in rows]
    seeds = ", ".join(str(s) for s in summary["split_seeds"])
    title = (f"{summary['env']}: mean return over test tasks after episode n, ± 95% CI "
             f"(split seeds {seeds})")
    return "\n".join([title, *lines])


__all__ = ["format_results_table", "aggregate_results", "write_summary", "write_run_outputs", "plot_learning_curves",
           "mean_ci95", "t_critical_95", "success_metrics", "metric_tag", "method_label", "TABLE_EPISODES",
           "RESULTS_FILE", "RESULTS_SCHEMA_VERSION"]
