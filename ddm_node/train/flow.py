"""Flow matching: x_t = (1 - t) x0 + t eps (data at t=0, noise at t=1); the network predicts v = eps - x0, or the
noise or the data (`train.objective`, core/objective.py), or a teacher's velocity (distillation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddm_node.core.errors import DDMError
from ddm_node.core.objective import from_velocity, training_target

T_MODES = ("uniform", "logit_normal")


def sample_t(n: int, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` times in (0, 1) on the generator's device: "uniform", or "logit_normal" = sigmoid(N(0, 1)).

    Logit-normal (SD3) puts more weight on the middle times, where the velocity is hardest to predict.
    """
    device = generator.device if generator is not None else None
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    raise DDMError(f"unknown t sampling mode {mode!r}; choose one of {', '.join(T_MODES)}")


def interpolate(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps with t [B] broadcast over the image dimensions."""
    tb = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * eps


Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def flow_matching_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor | None,
                       t: torch.Tensor, eps: torch.Tensor, objective: str = "velocity",
                       teacher: Teacher | None = None, **cond: torch.Tensor) -> torch.Tensor:
    """Mean squared error (in float32) between model(x_t, t, y, **cond) and the `objective`'s target: eps - x0, eps
    or x0. `cond`: a text model's `text` and `text_drop`.

    With a `teacher` (distillation) the target is the teacher's velocity at the same (x_t, t, y), expressed in the
    objective (`from_velocity`), computed without gradients and outside any autocast (a float32 target). Students of
    text-conditioned ensembles are not built (distill refuses them), so the teacher sees no text."""
    x_t = interpolate(x0, t, eps)
    pred = model(x_t, t, y, **cond)
    if teacher is None:
        return F.mse_loss(pred.float(), training_target(objective, x0, eps).float())
    with torch.no_grad(), torch.autocast(device_type=x_t.device.type, enabled=False):
        x32 = x_t.float()
        target = from_velocity(objective, teacher(x32, t.float(), y).float(), x32, t.float())
    return F.mse_loss(pred.float(), target)
