"""DiT (Peebles & Xie) with adaLN-Zero, patch embedding and class conditioning with a null class.

One readable file, after facebookresearch/DiT. The expert predicts the flow-matching velocity
v = eps - x0 at time t in [0, 1]. The null class (index `num_classes`) serves classifier-free
guidance and unconditional models (num_classes = 0 leaves only the null class).

Text (`text_dim` > 0): a pooled text embedding [B, text_dim] is projected by an MLP and added to the
timestep and class embedding, so it conditions every block through adaLN. A learned null text stands in
for rows without text (`text` None, or `text_drop` set): what classifier-free guidance's unconditional
pass uses, trained by `condition_dropout`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddm_node.core.config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def condition_dropout(batch: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Rows [batch] (bool) whose conditions, class label and text together, are replaced by the null ones in
    training, so that the model also learns the unconditional velocity classifier-free guidance needs. The one
    dropout policy of experts (p = model.class_dropout) and the learned router."""
    return torch.rand(batch, generator=gen) < p


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (scaled to [0, 1000] as in DiT) followed by an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated by the conditioning (adaLN-Zero: gates start at 0)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


def sincos_pos_embed(hidden: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [grid*grid, hidden]."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(gy, hidden // 2), embed_1d(gx, hidden // 2)], dim=1).float()


class DiTBackbone(nn.Module):
    """Patchify -> add position, timestep and class conditioning -> DiT blocks. Shared by experts and the router."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.hidden % cfg.heads or cfg.hidden % 4:
            raise ValueError(f"hidden {cfg.hidden} must be divisible by heads {cfg.heads} and by 4")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.x_embed = nn.Conv2d(cfg.channels, cfg.hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.hidden, self.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(cfg.hidden)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, cfg.hidden)  # last row: the null class
        self.text_dim = cfg.text_dim or 0
        if self.text_dim:
            self.text_embed = nn.Sequential(nn.Linear(self.text_dim, cfg.hidden), nn.SiLU(),
                                            nn.Linear(cfg.hidden, cfg.hidden))
            self.null_text = nn.Parameter(torch.zeros(self.text_dim))  # the learned null text of CFG
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads) for _ in range(cfg.depth))

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, text: torch.Tensor | None = None,
                text_drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns tokens [B, grid*grid, hidden] and the conditioning vector c [B, hidden]. `text` [B, text_dim]
        (None: the null text for every row); `text_drop` [B] bool: rows that take the null text instead."""
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(t) + self.y_embed(y)
        if self.text_dim:
            c = c + self.text_embed(self._text(text, text_drop, x.shape[0]))
        elif text is not None:
            raise ValueError("this model has no text conditioning (model.text_dim 0) but was given text")
        for block in self.blocks:
            h = block(h, c)
        return h, c

    def _text(self, text: torch.Tensor | None, drop: torch.Tensor | None, b: int) -> torch.Tensor:
        """[B, text_dim]: the embeddings, the null text where `drop` is set or for every row without `text`."""
        null = self.null_text.expand(b, -1)
        if text is None:
            return null
        if tuple(text.shape) != (b, self.text_dim):
            raise ValueError(f"text must be [{b}, {self.text_dim}], got {tuple(text.shape)}")
        text = text.to(null.dtype)
        return text if drop is None else torch.where(drop.to(text.device)[:, None], null, text)

    def init_weights(self) -> None:
        """DiT's initialisation: xavier linears, zeroed adaLN so every block starts as the identity."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.text_dim:
            nn.init.normal_(self.null_text, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """The expert: velocity v(x_t, t, y) with the same shape as x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = DiTBackbone(cfg)
        self.cfg = self.backbone.cfg
        self.final = FinalLayer(self.cfg.hidden, self.cfg.patch_size, self.cfg.channels)
        self.backbone.init_weights()
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, c, g = self.cfg.patch_size, self.cfg.channels, self.backbone.grid
        h = h.reshape(h.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_drop: torch.Tensor | None = None) -> torch.Tensor:
        h, c = self.backbone(x, t, y, text, text_drop)
        return self.unpatchify(self.final(h, c))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs (2 x multiply-adds) of `DiTBackbone` on one image: patch embedding, the blocks' linear layers
    and attention, and the conditioning (timestep MLP, each block's adaLN), which is per image, not per token, and
    dominates when there are few tokens (a router with one token)."""
    cfg = cfg.resolved()
    n = (cfg.image_size // cfg.patch_size) ** 2
    d = cfg.hidden
    per_block = 2 * n * (3 * d * d + d * d + 8 * d * d) + 2 * 2 * n * n * d + 2 * d * 6 * d
    embed = 2 * n * d * cfg.patch_size**2 * cfg.channels
    timestep = 2 * (256 * d + d * d)  # TimestepEmbedder: 256 frequencies -> d -> d
    text = 2 * ((cfg.text_dim or 0) * d + d * d) if cfg.text_dim else 0  # the text MLP: text_dim -> d -> d
    return float(cfg.depth * per_block + embed + timestep + text)


def flops_per_image(cfg: ModelConfig) -> float:
    """Approximate forward FLOPs of one image through the DiT: the backbone and the final layer (adaLN, linear)."""
    cfg = cfg.resolved()
    n = (cfg.image_size // cfg.patch_size) ** 2
    d = cfg.hidden
    return backbone_flops(cfg) + 2 * d * 2 * d + 2 * n * d * cfg.patch_size**2 * cfg.channels
