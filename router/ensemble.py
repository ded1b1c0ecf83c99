"""Ensemble velocity: v(x, t) = sum_k p(k | x_t, t) v_k(x, t), over whichever experts are present.

Routing modes:
- "full": every expert on every sample, weighted by the router (exact marginal flow; K expert passes).
- "topk" / "top2": each sample keeps its top-k experts, weights renormalized over them.
- "top1": each sample follows its most probable expert (the paper's default).
In the top-k modes the batch is grouped by chosen expert each call: every expert runs once, on the
samples that chose it, so top-1 costs about one expert forward per sample plus one router forward.

Classifier-free guidance is applied inside each expert (`Expert`), before the router weighting. Conditions travel
as `y`: a label tensor or a `Cond` (labels and pooled text); the unconditional pass nulls both. An expert trained to
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
from router.base import Cond, Conditioning, Router
from router.gaussian import broadcast_t

# routing -> experts per sample, from (experts present, top_k). "full" weights all of them (a sum, not a pick).
ROUTINGS: dict[str, Callable[[int, int], int]] = {
    "full": lambda n, top_k: n,
    "top1": lambda n, top_k: 1,
    "top2": lambda n, top_k: 2,
    "topk": lambda n, top_k: top_k,
}


class Expert:
    """A velocity model v(x, t, y[, text]) with classifier-free guidance applied inside.

    The conditions (`Cond`: class labels and, for a model with `text_dim` > 0, pooled text embeddings) absent or
    all null: the unconditional velocity. cfg_scale 1: the conditional velocity. Otherwise v_u + s (v_c - v_u),
    where v_u takes the null class and the model's learned null text, with the conditional and unconditional
    passes in one batched call (rows with no condition at all are not doubled). Text reaches the model as the
    keywords `text` and `text_drop` (rows that take the null text), and only when `text_dim` > 0.
    `objective`: what `model` predicts; its output is converted to velocity before guidance (`AsVelocity`).
    """

    def __init__(self, model: nn.Module | Callable[..., Tensor], num_classes: int, cfg_scale: float = 1.0,
                 text_dim: int = 0, objective: str = "velocity"):
        if num_classes < 0:
            raise DDMError(f"num_classes must be >= 0, got {num_classes}")
        self.model = model if objective == "velocity" else AsVelocity(model, objective)
        self.num_classes = num_classes
        self.text_dim = int(text_dim or 0)
        self.cfg_scale = float(cfg_scale)
        self.forward_samples = 0  # samples through the model, CFG's doubled passes included

    @property
    def null_class(self) -> int:
        return self.num_classes

    def __call__(self, x: Tensor, t: Tensor | float, y: Conditioning = None) -> Tensor:
        b = x.shape[0]
        t = broadcast_t(t, b, x.dtype, x.device)
        cond = Cond.of(y)
        null = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
        labels = null if cond.y is None or self.num_classes == 0 else cond.y.to(device=x.device, dtype=torch.long)
        if labels.shape != (b,):
            raise DDMError(f"class labels must have shape ({b},), got {tuple(labels.shape)}")
        text = None
        if self.text_dim and cond.text is not None:
            cond.check(b, self.text_dim)
            text = cond.text.to(x.device)
        conditioned = (labels != self.null_class) | (text is not None)
        if self.cfg_scale == 1.0 or not bool(conditioned.any()):
            self.forward_samples += b
            return self._model(x, t, labels, text, None)
        idx = conditioned.nonzero().squeeze(1)
        self.forward_samples += b + idx.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(idx.shape[0], dtype=torch.bool)])
        v = self._model(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([labels, null[idx]]),
                        None if text is None else torch.cat([text, text[idx]]), drop.to(x.device))
        out, v_u = v[:b].clone(), v[b:]
        out[idx] = v_u + self.cfg_scale * (out[idx] - v_u)
        return out

    def _model(self, x: Tensor, t: Tensor, y: Tensor, text: Tensor | None, drop: Tensor | None) -> Tensor:
        """The model call: text keywords only for a text model (None text: the null text on every row)."""
        if not self.text_dim:
            return self.model(x, t, y)
        return self.model(x, t, y, text=text, text_drop=drop if text is not None else None)


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

    def __call__(self, x: Tensor, t: Tensor | float, y: Conditioning = None) -> Tensor:
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

    def _run(self, k: int, x: Tensor, t: Tensor, y: Conditioning) -> Tensor:
        self.expert_calls += 1
        self.expert_samples += x.shape[0]
        return self.experts[k](x, t, y)


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    """Per-sample weights [B] shaped to multiply a [B, ...] tensor."""
    return w.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
