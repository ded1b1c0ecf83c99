"""A ddm-node expert in diffusers: `DiTTransformer2DModel` with DiT's own timestep frequencies.

Written by `ddm-node export` into each expert's folder and loaded by diffusers (trust_remote_code). The weights are
diffusers' DiT layout exactly; the only difference is the sinusoidal timestep features: ddm-node (like the DiT
paper's code) uses the frequencies exp(-ln(10^4) i / 128), diffusers' DiT exp(-ln(10^4) i / 127)
(`downscale_freq_shift=1`). No weight change can turn one set of features into the other, so this class sets the
shift to 0. Loaded as a plain `DiTTransformer2DModel` the weights give a slightly different (wrong) velocity.
The model takes `timestep = 1000 t` for flow-matching time t in [0, 1] and predicts v = noise - data.
"""

from __future__ import annotations

import inspect

from diffusers import DiTTransformer2DModel


def use_dit_frequencies(blocks) -> None:
    """Timestep features exp(-ln(10^4) i / half) in every block's conditioning embedder (DiT's, not diffusers')."""
    for block in blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


class DDMDiTTransformer2DModel(DiTTransformer2DModel):
    """`DiTTransformer2DModel` (same config, same weight names) with DiT's timestep frequencies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_dit_frequencies(self.transformer_blocks)

    # diffusers reads a model's config keys from its __init__ signature: keep DiTTransformer2DModel's
    __init__.__signature__ = inspect.signature(DiTTransformer2DModel.__init__)
