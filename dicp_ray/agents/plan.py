"""Test-time planning over a DICP model: beam search (discrete) and sampled greedy search (continuous).

What it is
    DICP's model-predictive control. The same Transformer that acts as the in-context policy also
    predicts (reward, next observation); before each real step the planner imagines rollouts with it,
    executes the first action of the best imagined path, and replans at the next step. Pure PyTorch.

How it is used (by evaluate/episodes.py, once per environment step, for a whole batch of tasks)::

    ctx = Context(obs, action, reward, next_obs)            # (B,T,D) (B,T) (B,T) (B,T,D), T may be 0
    a = sample_policy_action(model, ctx, obs, gen)          # model-free AD, or before the context is full
    a = plan_discrete(model, ctx, obs, steps_left, obs_table, PlannerSettings(), gen)   # grid worlds, AD or DPT
    a = plan_continuous(model, ctx, obs, PlannerSettings(), gen)                        # continuous

What to expect
    Deterministic for a given generator state. ``use_cache=False`` re-runs the whole model on every
    candidate's full (k+1)-token sequence, like the authors' release. ``use_cache=True`` encodes the
    shared real context once per task and depth level (a KV cache) and each beam's imagined tokens and
    each candidate's query-action token once, packing a task's whole search level into one row with
    tree-shaped RoPE positions and attention mask (any other model exposing the encode/expand API gets
    the same computation through ``KVCache.expand``). DPT puts the query observation first, so its real
    context is re-encoded once per distinct (task, imagined observation) at each depth level instead
    (``_cached_dpt_world_logits``; depth 1 reuses the policy's own [o_t, context] encoding). Both modes consume
    the same random draws and choose the same actions (exactly in float64; in float32 an argmax could in
    principle flip on a near-tie); on CPU the cached mode is 15-20x faster (benchmarks/bench_plan.py). The discrete
    planner needs a full context (k-1 transitions) and raises ``ValueError`` otherwise; the caller
    samples from the policy until then (see ``should_plan``). ``plan_continuous`` follows
    ``settings.depth`` too: the paper plans continuous tasks at depth 1, so pass depth=1 for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch
from torch import Tensor

from dicp_ray.models.transformer import DICPTransformer


@dataclass(frozen=True)
class PlannerSettings:
    beam_width: int = 10            # K: beams kept per depth level
    depth: int = 8                  # H: imagined steps (further truncated at the episode end)
    use_cache: bool = True          # KV-cache the real context (False = reference full re-encoding)
    num_samples: int = 10           # L: continuous candidates (policy mean + L-1 samples)
    second_half_only: bool = False  # continuous: plan only in the 2nd half of an episode (release)

    def __post_init__(self):
        for name in ("beam_width", "depth", "num_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PlannerSettings.{name} must be a positive int, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Context:
    """Real (or imagined) transitions; leading dims are (B, T) for real context."""

    obs: Tensor       # (B, T, D) float
    action: Tensor    # (B, T) long | (B, T, A) float
    reward: Tensor    # (B, T) float
    next_obs: Tensor  # (B, T, D) float

    @property
    def length(self) -> int:
        return self.obs.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.obs, self.action, self.reward, self.next_obs

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Context":
        return Context(*(fn(t) for t in self.tensors()))

    def as_batch(self, query_obs: Tensor, query_action: Tensor | None = None) -> dict:
        """The model's training-batch dict for this context and query."""
        batch = {"ctx_obs": self.obs, "ctx_action": self.action, "ctx_reward": self.reward,
                 "ctx_next_obs": self.next_obs, "query_obs": query_obs}
        if query_action is not None:
            batch["query_action"] = query_action
        return batch


def should_plan(settings: PlannerSettings, context_len: int, num_ctx: int, step: int, horizon: int,
                discrete: bool = False) -> bool:
    """Whether to plan at this step; `num_ctx` counts the real transitions seen so far in this task.

    Discrete (grid worlds): from the release's step k on (``release:gridworld/model/ad.py:102``, ``step >=
    n_transit``), i.e. once k transitions have been seen, so `num_ctx` must not be capped at k-1 there.
    Continuous: once the window is full (num_ctx >= k-1), and with second_half_only from step horizon//2 on.
    """
    if discrete:
        return num_ctx >= context_len
    return num_ctx >= context_len - 1 and (not settings.second_half_only or step >= horizon // 2)


def should_plan_continuous(settings: PlannerSettings, context_len: int, steps_done: int, step: int,
                           horizon: int) -> bool:
    """The release's rule for continuous AD (``release:metaworld/model/ad.py:113``: ``step >= n_transit and
    position > beam_start``, beam_start = 50, position = step % horizon): plan once ``steps_done`` >= k real
    steps precede this decision (uncapped, unlike the context, which holds at most k-1 of them: so the window
    was already full one step earlier; with k = E * horizon, from the first step of episode E + 1 on), and
    with ``second_half_only`` only at within-episode steps ``step`` > horizon // 2 (51..99 of 0..99 at horizon
    100: 49 planned steps per episode). The release always plans in the second half only."""
    return steps_done >= context_len and (not settings.second_half_only or step > horizon // 2)


# ----------------------------------------------------------------------------- shared helpers
def _prepare(model, context, query_obs) -> tuple[Context, Tensor]:
    """Normalise inputs: Context (or dict) on the model's device/dtype, keeping at most k-1 transitions."""
    if model.training:
        raise ValueError("call model.eval() before acting or planning: dropout would make it random")
    if isinstance(context, Mapping):
        context = Context(*(context.get(n, context.get(f"ctx_{n}")) for n in
                            ("obs", "action", "reward", "next_obs")))
    param = next(model.parameters())
    k = model.spec.context_len

    def fix(t: Tensor) -> Tensor:
        t = t[:, max(0, t.shape[1] - (k - 1)):]  # the model was trained on at most k-1 context tokens
        return t.to(param.device) if t.dtype in (torch.long, torch.int32) else t.to(param.device, param.dtype)

    context = context.map(fix)
    context = Context(context.obs, context.action.long() if model.spec.discrete_actions else context.action,
                      context.reward, context.next_obs)
    return context, query_obs.to(param.device, param.dtype)


def _policy_out(model, context: Context, query_obs: Tensor):
    """Action-head output at the query observation, via the training forward (any layout)."""
    q_act = None
    if model.spec.world_model:  # forward needs a query action; causality keeps it out of the policy
        B = query_obs.shape[0]
        q_act = (torch.zeros(B, dtype=torch.long, device=query_obs.device) if model.spec.discrete_actions
                 else query_obs.new_zeros(B, model.spec.num_actions))
    preds, _ = model(context.as_batch(query_obs, q_act))
    if model.spec.discrete_actions:
        logits = preds["action_logits"]
        return logits[:, -1] if logits.dim() == 3 else logits  # DPT: read after the whole context
    mean, log_std = preds["action_mean"], preds["action_log_std"]
    return (mean[:, -1], log_std[:, -1]) if mean.dim() == 3 else (mean, log_std)


def _uniform(shape, generator, device) -> Tensor:
    """float64 uniforms drawn on the generator's own device, so a CPU generator can drive a GPU run."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def _gumbel_order(logits: Tensor, generator) -> Tensor:
    """(B, A) logits -> (B, A) actions: a without-replacement sample from softmax(logits) (Gumbel-top-k)."""
    u = _uniform(logits.shape, generator, logits.device).clamp_min(1e-300)
    keys = logits.double() - torch.log(-torch.log(u))
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def sample_policy_action(model, context, query_obs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Model-free acting: discrete -> (B,) long sampled from softmax(action logits);
    continuous -> (B, A) float sampled from the Gaussian policy."""
    context, query_obs = _prepare(model, context, query_obs)
    if model.spec.discrete_actions:
        return _gumbel_order(_policy_out(model, context, query_obs), generator)[:, 0]  # Gumbel-max
    mean, log_std = _policy_out(model, context, query_obs)
    return mean + log_std.exp() * _normal(mean.shape, generator, mean)


def _normal(shape, generator, like: Tensor) -> Tensor:
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(like)


# ----------------------------------------------------------------------------- discrete beam search
@dataclass
class _Beams:
    first_action: Tensor  # (B, K) long: the real action to execute if this beam wins
    score: Tensor         # (B, K): undiscounted sum of imagined rewards, beams sorted best first
    current: Tensor       # (B, K, D): imagined observation the beam has reached
    past: Context         # imagined transitions so far, each (B, K, d-1, ...)


# predictor(d, imagined (M, d-1, ...), beam obs (M, D), actions (M, A')) -> reward (M*A',), next_obs (M*A', D)
# for M = B * beams rows (task-major); candidate m*A' + j tries action actions[m, j] from beam row m.
Predictor = Callable[[int, Context, Tensor, Tensor], tuple[Tensor, Tensor]]


def _cached_world_logits(model, ctx_tokens: Tensor, d: int, past: Context, q_obs: Tensor, actions: Tensor,
                         first_prefix=None, tree: bool = False):
    """Encode the real prefix once per task (a KV cache), each beam's d new tokens once per beam, and
    only the query-action token once per candidate: siblings share everything before it (causal).

    ctx_tokens (B, k-1, E) are the embedded real transitions, `first_prefix` optionally their cache
    (the depth-1 prefix, already built for the policy). tree=True packs every beam and candidate of a
    task into one row via encode's `positions` / `attn_mask` (no cache copies; DICPTransformer);
    otherwise plain causal encode with cache.expand (any model with the basic encode(tokens, cache)
    API, e.g. the tests' oracle). Returns reward logits (M*A', C) and next-obs logits (M*A', C').
    """
    (M, A), B = actions.shape, ctx_tokens.shape[0]
    # Sliding window: depth d sees real c_{d-1}..c_{k-2}; its RoPE positions restart at 0.
    prefix = first_prefix if d == 1 and first_prefix is not None else model.encode(ctx_tokens[:, d - 1:])[1]
    beam_tokens = torch.cat([model.embed_transitions(*past.tensors()),   # (M, d-1, E) imagined
                             model.embed_query_obs(q_obs)], dim=1)        # (M, d, E)
    q_act = model.embed_query_action(actions.reshape(M * A))              # (M*A, 1, E)
    if tree:
        E, Kc = beam_tokens.shape[-1], M // B
        tokens = torch.cat([beam_tokens.reshape(B, Kc * d, E), q_act.reshape(B, Kc * A, E)], dim=1)
        positions, mask = _tree_layout(prefix.length, Kc, d, A, tokens.device)
        h = model.encode(tokens, prefix, positions=positions, attn_mask=mask)[0]
        h = h[:, Kc * d:].reshape(M * A, E)                               # the query-action tokens
    else:
        _, cache = model.encode(beam_tokens, prefix.expand(M // B))       # length k per beam
        h = model.encode(q_act, cache.expand(A))[0][:, -1]                # (M*A, E): token k+1
    return model.reward_head(h), model.next_obs_head(h)


def _cached_dpt_world_logits(model, ctx_tokens: Tensor, d: int, past: Context, q_obs: Tensor, actions: Tensor,
                             first_prefix=None):
    """DICP-DPT's cached world model: the DPT sequence puts the query observation FIRST, [q_obs, real, imagined,
    query action], so the real context's keys depend on the beam's own current observation and are no prefix
    shared by a task's beams (as AD's are). What is shared: depth 1's [o_t, real] is the policy's own sequence
    (`first_prefix`, encoded once per task); deeper, [imagined o, real from c_{d-1}] is encoded once per distinct
    (task, imagined observation) -- beams often stand on the same cell -- and copied to its beams; each beam's
    d-1 imagined tokens and its A query-action tokens then go into one row on top (tree mask: every query
    action sees the prefix and the beam's imagined steps, not its siblings), at the reference's positions.
    Returns reward logits (M*A, C) and next-obs logits (M*A, C')."""
    (M, A), B = actions.shape, ctx_tokens.shape[0]
    if d == 1 and first_prefix is not None:
        prefix = first_prefix                                                 # (B = M rows, k tokens)
    else:
        task = torch.arange(B, device=q_obs.device).repeat_interleave(M // B).to(q_obs.dtype)
        keys, inverse = torch.unique(torch.cat([task[:, None], q_obs], dim=1), dim=0, return_inverse=True)
        heads = model.embed_query_obs(keys[:, 1:])                            # (U, 1, E)
        prefix = model.encode(torch.cat([heads, ctx_tokens[keys[:, 0].long(), d - 1:]], dim=1))[1]
        prefix = prefix.index_select(inverse)                                 # (M rows, k-d+1 tokens)
    tokens = torch.cat([model.embed_transitions(*past.tensors()),            # (M, d-1, E) imagined
                        model.embed_query_action(actions.reshape(M * A)).view(M, A, -1)], dim=1)
    positions, mask = _tree_layout(prefix.length, 1, d - 1, A, tokens.device)
    h = model.encode(tokens, prefix, positions=positions, attn_mask=mask)[0][:, d - 1:]   # (M, A, E)
    h = h.reshape(M * A, -1)
    return model.reward_head(h), model.next_obs_head(h)


def _tree_layout(P: int, Kc: int, d: int, A: int, device) -> tuple[Tensor, Tensor]:
    """RoPE positions (L,) and attention mask (L, P+L) for one task's packed level after a P-token prefix:
    [beam 0: d tokens] .. [beam Kc-1: d tokens] [beam 0: A query actions] .. [beam Kc-1: A query actions].
    Each token sees the prefix, its own beam's tokens up to itself, and itself: exactly what it would
    see in its own candidate sequence, at the same positions."""
    arange = partial(torch.arange, device=device)
    beam = torch.cat([arange(Kc).repeat_interleave(d), arange(Kc).repeat_interleave(A)])       # (L,)
    step = torch.cat([arange(d).repeat(Kc), torch.full((Kc * A,), d, device=device)])         # (L,)
    is_action = torch.cat([torch.zeros(Kc * d, dtype=torch.bool, device=device),
                           torch.ones(Kc * A, dtype=torch.bool, device=device)])
    sees = (beam[:, None] == beam[None, :]) & ~is_action[None, :] & (step[None, :] <= step[:, None])
    sees |= torch.eye(len(beam), dtype=torch.bool, device=device)
    return P + step, torch.cat([torch.ones(len(beam), P, dtype=torch.bool, device=device), sees], dim=1)


def _reference_world_logits(model, context: Context, d: int, past: Context, q_obs: Tensor, actions: Tensor):
    """The release's way: build every candidate's whole (k+1)-token sequence and run the full model."""
    M, A = actions.shape
    n = M * A // context.obs.shape[0]                                             # candidates per task
    real = context.map(lambda t: t[:, d - 1:].repeat_interleave(n, dim=0))        # (M*A, k-d, ...)
    past = past.map(lambda t: t.repeat_interleave(A, dim=0))                      # (M*A, d-1, ...)
    full = Context(*(torch.cat([r, p], dim=1) for r, p in zip(real.tensors(), past.tensors())))  # k-1
    preds, _ = model(full.as_batch(q_obs.repeat_interleave(A, dim=0), actions.reshape(M * A)))
    return preds["reward_logits"], preds["next_obs_logits"]


def _decode_world(reward_logits: Tensor, next_obs_logits: Tensor, obs_table: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax of both heads: the reward class index is the reward value; next-obs class -> observation."""
    reward = reward_logits.argmax(-1).to(obs_table.dtype)  # (N,)
    return reward, obs_table[next_obs_logits.argmax(-1)]    # (N,), (N, D)


def _expand_level(beams: _Beams, cand_actions: Tensor, predict: Predictor, d: int, active: Tensor,
                  beam_width: int) -> _Beams:
    """One depth level: every beam x every action in `cand_actions` (B, Kc, A); keep the top K."""
    B, Kc, A = cand_actions.shape
    N = Kc * A  # candidate n = (beam rank n // A, action slot n % A): beams in rank order, then actions

    def rows_of(t: Tensor) -> Tensor:                        # (B, Kc, ...) -> (B*Kc, ...)
        return t.flatten(0, 1)

    reward, next_obs = predict(d, beams.past.map(rows_of), rows_of(beams.current), rows_of(cand_actions))
    reward, next_obs = reward.view(B, N), next_obs.view(B, N, -1)     # (B, N), (B, N, D)
    # Tasks past their own depth stop accumulating: their scores freeze, and since the beams are
    # already sorted, the stable sort keeps beam 0's children (and so its first action) on top.
    score = beams.score.repeat_interleave(A, dim=1) + reward * active[:, None]          # (B, N)
    keep = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :beam_width]  # (B, K')
    rows, parent = torch.arange(B, device=keep.device)[:, None], keep // A
    action = cand_actions.reshape(B, N)[rows, keep]                                     # (B, K')
    step = (beams.current[rows, parent], action, reward[rows, keep], next_obs[rows, keep])
    past = Context(*(torch.cat([old[rows, parent], new.unsqueeze(2)], dim=2)
                     for old, new in zip(beams.past.tensors(), step)))                  # (B, K', d, ...)
    first = action if d == 1 else beams.first_action[rows, parent]
    return _Beams(first, score[rows, keep], next_obs[rows, keep], past)


def _check_discrete(model, context: Context, settings: PlannerSettings, obs_table: Tensor) -> None:
    spec = model.spec
    if not (spec.layout in ("ad", "dpt") and spec.world_model and spec.discrete_actions
            and spec.reward_classes and spec.num_obs_classes):
        raise ValueError("plan_discrete needs an 'ad' or 'dpt' layout model with world_model=True, discrete actions, "
                         f"reward classes and next-observation classes; got {spec}")
    k = spec.context_len
    if context.length < k - 1:
        raise ValueError(f"plan_discrete needs a full context of k-1={k - 1} transitions, got "
                         f"{context.length}; sample from the policy until the context is full")
    if obs_table.shape[0] != spec.num_obs_classes:
        raise ValueError(f"obs_table has {obs_table.shape[0]} rows, model has {spec.num_obs_classes} classes")
    if settings.depth > k - 1:
        raise ValueError(f"depth {settings.depth} > k-1={k - 1}: the sliding window would drop every real "
                         "transition")


@torch.no_grad()
def plan_discrete(model, context, query_obs: Tensor, steps_left: Tensor, obs_table: Tensor,
                  settings: PlannerSettings, generator: torch.Generator | None) -> Tensor:
    """DICP beam search (AD or DPT layout) for B tasks at once -> (B,) long actions to execute now."""
    context, query_obs = _prepare(model, context, query_obs)
    obs_table = obs_table.to(query_obs)                                  # (C, D)
    _check_discrete(model, context, settings, obs_table)
    B, A, device = query_obs.shape[0], model.spec.num_actions, query_obs.device
    depth = steps_left.to(device).long().clamp(1, settings.depth)       # (B,) per-task depth
    if settings.use_cache and model.spec.layout == "dpt":                 # query first: [o_t, real context]
        ctx_tokens = model.embed_transitions(*context.tensors())           # (B, k-1, E)
        h, first = model.encode(torch.cat([model.embed_query_obs(query_obs), ctx_tokens], dim=1))
        logits = model.action_head(h[:, -1])                               # (B, A), after the whole context
        world = partial(_cached_dpt_world_logits, model, ctx_tokens, first_prefix=first)
    elif settings.use_cache:
        ctx_tokens = model.embed_transitions(*context.tensors())           # (B, k-1, E), shared by all
        _, ctx_cache = model.encode(ctx_tokens)
        h, _ = model.encode(model.embed_query_obs(query_obs), ctx_cache)   # (B, 1, E)
        logits = model.action_head(h[:, -1])                               # (B, A)
        world = partial(_cached_world_logits, model, ctx_tokens, first_prefix=ctx_cache,
                        tree=isinstance(model, DICPTransformer))
    else:
        logits = _policy_out(model, context, query_obs)
        world = partial(_reference_world_logits, model, context)

    def predict(d, past, q_obs, q_act):
        return _decode_world(*world(d, past, q_obs, q_act), obs_table)

    order = _gumbel_order(logits, generator)                               # (B, A), the only random draw
    D = query_obs.shape[1]
    empty = Context(query_obs.new_zeros(B, 1, 0, D), order.new_zeros(B, 1, 0), query_obs.new_zeros(B, 1, 0),
                    query_obs.new_zeros(B, 1, 0, D))
    beams = _Beams(order.new_full((B, 1), -1), query_obs.new_zeros(B, 1), query_obs[:, None], empty)
    cand_actions = order[:, None]                                        # (B, 1, A): depth 1 in policy order
    all_actions = torch.arange(A, device=device)
    for d in range(1, int(depth.max()) + 1):
        beams = _expand_level(beams, cand_actions, predict, d, (d <= depth).to(query_obs.dtype),
                              settings.beam_width)
        cand_actions = all_actions.expand(B, beams.score.shape[1], A)   # deeper: all actions, 0..A-1
    return beams.first_action[:, 0]


# ----------------------------------------------------------------------------- continuous sampled search
@torch.no_grad()
def plan_continuous(model, context, query_obs: Tensor, settings: PlannerSettings,
                    generator: torch.Generator | None) -> Tensor:
    """Sampled greedy search: policy mean + (L-1) policy samples, scored by predicted reward -> (B, A).

    depth 1 (the paper) scores each candidate by the reward predicted at its query-action token and needs
    no next-observation head (the release's Meta-World models have none: ``spec.next_obs_loss=False``);
    depth H > 1 (an extension; needs a next-observation regression head, ``model.next_obs_loss: true``) adds
    the rewards of rolling each candidate H-1 steps further with the policy mean. Ties go to the policy mean
    (candidate 0).
    """
    spec = model.spec
    if spec.discrete_actions or not spec.world_model or spec.reward_classes or spec.layout != "ad":
        raise ValueError("plan_continuous needs an 'ad' continuous-action world model with a regression "
                         f"reward head; got {spec}")
    if settings.depth > 1 and (spec.num_obs_classes or not spec.has_next_obs_head):
        raise ValueError("continuous depth > 1 needs a next-observation regression head (num_obs_classes=None, "
                         "next_obs_loss=True: train with --set model.next_obs_loss=true), or plan at depth 1")
    context, query_obs = _prepare(model, context, query_obs)
    B, L, A = query_obs.shape[0], settings.num_samples, spec.num_actions
    if settings.use_cache:
        _, cache = model.encode(model.embed_transitions(*context.tensors()))   # (B, T) real context
        h, cache = model.encode(model.embed_query_obs(query_obs), cache)        # (B, 1, E), cache T+1
        mean, log_std = model.action_head(h[:, -1])                            # (B, A) each
    else:
        mean, log_std = _policy_out(model, context, query_obs)
    noise = _normal((B, L - 1, A), generator, mean)                              # (B, L-1, A)
    cands = torch.cat([mean[:, None], mean[:, None] + log_std.exp()[:, None] * noise], dim=1)  # (B, L, A)
    cands = cands.clamp(-1.0, 1.0)  # score what the env would execute: it clips, and the model saw clipped actions
    flat, q_rep = cands.flatten(0, 1), query_obs.repeat_interleave(L, dim=0)     # (B*L, A), (B*L, D)
    ctx_rep = context.map(lambda t: t.repeat_interleave(L, dim=0))               # (B*L, T, ...)
    if settings.use_cache:
        h = model.encode(model.embed_query_action(flat), cache.expand(L))[0][:, -1]   # (B*L, E)
        reward, next_obs = model.reward_head(h), model.next_obs_head(h) if settings.depth > 1 else None
    else:
        preds, _ = model(ctx_rep.as_batch(q_rep, flat))
        reward, next_obs = preds["reward"], preds.get("next_obs")
    if settings.depth > 1:
        first = Context(q_rep[:, None], flat[:, None], reward[:, None], next_obs[:, None])
        reward = reward + _rollout_mean_policy(model, ctx_rep, first, settings.depth - 1)
    best = reward.view(B, L).argmax(dim=1)                                       # first max wins
    return cands[torch.arange(B, device=best.device), best]


def _rollout_mean_policy(model, context: Context, imagined: Context, steps: int) -> Tensor:
    """Sum of rewards predicted over `steps` more imagined steps taking the policy mean, each step
    re-encoding the last k-1 (real + imagined) transitions: the sliding window of the discrete planner."""
    total, keep = 0.0, model.spec.context_len - 1
    for _ in range(steps):
        window = Context(*(torch.cat([c, i], dim=1)[:, -keep:] for c, i in zip(context.tensors(),
                                                                                 imagined.tensors())))
        obs = imagined.next_obs[:, -1]                                           # (N, D) imagined state
        _, cache = model.encode(model.embed_transitions(*window.tensors()))
        h, cache = model.encode(model.embed_query_obs(obs), cache)
        action = model.action_head(h[:, -1])[0].clamp(-1.0, 1.0)                 # policy mean, as executed
        h = model.encode(model.embed_query_action(action), cache)[0][:, -1]
        reward, next_obs = model.reward_head(h), model.next_obs_head(h)
        total = total + reward
        step = Context(obs[:, None], action[:, None], reward[:, None], next_obs[:, None])
        imagined = Context(*(torch.cat([i, s], dim=1) for i, s in zip(imagined.tensors(), step.tensors())))
    return total


__all__ = ["PlannerSettings", "Context", "should_plan", "should_plan_continuous", "sample_policy_action",
           "plan_discrete", "plan_continuous"]
