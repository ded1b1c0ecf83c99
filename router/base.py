"""The router interface: p(k | x_t, t, y) over a set of experts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import Tensor


class Router(Protocol):
    """What the ensemble needs of a router (CentroidRouter, LearnedRouter)."""

    experts: list[int]  # expert (shard) ids, the columns of log_probs

    def log_probs(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """log p(k | x_t, t, y) as [B, len(experts)]."""
        ...

    def subset(self, ids: Iterable[int]) -> Router:
        """The router renormalized over the experts `ids` (the exact posterior of the data they cover)."""
        ...
