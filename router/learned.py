"""Learned router: the paper's classifier p(k | x_t, t, y), a small DiT trained with cross-entropy on cluster labels.

Training data are noised samples x_t = (1 - t) x0 + t eps with t ~ U(0, 1) and the cluster label of x0.
Class labels (and text, for a text-conditioned run: pooled embeddings [N, D] through the backbone's text MLP) are
dropped to the null ones with probability 0.1 (`condition_dropout`), so the router also works without them.
Everything is in memory: the caller hands the images and labels; this module reads no files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddm_node.core.config import ModelConfig, RouterConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.model import DiTBackbone, backbone_flops, condition_dropout
from router.base import Cond, Conditioning
from router.gaussian import broadcast_t

log = logging.getLogger(__name__)

LABEL_DROPOUT = 0.1


class RouterNet(nn.Module):
    """DiT backbone -> [mean-pooled tokens, conditioning c] -> LayerNorm -> Linear -> K logits.

    The conditioning vector c (timestep + class embedding) is concatenated to the pooled tokens so the
    head sees t and y directly, not only through the adaLN modulation (which starts at zero).
    """

    def __init__(self, cfg: ModelConfig, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise DDMError(f"router needs at least one expert, got {num_experts}")
        self.backbone = DiTBackbone(cfg)
        self.cfg = self.backbone.cfg
        self.num_experts = num_experts
        self.norm = nn.LayerNorm(2 * self.cfg.hidden)
        self.head = nn.Linear(2 * self.cfg.hidden, num_experts)
        self.backbone.init_weights()
        nn.init.zeros_(self.head.weight)  # uniform p(k) at the start
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, text: Tensor | None = None,
                text_drop: Tensor | None = None) -> Tensor:
        """Logits [B, K] for images x [B, C, H, W], times t [B], labels y [B] (None: the null class) and pooled text
        [B, D] (None: the null text; `text_drop` [B]: rows that take it)."""
        h, c = self.backbone(x, t, y, text, text_drop)
        return self.head(self.norm(torch.cat([h.mean(dim=1), c], dim=1)))


def router_model_config(cfg: RouterConfig, image_size: int, channels: int, num_classes: int,
                        text_dim: int = 0) -> ModelConfig:
    """The ModelConfig of a router's backbone: the router's size on the experts' image shape, classes and text
    width, with the patch `cfg.max_patch` allows (`router_patch`)."""
    return ModelConfig(size=cfg.size, image_size=image_size, channels=channels, num_classes=num_classes,
                       patch_size=router_patch(cfg, image_size), text_dim=text_dim)


def router_patch(cfg: RouterConfig, image_size: int) -> int:
    """The largest divisor of `image_size` up to `cfg.max_patch`; 0 (the size's own patch) for max_patch 0."""
    cfg.validate()
    if cfg.max_patch == 0:
        return 0
    return max(p for p in range(1, min(cfg.max_patch, image_size) + 1) if image_size % p == 0)


def router_flops_per_image(cfg: ModelConfig, num_experts: int) -> float:
    """Forward FLOPs of a `RouterNet` on one image: its DiT backbone and the head on [pooled tokens, c]."""
    return backbone_flops(cfg) + 2 * 2 * cfg.resolved().hidden * num_experts


def training_share(router_flops: float, expert_flops: float) -> float:
    """The router's share of an ensemble's training FLOPs (router plus every expert)."""
    return router_flops / (router_flops + expert_flops)


class LearnedRouter:
    """log p(k | x_t, t, y) from a RouterNet whose logits are ordered as `experts` (shard ids)."""

    def __init__(self, net: RouterNet, experts: list[int], _columns: list[int] | None = None):
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts):
            raise DDMError(f"router experts must be distinct, got {experts}")
        if _columns is None:
            if len(experts) != net.num_experts:
                raise DDMError(f"router net has {net.num_experts} outputs but {len(experts)} experts were named")
            _columns = list(range(len(experts)))
        self.net = net
        self.experts: list[int] = experts
        self._columns = _columns  # logit column of each entry of `experts`

    @property
    def columns(self) -> list[int]:
        """The net's logit column of each entry of `experts`."""
        return list(self._columns)

    def log_probs(self, x: Tensor, t: Tensor | float, y: Conditioning = None) -> Tensor:
        """Normalized log-probabilities [B, len(experts)] in x's dtype; logits of other experts are masked out.
        `y`: labels or a `Cond`; its text counts when the router was trained with text (else it is ignored)."""
        p = next(self.net.parameters())
        cond = Cond.of(y)
        tt = broadcast_t(t, x.shape[0], torch.float32, p.device)
        yy = None if cond.y is None else cond.y.to(device=p.device, dtype=torch.long)
        text_dim = self.net.backbone.text_dim
        if text_dim and cond.text is not None:
            cond.check(x.shape[0], text_dim)
        text = cond.text.to(device=p.device, dtype=p.dtype) if text_dim and cond.text is not None else None
        logits = self.net(x.to(device=p.device, dtype=p.dtype), tt, yy, text)[:, self._columns]
        return F.log_softmax(logits.double(), dim=1).to(device=x.device, dtype=x.dtype)

    def subset(self, ids: Iterable[int]) -> LearnedRouter:
        """A router over `ids` only: the other logits are dropped and the softmax renormalizes."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            raise DDMError("router subset is empty")
        unknown = [i for i in ids if i not in self.experts]
        if unknown:
            raise DDMError(f"router has no expert {unknown[0]} (it knows {self.experts})")
        cols = [self._columns[self.experts.index(i)] for i in ids]
        return LearnedRouter(self.net, ids, _columns=cols)


def _lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of `base`."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def train_router(
    x: Tensor,
    cluster: Tensor,
    y: Tensor | None,
    num_classes: int,
    image_size: int,
    channels: int,
    experts: list[int],
    cfg: RouterConfig,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    text: Tensor | None = None,
) -> LearnedRouter:
    """Train a router on images x [N, C, H, W] in [-1, 1] with cluster ids `cluster` [N] (values in `experts`)
    and, for a text-conditioned run, pooled text embeddings `text` [N, D].

    Deterministic for a given `cfg.seed` on CPU (own generator, initialisation under a forked RNG).
    `on_step(step, loss)` is called after every optimizer step. Returns the router in eval mode.
    """
    x, labels, y = _check_inputs(x, cluster, y, num_classes, image_size, channels, experts)
    if text is not None and (text.ndim != 2 or text.shape[0] != x.shape[0] or not torch.isfinite(text).all()):
        raise DDMError(f"router text embeddings must be finite [{x.shape[0]}, D], got {tuple(text.shape)}")
    text_dim = 0 if text is None else int(text.shape[1])
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = RouterNet(router_model_config(cfg, image_size, channels, num_classes, text_dim), len(experts))
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    for step in range(cfg.steps):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        x0 = x[idx]
        t = torch.rand(cfg.batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        yb, drop = _drop_conditions(None if y is None else y[idx], text is not None, cfg.batch_size, num_classes, gen)
        tb = None if text is None else text[idx].float().to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.steps, cfg.lr)
        logits = net(xt.to(device), t.to(device), yb.to(device), tb, None if tb is None else drop.to(device))
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    log.info("router trained: %d steps, %d experts", cfg.steps, len(experts))
    return LearnedRouter(net.eval(), list(experts))


def _drop_conditions(y: Tensor | None, text: bool, batch: int, num_classes: int,
                     gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class labels with the rows `condition_dropout` picks (a LABEL_DROPOUT share) replaced by the null class (all
    null when there are none), and those rows (their text takes the null text too). Nothing is drawn for a run
    with neither labels nor text."""
    labeled = y is not None and num_classes > 0
    if not labeled and not text:
        return torch.full((batch,), num_classes, dtype=torch.long), torch.zeros(batch, dtype=torch.bool)
    drop = condition_dropout(batch, LABEL_DROPOUT, gen)
    if not labeled:
        return torch.full((batch,), num_classes, dtype=torch.long), drop
    return torch.where(drop, torch.full_like(y, num_classes), y), drop


def _check_inputs(
    x: Tensor,
    cluster: Tensor,
    y: Tensor | None,
    num_classes: int,
    image_size: int,
    channels: int,
    experts: list[int],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate shapes and ids; return float32 CPU images, label positions in `experts`, int64 y."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, image_size, image_size):
        raise DDMError(f"router data must be [N, {channels}, {image_size}, {image_size}], got {tuple(x.shape)}")
    n = x.shape[0]
    if n < 1:
        raise DDMError("router data is empty")
    if not experts or len(set(experts)) != len(experts):
        raise DDMError(f"router experts must be a non-empty list of distinct ids, got {experts}")
    if cluster.shape != (n,):
        raise DDMError(f"router cluster labels must have shape ({n},), got {tuple(cluster.shape)}")
    lookup = {int(e): i for i, e in enumerate(experts)}
    ids = cluster.tolist()
    bad = [c for c in ids if c not in lookup]
    if bad:
        raise DDMError(f"router cluster label {bad[0]} is not one of the experts {list(experts)}")
    labels = torch.tensor([lookup[c] for c in ids], dtype=torch.long)
    if y is not None:
        if y.shape != (n,):
            raise DDMError(f"router class labels must have shape ({n},), got {tuple(y.shape)}")
        y = y.detach().cpu().long()
        if num_classes > 0 and ((y < 0) | (y > num_classes)).any():
            raise DDMError(f"router class labels must be in [0, {num_classes}]")
    if not torch.isfinite(x).all():
        raise DDMError("router data contains NaN or infinite values")
    return x.detach().cpu().float(), labels, y
