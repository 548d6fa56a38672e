"""Distil one model without Ray: a thin wrapper of `dicp-ray train --backend local` for one output directory.

Kept for old command lines; `dicp-ray train --config FILE --backend local [--device cuda]
[--models-per-process N]` trains every split seed of a config (N at once) and is the one way to do it.

    PYTHONPATH=. python scripts/train_in_process.py --config tune_configs/darkroom_2core.yaml \
        --dataset runs/darkroom_2core/dataset --output runs/x/train_seed0 --split-seed 0 --device cuda \
        --set train.num_steps=20000
"""
from __future__ import annotations

import argparse
import logging

from dicp_ray.config.load import load_config
from dicp_ray.train.launch import train_in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", nargs="*", default=[], metavar="K=V")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.set)
    print(train_in_process(config, args.dataset, args.output, args.split_seed, args.device))


if __name__ == "__main__":
    main()
