"""Multi-task FwFM with shared and task-specific embeddings (STEM; method notes, "Multi-task").

One pCVR model learns several conversion types (a signup reported live, a purchase uploaded in
bursts...) as tasks. Every feature has a *shared* row, [w | v] as in FwFM, and one small
*task-specific* row per task, [w_t | e_t]. Task t's logit is

    logit_t = b_t + sum_i (w[x_i] + w_t[x_i]) + sum_{i<j} r^t_{F(i)F(j)} <u_i^t, u_j^t>
    u_i^t   = [v_i ; e_i^1 ; ... ; e_i^T]         (all forward)

so every task *sees* every task's embeddings, but the gradient of task t's loss reaches only the
shared rows and its own e^t (task-specific backward): the other tasks' e^s enter through
stop-gradient. This is STEM's "all forward, task-specific backward" in FwFM form. Why not one
shared embedding with T output heads: the tasks' gradients then fight over the same vectors (the
paper's *entanglement*), and a rare task (purchases, ~2% of clicks) is drowned by a frequent one;
the specific rows give each task room of its own while the shared rows still carry what the
tasks have in common (a user who signs up tends to buy). `task_dim=0` gives that shared-only
baseline (benchmarks/multitask.py measures both).

Output: logits [B, T]. A sample trains only its task's output (`OnlineLearner.learn(tasks=)`).
The task names travel in the hyper-parameters, so a snapshot says which output is which.

The detach trick: the value of u^t's Gram matrix is G_shared + sum_s G_s for every task; its
gradient must flow through G_shared and G_t only, so task t uses
G_shared + sum_s G_s.detach() + (G_t - G_t.detach()) — the same value, the wanted gradient — and
the T Gram matrices of the small specific rows are computed once for all tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding, prior_logit


class StemFwFM(CTRModel):
    name = "stem"

    def __init__(self, spec: FeatureSpec, tasks: list[str] | tuple[str, ...] = ("default",),
                 dim: int = 16, task_dim: int = 4, init_std: float = 0.01,
                 prior_ctr: float | list[float] = 0.03) -> None:
        tasks = [str(t) for t in tasks]
        if not tasks or len(set(tasks)) != len(tasks):
            raise ConfigError(f"stem needs one or more distinct task names, got {tasks!r}")
        priors = ([float(prior_ctr)] * len(tasks) if isinstance(prior_ctr, int | float)
                  else [float(p) for p in prior_ctr])
        if len(priors) != len(tasks):
            raise ConfigError("stem: give one prior_ctr, or one per task")
        if task_dim < 0 or dim < 1:
            raise ConfigError("stem: need dim >= 1 and task_dim >= 0")
        hp: dict[str, Any] = {"tasks": tasks, "dim": dim, "task_dim": task_dim,
                              "init_std": init_std, "prior_ctr": priors}
        super().__init__(spec, **hp)
        self.tasks = tuple(tasks)
        t, f = len(tasks), spec.num_fields
        self.dim, self.task_dim = dim, task_dim
        self.table = HashEmbedding(spec.total_buckets, dim + 1, init_std=init_std)
        # One gather for every task's specific row: [w_1..w_T | e_1 .. e_T].
        self.task_table = HashEmbedding(spec.total_buckets, t * (1 + task_dim),
                                        init_std=init_std)
        with torch.no_grad():
            self.table.weight[:, 0] = 0.0  # linear weights start at zero, as in FwFM
            self.task_table.weight[:, :t] = 0.0
        self.bias = nn.Parameter(torch.tensor([prior_logit(p) for p in priors]))
        self.field_pair = nn.Parameter(torch.ones(t, f, f))
        self.register_buffer("upper", torch.triu(torch.ones(f, f), diagonal=1), persistent=False)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t, d = self.num_tasks, self.task_dim
        rows = self.table(idx)  # [B, F, 1 + D]
        spec_rows = self.task_table(idx)  # [B, F, T (1 + d)]
        linear = rows[..., 0].sum(1, keepdim=True) + spec_rows[..., :t].sum(1)  # [B, T]
        v = rows[..., 1:]
        gram = torch.bmm(v, v.transpose(1, 2)).unsqueeze(1)  # [B, 1, F, F]
        if d > 0:
            b, f = idx.shape
            e = spec_rows[..., t:].reshape(b, f, t, d).transpose(1, 2)  # [B, T, F, d]
            g_task = torch.matmul(e, e.transpose(-1, -2))  # [B, T, F, F]
            g_seen = g_task.detach()
            gram = gram + g_seen.sum(1, keepdim=True) + (g_task - g_seen)
        pairs = (gram * (self.field_pair * self.upper)).sum((-1, -2))  # [B, T]
        return self.bias + linear + pairs

    def embedding_tables(self) -> list[torch.Tensor]:
        """The shared table, then each task's specific table (without the linear columns)."""
        t, d = self.num_tasks, self.task_dim
        spec_rows = self.task_table.weight.detach()[:, t:]
        return [self.table.weight.detach()[:, 1:],
                *(spec_rows[:, k * d:(k + 1) * d] for k in range(t) if d > 0)]
