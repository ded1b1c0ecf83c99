"""Typed configuration: dataclasses validated at the edge (YAML files and CLI flags).

Every section is a frozen-free dataclass with defaults; `load_config` reads YAML, rejects unknown keys
and ill-typed values with a one-line `DDMError` naming the field and the file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddm_node.core.errors import DDMError
from ddm_node.core.typed import ABSENT, canonical_json, coerce, config_hash, to_dict
from ddm_node.core.typed import from_dict as _from_dict

# Choices: the CLI derives its flags' choices from these, and `_coerce` checks them in every config.
# clustering features: PCA of pixels, the dataset's own `features`, or an .npy file of encoder features
# (partition.features_path; `ddm-node features` writes one)
Features = Literal["pca", "dataset", "npy"]
TSampling = Literal["uniform", "logit_normal"]
# what an expert predicts under x_t = (1 - t) x0 + t eps: the velocity eps - x0, the noise eps (DDPM-style) or the data
# x0; the ensemble converts every expert's output to velocity (core/objective.py)
Objective = Literal["velocity", "epsilon", "x0"]
# "power": EDM2's power-function EMA, averaging a fixed fraction (train.ema_std) of the steps so far, whatever the
# run's length; "fixed": decay train.ema_decay, warmed up as min(ema_decay, (1 + n) / (10 + n)) after n updates
EmaKind = Literal["power", "fixed"]
Solver = Literal["euler", "heun"]
Routing = Literal["top1", "top2", "topk", "full"]  # router/ensemble.py ROUTINGS implements each
RouterChoice = Literal["auto", "learned", "centroid"]  # "auto": the learned router when the bundle has one




def choices(tp: Any) -> tuple[str, ...]:
    """The values of a Literal choice type, for argparse."""
    return typing.get_args(tp)


# name -> (hidden, depth, heads, patch). router/tiny/small run on a CPU; S/B/XL follow DiT for 32x32x4 latents.
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 4, 4, 2),
    "router": (64, 2, 4, 4),  # the learned router on a CPU: 800 steps x 128 on digits in about 15-20 s
    "small": (128, 6, 4, 2),
    "mnist": (192, 6, 6, 4),
    "S/2": (384, 12, 6, 2),
    "B/2": (768, 12, 12, 2),
    "L/2": (1024, 24, 16, 2),
    "XL/2": (1152, 28, 16, 2),
}


@dataclass
class DataConfig:
    """Which dataset and how much of it is held out for evaluation."""

    dataset: str = "digits"
    holdout_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class PartitionConfig:
    """Features -> k-means -> K shards."""

    experts: int = 4
    features: Features = "pca"
    features_path: str = ""  # features "npy": float [N, F] .npy, one row per dataset sample, read in chunks
    pca_dim: int = 32  # features with more dimensions are projected to this many by PCA before k-means
    fine_clusters: int = 0  # 0: auto (consolidate fine clusters only when the data is large)
    sub_centroids: int = 4  # per-shard sub-centroids published for the centroid router
    seed: int = 0


@dataclass
class ModelConfig:
    """DiT expert. `size` picks hidden/depth/heads/patch from MODEL_SIZES; explicit values override.

    image_size, channels and num_classes left unset (None) are taken from the dataset when the plan is made
    (`data.plan.fit_model`); a value set here pins it, and a pin that contradicts the data is an error.
    """

    size: str = "tiny"
    image_size: int | None = None  # None: the dataset's (square) image size
    channels: int | None = None  # None: the dataset's channels
    num_classes: int | None = None  # None: the dataset's class count (0 when unlabeled); 0: unconditional
    class_dropout: float = 0.1  # condition dropout (labels and text together) that trains the null condition for CFG
    # width of the pooled text embedding the model conditions on: None = the dataset's (0 without text); 0 = none
    text_dim: int | None = field(default=None, metadata={ABSENT: 0})
    hidden: int = 0
    depth: int = 0
    heads: int = 0
    patch_size: int = 0

    def resolved(self) -> ModelConfig:
        """A copy with hidden/depth/heads/patch filled from the named size (the patch shrinks to a divisor of an
        image size the size's patch does not divide, e.g. 7x7 images get patch 1)."""
        if self.size not in MODEL_SIZES:
            raise DDMError(f"model.size: unknown size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}")
        h, d, n, p = MODEL_SIZES[self.size]
        if not self.patch_size and self.image_size:  # the size's patch, or the largest divisor of the image below it
            p = max(q for q in range(1, p + 1) if self.image_size % q == 0)
        return dataclasses.replace(
            self,
            hidden=self.hidden or h,
            depth=self.depth or d,
            heads=self.heads or n,
            patch_size=self.patch_size or p,
        )


@dataclass
class TextConfig:
    """The text encoder a text-conditioned run's embeddings came from (make_plan copies the dataset's text.json), so
    that `sample --prompt` embeds prompts with the same encoder. Empty: the run has no text."""

    encoder: str = ""  # hub id or directory the embeddings were computed with
    sha256: str = ""  # over every file of the encoder (weights, config, tokenizer): data/text.py encoder_sha256
    captions_sha256: str = ""  # the captions file the dataset's embeddings came from
    max_length: int = 0  # tokens per caption (padded and truncated)


@dataclass
class TrainConfig:
    """Flow-matching trainer for one expert."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    ema: EmaKind = "power"
    ema_std: float = 0.05  # "power": relative std of the averaging profile (EDM2's sigma_rel; 0.05-0.1 there)
    ema_decay: float = 0.99  # "fixed" only
    grad_clip: float = 1.0
    grad_accum: int = 1
    warmup_steps: int = 50  # linear lr warmup, in steps; unused when warmup_fraction > 0
    warmup_fraction: float = 0.0  # > 0: the warmup is this fraction of train.steps (scales with the run's length)
    t_sampling: TSampling = "uniform"  # uniform learned 8x8 digits faster here
    objective: Objective = field(default="velocity", metadata={ABSENT: "velocity"})  # the network's target
    seed: int = 0
    checkpoint_every: int = 250
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False  # torch.compile on CUDA only
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    nproc_per_node: int = 1  # >1: DDP over this many processes (GPUs) via torchrun; `start --nproc-per-node`

    def warmup(self) -> int:
        """Steps of linear lr warmup: warmup_fraction of the run's planned steps when set, else warmup_steps."""
        if self.warmup_fraction > 0:
            return max(1, round(self.warmup_fraction * self.steps))
        return self.warmup_steps


@dataclass
class RouterConfig:
    """Learned router: a small DiT-style classifier on (x_t, t, y).

    `max_patch` sets its patch: the largest divisor of the image side up to it. A router only tells K
    clusters apart, so it needs far fewer tokens than an expert that draws every pixel: the default 16 cuts
    8x8 digits into one token, 28x28 images into four (patch 14) and 32x32 latents into four, which keeps its
    training near 5% of an ensemble's FLOPs or below (docs/RESULTS.md). 0 keeps the size's own patch, which is
    what a plan or router artifact written before this field existed used (`ABSENT`)."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    size: str = "router"
    seed: int = 0
    max_patch: int = field(default=16, metadata={ABSENT: 0})

    def validate(self) -> RouterConfig:
        """Range checks (a router artifact's config is checked with these too). Returns self."""
        for ok, msg in ((self.steps >= 0, "router.steps must be >= 0"),
                        (self.batch_size >= 1, "router.batch_size must be >= 1"),
                        (self.lr > 0, "router.lr must be > 0"),
                        (self.max_patch >= 0, "router.max_patch must be >= 0 (0: the router size's own patch)")):
            if not ok:
                raise DDMError(msg)
        return self


@dataclass
class SampleConfig:
    """ODE sampling of the ensemble."""

    steps: int = 32
    solver: Solver = "heun"
    routing: Routing = "top1"
    top_k: int = 2
    cfg_scale: float = 1.0
    router: RouterChoice = "auto"


@dataclass
class SwarmConfig:
    """How islands cooperate: leases, mirroring, announcements, trust. Carried in the plan; the
    timing fields may be overridden per node by `ddm-node start --config` (trusted_keys may not)."""

    lease_ttl: float = 30.0  # a claim expires this long after its last renewal (renewed every ttl/3)
    settle: float = 2.0  # wait between writing a claim and re-reading it
    replicas: int = 2  # mirrors per shard, placed by rendezvous hashing over the live peers
    mirror_interval: float = 5.0  # seconds between mirror sweeps
    heartbeat: float = 5.0  # seconds between peer heartbeats
    announce_ttl: float = 120.0  # DHT expiration of announcements (re-announced every ttl/3)
    trusted_keys: list[str] = field(default_factory=list)  # publisher keys (hex); empty: any valid signature
    router_job: bool = True  # train the learned router once every shard is done
    compress: bool = False  # not read: experts and data packs travel zstd-packed, other kinds plain (fetch.PACKED_KINDS)


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    text: TextConfig = field(default_factory=TextConfig, metadata={ABSENT: dataclasses.asdict(TextConfig())})

    def validate(self) -> Config:
        """Range and choice checks that types alone do not catch. Returns self."""
        checks = [
            (0.0 <= self.data.holdout_fraction < 1.0, "data.holdout_fraction must be in [0, 1)"),
            (self.partition.experts >= 1, "partition.experts must be >= 1"),
            (self.partition.pca_dim >= 1, "partition.pca_dim must be >= 1"),
            (self.partition.sub_centroids >= 1, "partition.sub_centroids must be >= 1"),
            (self.partition.features != "npy" or bool(self.partition.features_path),
             "partition.features 'npy' needs partition.features_path (the CLI: --features npy:PATH)"),
            (self.model.image_size is None or self.model.image_size >= 1, "model.image_size must be >= 1"),
            (self.model.channels is None or self.model.channels >= 1, "model.channels must be >= 1"),
            (self.model.num_classes is None or self.model.num_classes >= 0, "model.num_classes must be >= 0"),
            (0.0 <= self.model.class_dropout < 1.0, "model.class_dropout must be in [0, 1)"),
            (self.model.text_dim is None or 0 <= self.model.text_dim <= 1 << 16, "model.text_dim must be in [0, 65536]"),
            (self.train.steps >= 0, "train.steps must be >= 0"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (0.0 <= self.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
            (0.0 < self.train.ema_std < 0.28, "train.ema_std must be in (0, 0.28) (the power EMA's sigma_rel)"),
            (self.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (0.0 <= self.train.warmup_fraction < 1.0, "train.warmup_fraction must be in [0, 1)"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
            (self.train.nproc_per_node >= 1, "train.nproc_per_node must be >= 1"),
            (self.sample.steps >= 1, "sample.steps must be >= 1"),
            (self.sample.top_k >= 1, "sample.top_k must be >= 1"),
            (self.swarm.lease_ttl > 0, "swarm.lease_ttl must be > 0"),
            (0 <= self.swarm.settle < self.swarm.lease_ttl, "swarm.settle must be in [0, lease_ttl)"),
            (self.swarm.replicas >= 0, "swarm.replicas must be >= 0"),
            (self.swarm.mirror_interval > 0, "swarm.mirror_interval must be > 0"),
            (self.swarm.heartbeat > 0, "swarm.heartbeat must be > 0"),
            (self.swarm.announce_ttl > 0, "swarm.announce_ttl must be > 0"),
            (all(len(k) == 64 and all(c in "0123456789abcdef" for c in k) for k in self.swarm.trusted_keys),
             "swarm.trusted_keys must be 64-hex Ed25519 public keys (ddm-node keygen prints them)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DDMError(msg)
        self.router.validate()
        for section in dataclasses.fields(self):  # choices set in code (not parsed) are checked too
            part = getattr(self, section.name)
            for name, tp in typing.get_type_hints(type(part)).items():
                if typing.get_origin(tp) is Literal:
                    coerce(getattr(part, name), tp, f"{section.name}.{name}")
        self.model.resolved()
        return self


def parse_set(text: str) -> tuple[str, Any]:
    """One `--set SECTION.KEY=VALUE`: the key and its value, parsed as YAML and typed like the config file
    (`--set model.image_size=null` unsets a pin). DDMError naming the flag for an unknown key or a bad value."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    section, dot, name = key.partition(".")
    if not eq or not dot or not section or not name:
        raise DDMError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. --set train.steps=200")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise DDMError(f"--set {key}: invalid value {raw!r}: {str(exc).splitlines()[0]}") from None
    sections = typing.get_type_hints(Config)
    if section not in sections:
        raise DDMError(f"--set {key}: unknown section '{section}' (known: {', '.join(sorted(sections))})")
    fields = typing.get_type_hints(sections[section])
    if name not in fields:
        raise DDMError(f"--set {key}: unknown key '{name}' in {section} (known: {', '.join(sorted(fields))})")
    try:
        return key, coerce(value, fields[name], key)
    except DDMError as exc:
        raise DDMError(f"--set {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                sets: Sequence[str] = (), base: Config | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides like {"train.steps": 100} (None: not given),
    then `--set KEY=VALUE` strings (`parse_set`; applied last, None included), and validate. `base`: the config
    the file's keys and the overrides change (default: the built-in defaults), e.g. a plan's for `distill`."""
    values: dict = to_dict(base) if base is not None else {}
    source = "defaults"
    if path is not None:
        import yaml  # imported here so that model and trainer code runs on machines without pyyaml

        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise DDMError(f"cannot read config {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise DDMError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise DDMError(f"{path}: top level must be a mapping of sections")
        for section, part in loaded.items():  # key by key over `base`'s sections
            both = isinstance(part, dict) and isinstance(values.get(section), dict)
            values[section] = {**values[section], **part} if both else part
    given = [(k, v) for k, v in (overrides or {}).items() if v is not None] + [parse_set(text) for text in sets]
    for dotted, value in given:
        section, _, key = dotted.partition(".")
        if not isinstance(values.setdefault(section, {}), dict):
            raise DDMError(f"{source}: section '{section}' must be a mapping")
        values[section][key] = value
    return from_dict(values, Config, f"{source} with --set" if sets else source)


def from_dict(values: dict, cls: type = Config, source: str = "config", saved: bool = False) -> Any:
    """`typed.from_dict` with the run's `Config` as the default type."""
    return _from_dict(values, cls, source, saved)


__all__ = ["ABSENT", "Config", "canonical_json", "config_hash", "from_dict", "load_config", "parse_set", "to_dict"]
