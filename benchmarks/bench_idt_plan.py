"""Benchmark DICP-IDT's beam search inside Decisions-to-Go: KV-cached vs reference (full re-encoding).

What: decisions per second on the 8 Darkroom test tasks of split 0 for a paper-size grid IDT with random
weights (dicp_ray.agents.idt_grid.benchmark_planner), K = 10 beams, depth to the end of each 10-step block; both
modes drive the same envs from the same seeds and must execute identical actions.

How:  python benchmarks/bench_idt_plan.py [--episodes 2] [--beam-width 10] [--device cpu|cuda] [--dtype float32|float64]
Needs only torch and the grid envs (no Ray).
"""
from __future__ import annotations

import argparse
import json

import torch

from dicp_ray.agents.idt_grid import benchmark_planner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2, help="planned episodes after the k = 80 warm-up steps")
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = benchmark_planner(args.episodes, args.beam_width, device=args.device, dtype=getattr(torch, args.dtype))
    print(json.dumps(result, indent=2))
    for mode in ("cached", "reference"):
        r = result[mode]
        print(f"{mode:>9}: {r['planned_decisions']} decisions in {r['seconds']:.2f} s = {r['decisions_per_s']:.1f}/s")
    print(f"speed-up {result['speedup']:.2f}x, identical actions: {result['identical_actions']}")


if __name__ == "__main__":
    main()
