"""Stage 2, distillation: train one model per split seed (or M stacked) on Ray Train workers or in this process.
Imports dicp_ray.config, envs, data, models and the utilities.

    batches      model_spec_from_config, token_choices, make_window_sampler, windows_to_batch
    step         build_optimizer, train_step, evaluate_batches, TRAIN_TAGS
    model_group  ModelGroup (M same-shape models in one forward/backward), stack_models
    runs         run_identity, run_name, dataset_id, split_task_ids, checkpoint_steps, member_name, loop_config
    backends     LocalBackend, RayBackend, write_member_checkpoint, MetricMeans
    loop         run_loop, train_loop_per_worker (the one training loop)
    launch       train_models, train_model, train_in_process (train, resume or reuse)
"""
