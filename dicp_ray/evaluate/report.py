"""Combine evaluation summaries of several runs into one results table, CSV and plot (docs/results.md).

    python -m dicp_ray.evaluate.report --out docs/results/darkroom \
        --method "AD=runs/darkroom_2core_ad/eval/summary.json:policy" \
        --method "AD + world model=runs/darkroom_2core/eval/summary.json:policy" \
        --method "DICP-AD=runs/darkroom_2core/eval/summary.json:plan" \
        --compare "DICP-AD" "AD"

Each ``--method LABEL=SUMMARY:MODE`` picks one mode of one `summary.json` (written by `dicp-ray
evaluate`/`pipeline`). All methods must share env, split seeds and episode count. Writes
``table.md`` (mean return after episodes 1, 5, 10, 25, 50 with 95% CI over split seeds, the paper's
value read off its curves, and the oracle), ``table.csv`` (every episode), ``curves.png``, and with
each ``--compare A B`` the paired difference A − B per split seed (mean over episodes 1-10, over all episodes and
at the last episode) with its 95% t-interval; ``--note TEXT`` lines (scale, wall time, command) head table.md. Meta-World summaries add two tables in percent: per-episode success and the
release's "succeeded at least once so far", the latter beside the paper's Table 1 for the five ML1 tasks; the
paired differences are then taken on per-episode success. One split seed is accepted with a warning (no
interval: the table says so).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dicp_ray.evaluate.results import TABLE_EPISODES, mean_ci95, plot_learning_curves
from dicp_ray.runtime import write_text_atomic

# Returns after 50 episodes read off the paper's curves (SPEC §6); None where the paper has no such method.
PAPER_AFTER_50 = {
    "Darkroom": {"AD": 13.3, "DICP-AD": 15.3, "DPT": 7.4, "DICP-DPT": 9.0, "IDT": 10.4, "DICP-IDT": 13.2},
    "DarkKeyToDoor": {"AD": 1.03, "DICP-AD": 1.06, "DPT": 0.80, "DICP-DPT": 1.24, "IDT": 1.35, "DICP-IDT": 1.55},
    "DarkroomPermuted": {"AD": 30.7, "DICP-AD": 32.0, "DPT": 28.8, "DICP-DPT": 33.0, "IDT": 27.5,
                         "DICP-IDT": 31.5},
}


def load_method(spec: str) -> tuple[str, dict, dict]:
    """'LABEL=path/summary.json:mode' -> (label, summary, method entry with per-split curves)."""
    label, _, rest = spec.partition("=")
    path, _, mode = rest.rpartition(":")
    if not label or not path or not mode:
        raise SystemExit(f"--method {spec!r}: expected LABEL=path/to/summary.json:MODE")
    summary = json.loads(Path(path).read_text())
    if mode not in summary["methods"]:
        raise SystemExit(f"--method {spec!r}: {path} has modes {sorted(summary['methods'])}, not {mode!r}")
    return label, summary, summary["methods"][mode]


# Meta-World ML1 success % from the paper's Table 1 (SPEC §6), compared with "succeeded at least once so far".
PAPER_ML1_SUCCESS = {
    "reach-v3": {"AD": 86, "IDT": 100, "DICP-AD": 84, "DICP-IDT": 100},
    "push-v3": {"AD": 88, "IDT": 94, "DICP-AD": 87, "DICP-IDT": 100},
    "pick-place-v3": {"AD": 96, "IDT": 95, "DICP-AD": 97, "DICP-IDT": 100},
    "sweep-v3": {"AD": 67, "IDT": 96, "DICP-AD": 71, "DICP-IDT": 100},
    "peg-insert-side-v3": {"AD": 73, "IDT": 76, "DICP-AD": 83, "DICP-IDT": 87},
}
EARLY_EPISODES = 10  # the paired difference is also reported over episodes 1-10, where the paper says planning helps most
SUCCESS_METRICS = (("success_once_so_far", "succeeded at least once so far"), ("success", "per-episode success"))


def per_split(method: dict, seeds: list[int], metric: str = "return") -> np.ndarray:
    """(num split seeds, num episodes) mean `metric` (return | success | success_once_so_far) over test tasks."""
    return np.array([method[f"per_split_{metric}_mean"][str(s)] for s in seeds])


def build_report(methods: list[tuple[str, dict, dict]], compare: list[tuple[str, str]] = ()) -> dict:
    summaries = [s for _, s, _ in methods]
    env, seeds, episodes = summaries[0]["env"], summaries[0]["split_seeds"], summaries[0]["num_episodes"]
    if len(seeds) < 2:
        print(f"warning: split seeds {seeds}: one split seed, so no confidence interval over split seeds")
    tests = methods[0][2].get("num_test_tasks")
    task = summaries[0].get("config", {}).get("env", {}).get("task")
    for label, summary, method in methods:
        if method.get("num_test_tasks") != tests or summary.get("config", {}).get("env", {}).get("task") != task:
            raise SystemExit(f"{label}: evaluated on other test tasks than {methods[0][0]} "
                             f"({method.get('num_test_tasks')} vs {tests}); compare runs of one protocol")
        if (summary["env"], summary["split_seeds"], summary["num_episodes"]) != (env, seeds, episodes):
            raise SystemExit(f"{label}: env/split seeds/episodes {summary['env']}/{summary['split_seeds']}/"
                             f"{summary['num_episodes']} differ from {env}/{seeds}/{episodes}")
    with_success = all("per_split_success_mean" in method for _, _, method in methods)
    rows = []
    for label, _, method in methods:
        curves = per_split(method, seeds)
        mean, low, high = mean_ci95(curves)
        row = {"label": label, "mean": mean, "low": low, "high": high, "curves": curves}
        for metric, _ in SUCCESS_METRICS if with_success else ():
            row[metric] = per_split(method, seeds, metric)
            row[f"{metric}_mean"], row[f"{metric}_low"], row[f"{metric}_high"] = mean_ci95(row[metric])
        rows.append(row)
    oracles = [s["oracle_max_return_mean"] for s in summaries]
    report = {"env": env, "task": task, "split_seeds": seeds, "num_episodes": episodes, "rows": rows,
              "with_success": with_success,
              "oracle": None if None in oracles else float(np.mean(oracles))}  # Meta-World has no oracle
    report["compare"] = []
    for name_a, name_b in compare:
        found = {r["label"]: r for r in rows}
        if name_a not in found or name_b not in found:
            raise SystemExit(f"--compare {name_a!r} {name_b!r}: labels are {sorted(found)}")
        key = "success" if with_success else "curves"
        diff = found[name_a][key] - found[name_b][key]                                # (seeds, episodes)
        early = min(EARLY_EPISODES, episodes)
        report["compare"].append({"a": name_a, "b": name_b, "metric": "success" if with_success else "return",
                                  "early_episodes": early,
                                  "mean_over_early": [float(x[0]) for x in mean_ci95(diff[:, :early].mean(1)[:, None])],
                                  "mean_over_episodes": [float(x[0]) for x in mean_ci95(diff.mean(1)[:, None])],
                                  "last_episode": [float(x[0]) for x in mean_ci95(diff[:, -1:])]})
    return report


def markdown_table(report: dict) -> str:
    episodes = [e for e in TABLE_EPISODES if e <= report["num_episodes"]]
    if episodes[-1] != report["num_episodes"]:
        episodes.append(report["num_episodes"])
    paper = PAPER_AFTER_50.get(report["env"])
    head = ["method", *(f"ep {e}" for e in episodes)] + (["paper, ep 50"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [_cell(row["mean"][e - 1], row["low"][e - 1], row["high"][e - 1], report) for e in episodes]
        key = row["label"]
        if paper:
            cells.append(f"≈{paper[key]}" if key in paper else "–")
        lines.append("| " + " | ".join([row["label"], *cells]) + " |")
    if report["oracle"] is not None:
        lines.append("| oracle (max) | " + " | ".join(f"{report['oracle']:.2f}" for _ in episodes) + " | |")
    seeds = ", ".join(str(s) for s in report["split_seeds"])
    interval = (f"± half-width of the 95% t-interval over split seeds {seeds}" if len(report["split_seeds"]) > 1
                else f"one split seed ({seeds}): no interval")
    name = f"{report['env']} {report['task']}" if report.get("task") else report["env"]
    returns = [f"{name}: mean return over the test tasks in episode n, {interval}.", "", *lines]
    if report.get("with_success"):  # Meta-World: the paper's metric first, then per-episode success, then return
        text = [f"{name}:", *_success_tables(report, episodes, interval), "", *returns]
    else:
        text = returns
    if report.get("notes"):
        text = [*report["notes"], "", *text]
    unit = ", success (percentage points)" if report.get("with_success") else ""
    scale = 100.0 if report.get("with_success") else 1.0
    for c in report["compare"]:
        text += ["", _paired_line(c, report, unit, scale)]
    return "\n".join(text) + "\n"


def _paired_line(c: dict, report: dict, unit: str, scale: float) -> str:
    """'A − B: episodes 1-10 ..., 1-50 ..., episode 50 ...' with 95% t-intervals over split seeds when there are two+."""
    n, seeds = report["num_episodes"], report["split_seeds"]
    parts = []
    keys = [("mean_over_early", f"mean over episodes 1-{c['early_episodes']}")] if c["early_episodes"] < n else []
    for key, what in (*keys, ("mean_over_episodes", f"mean over episodes 1-{n}"), ("last_episode", f"episode {n}")):
        m, lo, hi = (scale * v for v in c[key])
        parts.append(f"{what} {m:+.2f}" + (f" [95% CI {lo:+.2f}, {hi:+.2f}]" if len(seeds) > 1 else ""))
    how = " (paired by split seed)" if len(seeds) > 1 else ""
    tail = "" if len(seeds) > 1 else " (one split seed: no interval)"
    return f"{c['a']} − {c['b']}{how}{unit}: " + "; ".join(parts) + tail + "."


def _cell(mean: float, low: float, high: float, report: dict, digits: int = 2) -> str:
    """'mean ± half-width', or just the mean when one split seed gives no interval."""
    if len(report["split_seeds"]) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"


def _success_tables(report: dict, episodes: list[int], interval: str) -> list[str]:
    """Meta-World: per-episode success and succeeded-at-least-once-so-far in %, the paper's Table 1 beside."""
    paper = PAPER_ML1_SUCCESS.get(report.get("task") or "", {})
    text = []
    for metric, title in SUCCESS_METRICS:
        once = metric == "success_once_so_far"
        head = ["method", *(f"ep {e}" for e in episodes)] + (["paper, Table 1"] if once else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in report["rows"]:
            mean, low, high = (100 * row[f"{metric}_{k}"] for k in ("mean", "low", "high"))
            cells = [_cell(mean[e - 1], low[e - 1], high[e - 1], report, 1) for e in episodes]
            if once:
                cells.append(f"{paper[row['label']]}" if row["label"] in paper else "–")
            lines.append("| " + " | ".join([row["label"], *cells]) + " |")
        text += ["", f"{title} (%, over the test tasks, {interval}):", "", *lines]
    if paper:
        text += ["", "Paper Table 1: success after the task's full in-context budget on all 50 test goals."]
    return text


def csv_text(report: dict) -> str:
    extra = [m for m, _ in SUCCESS_METRICS] if report.get("with_success") else []
    lines = ["method,episode,mean,ci_low,ci_high," + ",".join(f"split_{s}" for s in report["split_seeds"])
             + "".join(f",{m}_mean,{m}_ci_low,{m}_ci_high" for m in extra)]
    for row in report["rows"]:
        for e in range(report["num_episodes"]):
            per = ",".join(f"{v:.4f}" for v in row["curves"][:, e])
            more = "".join(f",{row[f'{m}_mean'][e]:.4f},{row[f'{m}_low'][e]:.4f},{row[f'{m}_high'][e]:.4f}"
                           for m in extra)
            lines.append(f"{row['label']},{e + 1},{row['mean'][e]:.4f},{row['low'][e]:.4f},"
                         f"{row['high'][e]:.4f},{per}{more}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """The combined curves, drawn by evaluate's own plot (one line + 95% CI band per method, oracle line)."""
    methods = {row["label"]: {"label": row["label"], "return_mean": row["mean"].tolist(),
                              "ci_low": row["low"].tolist(), "ci_high": row["high"].tolist(),
                              **{f"{m}_{k}": row[f"{m}_{s}"].tolist() for m, _ in SUCCESS_METRICS if m in row
                                 for k, s in (("mean", "mean"), ("ci_low", "low"), ("ci_high", "high"))}}
               for row in report["rows"]}
    plot_learning_curves({"env": report["env"], "split_seeds": report["split_seeds"], "methods": methods,
                          "oracle_max_return_mean": report["oracle"]}, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", action="append", required=True, metavar="LABEL=SUMMARY:MODE")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="paired difference A - B over split seeds (repeatable)")
    parser.add_argument("--out", required=True, help="directory for table.md, table.csv, curves.png")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a line above the table (scale, wall time, command; repeatable)")
    args = parser.parse_args(argv)
    report = build_report([load_method(m) for m in args.method], [tuple(c) for c in args.compare])
    report["notes"] = args.note
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", markdown_table(report))
    write_text_atomic(out / "table.csv", csv_text(report))
    plot(report, out / "curves.png")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
