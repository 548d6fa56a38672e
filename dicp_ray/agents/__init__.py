"""Acting in context: one agent interface over a batch of tasks, acting by its policy or by DICP planning.
Imports dicp_ray.models (and dicp_ray.envs for the grid IDT planner's benchmark).

    agent           make_agent, InContextAgent, TransformerAgent, HierarchicalAgent, check_agent_options, MODES
    context         TransitionHistory (the newest k-1 transitions per task), group_rows
    plan            PlannerSettings, plan_discrete (beam search), plan_continuous (sampled search), sample_policy_action
    idt_grid        GridIDTAgent, beam_search (DICP-IDT on the grid worlds)
    idt_continuous  IDTAgent (Meta-World IDT)
"""
