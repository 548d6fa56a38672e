"""Would hosting the population in RLlib stay within 1.5x of plain PyTorch? The EnvRunner part, measured.

Per PPO update at paper Darkroom settings (N learners x 100 streams x 20 steps), in CPU seconds on one
thread: the plain population's rollout and its PPO update (``learn_population``'s sidecar), against RLlib's
default ``SingleAgentEnvRunner.sample()`` of the same steps over N x 100 sub-envs of the batched grid env
(what a hosted population would sample with). Prints the best case for a hosted population: RLlib's
sampling plus the same update, no other RLlib overhead, relative to the plain population.

    .venv/bin/python benchmarks/bench_population_rllib.py 81
"""
import dataclasses
import sys
import tempfile
import time

import torch

torch.set_num_threads(1)
from dicp_ray.config import config_from_dict
from dicp_ray.collect import build_learner_config
from dicp_ray.population_collect import learn_population
n = int(sys.argv[1])
cfg = lambda streams, steps: config_from_dict({"env": {"name": "Darkroom"}, "model": {"context_episodes": 1},
    "collect": {"num_streams": streams, "rollout_steps": 20, "minibatch_size": 50, "num_epochs": 20,
                "env_steps_per_task": steps, "learner": "rllib"}})
# (b) RLlib's default EnvRunner stepping n x 100 sub-envs of the batched grid env, one update's worth (20 steps)
algo = build_learner_config(cfg(n * 100, n * 100 * 20), 0).build_algo()
algo.env_runner.sample()
c0 = time.process_time()
for _ in range(3):
    algo.env_runner.sample()
rllib_sample = (time.process_time() - c0) / 3
algo.stop()
# (a) plain population: 2 updates of n learners, split into rollout and update CPU time
with tempfile.TemporaryDirectory() as tmp:
    c = cfg(100, 100 * 40)
    c = dataclasses.replace(c, collect=dataclasses.replace(c.collect, learner="population"))
    s = learn_population(c, list(range(n)), tmp)[0]
per_update_update = s["update_cpu_s"] / 2
per_update_rest = (s["cpu_s"] - s["update_cpu_s"]) / 2
print(f"N={n}: per update of {n*2000:,} env steps, CPU s: plain rollout+bookkeeping {per_update_rest:.2f}, "
      f"plain PPO update {per_update_update:.2f}; RLlib SingleAgentEnvRunner.sample() of the same steps {rllib_sample:.2f}")
print(f"hosted with RLlib's EnvRunner, at best (plain update, no other overhead): "
      f"{(rllib_sample + per_update_update) / (per_update_rest + per_update_update):.2f}x the plain population's time")
