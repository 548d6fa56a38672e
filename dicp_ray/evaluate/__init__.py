"""Stage 3, in-context evaluation: agents act on unseen test tasks; results files, summaries, tables and plots.
Imports dicp_ray.agents, models, config, envs, data and the utilities.

    episodes           evaluate_in_context, run_episodes, eval_task_ids, planner_settings
    launch             run_evaluations: every (split seed x mode) on Ray or in this process, resume, summary
    results            aggregate_results, write_summary, format_results_table, plot_learning_curves, mean_ci95
    report             combine several runs' summaries into one table, CSV and plot (python -m dicp_ray.evaluate.report)
    sweep_report       a Tune sweep's results as tables and plots; the sweeps' metric names
    metaworld_adapter  MetaWorldAgent: a checkpoint as metaworld.evaluation's MetaLearningAgent
    metaworld          score_checkpoint (dicp-ray mw-eval)
"""
