"""`ddm-node export --format diffusers`: a bundle as a directory diffusers loads and samples from.

    OUT/model_index.json        the pipeline: ["pipeline", "DDMEnsemblePipeline_<shards>"] and its components
    OUT/pipeline.py             remote/pipeline.py (sampling: ddm-node's grid, Euler steps, routing, guidance)
    OUT/expert_k/               config.json + diffusion_pytorch_model.safetensors in DiTTransformer2DModel's layout,
                                ddm_dit.py (DiT's timestep frequencies: weights.py says why)
    OUT/router/                 ddm_router.py + config.json (+ weights): the centroid or the learned router
    OUT/scheduler/              FlowMatchEulerDiscreteScheduler (shift 1: the pipeline hands it ddm-node's grid)
    OUT/vae/                    a latent run's AutoencoderKL, when the bundle's VAE reference is a local directory
                                whose files match it (a hub VAE is named in the model card, not copied)
    OUT/README.md               the model card (card.py)

Loading: `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`. The bundle is only read (verified first),
and OUT appears whole or not at all (staging directory, then rename); an existing OUT is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ddm_node.core.config import RouterChoice
from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import commit_dir, staging_dir, write_atomic
from ddm_node.ensemble.bundle import Bundle, load_bundle
from ddm_node.export.card import model_card
from ddm_node.export.vae import write_vae
from ddm_node.export.weights import dit_config, dit_to_diffusers, router_to_diffusers
from router.centroid import CentroidRouter
from router.learned import LearnedRouter

log = logging.getLogger(__name__)
FORMATS = ("diffusers",)
REMOTE = Path(__file__).parent / "remote"
PIPELINE_MODULE = "pipeline"
PIPELINE_PREFIX = "DDMEnsemblePipeline_"
INSTALL_HINT = "pip install 'ddm-node[latent]'"


def require_diffusers():
    """The diffusers module, or a one-line DDMError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise DDMError(f"export --format diffusers needs diffusers: {INSTALL_HINT}") from None
    return diffusers


def export(bundle_dir: str | Path, out: str | Path, fmt: str = "diffusers", router: RouterChoice = "auto") -> Path:
    """Write the bundle at `bundle_dir` as `fmt` into `out` (which must not exist); returns `out`."""
    if fmt not in FORMATS:
        raise DDMError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise DDMError(f"{out} already exists; export writes a new directory (remove it or pick another --out)")
    diffusers = require_diffusers()
    bundle = load_bundle(bundle_dir)
    _check_exportable(bundle, bundle_dir)
    vae = bundle.plan.vae
    stage = staging_dir(out)
    try:
        index = {"_class_name": [PIPELINE_MODULE, PIPELINE_PREFIX + "_".join(str(k) for k in sorted(bundle.models))],
                 "_diffusers_version": diffusers.__version__}
        shutil.copyfile(REMOTE / "pipeline.py", stage / "pipeline.py")
        for k in sorted(bundle.models):
            index[f"expert_{k}"] = _write_expert(bundle, k, stage / f"expert_{k}")
        routes = bundle.router(router)
        index["router"] = _write_router(routes, bundle, stage / "router")
        index["scheduler"] = _write_scheduler(stage / "scheduler")
        index["vae"] = write_vae(vae, stage / "vae") if vae is not None else [None, None]
        write_atomic(stage / "model_index.json", json.dumps(index, indent=2, sort_keys=True).encode())
        write_atomic(stage / "README.md", model_card(bundle, type(routes).__name__, vae).encode())
        if out.exists():
            raise DDMError(f"{out} appeared while exporting; not replacing it")
        commit_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("exported %s as %s to %s", bundle_dir, fmt, out)
    return out


def _check_exportable(bundle: Bundle, where: str | Path) -> None:
    """The exported pipeline sums velocities over routed experts: refuse what it would sample wrongly."""
    if bundle.distilled_from is not None:
        raise DDMError(f"{where} is a distilled bundle (one student, no router); export takes an ensemble bundle")
    other = {k: o for k, o in bundle.objectives.items() if o != "velocity"}
    if other:
        k = min(other)
        raise DDMError(f"{where}: expert {k} predicts {other[k]}; export --format diffusers takes velocity experts only")


def _write_expert(bundle: Bundle, k: int, folder: Path) -> list[str]:
    from ddm_node.export.remote.ddm_dit import DDMDiTTransformer2DModel

    model = bundle.models[k]
    net = DDMDiTTransformer2DModel(**dit_config(model.cfg))
    net.load_state_dict(dit_to_diffusers(model.state_dict(), model.cfg), strict=True)
    net.save_pretrained(folder)
    shutil.copyfile(REMOTE / "ddm_dit.py", folder / "ddm_dit.py")
    return ["ddm_dit", type(net).__name__]


def _write_router(routes, bundle: Bundle, folder: Path) -> list[str]:
    from ddm_node.export.remote.ddm_router import DDMCentroidRouter, DDMLearnedRouter

    if isinstance(routes, CentroidRouter):
        t = routes.export_tensors()
        c = t["log_py_k"].shape[1] if "log_py_k" in t else 0
        net = DDMCentroidRouter(experts=list(routes.experts), num_components=t["means"].shape[0],
                                dim=t["means"].shape[1], num_classes=c, class_components="classes" in t,
                                curve_points=t["curve_t"].shape[0] if "curve_t" in t else 0)
        net.load_state_dict(t, strict=False)
        absent = set(net.state_dict()) - set(t)  # only the optional parts the stats lack (kept empty)
        if any(net.state_dict()[name].numel() for name in absent):
            raise DDMError(f"centroid router export: missing tensors {sorted(absent)}")
    elif isinstance(routes, LearnedRouter):
        cfg = routes.net.cfg
        net = DDMLearnedRouter(experts=list(routes.experts), columns=routes.columns, num_outputs=routes.net.num_experts,
                               sample_size=cfg.image_size, patch_size=cfg.patch_size, in_channels=cfg.channels,
                               num_attention_heads=cfg.heads, attention_head_dim=cfg.hidden // cfg.heads,
                               num_layers=cfg.depth, num_embeds_ada_norm=cfg.num_classes)
        net.load_state_dict(router_to_diffusers(routes.net.state_dict(), cfg), strict=True)
    else:
        raise DDMError(f"cannot export a {type(routes).__name__}")
    net.save_pretrained(folder)
    shutil.copyfile(REMOTE / "ddm_router.py", folder / "ddm_router.py")
    return ["ddm_router", type(net).__name__]


def _write_scheduler(folder: Path) -> list[str]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder)
    return ["diffusers", "FlowMatchEulerDiscreteScheduler"]


__all__ = ["FORMATS", "export", "require_diffusers"]
