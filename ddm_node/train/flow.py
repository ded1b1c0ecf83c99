"""Flow matching: x_t = (1 - t) x0 + t eps (data at t=0, noise at t=1); the network predicts v = eps - x0."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddm_node.core.errors import DDMError

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


def flow_matching_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor | None,
                       t: torch.Tensor, eps: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
    """Mean squared error between model(x_t, t, y, **cond) and the target velocity eps - x0 (computed in float32);
    `cond`: a text model's `text` and `text_drop`."""
    v = model(interpolate(x0, t, eps), t, y, **cond)
    return F.mse_loss(v.float(), (eps - x0).float())
