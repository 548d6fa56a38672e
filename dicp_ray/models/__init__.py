"""The models, pure PyTorch (no Ray, no envs): the DICP Transformer (AD / DPT), the two IDTs, and their checkpoints.
Imports only dicp_ray.models itself.

    spec            ModelSpec (stored in every checkpoint)
    attention       exact, faster CPU dropout paths (CausalAttentionDropout, Dropout)
    blocks          KVCache, rope_cos_sin, CausalSelfAttention, SwiGLU, Block, CausalStack, init_gpt2_
    transformer     DICPTransformer (policy + world model), count_parameters, flops_per_token
    idt_base        IDTBase: what both IDTs share (heads, losses, three causal stacks, init)
    idt_grid        GridIDT (the release's grid-world IDT), grid_cells
    idt_continuous  IDTTransformer (Meta-World)
    checkpoints     build_model, save_checkpoint, load_checkpoint
"""
