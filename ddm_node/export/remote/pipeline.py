"""The diffusers pipeline of a ddm-node ensemble: K experts, a router and a flow-matching Euler scheduler.

Written by `ddm-node export`; load the exported directory with

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    images = pipe(batch_size=4, class_labels=[1, 2, 3, 4], num_inference_steps=32).images

Sampling integrates dx/dt = v(x, t, y) from noise at t = 1 to data at t = 0 on the uniform grid
t_i = 1 - i / steps (ddm-node's `router/sampler.py` grid, handed to the scheduler as its sigmas), one Euler step
each. The velocity is the routed mixture of the experts' velocities, ddm-node's `EnsembleVelocity`: the router gives
log p(k | x_t, t, y); "top1" sends each sample to its most probable expert, "top2"/"topk" weight each sample's k best
(renormalized), "full" weights every expert. Classifier-free guidance is applied inside each expert, before the
routing. A latent run decodes through the `vae` component: images = vae.decode(x / scaling + shift).

diffusers builds a pipeline's components from its __init__ signature, and an ensemble has as many expert components
as it has experts, so the class named in model_index.json (`DDMEnsemblePipeline_0_1_3`: experts of shards 0, 1, 3)
is made on first access by this module's `__getattr__`.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

PREFIX = "DDMEnsemblePipeline_"
TOPK = {"top1": 1, "top2": 2}


class DDMEnsemblePipeline(DiffusionPipeline):
    """A ddm-node ensemble: `expert_k` components (k: shard ids), `router`, `scheduler`, optional `vae`."""

    _optional_components = ["vae"]

    def __init__(self, scheduler, router, vae=None, **experts):
        super().__init__()
        shards = sorted(int(name.split("_", 1)[1]) for name in experts)
        if list(router.config.experts) != shards:
            raise ValueError(f"router routes between experts {list(router.config.experts)}, the pipeline has {shards}")
        self.shards = shards
        self.register_modules(scheduler=scheduler, router=router, vae=vae, **experts)

    def expert(self, k: int):
        return getattr(self, f"expert_{k}")

    def _expert_velocity(self, k: int, x, t, y, scale: float):
        """v_k(x, t, y) with classifier-free guidance v_u + s (v_c - v_u) for samples whose label is not null."""
        model = self.expert(k)
        null = model.config.num_embeds_ada_norm
        cond = y != null
        if scale == 1.0 or not bool(cond.any()):
            return model(x, timestep=t * 1000.0, class_labels=y).sample
        idx = cond.nonzero().squeeze(1)
        nulls = torch.full_like(y[idx], null)
        v = model(torch.cat([x, x[idx]]), timestep=torch.cat([t, t[idx]]) * 1000.0,
                  class_labels=torch.cat([y, nulls])).sample
        out, v_u = v[: x.shape[0]].clone(), v[x.shape[0]:]
        out[idx] = v_u + scale * (out[idx] - v_u)
        return out

    def velocity(self, x, t, y, guidance_scale: float = 1.0, routing: str = "top1", top_k: int = 2):
        """The ensemble's velocity [B, C, H, W] at x [B, C, H, W], t [B] (float32 in [0, 1]), labels y [B]."""
        if len(self.shards) == 1:
            return self._expert_velocity(self.shards[0], x, t, y, guidance_scale)
        logp = self.router.log_probs(x, t, y)
        out = torch.zeros_like(x)
        if routing == "full":
            weights = logp.exp()
            for i, k in enumerate(self.shards):
                out = out + weights[:, i].to(x.dtype).view(-1, 1, 1, 1) * self._expert_velocity(k, x, t, y,
                                                                                               guidance_scale)
            return out
        if routing not in (*TOPK, "topk"):
            raise ValueError(f"unknown routing {routing!r}; choose one of top1, top2, topk, full")
        n = min(TOPK.get(routing, top_k), len(self.shards))
        top_logp, top_idx = logp.topk(n, dim=1)
        top_w = torch.softmax(top_logp, dim=1)
        for i in top_idx.unique().tolist():
            rows, slot = (top_idx == i).nonzero(as_tuple=True)
            v = self._expert_velocity(self.shards[i], x[rows], t[rows], y[rows], guidance_scale)
            if n == 1:
                out[rows] = v
            else:
                out.index_add_(0, rows, top_w[rows, slot].to(v.dtype).view(-1, 1, 1, 1) * v)
        return out

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int = 32,
                 guidance_scale: float = 1.0, routing: str = "top1", top_k: int = 2, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True):
        """Sample `batch_size` images (or as many as `class_labels`). output_type: "pil", "np" or "pt" (images in
        [0, 1]), or "latent" (the raw sample x at t = 0: latents, or pixels in [-1, 1] unclamped)."""
        first = self.expert(self.shards[0]).config
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            batch_size = labels.shape[0]
        else:
            labels = torch.full((batch_size,), first.num_embeds_ada_norm, dtype=torch.long)
        shape = (batch_size, first.in_channels, first.sample_size, first.sample_size)
        x = (latents.to(device=self.device, dtype=torch.float32) if latents is not None
             else randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32))
        y = labels.to(self.device)
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1].tolist()
        self.scheduler.set_timesteps(sigmas=grid, device=self.device)
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = self.scheduler.sigmas[i].to(torch.float32).expand(batch_size).clone()
            v = self.velocity(x, t, y, guidance_scale, routing, top_k)
            x = self.scheduler.step(v, timestep, x, return_dict=False)[0]
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                x = self.vae.decode(x / self.vae.config.scaling_factor + shift).sample
            images = (x.clamp(-1, 1) + 1) / 2
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


@functools.cache
def ensemble_pipeline(shards: tuple[int, ...]) -> type:
    """The `DDMEnsemblePipeline` subclass whose __init__ names one `expert_k` component per shard in `shards`."""

    def __init__(self, scheduler, router, vae=None, **experts):
        DDMEnsemblePipeline.__init__(self, scheduler, router, vae, **experts)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter(name, kind) for name in ("self", "scheduler", "router")]
        + [inspect.Parameter(f"expert_{k}", kind) for k in shards]
        + [inspect.Parameter("vae", kind, default=None)])
    name = PREFIX + "_".join(str(k) for k in shards)
    return type(name, (DDMEnsemblePipeline,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name: str):
    """`DDMEnsemblePipeline_<k>_<k>...`: the pipeline class of an ensemble of those shards (PEP 562)."""
    ids = name[len(PREFIX):].split("_") if name.startswith(PREFIX) else []
    if ids and all(i.isdigit() and len(i) <= 6 for i in ids) and len(set(ids)) == len(ids):
        return ensemble_pipeline(tuple(sorted(int(i) for i in ids)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
