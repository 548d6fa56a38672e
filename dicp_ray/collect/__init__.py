"""Stage 1, learning histories: source learners (population PPO, RLlib PPO/SAC, a scripted one) write task shards.
Imports dicp_ray.config, envs, data and the utilities (console, runtime).

    driver              collect_histories (tasks, resume, fan-out over Ray, manifest), collection_task_ids
    fingerprint         data_fingerprint, oracle_labels, resolved_learner (shared by every learner)
    population_ppo      SB3's PPO for N learners as stacked tensors (init_params, forward, gae, ppo_update)
    population_learner  learn_population (grid worlds: many tasks in one process), population_sizes
    population_meta_world  learn_meta_world_population, MetaWorldPopulation (Meta-World PPO: many tasks in one process)
    rllib_learner       learn_task, build_learner_config, build_sac_config, HistoryRecorder (RLlib, one task each)
    scripted            write_scripted_dataset (real datasets in seconds, for tests)
"""
