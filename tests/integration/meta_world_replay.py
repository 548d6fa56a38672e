"""Shared by the Meta-World collection tests (RLlib and population learners): a shard replays exactly."""
import gymnasium as gym
import numpy as np

import dicp_ray.envs  # noqa: F401 - registers dicp_ray/ML1-v0


def replay_mismatches(history: dict, task_id: int) -> int:
    """Step a fresh env with the stored actions; count any obs/reward/next_obs/flag/success difference."""
    env, bad = gym.make("dicp_ray/ML1-v0", task="reach-v3", task_id=task_id).unwrapped, 0
    for t in range(len(history["action"])):
        if history["step"][t] == 0:
            obs, _ = env.reset()
        bad += int(not np.array_equal(obs, history["obs"][t]))
        obs, reward, terminated, truncated, info = env.step(history["action"][t])
        bad += int(np.float32(reward) != history["reward"][t])
        bad += int(not np.array_equal(obs, history["next_obs"][t]))
        bad += int(info["success"] != history["success"][t]) + int(truncated != history["truncated"][t])
        bad += int(terminated != history["terminated"][t])
    return bad
