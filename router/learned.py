"""Learned router: the paper's classifier p(k | x_t, t, y), a small DiT trained with cross-entropy on cluster labels.

Training data are noised samples x_t = (1 - t) x0 + t eps with t ~ U(0, 1) and the cluster label of x0.
Class labels are dropped to the null class with probability 0.1, so the router also works without y.
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
from ddm_node.core.model import DiTBackbone, backbone_flops
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

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits [B, K] for images x [B, C, H, W], times t [B] and labels y [B] (None: the null class)."""
        h, c = self.backbone(x, t, y)
        return self.head(self.norm(torch.cat([h.mean(dim=1), c], dim=1)))


def router_model_config(cfg: RouterConfig, image_size: int, channels: int, num_classes: int) -> ModelConfig:
    """The ModelConfig of a router's backbone: the router's size on the experts' image shape and classes, with
    the patch `cfg.max_patch` allows (`router_patch`)."""
    return ModelConfig(size=cfg.size, image_size=image_size, channels=channels, num_classes=num_classes,
                       patch_size=router_patch(cfg, image_size))


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

    def log_probs(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Normalized log-probabilities [B, len(experts)] in x's dtype; logits of other experts are masked out."""
        p = next(self.net.parameters())
        tt = broadcast_t(t, x.shape[0], torch.float32, p.device)
        yy = None if y is None else y.to(device=p.device, dtype=torch.long)
        logits = self.net(x.to(device=p.device, dtype=p.dtype), tt, yy)[:, self._columns]
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
) -> LearnedRouter:
    """Train a router on images x [N, C, H, W] in [-1, 1] with cluster ids `cluster` [N] (values in `experts`).

    Deterministic for a given `cfg.seed` on CPU (own generator, initialisation under a forked RNG).
    `on_step(step, loss)` is called after every optimizer step. Returns the router in eval mode.
    """
    x, labels, y = _check_inputs(x, cluster, y, num_classes, image_size, channels, experts)
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = RouterNet(router_model_config(cfg, image_size, channels, num_classes), len(experts))
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
        yb = _drop_labels(None if y is None else y[idx], cfg.batch_size, num_classes, gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.steps, cfg.lr)
        logits = net(xt.to(device), t.to(device), yb.to(device))
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    log.info("router trained: %d steps, %d experts", cfg.steps, len(experts))
    return LearnedRouter(net.eval(), list(experts))


def _drop_labels(y: Tensor | None, batch: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """Class labels with a LABEL_DROPOUT share replaced by the null class (all null when there are none)."""
    if y is None or num_classes == 0:
        return torch.full((batch,), num_classes, dtype=torch.long)
    drop = torch.rand(batch, generator=gen) < LABEL_DROPOUT
    return torch.where(drop, torch.full_like(y, num_classes), y)


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
