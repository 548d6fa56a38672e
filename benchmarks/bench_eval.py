"""Wall time of the Darkroom evaluation protocol: 8 test tasks x 100 episodes, policy and plan mode.

    .venv/bin/python benchmarks/bench_eval.py            # full protocol (100 episodes per mode)
    .venv/bin/python benchmarks/bench_eval.py --quick    # 10 episodes per mode
    .venv/bin/python benchmarks/bench_eval.py --threads 2 --device cuda --skip-reference

Uses an untrained paper-size AD model (4 layers, 4 heads, embed 32, MLP 128, k = 80, world model), so the
returns are meaningless; the cost is what an in-context evaluation of a trained model costs. Plan mode is
DICP beam search with K = 10, H = 8 once the context holds k-1 = 79 transitions (from step 80 on), so its
first 4 episodes cost as much as policy mode. The baseline in the same run is the release's way of planning
(no KV cache: every candidate re-encodes its whole sequence), timed on 6 episodes (41 planning steps) because
it is ~15x slower; both planners pick the same actions, so their returns agree. Prints wall time, decisions/s,
ms per decision and ms per planning step (one batched beam search for all 8 tasks).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dicp_ray.config.load import config_from_dict
from dicp_ray.evaluate.episodes import evaluate_in_context
from dicp_ray.models.checkpoints import save_checkpoint
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer, count_parameters


def _config(num_episodes: int, device: str, use_cache: bool):
    return config_from_dict({
        "name": "bench_eval", "env": {"name": "Darkroom", "split_seeds": [0]},
        "model": {"variant": "ad", "world_model": True, "context_episodes": 4},
        "plan": {"beam_width": 10, "depth": 8, "use_cache": use_cache},
        "eval": {"num_episodes": num_episodes, "seed": 0, "device": device},
    })


def _checkpoint(path: Path, config) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(layout="ad", world_model=True, obs_dim=2, num_actions=5, num_obs_classes=81,
                     reward_classes=2, reward_max=1.0, context_len=config.context_len, num_layers=4,
                     num_heads=4, embed_dim=32, mlp_dim=128, obs_scale=1.0 / 8)
    model = DICPTransformer(spec)
    print(f"model: paper-size AD + world model, {count_parameters(model):,} parameters, "
          f"k = {spec.context_len}")
    save_checkpoint(str(path), model, extra={"env_name": "Darkroom", "split_seed": 0, "variant": "ad",
                                             "world_model": True, "step": 0, "config": config.to_dict()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 episodes per mode instead of 100")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per mode (overrides --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--skip-reference", action="store_true",
                        help="skip the no-KV-cache reference planner (the baseline)")
    args = parser.parse_args()
    num_episodes = args.episodes or (10 if args.quick else 100)
    torch.set_num_threads(args.threads)
    print(f"Darkroom evaluation protocol: 8 test tasks x {num_episodes} episodes x 20 steps, device "
          f"{args.device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    reference_episodes = min(num_episodes, 6)
    runs = [("policy", True, num_episodes), ("plan", True, num_episodes)]
    if not args.skip_reference:  # the cached planner on the reference's episodes, for a like-for-like pair
        runs += [("plan", True, reference_episodes)] if reference_episodes != num_episodes else []
        runs += [("plan", False, reference_episodes)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        _checkpoint(path, _config(num_episodes, args.device, True))
        print(f"{'mode':<20}{'episodes':>9}{'wall s':>8}{'decisions':>11}{'planned':>9}{'decisions/s':>13}"
              f"{'ms/decision':>13}{'ms/plan step':>14}{'return ep 1':>13}{'return last':>13}")
        policy_step_s = None
        for mode, use_cache, episodes in runs:
            config = _config(episodes, args.device, use_cache)
            start = time.perf_counter()
            result = evaluate_in_context(str(path), config, None, mode=mode, split_seed=0,
                                         num_threads=args.threads)
            wall_s = time.perf_counter() - start
            timing = result["timing"]
            name = mode if mode == "policy" else f"plan K10 H8{'' if use_cache else ' no cache'}"
            num_steps, num_plan_steps = timing["decisions"] // 8, timing["planned_decisions"] // 8
            if mode == "policy":
                policy_step_s = timing["rollout_s"] / num_steps
                plan_ms = "-"
            else:  # the steps before the context is full sample the policy, at policy-mode cost
                plan_s = timing["rollout_s"] - (num_steps - num_plan_steps) * policy_step_s
                plan_ms = f"{1000 * plan_s / num_plan_steps:.1f}"
            ms_per_decision = 1000 * timing["rollout_s"] / timing["decisions"]
            counts = f"{timing['decisions']:>11}{timing['planned_decisions']:>9}"
            print(f"{name:<20}{episodes:>9}{wall_s:>8.1f}{counts}{timing['decisions_per_s']:>13.0f}"
                  f"{ms_per_decision:>13.2f}"
                  f"{plan_ms:>14}{result['return_mean'][0]:>13.2f}{result['return_mean'][-1]:>13.2f}")
    print("decisions = tasks x episodes x steps (one batched model call per env step serves all 8 tasks)")


if __name__ == "__main__":
    main()
