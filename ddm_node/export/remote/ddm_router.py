"""The router of a ddm-node ensemble in diffusers: log p(k | x_t, t, y) over the exported experts.

Written by `ddm-node export` into the pipeline's `router/` folder and loaded by diffusers (trust_remote_code). It
needs diffusers and torch only. Two kinds, as in ddm-node (router/centroid.py, router/learned.py):

- `DDMCentroidRouter`: no weights, the clusters' Gaussian statistics. Component j of cluster k, N(mu, diag var) on
  clean data, is N((1 - t) mu, (1 - t)^2 var + t^2) at time t, and
  log p(k | x_t, t, y) = log pi_k + log p(y | k) + log p(x_t | k, y) / T(t) - Z, with p(x_t | k, y) the mixture of
  the cluster's components of class y (p(x_t | k) where it has none) and T(t) the calibration temperature.
  Without y (or with the null class) the class terms drop out.
- `DDMLearnedRouter`: the learned classifier: a DiT backbone (diffusers blocks, DiT's timestep frequencies) whose
  mean-pooled tokens and conditioning vector go through LayerNorm and a linear head.

`experts` (config) are the shard ids of the columns `log_probs` returns, in order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from torch import nn

_CHUNK_ELEMENTS = 1 << 22  # bounds the [b, M, D] float64 temporaries to about 32 MiB


def _times(t, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=dtype, device=device)
    return t.reshape(()).expand(batch).clone() if t.numel() == 1 else t.reshape(batch)


class DDMCentroidRouter(ModelMixin, ConfigMixin):
    """p(k | x_t, t[, y]) from per-cluster diagonal Gaussian mixtures (float64 buffers, no trainable weights)."""

    @register_to_config
    def __init__(self, experts: list[int], num_components: int, dim: int, num_classes: int = 0,
                 class_components: bool = False, curve_points: int = 0):
        super().__init__()
        k, m = len(experts), num_components
        f64 = torch.float64
        self.register_buffer("log_pi", torch.zeros(k, dtype=f64))
        self.register_buffer("owner", torch.zeros(m, dtype=torch.int64))
        self.register_buffer("log_w", torch.zeros(m, dtype=f64))
        self.register_buffer("means", torch.zeros(m, dim, dtype=f64))
        self.register_buffer("variances", torch.ones(m, dim, dtype=f64))
        self.register_buffer("log_py_k", torch.zeros(k, num_classes, dtype=f64))  # [K, 0]: not class-aware
        self.register_buffer("classes", torch.full((m if class_components else 0,), -1, dtype=torch.int64))
        self.register_buffer("log_class_w", torch.zeros(k, num_classes if class_components else 0, dtype=f64))
        self.register_buffer("curve_t", torch.zeros(curve_points, dtype=f64))  # T(t) through these points
        self.register_buffer("curve_temp", torch.ones(curve_points, dtype=f64))

    def temperature(self, t: torch.Tensor) -> torch.Tensor:
        """T(t) [B] (float64): piecewise linear through the curve's points, constant beyond its ends; 1 without."""
        xs, ys = self.curve_t, self.curve_temp
        if xs.shape[0] == 0:
            return torch.ones_like(t)
        if xs.shape[0] == 1:
            return ys[0].expand_as(t).clone()
        tt = t.clamp(float(xs[0]), float(xs[-1]))
        i = torch.searchsorted(xs, tt).clamp(1, xs.shape[0] - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tt - x0) / (x1 - x0)

    def _density(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log N(x_b; (1-t_b) mu_m, (1-t_b)^2 var_m + t_b^2) [B, M], chunked over the batch."""
        step = max(1, _CHUNK_ELEMENTS // max(1, self.means.numel()))
        out = []
        for i in range(0, x.shape[0], step):
            xb, tb = x[i:i + step], t[i:i + step]
            a = (1.0 - tb)[:, None, None]
            var = a**2 * self.variances[None] + (tb**2)[:, None, None]
            diff = xb[:, None, :] - a * self.means[None]
            out.append(-0.5 * ((diff**2 / var) + var.log()).sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi))
        return torch.cat(out)

    def _per_cluster(self, joint: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.logsumexp(joint[:, self.owner == i], dim=1) for i in range(self.log_pi.shape[0])],
                           dim=1)

    def log_probs(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized log p(k | x_t, t[, y]) [B, K] in x's dtype; a label outside [0, C) counts as no label."""
        b = x.shape[0]
        flat = x.detach().reshape(b, -1).to(torch.float64)
        tt = _times(t, b, torch.float64, x.device)
        joint = self._density(flat, tt) + self.log_w
        log_px = self._per_cluster(joint)
        temp = self.temperature(tt)[:, None]
        out = self.log_pi + log_px / temp
        c = self.log_py_k.shape[1]
        if y is not None and c > 0:
            yy = torch.as_tensor(y, device=x.device).reshape(-1).long()
            known = (yy >= 0) & (yy < c)
            safe = yy.clamp(0, c - 1)
            aware = self.log_pi + self.log_py_k[:, safe].T + self._class_log_px(joint, safe, log_px) / temp
            out = torch.where(known[:, None], aware, out)
        out = out - torch.logsumexp(out, dim=1, keepdim=True)
        return out.to(x.dtype)

    def _class_log_px(self, joint: torch.Tensor, y: torch.Tensor, log_px: torch.Tensor) -> torch.Tensor:
        if self.classes.shape[0] == 0:
            return log_px
        mine = self.classes[None, :] == y[:, None]
        within = self._per_cluster(joint.masked_fill(~mine, float("-inf"))) - self.log_class_w[:, y].T
        return torch.where(torch.isfinite(self.log_class_w[:, y].T), within, log_px)


class DDMLearnedRouter(ModelMixin, ConfigMixin):
    """The learned router: DiT backbone -> [mean-pooled tokens, conditioning] -> LayerNorm -> Linear -> logits.

    `columns`: the logit of each entry of `experts` (a router trained over more shards than were exported keeps
    its head; the softmax runs over the exported experts' columns only)."""

    @register_to_config
    def __init__(self, experts: list[int], columns: list[int], num_outputs: int, sample_size: int, patch_size: int,
                 in_channels: int, num_attention_heads: int, attention_head_dim: int, num_layers: int,
                 num_embeds_ada_norm: int):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=True,
                                  norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6)
            for _ in range(num_layers))
        for block in self.transformer_blocks:  # DiT's timestep frequencies (see ddm_dit.py)
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        self.norm = nn.LayerNorm(2 * inner)
        self.head = nn.Linear(2 * inner, num_outputs)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_outputs] for images x, timesteps 1000 t [B] and labels [B] (null class: num_classes)."""
        h = self.pos_embed(x)
        for block in self.transformer_blocks:
            h = block(h, timestep=timestep, class_labels=class_labels)
        c = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        return self.head(self.norm(torch.cat([h.mean(dim=1), c], dim=1)))

    def log_probs(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized log p(k | x_t, t, y) [B, K] over the exported experts, in x's dtype."""
        p = next(self.parameters())
        tt = _times(t, x.shape[0], torch.float32, p.device)
        if y is None:
            y = torch.full((x.shape[0],), self.config.num_embeds_ada_norm, dtype=torch.long)
        logits = self(x.to(device=p.device, dtype=p.dtype), tt * 1000.0, y.to(device=p.device, dtype=torch.long))
        return F.log_softmax(logits[:, list(self.config.columns)].double(), dim=1).to(device=x.device, dtype=x.dtype)
