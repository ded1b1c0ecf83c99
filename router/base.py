"""The router interface: p(k | x_t, t, y) over a set of experts, and what a sample is conditioned on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ddm_node.core.errors import DDMError


@dataclass(frozen=True)
class Cond:
    """A batch's conditions: class labels y [B] (None: the null class) and pooled text embeddings text [B, D]
    (None: the null text). Routers, the ensemble and `Expert` take a Cond, a bare label tensor or None where they
    take `y`; indexing selects rows of both, as it does of a label tensor."""

    y: Tensor | None = None
    text: Tensor | None = None

    @classmethod
    def of(cls, cond: Conditioning) -> Cond:
        """A Cond from a Cond, a label tensor or None."""
        return cond if isinstance(cond, Cond) else cls(y=cond)

    def __getitem__(self, rows: Tensor) -> Cond:
        return Cond(None if self.y is None else self.y[rows], None if self.text is None else self.text[rows])

    def check(self, b: int, text_dim: int) -> None:
        """DDMError unless the text, when present, is [b, text_dim]."""
        if self.text is not None and tuple(self.text.shape) != (b, text_dim):
            raise DDMError(f"text embeddings must be [{b}, {text_dim}] (the model's text_dim), "
                           f"got {tuple(self.text.shape)}")


Conditioning = Cond | Tensor | None


class Router(Protocol):
    """What the ensemble needs of a router (CentroidRouter, LearnedRouter)."""

    experts: list[int]  # expert (shard) ids, the columns of log_probs

    def log_probs(self, x: Tensor, t: Tensor | float, y: Conditioning = None) -> Tensor:
        """log p(k | x_t, t, y) as [B, len(experts)]; `y` labels or a Cond (routers use what they can see)."""
        ...

    def subset(self, ids: Iterable[int]) -> Router:
        """The router renormalized over the experts `ids` (the exact posterior of the data they cover)."""
        ...
