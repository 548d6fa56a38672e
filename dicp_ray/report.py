"""Combine evaluation summaries of several runs into one results table, CSV and plot (docs/results.md).

    python -m dicp_ray.report --out docs/results/darkroom \
        --method "AD=runs/darkroom_2core_ad/eval/summary.json:policy" \
        --method "AD + world model=runs/darkroom_2core/eval/summary.json:policy" \
        --method "DICP-AD=runs/darkroom_2core/eval/summary.json:plan" \
        --compare "DICP-AD" "AD"

Each ``--method LABEL=SUMMARY:MODE`` picks one mode of one `summary.json` (written by `dicp-ray
evaluate`/`pipeline`). All methods must share env, split seeds and episode count. Writes
``table.md`` (mean return after episodes 1, 5, 10, 25, 50 with 95% CI over split seeds, the paper's
value read off its curves, and the oracle), ``table.csv`` (every episode), ``curves.png``, and with
each ``--compare A B`` the paired difference A − B per split seed (mean over all episodes and at the last
episode) with its 95% t-interval.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dicp_ray.evaluate import TABLE_EPISODES, mean_ci95, plot_learning_curves
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


def per_split(method: dict, seeds: list[int]) -> np.ndarray:
    """(num split seeds, num episodes) mean return over test tasks."""
    return np.array([method["per_split_return_mean"][str(s)] for s in seeds])


def build_report(methods: list[tuple[str, dict, dict]], compare: list[tuple[str, str]] = ()) -> dict:
    summaries = [s for _, s, _ in methods]
    env, seeds, episodes = summaries[0]["env"], summaries[0]["split_seeds"], summaries[0]["num_episodes"]
    if len(seeds) < 2:
        raise SystemExit(f"split seeds {seeds}: a confidence interval over split seeds needs at least 2")
    tests = methods[0][2].get("num_test_tasks")
    task = summaries[0].get("config", {}).get("env", {}).get("task")
    for label, summary, method in methods:
        if method.get("num_test_tasks") != tests or summary.get("config", {}).get("env", {}).get("task") != task:
            raise SystemExit(f"{label}: evaluated on other test tasks than {methods[0][0]} "
                             f"({method.get('num_test_tasks')} vs {tests}); compare runs of one protocol")
        if (summary["env"], summary["split_seeds"], summary["num_episodes"]) != (env, seeds, episodes):
            raise SystemExit(f"{label}: env/split seeds/episodes {summary['env']}/{summary['split_seeds']}/"
                             f"{summary['num_episodes']} differ from {env}/{seeds}/{episodes}")
    rows = []
    for label, _, method in methods:
        curves = per_split(method, seeds)
        mean, low, high = mean_ci95(curves)
        rows.append({"label": label, "mean": mean, "low": low, "high": high, "curves": curves})
    report = {"env": env, "split_seeds": seeds, "num_episodes": episodes, "rows": rows,
              "oracle": float(np.mean([s["oracle_max_return_mean"] for s in summaries]))}
    report["compare"] = []
    for name_a, name_b in compare:
        found = {r["label"]: r for r in rows}
        if name_a not in found or name_b not in found:
            raise SystemExit(f"--compare {name_a!r} {name_b!r}: labels are {sorted(found)}")
        diff = found[name_a]["curves"] - found[name_b]["curves"]                      # (seeds, episodes)
        report["compare"].append({"a": name_a, "b": name_b,
                                  "mean_over_episodes": [float(x[0]) for x in mean_ci95(diff.mean(1)[:, None])],
                                  "last_episode": [float(x[0]) for x in mean_ci95(diff[:, -1:])]})
    return report


def markdown_table(report: dict) -> str:
    episodes = [e for e in TABLE_EPISODES if e <= report["num_episodes"]]
    if episodes[-1] != report["num_episodes"]:
        episodes.append(report["num_episodes"])
    paper = PAPER_AFTER_50.get(report["env"], {})
    head = ["method", *(f"ep {e}" for e in episodes), "paper, ep 50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [f"{row['mean'][e - 1]:.2f} ± {(row['high'][e - 1] - row['low'][e - 1]) / 2:.2f}"
                 for e in episodes]
        key = row["label"]
        lines.append("| " + " | ".join([row["label"], *cells, f"≈{paper[key]}" if key in paper else "–"]) + " |")
    lines.append("| oracle (max) | " + " | ".join(f"{report['oracle']:.2f}" for _ in episodes) + " | |")
    seeds = ", ".join(str(s) for s in report["split_seeds"])
    text = [f"{report['env']}: mean return over the test tasks in episode n, ± half-width of the 95% "
            f"t-interval over split seeds {seeds}.", "", *lines]
    for c in report["compare"]:
        m, lo, hi = c["mean_over_episodes"]
        lm, llo, lhi = c["last_episode"]
        text += ["", f"{c['a']} − {c['b']} (paired by split seed): mean over all {report['num_episodes']} "
                 f"episodes {m:+.2f} [95% CI {lo:+.2f}, {hi:+.2f}]; episode {report['num_episodes']} "
                 f"{lm:+.2f} [{llo:+.2f}, {lhi:+.2f}]."]
    return "\n".join(text) + "\n"


def csv_text(report: dict) -> str:
    lines = ["method,episode,mean,ci_low,ci_high," + ",".join(f"split_{s}" for s in report["split_seeds"])]
    for row in report["rows"]:
        for e in range(report["num_episodes"]):
            per = ",".join(f"{v:.4f}" for v in row["curves"][:, e])
            lines.append(f"{row['label']},{e + 1},{row['mean'][e]:.4f},{row['low'][e]:.4f},"
                         f"{row['high'][e]:.4f},{per}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """The combined curves, drawn by evaluate's own plot (one line + 95% CI band per method, oracle line)."""
    methods = {row["label"]: {"label": row["label"], "return_mean": row["mean"].tolist(),
                              "ci_low": row["low"].tolist(), "ci_high": row["high"].tolist()}
               for row in report["rows"]}
    plot_learning_curves({"env": report["env"], "split_seeds": report["split_seeds"], "methods": methods,
                          "oracle_max_return_mean": report["oracle"]}, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", action="append", required=True, metavar="LABEL=SUMMARY:MODE")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="paired difference A - B over split seeds (repeatable)")
    parser.add_argument("--out", required=True, help="directory for table.md, table.csv, curves.png")
    args = parser.parse_args(argv)
    report = build_report([load_method(m) for m in args.method], [tuple(c) for c in args.compare])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", markdown_table(report))
    write_text_atomic(out / "table.csv", csv_text(report))
    plot(report, out / "curves.png")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
