"""The model card (README.md) of an exported ensemble: what run it is, who signed it, how it routes and samples."""

from __future__ import annotations

import math

from ddm_node.data.vae_ref import VaeRef
from ddm_node.ensemble.bundle import Bundle
from ddm_node.export.vae import local_vae

MAX_SCORES = 32


def _scores(index: dict) -> list[tuple[str, float]]:
    """The bundle's scores when its index has a flat `scores` mapping of names to finite numbers (else none)."""
    scores = index.get("scores")
    if not isinstance(scores, dict):
        return []
    return [(k[:64], float(v)) for k, v in sorted(scores.items())[:MAX_SCORES] if isinstance(k, str)
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def model_card(bundle: Bundle, router: str, vae: VaeRef | None) -> str:
    """README.md text: YAML front matter for the hub, then the run, its signers, routing, scores and usage."""
    plan, index = bundle.plan, bundle.index
    experts = {e["shard"]: e for e in index["experts"]}
    c, h, w = plan.shape
    shards = ", ".join(str(k) for k in sorted(bundle.models))
    rows = [("run id (sha256 of plan.json)", f"`{plan.run_id}`"), ("dataset", f"`{plan.dataset}`"),
            ("samples", f"{c} x {h} x {w}" + (" latents" if vae else " pixels in [-1, 1]")),
            ("classes", str(plan.num_classes) if plan.num_classes else "unconditional"),
            ("experts K", f"{len(plan.shards)} planned, {len(bundle.models)} exported (shards {shards})"),
            ("missing shards", ", ".join(map(str, bundle.missing)) or "none"),
            ("router", router), ("default routing", "top1 (each sample follows its most probable expert)"),
            ("expert training steps", str(plan.cfg.train.steps))]
    lines = ["---", "library_name: diffusers", "tags:", "- ddm-node", "- decentralized-diffusion", "- flow-matching",
             "- dit", "---", "", f"# ddm-node ensemble {plan.run_id[:12]}", "",
             "A decentralized diffusion ensemble: experts trained in isolation on clusters of the data, and a router "
             "p(k | x_t, t, y) that picks an expert per sample and step. Exported by `ddm-node export`.", "",
             "| | |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "", "## Signers", "",
             "Each expert is the EMA of its shard's signed checkpoint; the key that signed it (ed25519, hex):", ""]
    for k in sorted(experts):
        e = experts[k]
        lines.append(f"- expert {k} (step {e['step']}): `{e['publisher'] or 'unsigned'}`")
    if isinstance(index.get("router"), dict) and index["router"].get("kind") == "learned":
        lines.append(f"- learned router: `{index['router'].get('publisher') or 'unsigned'}`")
    scores = _scores(index)
    lines += ["", "## Scores", ""]
    lines += [f"- {k}: {v:.6g}" for k, v in scores] or ["The bundle records no scores (`ddm-node eval` measures them)."]
    if vae is not None:
        where = "copied into `vae/`" if local_vae(vae) else "not included: pass it when loading (below)"
        lines += ["", "## VAE", "", f"The experts work in the latent space of `{vae.source}`"
                  + (f" (revision `{vae.revision}`)" if vae.revision else "")
                  + f", scaling factor {vae.scaling_factor:g}, shift {vae.shift_factor or 0:g}; {where}."]
    load_vae = (f', vae=AutoencoderKL.from_pretrained("{vae.source}")' if vae is not None and not local_vae(vae) else "")
    lines += ["", "## Usage", "", "```python", "import torch", "from diffusers import AutoencoderKL, DiffusionPipeline",
              "", f'pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO"{load_vae}, trust_remote_code=True)',
              "images = pipe(batch_size=4, num_inference_steps=32, generator=torch.Generator().manual_seed(0)"
              + (", class_labels=[0, 1, 2, 3]" if plan.num_classes else "") + ").images", "```", "",
              "`routing` (top1, top2, topk, full), `guidance_scale` (classifier-free guidance inside each expert) and "
              "`num_inference_steps` (Euler steps on the grid t = 1 - i/steps) are arguments of the call. "
              "`output_type=\"latent\"` returns the raw sample at t = 0.", "",
              "## Architecture", "",
              "Each `expert_k/` is a DiT in diffusers' `DiTTransformer2DModel` weight layout and config; its class "
              "`DDMDiTTransformer2DModel` (`ddm_dit.py`) differs only in the timestep features, which use DiT's "
              "frequencies exp(-ln(10^4) i/128) where diffusers' DiT uses i/127. The expert takes timestep = 1000 t "
              "and predicts the flow-matching velocity v = noise - data (x_t = (1 - t) data + t noise).", ""]
    return "\n".join(lines)
