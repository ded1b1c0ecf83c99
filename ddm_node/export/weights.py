"""ddm-node's DiT weights in diffusers' `DiTTransformer2DModel` layout.

The architectures agree block for block (patch embedding, adaLN-Zero blocks with the shift/scale/gate order, tanh
GELU MLP of ratio 4, LayerNorm eps 1e-6 without affine, final adaLN layer, unpatchify), with three differences:

1. Names and shapes: our fused `qkv` is diffusers' `to_q`/`to_k`/`to_v`, and our one timestep/class embedder is
   repeated in every diffusers block (`norm1.emb`), so its weights are copied into each block.
2. Position embedding: ours puts the row coordinate's sine-cosine features in the first half of the channels,
   diffusers' (MAE's) the column's. Both are fixed buffers, so the residual stream's channels are permuted instead
   (halves swapped): every weight that writes the stream gets its output rows permuted, every weight that reads it
   its input columns. LayerNorm without affine commutes with a permutation, so the model is the same function.
3. Timestep features: diffusers' DiT uses frequencies exp(-ln(10^4) i / 127), ours exp(-ln(10^4) i / 128). No
   weight change maps one onto the other; `remote/ddm_dit.py` subclasses DiTTransformer2DModel to use ours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddm_node.core.config import ModelConfig


def dit_config(cfg: ModelConfig) -> dict:
    """The `DiTTransformer2DModel` config of a resolved ModelConfig (the null class is diffusers' dropout class)."""
    return {"num_attention_heads": cfg.heads, "attention_head_dim": cfg.hidden // cfg.heads,
            "in_channels": cfg.channels, "out_channels": cfg.channels, "num_layers": cfg.depth,
            "sample_size": cfg.image_size, "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes,
            "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "attention_bias": True, "dropout": 0.0}


def _perm(hidden: int) -> Tensor:
    """Diffusers' stream channel j is our channel perm[j]: the two halves swapped."""
    return torch.cat([torch.arange(hidden // 2, hidden), torch.arange(hidden // 2)])


def _chunk_rows(w: Tensor, n: int, perm: Tensor) -> Tensor:
    """An adaLN output [n * hidden, ...]: each of its n chunks (shift, scale, gate, ...) modulates the stream."""
    return torch.cat([c[perm] for c in w.chunk(n)])


def backbone_to_diffusers(sd: dict[str, Tensor], cfg: ModelConfig, prefix: str = "backbone.") -> dict[str, Tensor]:
    """`DiTBackbone` weights (under `prefix`) as diffusers' `pos_embed.proj` and `transformer_blocks.*`."""
    p = _perm(cfg.hidden)
    out = {"pos_embed.proj.weight": sd[prefix + "x_embed.weight"][p], "pos_embed.proj.bias": sd[prefix + "x_embed.bias"][p]}
    emb = {"timestep_embedder.linear_1": "t_embed.mlp.0", "timestep_embedder.linear_2": "t_embed.mlp.2"}
    for i in range(cfg.depth):
        b, o = f"{prefix}blocks.{i}.", f"transformer_blocks.{i}."
        for theirs, ours in emb.items():
            for kind in ("weight", "bias"):
                out[f"{o}norm1.emb.{theirs}.{kind}"] = sd[f"{prefix}{ours}.{kind}"]
        out[o + "norm1.emb.class_embedder.embedding_table.weight"] = sd[prefix + "y_embed.weight"]
        for kind in ("weight", "bias"):
            out[f"{o}norm1.linear.{kind}"] = _chunk_rows(sd[f"{b}adaLN_modulation.1.{kind}"], 6, p)
        for name, w, bias in zip(("to_q", "to_k", "to_v"), sd[b + "attn.qkv.weight"].chunk(3),
                                 sd[b + "attn.qkv.bias"].chunk(3)):
            out[f"{o}attn1.{name}.weight"], out[f"{o}attn1.{name}.bias"] = w[:, p], bias
        out[o + "attn1.to_out.0.weight"] = sd[b + "attn.proj.weight"][p]
        out[o + "attn1.to_out.0.bias"] = sd[b + "attn.proj.bias"][p]
        out[o + "ff.net.0.proj.weight"], out[o + "ff.net.0.proj.bias"] = sd[b + "mlp.0.weight"][:, p], sd[b + "mlp.0.bias"]
        out[o + "ff.net.2.weight"], out[o + "ff.net.2.bias"] = sd[b + "mlp.2.weight"][p], sd[b + "mlp.2.bias"][p]
    return {k: v.contiguous() for k, v in out.items()}


def dit_to_diffusers(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A `DiT` (expert) state dict as a `DiTTransformer2DModel` state dict."""
    p = _perm(cfg.hidden)
    out = backbone_to_diffusers(sd, cfg)
    out["proj_out_1.weight"] = _chunk_rows(sd["final.adaLN_modulation.1.weight"], 2, p)
    out["proj_out_1.bias"] = _chunk_rows(sd["final.adaLN_modulation.1.bias"], 2, p)
    out["proj_out_2.weight"] = sd["final.linear.weight"][:, p].contiguous()
    out["proj_out_2.bias"] = sd["final.linear.bias"]
    return out


def router_to_diffusers(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A `RouterNet` state dict in `remote/ddm_router.py` `DDMLearnedRouter`'s layout: the pooled tokens (the first
    half of the head's input) are stream channels, so the LayerNorm's affine and the head's columns are permuted."""
    h = cfg.hidden
    p2 = torch.cat([_perm(h), torch.arange(h, 2 * h)])
    out = backbone_to_diffusers(sd, cfg)
    out["norm.weight"], out["norm.bias"] = sd["norm.weight"][p2], sd["norm.bias"][p2]
    out["head.weight"], out["head.bias"] = sd["head.weight"][:, p2].contiguous(), sd["head.bias"]
    return out
