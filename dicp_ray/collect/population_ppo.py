"""Population PPO: N independent task learners held as stacked tensors and updated in one pass.

Why: the paper's source learners are tiny (64x64 tanh actor and critic) and all the same shape, and its PPO
settings take 0.4 gradient steps per env step, so a learner per task spends its time on fixed per-minibatch
overhead (RLlib: ~4 ms per minibatch of 50). Stacking N learners into one batched network (``torch.bmm``)
pays that overhead once for the whole population, the way PureJaxRL-style code runs thousands of learners.

Semantics are those of N independent Stable-Baselines3 PPO learners (``PPO("MlpPolicy")``), checked against
live SB3 in tests/unit/test_population.py:

* Parameters: per learner an actor and a critic MLP (``collect.hidden_sizes``, tanh), SB3's orthogonal init
  (gain sqrt(2) hidden, 0.01 policy head, 1 value head, zero biases) from the learner's own torch Generator.
  All of a learner's parameters live in ONE row of a flat ``(N, P)`` tensor that every layer views into,
  every block 64-byte aligned (`Layout`). That makes one Adam over one tensor, a per-learner grad norm as
  one row reduction, and bit-identical arithmetic for a learner whatever N is (tested): a task's shard
  does not depend on the population it ran in.
* Update (``ppo_update``): per learner its own minibatch permutation per epoch (SB3 RolloutBuffer order:
  sample index = stream * rollout_steps + step), advantage normalisation per minibatch (unbiased std +
  1e-8), clipped surrogate, unclipped value MSE, entropy bonus, loss summed over learners (so each learner's
  gradient is exactly its own loss's), global-norm clipping per learner (torch's ``clip_grad_norm_``
  formula), Adam eps 1e-5 (SB3's) - elementwise, so one optimizer over the stacked tensor is N Adams.
* GAE (``gae``): SB3's ``compute_returns_and_advantage`` in float32, vectorised over learners.
* Policy distribution, the only difference between the two action kinds (``Layout.continuous``): discrete,
  SB3's Categorical over the logits; continuous (Meta-World), SB3's ``DiagGaussianDistribution``: the actor
  outputs the means, a state-independent log-std (one block of the learner's row, SB3's ``log_std_init=0``,
  so std 1) gives the std, log-prob and entropy summed over the action dims (``gaussian_log_prob``,
  torch's ``Normal`` formulas). Rollouts (`dicp_ray.collect.population_meta_world`) sample
  ``mean + std * noise``, send the sample clipped to [-1, 1] to the env and keep the unclipped one for the
  update, as SB3 does; tested against live SB3 on Meta-World reach-v3 (one update to 1e-6, and bit for bit
  alone vs in a population: tests/unit/test_population_continuous.py).

Throughput (benchmarks/bench_collect.py --quick, paper Darkroom settings, one thread each, env steps per
CPU-second, all rows in one run on 2 shared cores; two runs, at load average 35-49 / 5): SB3 PPO 1,025 /
1,409; RLlib learner per task 503 / 976; population N = 1: 1,937 / 3,465 (1.9x / 2.5x SB3), N = 9: 8,286 /
14,236 (8.1x / 10.1x), N = 81: 16,485 / 20,120 (16.1x / 14.3x SB3, 33x / 21x RLlib); Dark Key-to-Door
N = 81 (its settings take 4x fewer gradient steps per env step): 37,069 / 40,833.

Decision: the population runs as plain PyTorch inside Ray tasks, not hosted in RLlib. Bounded attempt
(benchmarks/bench_population_rllib.py 81): at N = 81 one update of the plain population costs 0.13 CPU s of
rollout (grid observations are cells, so a step is a lookup in a per-update policy table) plus 10.9 s of
PPO update, while RLlib's ``SingleAgentEnvRunner.sample()`` of the same 162,000 steps over 8,100 sub-envs of
the batched grid env alone costs 7.0 s: hosted with RLlib's EnvRunner, even with this update and no other
RLlib overhead, the population would take >= 1.62x the plain time (the target was 1.5x). A "lean EnvRunner"
that removes that cost would be this module's rollout inside an RLlib class, with RLlib's episode and
connector machinery (the point of hosting) bypassed, so it was not built. RLlib stays for Meta-World (PPO,
SAC) and as the reference learner (``collect.learner: rllib``).

Meta-World PPO (issue #24, `dicp_ray.collect.population_meta_world`, the ``collect.learner: auto`` PPO learner there):
the release's settings (100 streams, n_steps 100, minibatch 200, 20 epochs, 39-number observation), env steps
per CPU-second of the learning loop, SB3 PPO and populations in one run (benchmarks/bench_meta_world_ppo.py,
one update per learner; two runs on 2 shared cores, load average 6-17 / 13-18): reach-v3 SB3 1,027 / 970;
population N = 1 1,561 / 1,630 (1.52x / 1.68x), N = 4 1,701 / 1,802 (1.66x / 1.86x), N = 8 1,551 / 1,685
(1.51x / 1.74x); pick-place-v3 SB3 763 / 804; N = 1 849 / 915 (1.11x / 1.14x), N = 4 999 / 1,001 (1.31x /
1.24x), N = 8 839 / 1,057 (1.10x / 1.31x). Meta-World's own step and reset (~8 ms, every 100 steps) are most
of the time: the update is 8-22% of the population's CPU, so the gain is SB3's update cost and shrinks on
dearer tasks; the 1.5x target holds on reach, not on pick-place. Populations there are capped at 4 tasks (no measurable gain
beyond, more memory). Learning, 8 reach-v3 goals at 20K env steps each (10 streams; ``--learn 20000 --streams
10``), mean return of each stream's first -> last 10% of episodes: SB3 177 -> 640, population 180 -> 633.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # floats (64 bytes): every block's offset, every padded width and each learner's row size


def _pad(size: int) -> int:
    return _ALIGN * math.ceil(size / _ALIGN)


@dataclass(frozen=True)
class Layer:
    """One Linear layer inside a learner's row: weight ``(fan_in, fan_out)`` padded to ``(rows, cols)``."""

    weight: int       # offset of the padded weight block
    fan_in: int
    fan_out: int
    rows: int         # padded fan_in
    cols: int         # padded fan_out
    bias: int         # offset of the padded bias block (cols floats)


@dataclass(frozen=True)
class Layout:
    """Where each layer's weight and bias (and, for continuous actions, the log-std) sit in a learner's row.

    Every block is padded (zero rows / columns that stay zero: they get no gradient) to a multiple of 16
    floats, the observation too. Why: CPU GEMM kernels pick code paths by the 64-byte alignment of each batch
    element; with 5 logits per row, learner i's output started at 20*M*i bytes and its results differed
    in the last bit from the same learner alone. Aligned blocks make a learner's arithmetic independent of
    its index and of N. ``num_actions`` is the number of logits (discrete) or the action dimension
    (``continuous``: a diagonal Gaussian whose state-independent log-std is the block at ``log_std``).
    """

    obs_dim: int
    num_actions: int
    actor: tuple[Layer, ...]
    critic: tuple[Layer, ...]
    size: int                                       # P
    continuous: bool = False
    log_std: int = -1                               # offset of the log-std block (continuous only)

    @staticmethod
    def build(obs_dim: int, num_actions: int, hidden: tuple[int, ...], continuous: bool = False) -> "Layout":
        offset, nets = 0, []
        for out_dim in (num_actions, 1):
            layers, width = [], obs_dim
            for size in (*hidden, out_dim):
                rows, cols = _pad(width), _pad(size)
                layers.append(Layer(offset, width, size, rows, cols, offset + rows * cols))
                offset += rows * cols + cols
                width = size
            nets.append(tuple(layers))
        log_std = offset if continuous else -1
        offset += _pad(num_actions) if continuous else 0
        return Layout(obs_dim, num_actions, nets[0], nets[1], _pad(offset), continuous, log_std)

    def weight(self, params: torch.Tensor, layer: Layer) -> torch.Tensor:
        """``(N, fan_in, fan_out)`` view of a layer's (unpadded) weights."""
        block = params[:, layer.weight:layer.weight + layer.rows * layer.cols]
        return block.view(-1, layer.rows, layer.cols)[:, :layer.fan_in, :layer.fan_out]

    def bias(self, params: torch.Tensor, layer: Layer) -> torch.Tensor:
        """``(N, fan_out)`` view of a layer's (unpadded) bias."""
        return params[:, layer.bias:layer.bias + layer.fan_out]

    def log_std_of(self, params: torch.Tensor) -> torch.Tensor:
        """``(N, num_actions)`` view of the Gaussian's log-std (continuous layouts only)."""
        if not self.continuous:
            raise ValueError("a discrete layout has no log-std: build it with continuous=True")
        return params[:, self.log_std:self.log_std + self.num_actions]


def init_params(layout: Layout, seeds: list[int]) -> torch.Tensor:
    """``(N, P)`` float32 parameters, learner i initialised from ``torch.Generator().manual_seed(seeds[i])``.

    SB3 ``MlpPolicy``'s init: orthogonal weights, gain sqrt(2) in hidden layers, 0.01 for the policy head, 1
    for the value head, zero biases. The orthogonal matrix is drawn in torch's ``(out, in)`` orientation and
    stored transposed (actor layers first, then critic layers, from the learner's generator). A continuous
    layout's log-std starts at 0 (SB3's ``log_std_init=0.0``: std 1).
    """
    params = torch.zeros(len(seeds), layout.size)
    for row, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        for layers, head_gain in ((layout.actor, 0.01), (layout.critic, 1.0)):
            for k, layer in enumerate(layers):
                gain = head_gain if k == len(layers) - 1 else math.sqrt(2)
                weight = torch.empty(layer.fan_out, layer.fan_in)
                torch.nn.init.orthogonal_(weight, gain, generator=gen)
                layout.weight(params[row:row + 1], layer)[0] = weight.t()
    return params


def _split(params: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Padded per-layer views ``[W1, b1, W2, b2, ...]`` of the actor then the critic, shaped for ``baddbmm``,
    and the ``(N, 1, A)`` log-std (None for a discrete layout).

    One ``split`` (its backward is one ``cat``), not one slice per layer: a slice's backward zero-fills a
    gradient of the whole ``(N, P)`` tensor, which cost 40% of an update at N = 81.
    """
    sizes, shapes = [], []
    for layer in (*layout.actor, *layout.critic):
        sizes += [layer.rows * layer.cols, layer.cols]
        shapes += [(layer.rows, layer.cols), (1, layer.cols)]
    if layout.continuous:
        sizes.append(_pad(layout.num_actions))
        shapes.append((1, _pad(layout.num_actions)))
    n = params.shape[0]
    chunks = torch.split(params, [*sizes, layout.size - sum(sizes)], dim=1)
    views = [chunk.view(n, *shape) for chunk, shape in zip(chunks, shapes)]
    if layout.continuous:
        return views[:-1], views[-1][..., :layout.num_actions]
    return views, None


def _mlp(views: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for k in range(0, len(views), 2):
        x = torch.baddbmm(views[k + 1], x, views[k])
        if k < len(views) - 2:
            x = torch.tanh(x)
    return x


def _forward(params: torch.Tensor, layout: Layout,
             obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    views, log_std = _split(params, layout)
    actor_len = 2 * len(layout.actor)
    x = torch.nn.functional.pad(obs, (0, layout.actor[0].rows - obs.shape[-1]))
    return (_mlp(views[:actor_len], x)[..., :layout.num_actions], _mlp(views[actor_len:], x)[..., 0],
            log_std)


def forward(params: torch.Tensor, layout: Layout, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched actor and critic: ``obs (N, M, obs_dim)`` -> logits (discrete) or Gaussian means (continuous)
    ``(N, M, A)``, values ``(N, M)``."""
    out, values, _ = _forward(params, layout, obs)
    return out, values


_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-density of ``actions (N, M, A)`` under the diagonal Gaussian, summed over A -> ``(N, M)``.

    torch's ``Normal.log_prob`` formula term by term (SB3's ``DiagGaussianDistribution``: ``Normal(mean,
    exp(log_std))``, whose ``log_prob`` takes the log of the exponentiated std), so it agrees with SB3 to
    float rounding. ``log_std`` broadcasts: ``(N, 1, A)``.
    """
    std = log_std.exp()
    return (-((actions - mean) ** 2) / (2 * std ** 2) - std.log() - _LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of the diagonal Gaussian summed over A (``Normal.entropy``): ``(N, 1, A)`` -> ``(N, 1)``."""
    return (0.5 + _LOG_SQRT_2PI + log_std.exp().log()).sum(-1)


def gae(rewards: np.ndarray, values: np.ndarray, episode_starts: np.ndarray, last_values: np.ndarray,
        last_dones: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """SB3's ``RolloutBuffer.compute_returns_and_advantage`` on ``(..., T)`` arrays -> (advantages, returns).

    ``episode_starts[..., t]`` is 1 where step t began a new episode, ``last_dones`` whether the last step
    ended one, ``last_values`` V of the observation after the last step. Float32 throughout, like SB3.
    A value bootstrap at truncation, if wanted, is already folded into ``rewards`` (SB3's way).
    """
    rewards, values = rewards.astype(np.float32), values.astype(np.float32)
    starts = episode_starts.astype(np.float32)
    advantages = np.zeros_like(rewards)
    last_gae = np.zeros(rewards.shape[:-1], np.float32)
    steps = rewards.shape[-1]
    for t in reversed(range(steps)):
        if t == steps - 1:
            non_terminal = 1.0 - last_dones.astype(np.float32)
            next_values = last_values.astype(np.float32)
        else:
            non_terminal, next_values = 1.0 - starts[..., t + 1], values[..., t + 1]
        delta = rewards[..., t] + gamma * next_values * non_terminal - values[..., t]
        last_gae = delta + gamma * lam * non_terminal * last_gae
        advantages[..., t] = last_gae
    return advantages, advantages + values


@dataclass(frozen=True)
class PPOSettings:
    """The PPO hyper-parameters of ``ppo_update`` (``collect.*`` keys of the same meaning)."""

    num_epochs: int
    minibatch_size: int
    clip_param: float
    vf_loss_coeff: float
    entropy_coeff: float
    grad_clip: float


def make_optimizer(params: torch.Tensor, lr: float) -> torch.optim.Adam:
    """One Adam over the stacked parameters: elementwise, hence N independent Adams (SB3's eps 1e-5).

    ``fused``: one pass over the tensor instead of ~6 (25% faster updates at N = 81, same results).
    """
    return torch.optim.Adam([params], lr=lr, eps=1e-5, fused=True)


def ppo_update(params: torch.Tensor, optimizer: torch.optim.Optimizer, layout: Layout, ppo: PPOSettings,
               batch: dict[str, torch.Tensor], perms: torch.Tensor) -> dict[str, float]:
    """``num_epochs`` passes of minibatch PPO over every learner's own rollout, all learners at once.

    ``batch``: ``obs (N, B, obs_dim)`` float32; ``actions`` ``(N, B)`` int64 (discrete) or ``(N, B, A)``
    float32 (continuous: the UNclipped Gaussian samples, as SB3's buffer keeps them); ``log_probs``,
    ``advantages``, ``returns`` ``(N, B)`` float32, in SB3's flattened order. ``perms (N, num_epochs, B)``
    int64: learner i's minibatch order in each epoch (SB3: ``np.random.permutation`` per epoch). ``params``
    must be a leaf with ``requires_grad``. Returns the mean losses of the last epoch (for logging). The
    discrete and continuous cases differ only in the policy's log-probability and entropy.
    """
    n, size = batch["actions"].shape[:2]
    obs_dim = batch["obs"].shape[2]
    act_cols = layout.num_actions if layout.continuous else 1
    rows = torch.arange(n).unsqueeze(1)
    # One gather per minibatch: obs | action(s) | old log-prob | advantage | return as float32 columns.
    actions = batch["actions"].float() if layout.continuous else batch["actions"].unsqueeze(-1).float()
    table = torch.cat([batch["obs"], actions,
                       torch.stack([batch[k] for k in ("log_probs", "advantages", "returns")], -1)], -1)
    stats = {}
    for epoch in range(ppo.num_epochs):
        totals = torch.zeros(3)
        for start in range(0, size, ppo.minibatch_size):
            picked = table[rows, perms[:, epoch, start:start + ppo.minibatch_size]]
            obs, action = picked[..., :obs_dim], picked[..., obs_dim:obs_dim + act_cols]
            old_log_prob, adv, returns = picked[..., -3], picked[..., -2], picked[..., -1]
            out, values, log_std = _forward(params, layout, obs)
            if layout.continuous:
                log_prob = gaussian_log_prob(out, log_std, action)
                entropy = gaussian_entropy(log_std)[:, 0]
            else:
                log_all = torch.log_softmax(out, -1)
                log_prob = log_all.gather(2, action.long()).squeeze(-1)
                entropy = -(log_all.exp() * log_all).sum(-1).mean(1)
            if adv.shape[1] > 1:
                adv = (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True) + 1e-8)
            ratio = torch.exp(log_prob - old_log_prob)
            clipped = torch.clamp(ratio, 1 - ppo.clip_param, 1 + ppo.clip_param)
            policy_loss = -torch.min(adv * ratio, adv * clipped).mean(1)
            value_loss = ((returns - values) ** 2).mean(1)
            loss = policy_loss - ppo.entropy_coeff * entropy + ppo.vf_loss_coeff * value_loss
            params.grad = None
            loss.sum().backward()
            with torch.no_grad():
                norms = torch.linalg.vector_norm(params.grad, dim=1)
                params.grad.mul_((ppo.grad_clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1))
            optimizer.step()
            totals += torch.stack([policy_loss.detach().mean(), value_loss.detach().mean(),
                                   entropy.detach().mean()])
        stats = dict(zip(("policy_loss", "value_loss", "entropy"),
                         (totals / math.ceil(size / ppo.minibatch_size)).tolist()))
    return stats
