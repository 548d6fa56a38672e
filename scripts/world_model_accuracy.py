"""How well a checkpoint's world model predicts held-out (test-task) transitions it never trained on.

    python scripts/world_model_accuracy.py runs/darkroom_2core/train/split_0/model.pt runs/darkroom_2core/dataset

Samples fixed windows of the split's TEST-task histories (drawn like the heldout/* windows of `dicp-ray
train`, with the same sampler seed), prints the mean losses/accuracies of `evaluate_batches` and two trivial baselines for the
query transition: always predicting "no reward", and predicting "the agent does not move".
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from dicp_ray.config.load import config_from_dict
from dicp_ray.data.history import HistoryDataset
from dicp_ray.models.checkpoints import load_checkpoint
from dicp_ray.train.batches import make_window_sampler, windows_to_batch
from dicp_ray.train.step import evaluate_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("dataset")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, payload = load_checkpoint(args.checkpoint)
    if not model.spec.discrete_actions:
        raise SystemExit("this script scores the grid worlds' classification heads; Meta-World checkpoints "
                         "report their regression losses as heldout/* in TensorBoard")
    config = config_from_dict(payload["config"])
    present = set(int(t) for t in HistoryDataset.open(args.dataset, verify=False).task_ids)
    test_ids = [t for t in payload["test_task_ids"] if t in present]
    if not test_ids:
        raise SystemExit(f"{args.dataset} holds none of the checkpoint's test tasks (collect.include_test_tasks?)")
    dataset = HistoryDataset.open(args.dataset, task_ids=test_ids, verify=False)
    sampler = make_window_sampler(config, dataset, seed=[config.train.seed, 2 ** 31])
    windows = [sampler.sample(args.batch_size) for _ in range(args.batches)]
    spec = model.spec
    scores = evaluate_batches(model, [windows_to_batch(w, spec.layout, spec.world_model) for w in windows],
                              config.train.world_model_weight)
    reward = np.concatenate([w["reward"][:, -1] for w in windows])
    moved = np.concatenate([(w["obs"][:, -1] != w["next_obs"][:, -1]).any(-1) for w in windows])
    print(f"{args.checkpoint}: split seed {payload['split_seed']}, {len(test_ids)} test tasks, "
          f"{args.batches * args.batch_size} windows")
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())))
    print(f"  baselines: always-no-reward acc {np.mean(reward == 0):.4f}, agent-does-not-move acc "
          f"{np.mean(~moved):.4f}")


if __name__ == "__main__":
    main()
