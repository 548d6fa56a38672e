"""The transition history an in-context agent keeps per task: the newest k-1 transitions of each task, on device.

``TransitionHistory(N, window, obs_dim, action_dim, device)`` holds every task's newest transitions (obs, action,
reward, next_obs) in buffers of 2 * window rows; when a row's buffer is full its newest `window` transitions move
to the front (amortised O(1) per step). ``context(rows)`` gathers the last min(length, window) transitions of rows
that hold equally many as one batched ``plan.Context``. Rows may differ in length (Meta-World: a restored
adaptation context next to an evaluation episode in progress); ``group_rows`` sorts rows into groups that share a
key, such as (context length, plan decision), in a fixed order.
"""
from __future__ import annotations

import numpy as np
import torch

from dicp_ray.agents.plan import Context

COLUMNS = ("obs", "action", "reward", "next_obs")


def group_rows(keys: list[tuple]) -> list[tuple[tuple, np.ndarray]]:
    """[(key, row positions)] for positions sharing a key, in sorted key order (a fixed order of random draws)."""
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return [(key, np.asarray(out[key])) for key in sorted(out)]


class TransitionHistory:
    """Per-row buffers of the newest `window` transitions; action_dim None = discrete (long) actions."""

    def __init__(self, num_rows: int, window: int, obs_dim: int, action_dim: int | None, device):
        cap, f32 = max(2 * window, 1), dict(dtype=torch.float32, device=device)
        self.window, self.device = window, torch.device(device)
        self.obs = torch.zeros(num_rows, cap, obs_dim, **f32)
        self.action = (torch.zeros(num_rows, cap, dtype=torch.long, device=device) if action_dim is None
                       else torch.zeros(num_rows, cap, action_dim, **f32))
        self.reward = torch.zeros(num_rows, cap, **f32)
        self.next_obs = torch.zeros(num_rows, cap, obs_dim, **f32)
        self.length = np.zeros(num_rows, np.int64)
        self.total = np.zeros(num_rows, np.int64)  # transitions ever appended (uncapped): when planning starts

    def columns(self) -> tuple[torch.Tensor, ...]:
        return self.obs, self.action, self.reward, self.next_obs

    def append(self, rows: np.ndarray, values) -> None:
        """One transition per row of `rows`: `values` = (obs, action, reward, next_obs), each with len(rows) rows."""
        self.total[rows] += 1
        if self.window == 0 or len(rows) == 0:
            return
        cap = self.obs.shape[1]
        full = rows[self.length[rows] == cap]
        if len(full):
            index = torch.as_tensor(full, device=self.device)
            for column in self.columns():
                column[index, :self.window] = column[index, cap - self.window:]
            self.length[full] = self.window
        index = torch.as_tensor(rows, device=self.device)
        at = torch.as_tensor(self.length[rows], device=self.device)
        for column, value in zip(self.columns(), values):
            value = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            column[index, at] = value.to(self.device).to(column.dtype)
        self.length[rows] += 1

    def num_ctx(self) -> np.ndarray:
        """(N,) transitions each row's context holds now: min(length, window)."""
        return np.minimum(self.length, self.window)

    def context(self, rows: np.ndarray) -> Context:
        """The contexts of `rows` (all holding equally many transitions) as one batched Context, oldest first."""
        n = int(min(self.length[rows[0]], self.window))
        steps = torch.as_tensor(self.length[rows][:, None] - n + np.arange(n)[None], device=self.device)
        index = torch.as_tensor(rows, device=self.device)[:, None]
        return Context(*(column[index, steps] for column in self.columns()))

    def window_of(self, row: int) -> dict[str, np.ndarray]:
        """Row `row`'s context as numpy arrays (copies), oldest first."""
        n, end = int(min(self.length[row], self.window)), int(self.length[row])
        return {name: column[row, end - n:end].cpu().numpy().copy() for name, column in zip(COLUMNS, self.columns())}

    def copy(self) -> "TransitionHistory":
        out = object.__new__(TransitionHistory)
        out.window, out.device = self.window, self.device
        out.length, out.total = self.length.copy(), self.total.copy()
        out.obs, out.action, out.reward, out.next_obs = (column.clone() for column in self.columns())
        return out

    def restore_rows(self, source: "TransitionHistory", rows: np.ndarray) -> None:
        index = torch.as_tensor(rows, device=self.device)
        for mine, theirs in zip(self.columns(), source.columns()):
            mine[index] = theirs[index]
        self.length[rows], self.total[rows] = source.length[rows], source.total[rows]


__all__ = ["TransitionHistory", "group_rows", "COLUMNS"]
