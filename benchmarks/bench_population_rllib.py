"""Would hosting the population in RLlib stay within 1.5x of plain PyTorch? The EnvRunner part, measured.

Per PPO update at paper Darkroom settings (N learners x 100 streams x 20 steps), in CPU seconds on one
thread: the plain population's rollout and its PPO update (``learn_population``'s sidecar), against RLlib's
default ``SingleAgentEnvRunner.sample()`` of the same steps over N x 100 sub-envs of the batched grid env
(what a hosted population would sample with). Prints the best case for a hosted population: RLlib's
sampling plus the same update, no other RLlib overhead, relative to the plain population.

    .venv/bin/python benchmarks/bench_population_rllib.py 81
"""
from __future__ import annotations

import sys
import tempfile
import time


def config(streams: int, steps: int, learner: str):
    from dicp_ray.config.load import config_from_dict

    return config_from_dict({"env": {"name": "Darkroom"}, "model": {"context_episodes": 1},
                             "collect": {"num_streams": streams, "rollout_steps": 20, "minibatch_size": 50,
                                         "num_epochs": 20, "env_steps_per_task": steps, "learner": learner}})


def rllib_sample_cpu_s(n: int, repeats: int = 3) -> float:
    """CPU s of one ``sample()`` (20 steps) of RLlib's default EnvRunner over n x 100 sub-envs."""
    from dicp_ray.collect.rllib_learner import build_learner_config

    algo = build_learner_config(config(n * 100, n * 100 * 20, "rllib"), 0).build_algo()
    try:
        algo.env_runner.sample()                                          # warm-up
        start = time.process_time()
        for _ in range(repeats):
            algo.env_runner.sample()
        return (time.process_time() - start) / repeats
    finally:
        algo.stop()


def main() -> None:
    import torch

    from dicp_ray.collect.population_learner import learn_population

    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 81
    sample = rllib_sample_cpu_s(n)
    with tempfile.TemporaryDirectory() as tmp:                            # 2 updates of n learners
        sidecar = learn_population(config(100, 100 * 40, "population"), list(range(n)), tmp)[0]
    update = sidecar["update_cpu_s"] / 2
    rollout = (sidecar["cpu_s"] - sidecar["update_cpu_s"]) / 2
    print(f"N={n}: per update of {n * 2000:,} env steps, CPU s: plain rollout+bookkeeping {rollout:.2f}, "
          f"plain PPO update {update:.2f}; RLlib SingleAgentEnvRunner.sample() of the same steps {sample:.2f}")
    print(f"hosted with RLlib's EnvRunner, at best (plain update, no other overhead): "
          f"{(sample + update) / (rollout + update):.2f}x the plain population's time")


if __name__ == "__main__":
    main()
