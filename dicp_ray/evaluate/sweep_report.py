"""Tables and plots of a Ray Tune sweep's results (``dicp_ray.tune``): per-point CSV + markdown with a mean row, a
heat map for two-key grids, bars for one-key pipeline sweeps. Reads the ResultGrid's dataframe; imports no Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dicp_ray.config.load import sweep_points
from dicp_ray.config.schema import ExperimentConfig

# Tune metric names of the sweeps (dicp_ray.tune reports them; the tables read them).
PLAN_METRIC = "return_final"
PLAN_METRIC_META_WORLD = "success_final"  # Meta-World: per-episode success rate over the last 10% of episodes
TRAIN_METRIC = "heldout/loss_action"  # comparable across world-model weights


def report_pipeline_sweep(results: Any, keys: list[str], config: ExperimentConfig, out: Path) -> str:
    """Print and save the per-point table with a mean row (CSV) and, for one-key grids, a bar chart."""
    import json

    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    kind = "success" if config.env.is_meta_world else "return"
    stats = ("final", "mean", "once_last") if kind == "success" else ("final", "mean")
    metrics = [f"{kind}_{stat}_{mode}" for mode in config.eval.modes for stat in stats]
    def point_key(values) -> str:  # grid values may be lists (e.g. eval.modes): compare them as JSON
        return json.dumps(list(values), sort_keys=True, default=str)

    by_point = {point_key(r.config.get(k) for k in keys): r for r in results}
    rows = []
    for point in sweep_points(config.sweep.grid):  # every grid point gets a row, a failed one with its error
        result = by_point.get(point_key(point[k] for k in keys))
        row = {**point, **{m: float("nan") for m in metrics}, "error": ""}
        if result is not None and result.error is None:
            row.update({m: result.metrics.get(m, float("nan")) for m in metrics})
        else:
            error = None if result is None else getattr(result.error, "cause", None) or result.error
            reason = str(error) if error is not None else "not run"  # the trial's own exception, not Ray's wrapper
            row["error"] = reason.strip().splitlines()[0][:160] if reason.strip() else "failed"
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(by=keys, key=lambda c: c.astype(str)).reset_index(drop=True)
    failed = int((table["error"] != "").sum())
    if failed == 0:
        table = table.drop(columns=["error"])
    done = table[metrics].notna().all(axis=1)
    finished = table[done]
    if done.any():
        label = f"mean of {int(done.sum())}/{len(table)}" + (f" ({failed} failed)" if failed else "")
        mean_row = {k: label if i == 0 else "" for i, k in enumerate(keys)}
        mean_row.update({m: table.loc[done, m].mean() for m in metrics})
        table = pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)
    table.to_csv(out / "sweep_results.csv", index=False)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    if failed:
        text += (f"\n{failed} trial(s) failed: the mean is over the others; see <output>/runs/<point>/pipeline.log "
                 "and re-run the same command to retry them.")
    print(text)
    if len(keys) == 1 and len(finished) > 1:
        _bars(finished, keys[0], [m for m in metrics if "_final_" in m or "_once_last_" in m],
              out / "sweep_bars.png")
    return text


def _bars(table, key: str, metrics: list[str], path: Path) -> None:
    """Grouped horizontal bars: one group per grid value, one bar per metric (e.g. policy vs plan success)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n, width = len(table), 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * n * max(1, len(metrics)) ** 0.5))
    y = np.arange(n)
    for i, metric in enumerate(metrics):
        ax.barh(y + i * width, table[metric].astype(float), height=width, label=metric)
    ax.set_yticks(y + width * (len(metrics) - 1) / 2, [str(v) for v in table[key]])
    ax.invert_yaxis()
    ax.set_xlabel("*_final_*: mean over the last 10% of in-context episodes; *_once_last_*: at the last episode")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"pipeline sweep over {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_sweep(results: Any, keys: list[str], metric: str, out: Path) -> str:
    """Print and save the sweep table (CSV) and, for two-key grids, a heat map PNG."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    frame = results.get_dataframe()
    columns = {f"config/{k}": k for k in keys}
    present = [c for c in columns if c in frame.columns]
    extra = tuple(dict.fromkeys((metric, "return_final", "return_mean", "return_first", "success_mean",
                                 "success_once_final", "heldout/acc_reward", "heldout/acc_next_obs", "step")))
    table = frame[present + [c for c in extra if c in frame.columns]]
    table = table.rename(columns=columns).sort_values(by=[columns[c] for c in present])
    table.to_csv(out / "sweep_results.csv", index=False)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    if results.num_errors:
        text += f"\n{results.num_errors} trial(s) failed; their errors are in the Tune trial directories."
    print(text)
    if len(keys) == 2 and metric in table.columns:
        shown = [m for m in (metric, "return_mean" if metric == PLAN_METRIC else "success_once_final")
                 if m in table.columns]  # plan sweeps: final and mean return / success and at-least-once
        _heatmap([pd.pivot_table(table, index=keys[0], columns=keys[1], values=m) for m in shown], shown,
                 out / "sweep_heatmap.png")
    return text


def _heatmap(matrices: list, metrics: list[str], path: Path) -> None:
    """One annotated heat map per metric, side by side (2 decimals: sweep cells often differ by < 0.1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = matrices[0].shape
    fig, axes = plt.subplots(1, len(matrices), figsize=(len(matrices) * (1.2 * cols + 2.5), 0.8 * rows + 2),
                             squeeze=False)
    for ax, matrix, metric in zip(axes[0], matrices, metrics):
        image = ax.imshow(matrix.values, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(cols), [str(c) for c in matrix.columns])
        ax.set_yticks(range(rows), [str(i) for i in matrix.index])
        ax.set_xlabel(matrix.columns.name)
        ax.set_ylabel(matrix.index.name)
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{matrix.values[i, j]:.2f}", ha="center", va="center", color="white")
        fig.colorbar(image, ax=ax, label=metric)
        ax.set_title(f"DICP planning sweep: {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
