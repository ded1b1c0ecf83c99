"""What a run's plan allows a peer's artifact to be, in one place: the files of each kind, the most bytes each
may declare, and the model configs inside them.

The verified fetch (exchange/fetch.py) checks a signed manifest against these rules before it downloads a byte
(mirror, resume, assembly and done checks all go through it), and the loaders compare an artifact's config.json
with the plan's before they build a model from it. Sizes are the tensor bytes the plan's model config implies
(models built on torch's meta device: no memory is allocated, whatever the size), plus `MARGIN` for safetensors
headers; nothing of ours is larger, and a manifest that declares more is refused whoever signed it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ddm_node.core.config import MODEL_SIZES, ModelConfig, to_dict
from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import Manifest
from ddm_node.core.model import DiT
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import run_config_hash
from router.learned import RouterNet, router_model_config
from router.stats import max_values

MARGIN = 1 << 20  # bytes on top of the tensor data of every safetensors file (headers: names, shapes, offsets)
CONFIG_BYTES = 64 << 10  # a config.json (ours are a few hundred bytes)
RNG_BYTES = 64 << 10  # the random generator states a training state carries (about 10 KiB on CPU and CUDA)
FLOAT64 = 8


def _tensor_bytes(module: torch.nn.Module) -> tuple[int, int, int]:
    """Bytes of the state dict, bytes of the parameters and their number, of a module (built on the meta device)."""
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    params = list(module.parameters())
    return state, sum(p.numel() * p.element_size() for p in params), len(params)


def _inference_bytes(module: torch.nn.Module) -> int:
    """Bytes of the state dict as an expert publishes it (`ckpt.inference_tensors`: floating tensors in bf16)."""
    return sum(t.numel() * t.element_size() for t in ckpt.inference_tensors(module.state_dict()).values())


@dataclass(frozen=True)
class ArtifactRules:
    """The plan's rules for artifacts: `files[kind][name]` is the most bytes file `name` of a `kind` artifact may
    declare (the kind has exactly these files), `model` and `router` the configs its config.json must hold."""

    run_id: str
    model: ModelConfig  # every expert's and training state's model config (resolved)
    router: ModelConfig  # the learned router's backbone (resolved)
    num_shards: int
    steps: int  # the plan's step count: a shard is done with a checkpoint at it
    config_hash: str  # what every checkpoint of the run records (`run_config_hash`)
    files: dict[str, dict[str, int]]

    @classmethod
    def for_plan(cls, plan: Plan) -> ArtifactRules:
        model = plan.cfg.model.resolved()
        c, h, w = (int(s) for s in plan.shape)
        k = len(plan.shards)
        router = router_model_config(plan.cfg.router, h, c, model.num_classes, model.text_dim or 0).resolved()
        with torch.device("meta"):
            expert = DiT(model)
            expert_state, expert_params, n_params = _tensor_bytes(expert)
            inference = _inference_bytes(expert)
            router_state, _, _ = _tensor_bytes(RouterNet(router, k))
        # model and EMA state dicts, AdamW's two moments per parameter and its step counter, the RNG states
        state = 2 * expert_state + 2 * expert_params + 4 * n_params + RNG_BYTES
        largest = max(len(s.ids) for s in plan.shards)
        stats = FLOAT64 * max_values(c * h * w, max(1, plan.cfg.partition.sub_centroids), model.num_classes, largest)
        files = {
            ckpt.EXPERT: {ckpt.MODEL_FILE: inference + MARGIN, ckpt.CONFIG_FILE: CONFIG_BYTES},
            ckpt.STATE: {ckpt.STATE_FILE: state + MARGIN, ckpt.CONFIG_FILE: CONFIG_BYTES},
            ckpt.STATS: {ckpt.STATS_FILE: stats + MARGIN},
            "router": {ckpt.MODEL_FILE: router_state + MARGIN, ckpt.CONFIG_FILE: CONFIG_BYTES},
        }
        return cls(plan.run_id, model, router, k, plan.cfg.train.steps, run_config_hash(plan), files)

    def size_problem(self, m: Manifest) -> str | None:
        """Why a signed manifest's files are not what this plan allows for its kind, or None: a file the kind does
        not have or lacks, an empty file, or one declaring more bytes than the plan's model can fill."""
        allowed = self.files.get(m.kind)
        if allowed is None:
            return f"a {m.kind} is not an artifact peers exchange"
        for name, entry in sorted(m.files.items()):
            if name not in allowed:
                return f"file {name[:40]!r} is not part of a {m.kind}"
            if entry.size == 0:
                return f"{name} is empty"
            if entry.size > allowed[name]:
                return (f"{name} declares {entry.size} bytes; this run's {m.kind} holds at most {allowed[name]} "
                        f"({mib(allowed[name])})")
        missing = sorted(set(allowed) - set(m.files))
        return f"it lacks {missing[0]}" if missing else None


# What a distilled student may choose for itself (ensemble/distill.py); the rest of its config is the plan's.
STUDENT_FIELDS = ("size", "hidden", "depth", "heads", "patch_size", "class_dropout")
_LARGEST = dict(zip(("hidden", "depth", "heads"), (max(s[i] for s in MODEL_SIZES.values()) for i in range(3))))


def student_rules(plan: Plan, cfg: ModelConfig, source: str) -> ArtifactRules:
    """The rules for a student distilled from this plan's ensemble, whose (resolved) model config is `cfg`: the
    plan's model but for `STUDENT_FIELDS`, no wider, deeper or with more heads than the largest named size, and a
    patch that divides the images. DDMError naming `source` and the problem otherwise."""
    want = dataclasses.replace(plan.cfg.model.resolved(), **{f: getattr(cfg, f) for f in STUDENT_FIELDS})
    ckpt.check_model_config(cfg, want, source)
    for name, most in _LARGEST.items():
        if getattr(cfg, name) > most:
            raise DDMError(f"{source}: model {name} {getattr(cfg, name)} is beyond the largest model size's ({most})")
    if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size:
        raise DDMError(f"{source}: model patch_size {cfg.patch_size} does not divide the {cfg.image_size}px images")
    try:
        return ArtifactRules.for_plan(dataclasses.replace(plan, config={**plan.config, "model": to_dict(cfg)}))
    except ValueError as exc:  # the DiT refuses the shape (hidden not a multiple of heads)
        raise DDMError(f"{source}: {exc}") from None


def mib(n: int) -> str:
    """A byte count for a message: MiB with one decimal."""
    return f"{n / (1 << 20):.1f} MiB"
