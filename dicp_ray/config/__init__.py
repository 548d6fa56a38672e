"""Configuration: one frozen dataclass per stage, loaded from YAML with ``--set`` overrides and validated before Ray.
Bottom layer: imports nothing else of dicp_ray.

    schema  ExperimentConfig and its sections (EnvConfig, CollectConfig, ModelConfig, TrainConfig, PlanConfig,
            EvalConfig, SweepConfig, ResourcesConfig), ConfigError, the env tables
    load    load_config, config_from_dict, apply_overrides, parse_override, replace; sweep_points, point_slug,
            trial_config
    checks  validate (ranges and cross-stage rules)
"""
