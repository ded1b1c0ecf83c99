"""What a network predicts under the flow x_t = (1 - t) x0 + t eps, and its conversion to the velocity v = eps - x0.

An expert may be trained to predict the velocity, the noise eps (DDPM-style) or the data x0 (`train.objective`).
Given x_t and t, any one of them determines the others:

    eps = x_t + (1 - t) v           x0 = x_t - t v                  (from the velocity: exact for every t)
    v = (eps - x_t) / (1 - t)       v = (x_t - x0) / t              (to the velocity)

The conversions to velocity are singular where the prediction carries no information about the velocity: at t = 1
x_t is the noise itself, so a noise prediction says nothing about x0; at t = 0 x_t is the data, so an x0
prediction says nothing about eps. Both samplers evaluate those ends (t = 1 first; Heun also t = 0 last), so the
denominator is clamped to at least `EDGE`: within EDGE of its singular end such an expert's velocity is shrunk by
(1 - t) / EDGE (epsilon) or t / EDGE (x0), and is exact everywhere else. Every conversion is affine in the
prediction with the same coefficients for the conditional and unconditional passes, so classifier-free guidance
gives the same result in either space, and routing weights velocities whatever the experts predict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddm_node.core.config import Objective, choices
from ddm_node.core.errors import DDMError

OBJECTIVES: tuple[str, ...] = choices(Objective)
EDGE = 0.02  # the smallest denominator t or 1 - t a conversion to velocity divides by


def _tb(t: Tensor | float, like: Tensor) -> Tensor:
    """t as [B, 1, ...] (or a scalar tensor) in `like`'s dtype and device, to broadcast over a batch."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise DDMError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def training_target(objective: str, x0: Tensor, eps: Tensor) -> Tensor:
    """What a network trained with `objective` regresses at x_t = (1 - t) x0 + t eps."""
    _check(objective)
    return {"velocity": lambda: eps - x0, "epsilon": lambda: eps, "x0": lambda: x0}[objective]()


def from_velocity(objective: str, v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """The `objective`'s prediction that corresponds to velocity `v` at (x_t, t) (exact for every t)."""
    _check(objective)
    tb = _tb(t, x_t)
    return {"velocity": lambda: v, "epsilon": lambda: x_t + (1 - tb) * v, "x0": lambda: x_t - tb * v}[objective]()


def to_velocity(objective: str, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """The velocity that a prediction of `objective` at (x_t, t) stands for (denominators clamped at `EDGE`)."""
    _check(objective)
    if objective == "velocity":
        return pred
    tb = _tb(t, x_t)
    if objective == "epsilon":
        return (pred - x_t) / (1 - tb).clamp(min=EDGE)
    return (x_t - pred) / tb.clamp(min=EDGE)


class AsVelocity:
    """A model `model(x, t, y)` trained with `objective`, called as a velocity model (what the ensemble weights)."""

    def __init__(self, model: Callable[..., Tensor], objective: str):
        _check(objective)
        self.model, self.objective = model, objective

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Tensor | None) -> Tensor:
        return to_velocity(self.objective, self.model(x, t, y, **cond), x, t)
