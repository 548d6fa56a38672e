"""Acting and planning in context with the grid-world IDT (``dicp_ray.models.idt_grid.GridIDT``): IDT and DICP-IDT.

What it is
    ``GridIDTAgent`` acts on N tasks in lockstep as the release's ``evaluate_in_context`` does
    (``release:gridworld/model/idt.py:68-134``): every c = ``block_len`` steps Making-Decisions reads a sliding,
    time-ordered window of the newest n = context_len / c blocks ([R, o, zd] per block, the current block's zd
    left out) and gives the block's decision distribution; c independent samples z_0..z_{c-1} of it drive
    Decisions-to-Go for the block's c steps; the finished block is reviewed into its zd. Every episode starts at
    return-to-go = the task's maximum return (``return_target``), and each block starts at the previous block's
    return-to-go minus that block's rewards. Actions are sampled from the action head (Gumbel-max).

    ``plan_action`` is DICP-IDT: beam search inside Decisions-to-Go from o_j (``release:gridworld/model/idt.py
    :338-436``). Level 1 takes all A actions in the order of a without-replacement sample of the policy (the
    release's ``torch.multinomial(p, A)``; here Gumbel-top-k, the same distribution); every candidate's reward
    class and next cell are the argmaxes of the world-model heads at its action token; the score is the
    undiscounted sum of predicted rewards; a stable descending sort keeps the top K. Deeper levels append the
    predicted reward, z and predicted cell of the beam, then all A actions in index order. The executed action is
    the first action of the best beam. Planning starts once the agent has taken ``context_len`` steps (the
    release: the block starts at step >= n_transit).

Where we depart from the release (its quirks; dicp_ray docs "release deviations" §3)
    * Depth: the release searches a fixed 10 = c levels from every step j of the block, so from j > 0 its
      sequences grow past the 4c tokens Decisions-to-Go was trained on, into the next block, where no z exists
      yet. We search to the block end, depth c - j: the longest sequence is 4c - 1 tokens, and as the grid
      worlds' horizons are multiples of c the search never crosses an episode end either.
    * z: the release feeds the imagined step d the sample z[d] indexed by search depth; we feed the z of the step
      the imagined token stands for, z[j + d], as training does.

    ``use_cache=True`` encodes the real prefix once and extends key/value caches level by level; ``False`` is the
    reference, re-encoding every candidate's whole sequence as the release does. Both take the same random draw
    and choose the same actions (up to float rounding of near-equal logits; tested in float64).

What to expect
    ``benchmark_planner`` / ``benchmarks/bench_idt_plan.py`` (8 Darkroom test tasks, K = 10, paper-size random
    model, 1 torch thread, two shared CPU cores under heavy load): cached ~28-30 planned decisions/s, reference
    ~3-4/s (8-10x), identical executed actions.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from dicp_ray.agents.plan import _gumbel_order
from dicp_ray.models.blocks import KVCache
from dicp_ray.models.idt_grid import GridIDT, grid_cells
from dicp_ray.models.spec import ModelSpec


class GridIDTAgent:
    """IDT / DICP-IDT acting of a ``GridIDT`` on N tasks (module docstring). Per step: ``act(obs)`` or
    ``plan_action(obs, beam_width)`` -> (N,) actions, then ``observe(action, reward, next_obs)``; call
    ``start_episode()`` before each episode. Deterministic for a generator state."""

    def __init__(self, model: GridIDT, horizon: int, return_target, generator: torch.Generator | None = None,
                 sample_decisions: bool = True):
        spec = model.spec
        if model.training:
            raise ValueError("call model.eval() before acting: dropout would make it random")
        if horizon % spec.block_len:
            raise ValueError(f"horizon {horizon} must be a multiple of block_len {spec.block_len}")
        param = next(model.parameters())
        self.model, self.horizon, self.generator, self.sample_decisions = model, horizon, generator, sample_decisions
        self.device, self.dtype = param.device, param.dtype
        self.target = torch.as_tensor(return_target).to(self.device, self.dtype).reshape(-1)
        self.num_tasks = self.target.shape[0]
        self.max_blocks = spec.context_len // spec.block_len
        self.steps_taken, self.num_finished = 0, 0
        self._context = self._empty_context()
        self._snapshot = self._copy_context()
        self.t: int | None = None

    # -- context -----------------------------------------------------------------
    def _empty_context(self) -> dict[str, Tensor]:
        N, Z = self.num_tasks, self.model.spec.z_dim
        return {"return_to_go": torch.zeros(N, 0, device=self.device, dtype=self.dtype),
                "obs": torch.zeros(N, 0, dtype=torch.long, device=self.device),
                "z_dists": torch.zeros(N, 0, 2 * Z, device=self.device, dtype=self.dtype)}

    def _copy_context(self) -> dict[str, Tensor]:
        """The context plus the step and episode counters (a ``finished_episodes`` snapshot)."""
        return {**self.context_window(), "steps_taken": torch.tensor(self.steps_taken),
                "num_finished": torch.tensor(self.num_finished)}

    def context_window(self) -> dict[str, Tensor]:
        """Making-Decisions' context, oldest block first: ``return_to_go (N, m)``, ``obs (N, m)`` cells of the block
        starts, ``z_dists (N, m', 2Z)`` of the reviewed blocks (m' = m - 1 inside a block, m at its end)."""
        return {name: self._context[name].clone() for name in ("return_to_go", "obs", "z_dists")}

    def finished_episodes(self) -> dict[str, Tensor]:
        """A copy of the context at the end of the last finished episode, for ``restore_finished``."""
        return {name: x.clone() for name, x in self._snapshot.items()}

    def restore_finished(self, episodes: dict[str, Tensor] | None) -> None:
        """Go back to a copy of ``finished_episodes()`` (None: no context), dropping the episode in progress."""
        episodes = episodes or {**self._empty_context(), "steps_taken": 0, "num_finished": 0}
        self._context = {name: episodes[name].clone() for name in ("return_to_go", "obs", "z_dists")}
        self.steps_taken, self.num_finished = int(episodes["steps_taken"]), int(episodes["num_finished"])
        self._snapshot, self.t = self._copy_context(), None

    @property
    def plan_ready(self) -> bool:
        """Planning starts once the agent has acted context_len steps (release: block start >= n_transit)."""
        return self.steps_taken >= self.model.spec.context_len

    # -- acting ------------------------------------------------------------------
    def start_episode(self) -> None:
        if self.t not in (None, self.horizon) and self.t != 0:
            raise RuntimeError(f"start_episode() in the middle of an episode (step {self.t} of {self.horizon})")
        N, c = self.num_tasks, self.model.spec.block_len
        self.t = 0
        self._block = {"obs": torch.zeros(N, c, dtype=torch.long, device=self.device),
                       "action": torch.zeros(N, c, dtype=torch.long, device=self.device),
                       "reward": torch.zeros(N, c, dtype=torch.long, device=self.device),
                       "next_obs": torch.zeros(N, c, dtype=torch.long, device=self.device)}

    @torch.no_grad()
    def _step_tokens(self, obs) -> Tensor:
        """Record o_t (deciding at a block start) -> the block's DtG tokens up to o_t (N, 4j + 2, E)."""
        if self.t is None or self.t >= self.horizon:
            raise RuntimeError("call start_episode() before acting in a new episode")
        j, blk = self.t % self.model.spec.block_len, self._block
        blk["obs"][:, j] = grid_cells(obs).to(self.device)
        if j == 0:
            self._decide()
        return self.model.low_level_tokens(self.z, blk["obs"][:, : j + 1], blk["action"][:, :j],
                                           blk["reward"][:, :j])

    def _decide(self) -> None:
        """Append the block start to Making-Decisions' window and sample the block's c decisions z (N, c, Z)."""
        ctx, blk = self._context, self._block
        rtg = self.target if self.t == 0 else ctx["return_to_go"][:, -1] - self._last_block_reward
        ctx["return_to_go"] = torch.cat([ctx["return_to_go"], rtg[:, None]], dim=1)
        ctx["obs"] = torch.cat([ctx["obs"], blk["obs"][:, :1]], dim=1)
        if ctx["obs"].shape[1] > self.max_blocks:                         # slide: drop the oldest block
            ctx["return_to_go"], ctx["obs"] = ctx["return_to_go"][:, 1:], ctx["obs"][:, 1:]
            ctx["z_dists"] = ctx["z_dists"][:, 1:]
        mean, log_var = self.model.decide(ctx["return_to_go"], ctx["obs"], ctx["z_dists"])
        mean, std = mean[:, -1:], (log_var[:, -1:] / 2).exp()                          # (N, 1, Z)
        N, c, Z = self.num_tasks, self.model.spec.block_len, self.model.spec.z_dim
        if not self.sample_decisions:
            self.z = mean.expand(N, c, Z)
            return
        gen_device = self.generator.device if self.generator is not None else "cpu"
        noise = torch.randn((N, c, Z), generator=self.generator, device=gen_device, dtype=torch.float64)
        self.z = mean + std * noise.to(mean)

    @torch.no_grad()
    def action_logits(self, obs) -> Tensor:
        """(N, 2) observations -> (N, A) action logits at o_t (call once per step, or `act` / `plan_action`)."""
        return self.model.action_head(self.model.decisions_to_go(self._step_tokens(obs))[:, -1])

    policy = action_logits

    def act(self, obs) -> Tensor:
        """(N, 2) observations -> (N,) long actions sampled from the action head (Gumbel-max)."""
        return _gumbel_order(self.action_logits(obs), self.generator)[:, 0]

    @torch.no_grad()
    def plan_action(self, obs, beam_width: int = 10, use_cache: bool = True) -> Tensor:
        """DICP-IDT: (N, 2) observations -> (N,) the first action of the best beam of a depth c - j search."""
        if not self.model.spec.world_model:
            raise ValueError("plan_action needs an IDT trained with the world model (model.world_model=true)")
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be a positive int, got {beam_width!r}")
        tokens = self._step_tokens(obs)
        j = self.t % self.model.spec.block_len
        return beam_search(self.model, tokens, self.z, j, beam_width, self.generator, use_cache)

    @torch.no_grad()
    def observe(self, action, reward, next_obs) -> None:
        """Record the outcome of step t; reviews a finished block and closes a finished episode."""
        c, j, blk = self.model.spec.block_len, self.t % self.model.spec.block_len, self._block
        blk["action"][:, j] = torch.as_tensor(action).to(self.device).long()
        blk["reward"][:, j] = torch.as_tensor(reward).to(self.device).round().long()
        blk["next_obs"][:, j] = grid_cells(next_obs).to(self.device)
        self.t, self.steps_taken = self.t + 1, self.steps_taken + 1
        if j == c - 1:
            zd = self.model.review(blk["obs"], blk["action"], blk["reward"], blk["next_obs"])   # (N, 2Z)
            self._context["z_dists"] = torch.cat([self._context["z_dists"], zd[:, None].to(self.dtype)], dim=1)
            self._last_block_reward = blk["reward"].sum(dim=1).to(self.dtype)
        if self.t == self.horizon:
            self.num_finished += 1
            self._snapshot = self._copy_context()


# ----------------------------------------------------------------------------- DICP-IDT beam search
def _world(model: GridIDT, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states at action tokens (..., E) -> argmax reward class and argmax next cell (...,)."""
    return model.reward_head(hidden).argmax(dim=-1), model.next_obs_head(hidden).argmax(dim=-1)


def _branch(dtg, cache: KVCache, tokens: Tensor) -> tuple[Tensor, KVCache]:
    """A candidate tokens (R, A, E) packed into each of the R cached rows, each seeing the row's cache and itself
    only, all at position cache.length -> (hidden (R, A, E), cache whose last A columns are the candidates)."""
    P, A = cache.length, tokens.shape[1]
    mask = torch.cat([torch.ones(A, P, dtype=torch.bool, device=tokens.device),
                      torch.eye(A, dtype=torch.bool, device=tokens.device)], dim=1)
    return dtg.encode(tokens, cache, positions=torch.full((A,), P, device=tokens.device), attn_mask=mask)


def _pick(cache: KVCache, row: Tensor, col: Tensor, num_candidates: int) -> KVCache:
    """Rows `row` (M,) of a `_branch` cache with its shared columns plus candidate column `col` (M,) of the last
    `num_candidates` -> a plain cache (M rows, shared + 1 columns)."""
    shared = cache.length - num_candidates
    return KVCache([tuple(torch.cat([x[row, :, :shared], x[row, :, shared + col][:, :, None]], dim=2)
                          for x in (k, v)) for k, v in cache.layers])


@torch.no_grad()
def beam_search(model: GridIDT, prefix: Tensor, z: Tensor, j: int, beam_width: int,
                generator: torch.Generator | None, use_cache: bool = True) -> Tensor:
    """Prefix DtG tokens (N, P, E) ending at o_j, the block's decisions z (N, c, Z), step j of the block ->
    (N,) actions (module docstring). One random draw: the level-1 candidate order. Candidates are beam-major
    (beam b, action a at column b * A + a), so the stable sort breaks ties like the release. The cached mode
    packs each beam's A candidates into one row (``_branch``) instead of copying its cache A times."""
    N, E, A, c = prefix.shape[0], prefix.shape[-1], model.spec.num_actions, model.spec.block_len
    dtg, rows = model.decisions_to_go, torch.arange(prefix.shape[0], device=prefix.device)
    if use_cache:
        hidden, cache = dtg.encode(prefix)
    else:
        hidden, seqs = dtg(prefix), prefix[:, None]                                     # seqs (N, beams, L, E)
    cand = _gumbel_order(model.action_head(hidden[:, -1]), generator)                   # (N, A)
    act_tokens = model.embed_action(cand)[:, :, None]                                   # (N, A, 1, E)
    if use_cache:
        h, cache = _branch(dtg, cache, act_tokens[:, :, 0])                             # (N, A, E)
    else:
        seqs = torch.cat([seqs.expand(N, A, -1, -1), act_tokens], dim=2)
        h = dtg(seqs.reshape(N * A, -1, E))[:, -1]
    reward, cell = (x.reshape(N, A) for x in _world(model, h))
    score, first = reward.to(torch.float64), cand
    acts = model.embed_action(torch.arange(A, device=prefix.device))                    # (A, E)
    for d in range(1, c - j + 1):
        Kc = score.shape[1]
        K = min(beam_width, Kc)
        keep = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :K]    # (N, K)
        score, first = score.gather(1, keep), first.gather(1, keep)
        if d == c - j:
            break
        reward, cell = reward.gather(1, keep), cell.gather(1, keep)
        z_tok = model.embed_z(z[:, j + d].to(prefix.dtype))[:, None].expand(N, K, E)
        step_tokens = torch.stack([model.embed_reward(reward), z_tok, model.embed_obs(cell)], dim=2)  # (N,K,3,E)
        if use_cache:
            row = (rows[:, None] * (Kc // A) + keep // A).reshape(-1)                  # the beam's cached row
            col = (keep % A).reshape(-1)                                                # and its candidate
            _, cache = dtg.encode(step_tokens.reshape(N * K, 3, E), _pick(cache, row, col, A))
            h, cache = _branch(dtg, cache, acts[None].expand(N * K, A, E))              # (N*K, A, E)
        else:
            flat = (rows[:, None] * Kc + keep).reshape(-1)                              # surviving sequences
            seqs = seqs.reshape(N * Kc, -1, E)[flat].view(N, K, -1, E)
            seqs = torch.cat([seqs, step_tokens], dim=2)[:, :, None].expand(N, K, A, -1, E)
            seqs = torch.cat([seqs, acts[None, None, :, None].expand(N, K, A, 1, E)], dim=3).reshape(N, K * A, -1, E)
            h = dtg(seqs.reshape(N * K * A, -1, E))[:, -1]
        reward, cell = (x.reshape(N, K * A) for x in _world(model, h))
        score = score.repeat_interleave(A, dim=1) + reward.to(torch.float64)
        first = first.repeat_interleave(A, dim=1)
    return first[:, 0]


# ----------------------------------------------------------------------------- planner speed
def benchmark_planner(num_plan_episodes: int = 2, beam_width: int = 10, split_seed: int = 0, seed: int = 0,
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """DICP-IDT decisions/s, cached vs reference, on the 8 Darkroom test tasks of `split_seed`.

    A paper-size grid IDT (3 x 4 layers, 4 heads, width 32, MLP 128, k = 80, c = 10, z of 8) with unit-gain random
    weights (so head argmaxes differ between candidates) acts in policy mode for k steps, then plans
    `num_plan_episodes` episodes with K = `beam_width`; both modes start from the same generator seeds. Returns the
    planned decisions, seconds and decisions/s per mode, and whether every executed action was identical.
    """
    from dicp_ray.envs import split_tasks
    from dicp_ray.envs.grid import DarkroomVectorEnv

    torch.manual_seed(seed)
    spec = ModelSpec(layout="idt", world_model=True, context_len=80, block_len=10, z_dim=8, num_layers=4,
                     num_heads=4, embed_dim=32, mlp_dim=128, return_scale=1.0, reward_max=1.0)
    model = GridIDT(spec).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / float(np.sqrt(p.shape[1])))
    _, test_ids = split_tasks("Darkroom", split_seed)
    out = {"tasks": len(test_ids), "beam_width": beam_width, "device": device, "dtype": str(dtype)}
    actions = {}
    for mode, use_cache in (("cached", True), ("reference", False)):
        env = DarkroomVectorEnv(task_ids=test_ids)
        agent = GridIDTAgent(model, env.horizon, np.asarray(env.max_returns(), np.float32),
                             torch.Generator().manual_seed(seed))
        taken, seconds, planned = [], 0.0, 0
        warm = model.spec.context_len // env.horizon
        for _ in range(warm + num_plan_episodes):
            obs, _ = env.reset(seed=seed)
            agent.start_episode()
            for _ in range(env.horizon):
                query = torch.as_tensor(obs, dtype=dtype, device=device)
                if agent.plan_ready:
                    start = time.perf_counter()
                    action = agent.plan_action(query, beam_width, use_cache)
                    seconds += time.perf_counter() - start
                    planned += len(test_ids)
                else:
                    action = agent.act(query)
                obs, reward, _, _, _ = env.step(action.cpu().numpy())
                agent.observe(action, torch.as_tensor(reward), torch.as_tensor(obs))
                taken.append(action.cpu())
        actions[mode] = torch.stack(taken)
        out[mode] = {"planned_decisions": planned, "seconds": seconds, "decisions_per_s": planned / seconds}
    out["identical_actions"] = bool(torch.equal(actions["cached"], actions["reference"]))
    out["speedup"] = out["cached"]["decisions_per_s"] / out["reference"]["decisions_per_s"]
    return out
