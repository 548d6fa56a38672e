"""Configs: every shipped YAML validates; every bad input fails early with a message naming key, value and fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicp_ray.config.load import config_from_dict, load_config, replace
from dicp_ray.config.schema import META_WORLD_TASKS, ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tune_configs"
YAMLS = sorted((ROOT / "tune_configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_and_validates(path):
    config = load_config(path)
    assert config.context_len >= config.env.horizon
    assert path.read_text().lstrip().startswith("#"), "each config opens with a comment saying what it runs"


def test_defaults_are_the_papers():
    config = config_from_dict({})
    assert (config.collect.num_streams, config.collect.lr, config.collect.num_epochs) == (100, 3e-4, 20)
    assert (config.model.num_layers, config.model.embed_dim, config.train.batch_size) == (4, 32, 512)
    assert config.context_len == 80 and config.plan_depth == 8 and config.plan.beam_width == 10


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nplan: {beam_width: 4}\n")
    config = load_config(path, ["plan.depth=3", "eval.modes=[policy]", "train.lr=1e-3", "model.world_model=false"])
    assert config.plan.depth == 3 and config.plan.beam_width == 4 and config.eval.modes == ("policy",)
    assert config.train.lr == 1e-3 and config.model.world_model is False


def test_replace_returns_validated_copy():
    config = config_from_dict({})
    assert replace(config, {"plan.depth": 2}).plan.depth == 2
    with pytest.raises(ConfigError, match="plan.depth"):
        replace(config, {"plan.depth": 0})


BAD = {
    "unknown section": ({"plann": {}}, "did you mean 'plan'"),
    "unknown key": ({"plan": {"beam_widht": 3}}, "did you mean 'beam_width'"),
    "int as string": ({"plan": {"beam_width": "ten"}}, "plan.beam_width = 'ten' has the wrong type"),
    "bool as int": ({"model": {"world_model": 1}}, "model.world_model = 1 has the wrong type"),
    "float for int": ({"train": {"num_steps": 1.5}}, "train.num_steps = 1.5 has the wrong type"),
    "list expected": ({"env": {"split_seeds": 3}}, "env.split_seeds = 3 has the wrong type"),
    "section not mapping": ({"plan": 5}, "section 'plan' must be a mapping"),
    "beam width zero": ({"plan": {"beam_width": 0}}, "plan.beam_width = 0 is out of range"),
    "beam width negative": ({"plan": {"beam_width": -2}}, "plan.beam_width = -2 is out of range"),
    "depth zero": ({"plan": {"depth": 0}}, "plan.depth = 0 is out of range"),
    "depth beyond horizon": ({"plan": {"depth": 21}}, "must be in [1, horizon = 20]"),
    "context too short": ({"model": {"context_episodes": 0}}, "model.context_episodes = 0"),
    "train ratio 1": ({"env": {"train_ratio": 1.0}}, "env.train_ratio = 1.0 is out of range"),
    "train ratio 0": ({"env": {"train_ratio": 0.0}}, "must be in (0, 1)"),
    "unknown env": ({"env": {"name": "Darkrom"}}, "did you mean 'Darkroom'"),
    "no split seeds": ({"env": {"split_seeds": []}}, "needs at least one seed"),
    "duplicate split seeds": ({"env": {"split_seeds": [1, 1]}}, "seeds must be distinct"),
    "zero streams": ({"collect": {"num_streams": 0}}, "collect.num_streams = 0"),
    "negative lr": ({"train": {"lr": -1.0}}, "train.lr = -1.0 is out of range"),
    "zero batch": ({"train": {"batch_size": 0}}, "train.batch_size = 0"),
    "batch not divisible": ({"train": {"batch_size": 513, "num_workers": 2}}, "divisible by train.num_workers"),
    "dropout 1": ({"model": {"dropout": 1.0}}, "model.dropout = 1.0"),
    "heads do not divide": ({"model": {"embed_dim": 30, "num_heads": 4}}, "must be divisible by model.num_heads"),
    "unknown variant": ({"model": {"variant": "ada"}}, "did you mean 'ad'"),
    "plan without world model": ({"model": {"world_model": False}}, "planning needs the world model"),
    "unknown eval mode": ({"eval": {"modes": ["planning"]}}, "did you mean 'plan'"),
    "sac on grid": ({"collect": {"algorithm": "sac"}}, "needs a continuous-action env"),
    "unknown algorithm": ({"collect": {"algorithm": "dqn"}}, "collect.algorithm = 'dqn' is not known"),
    "minibatch too big": ({"collect": {"minibatch_size": 5000}}, "must be <= rollout_steps * num_streams"),
    "history shorter than window": ({"collect": {"env_steps_per_task": 2000}}, "at least one training window"),
    "partial episodes": ({"collect": {"env_steps_per_task": 100_100}}, "not whole episodes"),
    "sweep key unknown": ({"sweep": {"grid": {"plan.widht": [1]}}}, "sweep.grid.plan.widht"),
    "sweep values empty": ({"sweep": {"grid": {"plan.depth": []}}}, "non-empty list"),
    "bad device": ({"eval": {"device": "tpu"}}, "eval.device = 'tpu' is not known"),
    "pipeline sweep bad trial": ({"sweep": {"kind": "pipeline", "grid": {"plan.depth": [2, 40]}}},
                                 "sweep trial {'plan.depth': 40}: plan.depth = 40 is out of range"),
    "paper budget not ML1": ({"sweep": {"kind": "pipeline", "paper_eval_budget": True,
                                        "grid": {"plan.depth": [1]}}}, "ML1 pipeline sweeps only"),
    "pipeline sweep without grid": ({"sweep": {"kind": "pipeline"}}, "needs sweep.grid"),
    "pipeline sweep grid not a list": ({"sweep": {"kind": "pipeline", "grid": {"plan.depth": 2}}},
                                       "sweep.grid.plan.depth = 2 must be a non-empty list"),
    "pipeline sweep shared run dir": ({"sweep": {"kind": "pipeline", "grid": {"plan.depth": [2, 2]}}},
                                      "would share the run directory runs/depth=2"),
    "idt train sweep": ({"model": {"variant": "idt"}, "eval": {"modes": ["policy"]}, "sweep": {"kind": "train"}},
                        "sweep.kind = 'train' is implemented for AD/DPT only"),
    "reward loss weight on a grid world": ({"model": {"reward_loss_weight": 0.5}}, "applies to Meta-World"),
    "zero cpus": ({"resources": {"num_cpus": 0}}, "resources.num_cpus = 0"),
    "max test tasks zero": ({"env": {"max_test_tasks": 0}}, "env.max_test_tasks = 0"),
    "unknown collect backend": ({"collect": {"backend": "slurm"}}, "collect.backend = 'slurm' is not known"),
    "unknown eval backend": ({"eval": {"backend": "lokal"}}, "did you mean 'local'"),
    "local collection of Meta-World": ({"env": {"name": "ML1", "task": "reach-v3"}, "collect": {"backend": "local"},
                                        "model": {"context_episodes": 10}, "plan": {"depth": 1}},
                                       "collect.backend = 'local' runs the grid worlds' population PPO learners"),
    "negative deadline": ({"train": {"deadline_unix_s": -5}}, "train.deadline_unix_s = -5.0 is out of range"),
}


def test_backend_flag_sets_the_backend_of_every_stage_a_command_runs():
    from dicp_ray.cli import _BACKEND_KEYS, _load, _parser

    root = Path(__file__).resolve().parents[2]
    for stage, sections in _BACKEND_KEYS.items():
        argv = [stage, "--config", str(root / "tune_configs" / "smoke.yaml"), "--backend", "local"]
        if stage == "evaluate":
            argv += ["--checkpoint", "unused.pt"]
        config = _load(_parser().parse_args(argv))
        backends = {"collect": config.collect.backend, "train": config.train.backend, "eval": config.eval.backend}
        assert {k for k, v in backends.items() if v == "local"} == set(sections), stage


@pytest.mark.parametrize("data,message", BAD.values(), ids=BAD.keys())
def test_bad_config_catalogue(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_bad_override_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["plan.depth"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("plan: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicp_ray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_config_exits_2_without_traceback():
    result = _cli("collect", "--config", "tune_configs/smoke.yaml", "--set", "plan.beam_width=0")
    assert result.returncode == 2
    assert "plan.beam_width = 0 is out of range" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_is_refused_before_ray_is_imported():
    code = ("import sys; from dicp_ray.cli import main; "
            "rc = main(['pipeline', '--config', 'tune_configs/smoke.yaml', '--set', 'env.name=Nope']); "
            "print(rc, 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr


def test_cli_unwritable_output_and_unreachable_address(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _cli("collect", "--config", "tune_configs/smoke.yaml", "--output", str(blocker / "sub"))
    assert result.returncode == 2 and "is not writable" in result.stderr
    result = _cli("pipeline", "--config", "tune_configs/smoke.yaml", "--output", str(tmp_path / "o"),
                  "--address", "127.0.0.1:1")
    assert result.returncode == 2 and "cannot reach the Ray cluster" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_validate_ok():
    result = _cli("validate", "--config", "tune_configs/demo.yaml")
    assert result.returncode == 0 and "OK" in result.stdout


def test_base_include_merges_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: p\nplan: {beam_width: 4, depth: 2}\ntrain: {lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: c\nplan: {depth: 3}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.name, config.plan.beam_width, config.plan.depth, config.train.lr) == ("c", 4, 3, 0.5)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_config_env_table_agrees_with_the_envs():
    # config.py stays import-light (no gymnasium), so it keeps its own small copy of the env table.
    from dicp_ray.config.schema import GRID_ENVS
    from dicp_ray.envs import GRID_SPECS

    for name, (num_tasks, horizon, ratio, depth) in GRID_ENVS.items():
        spec = GRID_SPECS[name]
        assert (spec.num_tasks, spec.horizon, spec.train_ratio, spec.default_plan_depth) == (
            num_tasks, horizon, ratio, depth)


def test_envs_command_prints_random_and_oracle_returns():
    result = _cli("envs")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"Darkroom", "DarkKeyToDoor", "DarkroomPermuted"}
    for row in rows.values():
        assert float(row[4]) == float(row[5]) > float(row[3])  # oracle reaches the maximum, random does not


def test_pipeline_sweep_trials_get_the_papers_meta_world_budgets():
    from dicp_ray.config.load import sweep_points, trial_config

    config = load_config(CONFIGS / "ml1_all.yaml")
    points = sweep_points(config.sweep.grid)
    assert [p["env.task"] for p in points] == list(META_WORLD_TASKS)  # all 50, once each
    budgets = {p["env.task"]: trial_config(config, p) for p in points}
    assert budgets["reach-v3"].eval.num_episodes == 100          # 10K steps of 100-step episodes
    assert budgets["push-v3"].eval.num_episodes == 300
    assert budgets["pick-place-v3"].eval.num_episodes == 2000
    assert budgets["peg-insert-side-v3"].eval.num_episodes == 2000
    assert budgets["sweep-v3"].eval.num_episodes == 200
    trial = budgets["door-open-v3"]
    assert trial.env.task == "door-open-v3" and trial.sweep.kind == "plan" and not trial.sweep.grid
    assert trial.train == config.train and trial.collect == config.collect  # only the grid point changes


def test_paper_budget_and_a_num_episodes_grid_conflict():
    with pytest.raises(ConfigError, match="drop one of them"):
        load_config(CONFIGS / "ml1_all.yaml", ["sweep.grid={env.task: [reach-v3], eval.num_episodes: [5, 7]}"])


def test_pipeline_sweep_with_a_misspelt_task_is_refused_before_ray(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {CONFIGS / 'ml1_smoke.yaml'}\nsweep:\n  kind: pipeline\n"
                    "  grid:\n    env.task: [reach-v3, pick-plce-v3]\n")
    with pytest.raises(ConfigError, match="sweep trial .*did you mean 'pick-place-v3'"):
        load_config(path)


def test_beam_width_is_refused_on_meta_world_where_it_does_nothing():
    """Meta-World plans by sampled search (plan.num_samples); a beam width there would be silently ignored."""
    from dicp_ray.config.load import config_from_dict

    base = {"env": {"name": "ML1", "task": "reach-v3"}}
    config_from_dict({**base, "plan": {"num_samples": 4}})
    with pytest.raises(ConfigError, match="plan.beam_width = 5 does nothing on ML1.*plan.num_samples"):
        config_from_dict({**base, "plan": {"beam_width": 5}})
    config_from_dict({"env": {"name": "Darkroom"}, "plan": {"beam_width": 5}})
