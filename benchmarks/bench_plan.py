"""Benchmark the DICP beam-search planner: KV-cached vs reference (full re-encoding) mode, AD or DPT layout.

What: decisions per second and FLOPs per decision for 8 Darkroom tasks at the paper's settings
(K=10 beams, H=8 depth, k=80 context, model 4 layers / 4 heads / embed 32 / MLP 128), random
weights, every task planning at full depth, driven through the in-context agent (dicp_ray.agents.agent) in plan
mode: each agent's context is filled with k-1 random Darkroom-like transitions, then every timed call is
one ``agent.act`` (one batched beam search for the 8 tasks) followed by one more random transition. Both
modes run on the same inputs and generator seeds in one process, and the benchmark checks that they choose
identical actions.

How:  python benchmarks/bench_plan.py [--layout ad|dpt] [--quick] [--device cpu|cuda] [--dtype float32|float64]
Needs only torch (no Ray), so it runs on a bare GPU box.

What to expect: the reference mode re-runs all k+1 tokens for every candidate at every depth
(~355 sequences per decision), like the authors' release (paper Table 7: up to ~18 GFLOPs per action).
AD's cached mode encodes the shared real context once per depth level and only d+1 new tokens per
candidate, so it needs several times fewer FLOPs and runs >=10x faster on CPU. DPT puts the query
observation first, so its context cannot be shared across beams: the cached mode re-encodes it once per
distinct (task, imagined observation) and depth level, and packs each beam's candidates into one row.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dicp_ray.agents.agent import make_agent
from dicp_ray.agents.plan import PlannerSettings
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer

PAPER_GFLOPS_PER_ACTION = 18.0  # paper Table 7, "up to"
OBS_TABLE = torch.tensor([[c // 9, c % 9] for c in range(81)], dtype=torch.float64)  # Darkroom cell -> (x, y)


def build_model(k: int, seed: int, device: str, dtype: torch.dtype, layout: str = "ad") -> DICPTransformer:
    """The paper's AD / DPT model with unit-scale random weights (so head argmaxes vary between candidates)."""
    torch.manual_seed(seed)
    model = DICPTransformer(ModelSpec(layout=layout, context_len=k, num_layers=4, num_heads=4, embed_dim=32,
                                      mlp_dim=128))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.to(device=device, dtype=dtype).eval()


def random_transitions(num_tasks: int, steps: int, seed: int, dtype: torch.dtype) -> list[tuple]:
    """`steps` Darkroom-like transitions per task: (obs, action, reward, next_obs), each batched over tasks."""
    g, B = torch.Generator().manual_seed(seed), num_tasks
    return [(torch.randint(0, 9, (B, 2), generator=g).to(dtype), torch.randint(0, 5, (B,), generator=g),
             (torch.rand(B, generator=g) < 0.2).to(dtype), torch.randint(0, 9, (B, 2), generator=g).to(dtype))
            for _ in range(steps)]


def planning_agent(model, settings: PlannerSettings, fill: list[tuple], horizon: int, seed: int):
    """An agent in plan mode whose contexts hold the k-1 transitions of `fill` (its own actions are replaced)."""
    agent = make_agent(model, fill[0][0].shape[0], mode="plan", horizon=horizon, settings=settings,
                       generator=torch.Generator().manual_seed(seed), obs_table=OBS_TABLE)
    for obs, action, reward, next_obs in fill:
        agent.act(obs)                                     # context not full yet: a policy sample
        agent.observe(action, reward, next_obs)
    return agent


def count_flops(fn) -> int:
    """FLOPs of fn() (2 per multiply-add). On CPU, SDPA dispatches to a kernel the stock counter misses."""
    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(agents: dict, steps: list[tuple], device: str) -> dict:
    """Per-call wall times of ``agent.act`` (every call plans), modes interleaved call by call so that load from
    other processes hits both alike; the median call time is the robust number on a shared machine."""
    out = {name: {"actions": [], "times": []} for name in agents}
    for i, (obs, action, reward, next_obs) in enumerate(steps):
        for name in (list(agents) if i % 2 == 0 else list(agents)[::-1]):
            _sync(device)
            start = time.perf_counter()
            out[name]["actions"].append(agents[name].act(obs).cpu())
            _sync(device)
            out[name]["times"].append(time.perf_counter() - start)
            assert agents[name].planned.all()
        for agent in agents.values():                      # the window slides on
            agent.observe(action, reward, next_obs)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", default="ad", choices=["ad", "dpt"])
    parser.add_argument("--quick", action="store_true", help="3 planner calls per mode instead of 10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--context-len", type=int, default=80)
    parser.add_argument("--calls", type=int, default=None, help="planner calls per mode (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    calls = args.calls or (3 if args.quick else 10)
    model = build_model(args.context_len, 0, args.device, dtype, args.layout)
    k = args.context_len
    fill = random_transitions(args.tasks, k - 1, 100, dtype)
    steps = random_transitions(args.tasks, calls + 2, 200, dtype)       # warm-up, timed calls, FLOP count
    horizon = k + calls + args.depth + 2                                 # every call plans at full depth
    settings = {name: PlannerSettings(beam_width=args.beam_width, depth=args.depth, use_cache=use_cache)
                for name, use_cache in (("cached", True), ("reference", False))}
    agents = {name: planning_agent(model, st, fill, horizon, seed=0) for name, st in settings.items()}
    time_modes(agents, steps[:1], args.device)                           # warm-up (allocator, kernels)
    timed = time_modes(agents, steps[1:calls + 1], args.device)
    results = {}
    for name, agent in agents.items():
        flops = count_flops(lambda agent=agent: agent.act(steps[-1][0])) / args.tasks
        median = statistics.median(timed[name]["times"])
        results[name] = dict(actions=torch.cat(timed[name]["actions"]), decisions_per_s=args.tasks / median,
                             mean_decisions_per_s=calls * args.tasks / sum(timed[name]["times"]),
                             gflops=flops / 1e9)
    report(args, calls, results)
    return results


def report(args, calls: int, results: dict) -> None:
    c, r = results["cached"], results["reference"]
    same = int((c["actions"] == r["actions"]).sum())
    total = c["actions"].numel()
    print(f"DICP beam search, {args.layout.upper()} layout, {args.tasks} Darkroom tasks, K={args.beam_width} "
          f"H={args.depth} k={args.context_len}, 4 layers/4 heads/embed 32/MLP 128, random weights, "
          f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}, "
          f"{calls} calls per mode through dicp_ray.agents.agent "
          f"(decisions/s from the median call; mean over all calls in brackets)")
    print(f"{'mode':<10} {'decisions/s':>12} {'(mean)':>8} {'ms/decision':>12} {'GFLOPs/decision':>16}")
    for name, res in results.items():
        print(f"{name:<10} {res['decisions_per_s']:>12.1f} {res['mean_decisions_per_s']:>8.1f} "
              f"{1e3 / res['decisions_per_s']:>12.2f} {res['gflops']:>16.3f}")
    print(f"{'paper':<10} {'':>12} {'':>8} {'':>12} {PAPER_GFLOPS_PER_ACTION:>15.0f}~  "
          "(Table 7: up to, per action)")
    print(f"speed-up {c['decisions_per_s'] / r['decisions_per_s']:.1f}x (median call), FLOPs ratio "
          f"{r['gflops'] / c['gflops']:.1f}x, identical actions {same}/{total}"
          + ("" if same == total else "  <-- MISMATCH"))


if __name__ == "__main__":
    main()
