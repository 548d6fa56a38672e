"""`dicp-ray <stage>`: the command line for every stage, with one shape for all of them.

    dicp-ray validate --config tune_configs/demo.yaml [--set plan.depth=4]
    dicp-ray collect  --config FILE [--set k=v ...] [--output DIR] [--address ADDR] [--backend ray|local]
    dicp-ray train    --config FILE [--set k=v ...] [--output DIR] [--address ADDR]
                      [--backend ray|local] [--models-per-process N] [--device auto|cpu|cuda]
    dicp-ray evaluate --checkpoint PATH [--config FILE] [--set k=v ...] [--output DIR] [--backend ray|local]
    dicp-ray pipeline --config FILE [--set k=v ...] [--output DIR] [--address ADDR] [--backend ray|local]
                      [--models-per-process N] [--device auto|cpu|cuda]

--backend sets the backend of the stage(s) the command runs: collect.backend, train.backend, eval.backend (the
pipeline: all three, so `--backend local` runs without Ray).
    dicp-ray sweep    --config tune_configs/sweeps/plan_darkroom.yaml [--checkpoint PATH] [--output DIR]
    dicp-ray envs     (a few episodes of each grid world with a random and an oracle policy)
    dicp-ray mw-eval  --checkpoint PATH [--mode policy|plan] [--split-seed S] [--num-evals N]
                      [--adaptation-episodes N] [--evaluation-episodes N] [--meta-batch-size N]
                      [--output FILE.json] [--device cpu]   (Meta-World's own metaworld.evaluation)

The config is loaded and validated before anything imports Ray; a bad config, a missing dataset or checkpoint,
an unwritable output directory or an unreachable --address exits with status 2 and a one-line message naming
the problem and the fix, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dicp_ray.config.load import load_config
from dicp_ray.config.schema import ConfigError, ExperimentConfig

logger = logging.getLogger("dicp_ray")

STAGES = ("validate", "collect", "train", "evaluate", "pipeline", "sweep", "envs")


# The config sections whose `backend` the --backend flag of a command sets.
_BACKEND_KEYS = {"collect": ("collect",), "train": ("train",), "evaluate": ("eval",),
                 "pipeline": ("collect", "train", "eval")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicp-ray", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        if stage == "envs":
            continue
        p.add_argument("--config", required=stage not in ("evaluate",), help="experiment YAML (tune_configs/)")
        p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="K=V",
                       help="override a config value, e.g. --set plan.beam_width=5 train.num_steps=100")
        p.add_argument("--output", default=None, help="output directory (default: runs/<config name>)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
        if stage in ("evaluate", "sweep"):
            p.add_argument("--checkpoint", default=None, help="trained model.pt (evaluate: required)")
        if stage in _BACKEND_KEYS:  # shorthand for --set <stage>.backend=... of every stage the command runs
            p.add_argument("--backend", choices=["ray", "local"], default=None,
                           help="ray (default): Ray tasks / Ray Train workers; local: this machine without Ray "
                                f"(sets {', '.join(k + '.backend' for k in _BACKEND_KEYS[stage])})")
        if stage in ("train", "pipeline"):  # shorthands for --set train.<key>=... (dicp_ray/train/launch.py)
            p.add_argument("--models-per-process", type=int, default=None, metavar="N",
                           help="train up to N split seeds together with stacked weights (default 1)")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="local backend's device")
        p.add_argument("-v", "--verbose", action="store_true", help="show everything on the console: debug "
                       "logging, Ray/RLlib/Ray Train worker output, library warnings (default: those go to "
                       "<output>/logs/)")
    _add_mw_eval(sub)
    return parser


def _add_mw_eval(sub) -> None:
    p = sub.add_parser("mw-eval", help="score a Meta-World checkpoint with metaworld.evaluation "
                       "(metalearning_evaluation)")
    p.add_argument("--checkpoint", required=True, help="trained Meta-World model.pt (continuous AD or IDT)")
    p.add_argument("--mode", default="policy", choices=["policy", "plan"], help="act by sampling the "
                   "policy or by DICP planning (needs a world model); default policy")
    p.add_argument("--split-seed", type=int, default=None, help="default: the checkpoint's split seed")
    p.add_argument("--num-evals", type=int, default=10, help="rounds, each with new goals (default 10)")
    p.add_argument("--adaptation-episodes", type=int, default=10, help="episodes with rewards (default 10)")
    p.add_argument("--evaluation-episodes", type=int, default=3, help="scored episodes per task (default 3)")
    p.add_argument("--meta-batch-size", type=int, default=None, help="envs (a multiple of the test "
                   "classes: ML1 1, ML10 5; default one env per class, see dicp_ray/evaluate/metaworld.py)")
    p.add_argument("--max-episode-steps", type=int, default=100, help="episode length (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the agent's sampling (default 0)")
    p.add_argument("--eval-reward", default=None, choices=["predicted", "zero"], help="reward tokens of the "
                   "scored (reward-less) episodes: the world model's prediction or 0 (default: predicted when "
                   "the model has a world model)")
    p.add_argument("--output", default=None, help="write the result JSON here (atomically)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _run_mw_eval(args: argparse.Namespace) -> int:
    """Check everything that can be checked (checkpoint, mode, sizes, output) before the envs are built."""
    import json

    from dicp_ray.evaluate import metaworld as metaworld_eval
    from dicp_ray.runtime import write_text_atomic

    if not Path(args.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint} does not exist: pass the model.pt from a train run")
    _, _, config = metaworld_eval.load_checkpoint_for_metaworld(args.checkpoint, args.mode)
    for flag in ("num_evals", "adaptation_episodes", "evaluation_episodes", "max_episode_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} = {getattr(args, flag)} must be >= 1")
    if args.meta_batch_size is not None:
        metaworld_eval.check_meta_batch_size(config.env.name, args.meta_batch_size)
    if args.eval_reward == "predicted" and not config.model.world_model:
        raise ConfigError("--eval-reward predicted needs a world model, but the checkpoint was trained with "
                          "model.world_model=false: use --eval-reward zero")
    if args.split_seed is not None and args.split_seed < 0:
        raise ConfigError(f"--split-seed = {args.split_seed} must be >= 0")
    output = Path(args.output).resolve() if args.output else None
    if output is not None and (output.is_dir() or not output.parent.is_dir()):
        raise ConfigError(f"--output {args.output} must be a file in an existing directory")
    result = metaworld_eval.score_checkpoint(
        args.checkpoint, mode=args.mode, split_seed=args.split_seed, meta_batch_size=args.meta_batch_size,
        num_evals=args.num_evals, adaptation_episodes=args.adaptation_episodes,
        evaluation_episodes=args.evaluation_episodes, max_episode_steps=args.max_episode_steps,
        device=args.device, seed=args.seed, eval_reward=args.eval_reward)
    print(metaworld_eval.format_table(result))
    if output is not None:
        write_text_atomic(output, json.dumps(result, indent=1, sort_keys=True, allow_nan=False))
        print(f"wrote {output}")
    return 0


def _load(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if getattr(args, "backend", None) is not None:
        overrides += [f"{section}.backend={args.backend}" for section in _BACKEND_KEYS[args.stage]]
    for flag, key in (("models_per_process", "models_per_process"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"train.{key}={getattr(args, flag)}")
    if args.address:
        overrides.append(f"resources.address={args.address}")
    if args.config is None:  # evaluate without --config: the checkpoint's own config
        from dicp_ray.models.checkpoints import load_checkpoint

        _, payload = load_checkpoint(args.checkpoint)
        from dicp_ray.config.load import apply_overrides, config_from_dict

        return config_from_dict(apply_overrides(payload["config"], overrides))
    return load_config(args.config, overrides)


def _output_dir(args: argparse.Namespace, config: ExperimentConfig) -> Path:
    out = Path(args.output or Path("runs") / config.name).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output {out} is not writable ({err.strerror}): choose another directory") from None
    return out


def _run(args: argparse.Namespace) -> int:
    if args.stage == "mw-eval":
        return _run_mw_eval(args)
    if args.stage == "envs":
        from dicp_ray.envs.demo import print_env_returns

        print_env_returns()
        return 0
    if args.stage == "evaluate" and not args.checkpoint:
        raise ConfigError("evaluate needs --checkpoint PATH (a model.pt written by `dicp-ray train`)")
    if getattr(args, "checkpoint", None) and not Path(args.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint} does not exist: pass the model.pt from a train run")
    config = _load(args)
    if args.stage == "validate":
        print(f"{args.config}: OK ({config.env.name}, variant {config.model.variant}, "
              f"world_model={config.model.world_model}, k={config.context_len}, depth={config.plan_depth})")
        return 0
    out = _output_dir(args, config)
    from dicp_ray.console import attach_log_file

    log_file = attach_log_file(out)
    logger.debug("logging to %s", log_file)
    if config.resources.address:
        from dicp_ray.runtime import check_reachable

        check_reachable(config.resources.address)
    return _dispatch(args, config, out)


def _dispatch(args: argparse.Namespace, config: ExperimentConfig, out: Path) -> int:
    if args.stage == "collect":
        from dicp_ray.collect.driver import collect_histories

        print(collect_histories(config, str(out / "dataset")))
    elif args.stage == "train":
        from dicp_ray.train.launch import train_models

        runs = [(str(out / "train" / f"split_{seed}"), seed) for seed in config.env.split_seeds]
        for path in train_models(config, str(out / "dataset"), runs):
            print(path)
    elif args.stage == "evaluate":
        from dicp_ray.evaluate.launch import run_evaluations
        from dicp_ray.evaluate.results import format_results_table
        from dicp_ray.models.checkpoints import load_checkpoint

        _, payload = load_checkpoint(args.checkpoint)
        seed = int(payload.get("split_seed", config.env.split_seeds[0]))
        summary = run_evaluations(config, {seed: args.checkpoint}, str(out / "eval"))
        print(format_results_table(summary))
    elif args.stage == "pipeline":
        from dicp_ray.pipeline import run_pipeline

        run_pipeline(config, out)
    elif args.stage == "sweep":
        from dicp_ray.tune import run_sweep

        results = run_sweep(config, out, checkpoint=args.checkpoint)
        if getattr(results, "num_errors", 0):
            print(f"dicp-ray sweep: {results.num_errors} trial(s) failed (see above); re-run the same command to "
                  "retry them", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dicp_ray.console import setup_logging

    setup_logging(verbose=getattr(args, "verbose", False))
    try:
        return _run(args)
    except (ConfigError, FileNotFoundError, ValueError, PermissionError, ConnectionError) as err:
        if args.verbose if hasattr(args, "verbose") else False:
            raise
        print(f"dicp-ray {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dicp-ray {args.stage}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
