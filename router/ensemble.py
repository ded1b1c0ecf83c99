"""Ensemble velocity: v(x, t) = sum_k p(k | x_t, t) v_k(x, t), over whichever experts are present.

Routing modes:
- "full": every expert on every sample, weighted by the router (exact marginal flow; K expert passes).
- "topk" / "top2": each sample keeps its top-k experts, weights renormalized over them.
- "top1": each sample follows its most probable expert (the paper's default).
In the top-k modes the batch is grouped by chosen expert each call: every expert runs once, on the
samples that chose it, so top-1 costs about one expert forward per sample plus one router forward.

Classifier-free guidance is applied inside each expert (`Expert`), before the router weighting. An expert trained to
predict the noise or the data (`train.objective`) has its output converted to velocity first (core/objective.py), so
guidance and routing both act on velocities whatever each expert predicts (a mixed ensemble, as heterogeneous DDM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ddm_node.core.config import Routing
from ddm_node.core.errors import DDMError
from ddm_node.core.objective import AsVelocity
from router.base import Router
from router.gaussian import broadcast_t

# routing -> experts per sample, from (experts present, top_k). "full" weights all of them (a sum, not a pick).
ROUTINGS: dict[str, Callable[[int, int], int]] = {
    "full": lambda n, top_k: n,
    "top1": lambda n, top_k: 1,
    "top2": lambda n, top_k: 2,
    "topk": lambda n, top_k: top_k,
}


class Expert:
    """A velocity model v(x, t, y) with classifier-free guidance applied inside.

    `objective`: what `model` predicts; its output is converted to velocity before guidance (`AsVelocity`).
    y None or all-null: the unconditional velocity. cfg_scale 1: the conditional velocity. Otherwise
    v_u + s (v_c - v_u), with the conditional and unconditional passes in one batched call (samples whose
    label is already null are not doubled).
    """

    def __init__(self, model: nn.Module | Callable[[Tensor, Tensor, Tensor], Tensor], num_classes: int, cfg_scale: float = 1.0,
                 objective: str = "velocity"):
        if num_classes < 0:
            raise DDMError(f"num_classes must be >= 0, got {num_classes}")
        self.model = model if objective == "velocity" else AsVelocity(model, objective)
        self.num_classes = num_classes
        self.cfg_scale = float(cfg_scale)
        self.forward_samples = 0  # samples through the model, CFG's doubled passes included

    @property
    def null_class(self) -> int:
        return self.num_classes

    def __call__(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        t = broadcast_t(t, b, x.dtype, x.device)
        null = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
        if y is None or self.num_classes == 0:
            self.forward_samples += b
            return self.model(x, t, null)
        y = y.to(device=x.device, dtype=torch.long)
        if y.shape != (b,):
            raise DDMError(f"class labels must have shape ({b},), got {tuple(y.shape)}")
        cond = y != self.null_class
        if self.cfg_scale == 1.0 or not bool(cond.any()):
            self.forward_samples += b
            return self.model(x, t, y)
        idx = cond.nonzero().squeeze(1)
        self.forward_samples += b + idx.shape[0]
        v = self.model(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([y, null[idx]]))
        out, v_u = v[:b].clone(), v[b:]
        out[idx] = v_u + self.cfg_scale * (out[idx] - v_u)
        return out


class SoleRouter:
    """The router of a one-model bundle (a distilled student): p(k | x_t, t) = 1 for its only expert `k`."""

    def __init__(self, k: int):
        self.experts = [int(k)]

    def log_probs(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        return torch.zeros((x.shape[0], 1), dtype=x.dtype, device=x.device)

    def subset(self, ids) -> SoleRouter:
        if [int(k) for k in ids] != self.experts:
            raise DDMError(f"this router knows expert {self.experts[0]} only, not {list(ids)}")
        return self


class EnsembleVelocity:
    """The routed mixture of expert velocities; callable as velocity(x, t, y) -> [B, ...] like one model.

    `experts` maps shard id -> velocity callable (x, t[B], y) -> v. The router (anything with `experts`,
    `log_probs(x, t, y)` and `subset(ids)`) is restricted to the experts present, which renormalizes
    p(k | x_t, t) over them: the exact marginal flow of the data of those clusters only.
    Counters for cost accounting: expert_calls (expert invocations), expert_samples (samples routed to
    experts, before any CFG doubling, which `Expert.forward_samples` counts), router_calls (router passes).
    """

    def __init__(self, experts: dict[int, Callable], router: Router, routing: Routing = "top1", top_k: int = 2):
        if not experts:
            raise DDMError("ensemble needs at least one expert")
        if routing not in ROUTINGS:
            raise DDMError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        ids = sorted(int(k) for k in experts)
        unknown = [k for k in ids if k not in router.experts]
        if unknown:
            raise DDMError(f"expert {unknown[0]} is not known to the router (it knows {list(router.experts)})")
        self.router = router if list(router.experts) == ids else router.subset(ids)
        self.experts = {k: experts[k] for k in ids}
        self.ids = ids
        self.routing = routing
        if top_k < 1:
            raise DDMError(f"top_k must be >= 1, got {top_k}")
        self.k = min(ROUTINGS[routing](len(ids), top_k), len(ids))
        self.reset_counters()

    def reset_counters(self) -> None:
        self.expert_calls = 0
        self.expert_samples = 0
        self.router_calls = 0

    def __call__(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        t = broadcast_t(t, b, x.dtype, x.device)
        if len(self.ids) == 1:  # p = 1: no router needed
            return self._run(self.ids[0], x, t, y)
        self.router_calls += 1
        logp = self.router.log_probs(x, t, y)  # [B, K], columns in self.ids order
        if self.routing == "full":
            weights = logp.exp()
            out = torch.zeros_like(x)
            for i, k in enumerate(self.ids):
                out = out + _bcast(weights[:, i], x) * self._run(k, x, t, y)
            return out
        top_logp, top_idx = logp.topk(self.k, dim=1)  # [B, k]
        top_w = torch.softmax(top_logp, dim=1)  # renormalized over each sample's chosen experts
        out = torch.zeros_like(x)
        for i in top_idx.unique().tolist():
            rows, slot = (top_idx == i).nonzero(as_tuple=True)
            v = self._run(self.ids[i], x[rows], t[rows], None if y is None else y[rows])
            if self.k == 1:
                out[rows] = v
            else:
                out.index_add_(0, rows, _bcast(top_w[rows, slot], v) * v)
        return out

    def _run(self, k: int, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        self.expert_calls += 1
        self.expert_samples += x.shape[0]
        return self.experts[k](x, t, y)


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    """Per-sample weights [B] shaped to multiply a [B, ...] tensor."""
    return w.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
