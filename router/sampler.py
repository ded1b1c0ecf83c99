"""ODE samplers for dx/dt = v(x, t, y), integrated from t = 1 (noise) to t = t_end (data at 0).

Uniform time grid. Euler: one velocity call per step. Heun (explicit trapezoid): two calls per step,
including the last one. The correction is kept on the final step because the velocity
parameterization v = eps - x0 is finite at t = 0 (the ideal v(x, 0) is -x + E[eps] = -x), unlike the
denoiser form (x - D(x)) / sigma that makes Karras-style samplers skip it; a trained network is
evaluated at t = 0, inside its training range [0, 1]. Use t_end > 0 to stop short of 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ddm_node.core.errors import DDMError

SOLVERS = ("euler", "heun")


def time_grid(steps: int, t_end: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """The steps + 1 times 1 = t_0 > t_1 > ... > t_steps = t_end."""
    return torch.linspace(1.0, t_end, steps + 1, dtype=dtype)


def sample(
    velocity: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    noise: Tensor,
    steps: int,
    solver: str = "heun",
    y: Tensor | None = None,
    t_end: float = 0.0,
) -> Tensor:
    """Integrate from `noise` at t = 1 to t = t_end with `steps` uniform steps; returns x at t_end.

    `velocity(x, t, y)` gets t as a [B] tensor in x's dtype. Runs under torch.inference_mode.
    Euler costs `steps` velocity calls, Heun 2 * `steps`.
    """
    if solver not in SOLVERS:
        raise DDMError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DDMError(f"sampling steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= t_end < 1.0:
        raise DDMError(f"t_end must be in [0, 1), got {t_end}")
    if not noise.is_floating_point():
        raise DDMError(f"noise must be a floating-point tensor, got {noise.dtype}")
    grid = time_grid(steps, t_end).tolist()
    b = noise.shape[0]
    with torch.inference_mode():
        x = noise.clone()
        for t, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t  # negative: time runs backwards
            tb = torch.full((b,), t, dtype=x.dtype, device=x.device)
            d = velocity(x, tb, y)
            x_euler = x + dt * d
            if solver == "euler":
                x = x_euler
                continue
            tn = torch.full((b,), t_next, dtype=x.dtype, device=x.device)
            x = x + dt * 0.5 * (d + velocity(x_euler, tn, y))
    return x
