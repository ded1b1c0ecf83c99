"""Diagonal Gaussians under the forward process: the one density every centroid-router computation uses.

A component N(mu, diag var) of clean data becomes, under x_t = (1 - t) x0 + t eps,
N((1 - t) mu, (1 - t)^2 var + t^2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddm_node.core.errors import DDMError

_CHUNK_ELEMENTS = 1 << 22  # bounds the [b, M, D] float64 temporaries to about 32 MiB


def component_log_density(x: Tensor, t: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """log N(x_b; (1-t_b) mu_m, (1-t_b)^2 var_m + t_b^2) for every sample b and component m: [B, M].

    `x` [B, D], `t` [B], `means` and `variances` [M, D], all float64 on one device; chunked over B."""
    step = max(1, _CHUNK_ELEMENTS // max(1, means.numel()))
    return torch.cat([_block(x[i:i + step], t[i:i + step], means, variances) for i in range(0, x.shape[0], step)])


def _block(x: Tensor, t: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    a = (1.0 - t)[:, None, None]
    var = a**2 * variances[None] + (t**2)[:, None, None]  # [b, M, D]
    diff = x[:, None, :] - a * means[None]
    return -0.5 * ((diff**2 / var) + var.log()).sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def broadcast_t(t: Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """t as a [batch] tensor; accepts a float, a 0-d tensor, a [1] tensor or a [batch] tensor."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(()).expand(batch).clone()
    if t.ndim != 1 or t.shape[0] != batch:
        raise DDMError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def interp(t: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Piecewise-linear y(t) through the points (xs, ys) (xs increasing), constant beyond the ends: [B]."""
    tt = t.clamp(float(xs[0]), float(xs[-1]))
    i = torch.searchsorted(xs, tt).clamp(1, max(1, xs.shape[0] - 1))
    if xs.shape[0] == 1:
        return ys[0].expand_as(tt).clone()
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (tt - x0) / (x1 - x0)
