"""Sample quality at equal training FLOPs: one monolithic expert against ensembles of K = 4 and K = 8 experts.

Everything runs in this process through the library (no daemon): `make_plan` partitions the dataset,
`train_shard` trains each expert, `train_plan_router` the learned router, `write_bundle`/`load_bundle`
make the ensemble, `generate` samples it, and the metrics score it against the plan's held-out split.

Equal FLOPs, two ways to split them (`--split`, the headline; the other is trained too, at the full budget, and
shown side by side; the monolith, K = 1 at batch B for N steps, is the same model in both):
- paper: each of the K experts trains all N steps at batch B / K, as the paper does (its experts and monolith
  train for the same number of steps);
- current: each expert trains N / K steps at batch B.
Either way the experts together see N x B images, the monolith's. Training FLOPs = 3 x `flops_per_image`
(forward + backward) x images seen. The learned router's training FLOPs are counted on top and shown.

Evaluated at several fractions of the budget (for the FD-vs-FLOPs plot: the monolith and top-1 routing with
both routers), and at the full budget with every router (learned, centroid), the chosen routings, the raw
(not averaged) weights beside the EMA, and the other split. Repeated for several seeds; a seed changes the
partition, the training, router and sampling seeds. FD_dom and KID are in the features of the repository's
domain classifier (`ddm_node.ensemble.metrics`, not Inception: FD_dom is not FID). Every ratio to the monolith
comes with a 95% paired bootstrap interval (`ratio_ci`: seeds, held-out rows and sample rows redrawn; the
samples of every configuration share noise and labels, so rows pair).

Run: `python -m bench.quality` (digits, 3 seeds, budget 1600 monolith steps; seeds run in parallel processes,
`--jobs`), `--full` (digits, budget 6000 steps, more samples and sampling steps), `--dataset fashion-mnist`
(needs `apt-get install dataset-fashion-mnist`; a small 28x28 DiT) or `--quick` (1 seed, tiny budget; prints its
section, writes docs only with `--doc`). `--budget`, `--fractions`, `--samples`, `--router-steps`,
`--routings` and `--boot` size a run to the time at hand. Seeds can also run on separate machines
(`--first-seed N --seeds 1 --doc DIR/RESULTS.md`) and be merged with `--from-json DIR*/quality-DATASET.json`.
The printed ratio is the best top-1 ensemble's FD_dom / the monolith's at the full budget, headline split.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench.common import (
    REPO_ROOT,
    RESULTS_MD,
    command_line,
    load_str,
    markdown_table,
    now_str,
    print_ratio,
    section_header,
    write_section,
)
from ddm_node.core.config import SampleConfig, load_config
from ddm_node.core.manifest import write_atomic
from ddm_node.core.model import DiT, flops_per_image
from ddm_node.data.datasets import Dataset, load_dataset
from ddm_node.data.plan import Plan, make_plan
from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, write_bundle
from ddm_node.ensemble.distill import distill, student_config
from ddm_node.ensemble.generate import generate, reference_features, reference_split, save_grid
from ddm_node.ensemble.metrics import Scores, bootstrap_fd, evaluate_features, features
from ddm_node.train.checkpoint import latest_checkpoint, load_expert
from ddm_node.train.expert import train_shard
from ddm_node.train.router_job import train_plan_router
from router.learned import router_model_config

NAME = "bench.quality"
IMG_DIR = REPO_ROOT / "docs" / "img"
DATA_DIR = REPO_ROOT / "docs" / "data"
INTRO = ("# Results\n\nMeasured sample quality of ddm-node ensembles. Each section is written by the script "
         "named in its title; rerun it to refresh the numbers.")
ROUTERS = ("learned", "centroid")
ROUTINGS = ("top1", "top2", "full")

# Per dataset: config overrides on top of the library defaults (a CPU-sized model for each). The EMA (power
# function) and the warmup (a fraction of the run) scale with each run's length, so the monolith, the experts of
# either split and every evaluated fraction of the budget get the same treatment.
DATASETS: dict[str, dict] = {
    "digits": {"model.size": "tiny", "train.batch_size": 64, "train.lr": 0.002, "train.ema": "power",
               "train.ema_std": 0.05, "train.warmup_fraction": 0.02},
    "fashion-mnist": {"model.size": "tiny", "model.image_size": 28, "model.patch_size": 4,
                      "partition.pca_dim": 64, "train.batch_size": 64, "train.lr": 0.001, "train.ema": "power",
                      "train.ema_std": 0.05, "train.warmup_fraction": 0.02, "train.t_sampling": "logit_normal"},
}


SPLITS = ("paper", "current")


@dataclass
class Settings:
    dataset: str
    budget: int  # monolith steps N at batch B
    ks: list[int]
    seeds: list[int]
    fractions: list[float]
    n_samples: int
    sample_steps: int
    router_steps: int
    label: str  # quick / default / full
    split: str = "current"  # the headline split (saved runs from before the paper split were "current")
    compare: bool = False  # also train the other split (at the full budget) and show it side by side
    routings: list[str] = field(default_factory=lambda: list(ROUTINGS))  # evaluated at the full budget
    boot_rounds: int = 0  # paired bootstrap rounds for the ratio intervals (0: none)
    routers: list[str] = field(default_factory=lambda: list(ROUTERS))
    distill_steps: int = 0  # > 0: each full-budget ensemble is also distilled into one student (router "student")

    def steps(self, k: int, fraction: float, split: str | None = None) -> int:
        """Steps per expert: the paper split trains each of K experts all N steps at batch B / K, the current
        split N / K steps at batch B; both see N x B images in all (the monolith's)."""
        if k == 1 or (split or self.split) == "paper":
            return max(1, round(self.budget * fraction))
        return max(1, round(self.budget * fraction / k))

    def batch(self, base: int, k: int, split: str | None = None) -> int:
        return base // k if k > 1 and (split or self.split) == "paper" else base

    @property
    def other(self) -> str:
        return SPLITS[1 - SPLITS.index(self.split)]

    @property
    def tag(self) -> str:
        """Names this run's images and saved JSON: the dataset, and the mode unless it is the default one
        (a --full run then keeps the default run's section and files)."""
        return self.dataset if self.label == "default" else f"{self.dataset}-{self.label}"

    @property
    def section(self) -> str:
        return NAME if self.tag == "digits" else f"{NAME}.{self.tag}"


@dataclass
class Record:
    """One evaluated configuration at one checkpoint of one seed."""

    k: int
    seed: int
    fraction: float
    steps_per_expert: int
    expert_flops: float  # training FLOPs of all experts so far
    router_flops: float  # training FLOPs of the learned router (0 for the monolith)
    router: str  # "-" for the monolith
    routing: str
    fd_dom: float
    kid: float
    precision: float
    recall: float
    sample_cost: float  # sampling FLOPs relative to the monolith's (experts + learned router)
    seconds: float
    split: str = "current"  # "-" for the monolith (the same model in both splits)
    weights: str = "ema"  # "ema" or "raw" (the trained weights)
    boot: list[float] = field(default_factory=list)  # FD_dom under paired bootstrap draws (full budget only)

    @property
    def method(self) -> str:
        return "monolith" if self.k == 1 else f"K={self.k}"


@dataclass
class Costs:
    expert_fpi: float
    router_fpi: float
    batch: int
    router_batch: int


@dataclass
class Arm:
    """What one evaluation is of: the model(s), how far trained and at what cost."""

    k: int
    seed: int
    split: str
    fraction: float
    steps: int
    expert_flops: float
    router_flops: float
    final: bool


@dataclass
class Run:
    s: Settings
    root: Path
    ds: Dataset
    records: list[Record] = field(default_factory=list)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    costs: Costs | None = None
    floor: list[Scores] = field(default_factory=list)  # real training images scored like samples, per seed
    feats: dict[int, np.ndarray] = field(default_factory=dict)  # record index -> sample features (full budget)
    ref: tuple | None = None  # (domain classifier, held-out features, eval ids) of this process's plans
    n_ref: int = 0  # held-out reference images

    def log(self, msg: str) -> None:
        print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)

    def config(self, k: int, seed: int, split: str | None = None):
        over = dict(DATASETS.get(self.s.dataset, {}))
        batch = self.s.batch(over.get("train.batch_size", 64), k, split)
        steps = self.s.steps(k, 1.0, split)
        over.update({"data.dataset": self.s.dataset, "partition.experts": k, "partition.seed": seed,
                     "train.batch_size": batch, "train.steps": steps, "train.checkpoint_every": steps,
                     "train.seed": seed, "train.threads": 1, "router.seed": seed, "router.steps": self.s.router_steps,
                     "sample.steps": self.s.sample_steps, "sample.solver": "heun"})
        return load_config(overrides=over)

    def seed(self, seed: int) -> None:
        """The monolith and every ensemble size for one seed, then the paired bootstrap of its full-budget
        records (one set of draws for all of them, so their ratios are paired)."""
        start = len(self.records)
        for k in [1, *self.s.ks]:
            self.one(k, seed)
        self.bootstrap(range(start, len(self.records)), seed)

    def plan(self, k: int, seed: int, split: str) -> tuple[Plan, Path]:
        cfg = self.config(k, seed, split)
        plan_dir = self.root / f"s{seed}-k{k}-{split}"
        plan = make_plan(cfg, self.ds)
        plan.save(plan_dir / "plan")
        return Plan.load(plan_dir / "plan"), plan_dir

    def train(self, plan: Plan, plan_dir: Path, steps: int) -> None:
        for shard in range(len(plan.shards)):
            train_shard(plan, shard, plan_dir / "work", steps=steps, dataset=self.ds)

    def one(self, k: int, seed: int) -> None:
        """Train a K-expert plan (K = 1: the monolith) of the headline split fraction by fraction, evaluating at
        each; at the full budget also the raw weights and (with `compare`) the other split."""
        plan, plan_dir = self.plan(k, seed, self.s.split)
        cfg = plan.cfg
        if k == 1:
            self.floor.append(self.real_floor(plan, seed))
        self.costs = costs_of(cfg, plan)
        router_dir, router_flops = None, 0.0
        if k > 1 and "learned" in self.routers:
            t = time.time()
            router_dir = train_plan_router(plan, plan_dir / "router", dataset=self.ds)
            router_flops = 3 * self.costs.router_fpi * cfg.router.batch_size * cfg.router.steps
            self.log(f"seed {seed} K={k}: router trained in {time.time() - t:.0f}s")
        for fraction in self.s.fractions:
            steps = self.s.steps(k, fraction)
            t = time.time()
            self.train(plan, plan_dir, steps)
            self.log(f"seed {seed} K={k} {self.s.split}: {steps} steps per expert at batch {cfg.train.batch_size} "
                     f"({fraction:g} of the budget) in {time.time() - t:.0f}s")
            out = plan_dir / f"bundle-{steps}"
            write_bundle(out, plan, sources_from_work_dirs([plan_dir / "work"], range(k)), router_dir)
            bundle = load_bundle(out)
            final = fraction == self.s.fractions[-1]
            arm = Arm(k, seed, "-" if k == 1 else self.s.split, fraction, steps,
                      3 * self.costs.expert_fpi * cfg.train.batch_size * steps * k, router_flops, final)
            for router, routing in self.combos(k, final):
                self.evaluate(bundle, plan, arm, router, routing)
            if final:
                self.evaluate(replace(bundle, models=raw_models(plan, plan_dir / "work")), plan, arm,
                              "-" if k == 1 else "centroid", "top1", weights="raw")
                if k > 1 and self.s.compare:
                    self.other_split(k, seed, bundle, router_flops)
                if k > 1 and self.s.distill_steps:
                    self.distilled(bundle, plan_dir, arm)
            shutil.rmtree(out, ignore_errors=True)

    @property
    def routers(self) -> list[str]:
        return self.s.routers

    def combos(self, k: int, final: bool) -> list[tuple[str, str]]:
        if k == 1:
            return [("-", "top1")]
        return [(r, m) for r in self.routers for m in (self.s.routings if final else ["top1"])]

    def other_split(self, k: int, seed: int, bundle, router_flops: float) -> None:
        """The other split's experts at the full budget, routed by the headline plan's routers (same partition)."""
        split = self.s.other
        plan, plan_dir = self.plan(k, seed, split)
        if [s.ids for s in plan.shards] != [s.ids for s in bundle.plan.shards]:
            raise RuntimeError("the two splits' partitions differ; they must share the data and the routers")
        steps = self.s.steps(k, 1.0, split)
        t = time.time()
        self.train(plan, plan_dir, steps)
        self.log(f"seed {seed} K={k} {split}: {steps} steps per expert at batch {plan.cfg.train.batch_size} in "
                 f"{time.time() - t:.0f}s")
        arm = Arm(k, seed, split, 1.0, steps, 3 * self.costs.expert_fpi * plan.cfg.train.batch_size * steps * k,
                  router_flops, True)
        ema = {i: load_expert(latest_checkpoint(plan_dir / "work", i) / "expert") for i in range(k)}
        for router in self.routers:
            self.evaluate(replace(bundle, models=ema), plan, arm, router, "top1")
        self.evaluate(replace(bundle, models=raw_models(plan, plan_dir / "work")), plan, arm, "centroid", "top1",
                      weights="raw")

    def distilled(self, bundle, plan_dir: Path, arm: Arm) -> None:
        """The ensemble distilled into one student of the experts' size (ddm-node distill: top-1 teacher, the
        monolith's batch), evaluated beside it at its own sampling cost (one model pass per step, no router)."""
        steps, batch = self.s.distill_steps, DATASETS[self.s.dataset].get("train.batch_size", 64)
        cfg = student_config(bundle.plan, steps, sets=[f"train.batch_size={batch}", f"train.checkpoint_every={steps}",
                                                       f"train.seed={arm.seed}", "train.threads=1"])
        t = time.time()
        out = distill(bundle, plan_dir / "student", cfg, replace(bundle.plan.cfg.sample, routing="top1"), device="cpu")
        self.log(f"seed {arm.seed} K={arm.k}: student distilled in {steps} steps at batch {batch} in "
                 f"{time.time() - t:.0f}s")
        # its training: 3 passes of the student and one of a top-1 teacher expert per image (the centroid router
        # is a few dot products)
        flops = 4 * self.costs.expert_fpi * batch * steps
        self.evaluate(load_bundle(out), bundle.plan, replace(arm, expert_flops=arm.expert_flops + flops),
                      "student", "top1")

    def restore(self) -> None:
        """Costs and the real-data floor for records loaded from JSON (both are deterministic and cheap)."""
        for seed in self.s.seeds:
            cfg = self.config(1, seed)
            plan = make_plan(cfg, self.ds)
            self.costs = costs_of(cfg, plan)
            self.floor.append(self.real_floor(plan, seed))

    def reference(self, plan: Plan) -> tuple:
        """The domain classifier and held-out features, computed once (every plan here holds out the same ids)."""
        if self.ref is None or self.ref[2] != plan.eval_ids:
            clf, fr = reference_features(plan, self.ds)
            self.ref = (clf, fr, plan.eval_ids)
            self.n_ref = len(fr)
        return self.ref

    def real_floor(self, plan: Plan, seed: int) -> Scores:
        """n real training images scored against the held-out split: the best any model can do here."""
        _ref, x_train, _y = reference_split(plan, self.ds)
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:self.s.n_samples]
        clf, fr, _ = self.reference(plan)
        sc = evaluate_features(features(x_train[pick], clf), fr, clf.hash, seed)
        self.log(f"seed {seed} real training images: FD_dom {sc.fd_dom:.2f} KID {sc.kid:.4f} "
                 f"({len(fr)} held-out reference images)")
        return sc

    def evaluate(self, bundle, plan: Plan, arm: Arm, router: str, routing: str, weights: str = "ema") -> None:
        sc = SampleConfig(steps=self.s.sample_steps, solver="heun", routing=routing,
                          router="auto" if router == "-" else router)
        t = time.time()
        samples = generate(bundle, self.s.n_samples, sc, seed=arm.seed, dataset=self.ds)
        clf, fr, _ = self.reference(plan)
        fs = features(samples.x, clf)
        scores = evaluate_features(fs, fr, clf.hash, arm.seed)
        calls = self.s.n_samples * 2 * self.s.sample_steps  # Heun: two velocity calls per step, per sample
        routed = calls * self.costs.router_fpi if router == "learned" else 0.0  # centroid: a few dot products
        cost = (samples.expert_samples * self.costs.expert_fpi + routed) / (calls * self.costs.expert_fpi)
        rec = Record(arm.k, arm.seed, arm.fraction, arm.steps, arm.expert_flops, arm.router_flops, router, routing,
                     scores.fd_dom, scores.kid, scores.precision, scores.recall, cost, time.time() - t, arm.split,
                     weights)
        if arm.final:
            self.feats[len(self.records)] = fs
        self.records.append(rec)
        self.log(f"seed {arm.seed} {rec.method} {arm.split} {router}/{routing} {weights} @{arm.steps}: FD_dom "
                 f"{scores.fd_dom:.2f} KID {scores.kid:.4f} P {scores.precision:.2f} R {scores.recall:.2f} "
                 f"(cost x{cost:.2f}, {rec.seconds:.0f}s)")
        if (arm.final and arm.seed == self.s.seeds[0] and routing == "top1" and router in ("-", self.s.routers[0])
                and weights == "ema" and arm.split in ("-", self.s.split)):
            self.grids[rec.method] = samples.x[:100].clone()

    def bootstrap(self, indices: range, seed: int) -> None:
        """Paired bootstrap FD_dom draws for this seed's full-budget records (`Record.boot`)."""
        idx = [i for i in indices if i in self.feats]
        if not idx or self.s.boot_rounds < 1 or self.ref is None:
            return
        t = time.time()
        draws = bootstrap_fd(self.ref[1], [self.feats.pop(i) for i in idx], self.s.boot_rounds, seed)
        for i, row in zip(idx, draws):
            self.records[i].boot = [round(float(v), 4) for v in row]
        self.log(f"seed {seed}: {self.s.boot_rounds} bootstrap rounds of {len(idx)} records in {time.time() - t:.0f}s")


def raw_models(plan: Plan, work: Path) -> dict[int, torch.nn.Module]:
    """Each shard's raw (not averaged) weights from its newest training state, as eval-mode DiTs."""
    out = {}
    for shard in range(len(plan.shards)):
        tensors = load_file(str(latest_checkpoint(work, shard) / "state" / "state.safetensors"))
        model = DiT(plan.cfg.model)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        out[shard] = model.eval().requires_grad_(False)
    return out


T0 = time.time()


def run_seed(job: tuple[Settings, Path, int]) -> tuple[list[Record], dict[str, torch.Tensor], list[Scores], Costs, int]:
    """Every configuration of one seed (a worker process of `--jobs`): its records, grids, floor, costs and the
    number of reference images."""
    s, root, seed = job
    torch.set_num_threads(1)
    run = Run(s, root, load_dataset(s.dataset))
    run.seed(seed)
    return run.records, run.grids, run.floor, run.costs, run.n_ref


def run_all(run: Run, jobs: int) -> None:
    """All seeds, `jobs` of them at a time in spawned processes (one torch thread each), into `run`."""
    if jobs <= 1 or len(run.s.seeds) == 1:
        for seed in run.s.seeds:
            run.seed(seed)
        return
    run.reference(make_plan(run.config(1, run.s.seeds[0]), run.ds))  # trains and caches the domain classifier once
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has started torch's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for records, grids, floor, costs, n_ref in pool.map(run_seed, [(run.s, run.root, s) for s in run.s.seeds]):
            run.records += records
            run.grids.update(grids)
            run.floor += floor
            run.costs, run.n_ref = costs, n_ref


def costs_of(cfg, plan: Plan) -> Costs:
    c, h, _ = plan.shape
    rcfg = router_model_config(cfg.router, h, c, plan.num_classes)
    return Costs(flops_per_image(plan.cfg.model), flops_per_image(rcfg), cfg.train.batch_size, cfg.router.batch_size)


# ---------------------------------------------------------------------------------------------- report


def stats(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(vals: list[float], digits: int) -> str:
    m, s = stats(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def ratio_ci(ens: list[Record], mono: list[Record], seed: int = 0) -> tuple[float, float, float]:
    """Mean ensemble FD_dom / mean monolith FD_dom over the seeds both have, and a 95% paired bootstrap interval:
    each round draws the seeds with replacement and, within each seed, the bootstrap round of both records (the
    same held-out and sample rows); a percentile interval, bias-corrected by a shift. NaN bounds when the records
    carry no bootstrap draws."""
    by_seed = {r.seed: r for r in mono}
    pairs = [(e, by_seed[e.seed]) for e in ens if e.seed in by_seed]
    if not pairs:
        return math.nan, math.nan, math.nan
    ratio = statistics.fmean(e.fd_dom for e, _ in pairs) / statistics.fmean(m.fd_dom for _, m in pairs)
    rounds = min(min(len(e.boot), len(m.boot)) for e, m in pairs)
    if rounds < 2:
        return ratio, math.nan, math.nan
    e_draws = np.array([e.boot[:rounds] for e, _ in pairs])
    m_draws = np.array([m.boot[:rounds] for _, m in pairs])
    pick = np.random.default_rng(seed).integers(len(pairs), size=(rounds, len(pairs)))
    cols = np.arange(rounds)[:, None]
    draws = e_draws[pick, cols].mean(1) / m_draws[pick, cols].mean(1)
    # Resampling rows with replacement duplicates some, which inflates every FD and pulls the drawn ratios
    # toward 1: the percentile interval is moved by that bias (the draws' median minus the estimate).
    lo, mid, hi = np.percentile(draws, [2.5, 50.0, 97.5])
    return ratio, float(lo + ratio - mid), float(hi + ratio - mid)


def ci_str(ci: tuple[float, float, float]) -> str:
    r, lo, hi = ci
    return f"{r:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else "")


GroupKey = tuple[str, int, str, str, str]  # split, K, router, routing, weights


def final_groups(run: Run) -> dict[GroupKey, list[Record]]:
    last = run.s.fractions[-1]
    groups: dict[GroupKey, list[Record]] = {}
    for r in run.records:
        if r.fraction == last:
            groups.setdefault((r.split, r.k, r.router, r.routing, r.weights), []).append(r)
    return groups


def mono_of(groups: dict[GroupKey, list[Record]], weights: str = "ema") -> list[Record]:
    return groups.get(("-", 1, "-", "top1", weights), [])


def final_table(run: Run) -> tuple[dict[GroupKey, list[Record]], str]:
    """Rows of the full-budget comparison, grouped over seeds (mean ± std; ratio to the monolith with its
    95% paired bootstrap interval, raw weights against the raw monolith)."""
    groups = final_groups(run)

    def order(key: GroupKey) -> tuple:
        split, k, router, routing, weights = key
        return (split != "-", split != run.s.split, k, weights, router, ROUTINGS.index(routing))

    rows = []
    for key in sorted(groups, key=order):
        split, k, router, routing, weights = key
        rs = groups[key]
        fd = [r.fd_dom for r in rs]
        routed = rs[0].router_flops if router == "learned" else 0.0  # the centroid router is not trained
        total = rs[0].expert_flops + routed
        ratio = "-" if k == 1 else ci_str(ratio_ci(rs, mono_of(groups, weights)))
        rows.append([rs[0].method, split, router, "-" if k == 1 else routing, weights, pm(fd, 2), ratio,
                     pm([r.kid for r in rs], 4), f"{statistics.fmean(r.precision for r in rs):.2f}",
                     f"{statistics.fmean(r.recall for r in rs):.2f}",
                     f"{total / 1e12:.2f}" + (f" (router {routed / total * 100:.1f}%)" if routed else ""),
                     f"{statistics.fmean(r.sample_cost for r in rs):.2f}x", len(rs)])
    if run.floor:
        f = run.floor
        rows.append([f"real training images ({run.s.n_samples})", "-", "-", "-", "-", pm([x.fd_dom for x in f], 2),
                     "-", pm([x.kid for x in f], 4), f"{statistics.fmean(x.precision for x in f):.2f}",
                     f"{statistics.fmean(x.recall for x in f):.2f}", "-", "-", len(f)])
    table = markdown_table(["model", "split", "router", "routing", "weights", "FD_dom (mean ± std)",
                            "ratio to monolith [95% CI] (raw: to the raw monolith)", "KID (mean ± std)", "precision", "recall",
                            "training TFLOPs", "sampling FLOPs vs monolith", "seeds"], rows)
    return groups, table


def headline(run: Run, r: Record) -> bool:
    """Records of the FD-vs-FLOPs comparison: the headline split (and the monolith), EMA weights."""
    return r.split in ("-", run.s.split) and r.weights == "ema" and r.router != "student"


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[Record]]] = {}
    for r in run.records:
        if r.routing != "top1" or not headline(run, r):
            continue
        label = "monolith" if r.k == 1 else f"K={r.k}, {r.router} router, top-1"
        series.setdefault(label, {}).setdefault(r.fraction, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_frac in sorted(series.items(), key=lambda kv: (kv[0] != "monolith", kv[0])):
        fr = sorted(by_frac)
        x = [by_frac[f][0].expert_flops / 1e12 for f in fr]
        m = [stats([r.fd_dom for r in by_frac[f]]) for f in fr]
        style = dict(lw=2.5, color="black") if label == "monolith" else dict(lw=1.5, ls="--" if "centroid" in label else "-")
        ax.errorbar(x, [v[0] for v in m], yerr=[v[1] for v in m], marker="o", capsize=3, label=label, **style)
    if run.floor:
        ax.axhline(stats([x.fd_dom for x in run.floor])[0], color="gray", ls=":", label="real training images")
    ax.set_xscale("log")
    router = max((r.router_flops for r in run.records), default=0.0)
    ax.set_xlabel("expert training FLOPs (TFLOP; 3 x forward x images seen)"
                  + (f"\nthe learned router adds {router / 1e12:.2f} TFLOP to every ensemble point" if router else ""))
    ax.set_ylabel("FD_dom (lower is better)")
    ax.set_title(f"{run.s.dataset}, {run.s.split} split: FD_dom vs training FLOPs (mean ± std, {len(run.s.seeds)} seeds)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _top1_by_fraction(run: Run) -> list[str]:
    """'0.25 of the budget: 6.3, K=4 8.7 / 8.9, K=8 ...' per evaluated fraction (headline split, top-1)."""
    out = []
    for f in run.s.fractions:
        def mean_fd(k: int, router: str) -> float | None:
            vals = [r.fd_dom for r in run.records if r.fraction == f and r.k == k and r.router == router
                    and r.routing == "top1" and headline(run, r)]
            return statistics.fmean(vals) if vals else None
        mono = mean_fd(1, "-")
        parts = [f"{f:g} of the budget: {mono:.2f}" if mono is not None else f"{f:g}: -"]
        for k in run.s.ks:
            a, b = mean_fd(k, "learned"), mean_fd(k, "centroid")
            if a is not None and b is not None:
                parts.append(f"K={k} {a:.2f} / {b:.2f}")
        out.append(", ".join(parts))
    return out


def best_top1(run: Run, groups: dict[GroupKey, list[Record]], split: str) -> tuple[GroupKey, tuple] | None:
    """The top-1 EMA ensemble of `split` with the lowest mean FD_dom, and its ratio to the monolith."""
    cands = [k for k in groups if k[0] == split and k[3] == "top1" and k[4] == "ema" and k[2] != "student"]
    if not cands or not mono_of(groups):
        return None
    key = min(cands, key=lambda k: statistics.fmean(r.fd_dom for r in groups[k]))
    return key, ratio_ci(groups[key], mono_of(groups))


def reading(run: Run, groups: dict[GroupKey, list[Record]]) -> tuple[list[str], float]:
    s = run.s
    mono = mono_of(groups)
    mono_fd = statistics.fmean(r.fd_dom for r in mono)
    best = best_top1(run, groups, s.split)
    assert best is not None, "no top-1 ensemble at the full budget"
    (split, k, router, _, _), ci = best
    ratio, lo, hi = ci
    goal = ratio <= 0.9 and hi < 1
    lines = [f"- **Ratio printed** (best top-1 ensemble FD_dom / monolith at equal training FLOPs, {split} split: "
             f"K={k}, {router} router): **{ratio:.3f}**, 95% interval [{lo:.3f}, {hi:.3f}] (paired bootstrap over "
             f"seeds, held-out and sample rows; {len(mono)} seeds). Goal (<= 0.9 with the interval below 1): "
             + ("met." if goal else f"not met: the ratio is {ratio - 0.9:+.3f} from 0.9 and the interval's upper end "
                                    f"is {hi:.3f}.")
             + " The best of several configurations is picked on the same samples, so the interval is optimistic."]
    for sp in (s.split, s.other):
        per_k = []
        for kk in s.ks:
            cells = [f"{rt} {ci_str(ratio_ci(groups[key], mono))}" for rt in ROUTERS
                     if (key := (sp, kk, rt, "top1", "ema")) in groups]
            if cells:
                per_k.append(f"K={kk}: " + ", ".join(cells))
        if per_k:
            how = ("each expert all N steps at batch B/K" if sp == "paper" else "each expert N/K steps at batch B")
            lines.append(f"- {sp.capitalize()} split ({how}), top-1 ratio to the monolith [95% CI]: "
                         + "; ".join(per_k) + ".")
    raw = mono_of(groups, "raw")
    if raw:
        parts = [f"monolith {statistics.fmean(r.fd_dom for r in raw):.2f} raw vs {mono_fd:.2f} EMA"]
        for key, rs in sorted(groups.items()):
            if key[4] == "raw" and key[1] > 1:
                ema = groups.get(key[:4] + ("ema",))
                if ema:
                    parts.append(f"K={key[1]} {key[0]} centroid {statistics.fmean(r.fd_dom for r in rs):.2f} raw vs "
                                 f"{statistics.fmean(r.fd_dom for r in ema):.2f} EMA")
        lines.append("- Raw weights against the EMA (top-1, mean FD_dom): " + "; ".join(parts) + ".")
    if run.floor:
        floor = stats([x.fd_dom for x in run.floor])[0]
        best_fd = statistics.fmean(r.fd_dom for r in groups[best[0]])
        lines.append(f"- Floor: {s.n_samples} real training images score FD_dom {floor:.2f} against the same held-out "
                     f"split; the monolith ends at {mono_fd:.2f} ({mono_fd / floor:.2f}x the floor), the best ensemble "
                     f"at {best_fd:.2f} ({best_fd / floor:.2f}x).")
    if len(s.fractions) > 1:
        lines.append(f"- Along the budget ({s.split} split, top-1, mean over seeds; monolith, K=... learned / "
                     "centroid): " + "; ".join(_top1_by_fraction(run)) + ".")
    lines += routing_lines(run, groups)
    spread = [stats([r.fd_dom for r in rs])[1] for rs in groups.values() if len(rs) > 1]
    if spread:
        lines.append(f"- Seed spread: the std of FD_dom over seeds (training, router, sampling and partition seed) is "
                     f"{min(spread):.2f}-{max(spread):.2f}. With {len(s.seeds)} seeds, resampling seeds in the "
                     "bootstrap understates the seed-to-seed part of the interval somewhat.")
    n_ref = run.n_ref
    lines.append("- FD_dom is a Frechet distance in the 64-dimensional features of a small classifier trained on the "
                 f"same dataset ({s.n_samples} samples against "
                 + (f"{n_ref} held-out images" if n_ref else "the plan's held-out split")
                 + "); it ranks samples consistently but is not FID, and with a few hundred samples it is biased "
                 "upwards (the same bias for every row). KID draws its subsets with replacement from both sides, so "
                 "its std includes the reference set's noise.")
    if n_ref and n_ref < 2000:
        lines.append(f"- Limit: the held-out reference set has only {n_ref} images (the dataset is small), fewer than "
                     "the 2000 a 64-dimensional FD wants; its noise is in the intervals (the bootstrap redraws it), "
                     "but every FD_dom here is biased upwards by it.")
    return lines, ratio


def routing_lines(run: Run, groups: dict[GroupKey, list[Record]]) -> list[str]:
    """What the routers and routings did here (headline split, EMA), from the numbers."""
    fd = {(key[1], key[2], key[3]): statistics.fmean(r.fd_dom for r in rs) for key, rs in groups.items()
          if key[0] == run.s.split and key[4] == "ema"}
    out = []
    for routing in ("top2", "full"):
        cmp = [f"K={k} {r}: {fd[(k, r, routing)]:.2f} vs {fd[(k, r, 'top1')]:.2f}" for k in run.s.ks for r in ROUTERS
               if (k, r, routing) in fd and (k, r, "top1") in fd]
        if cmp:
            out.append(f"- {routing} vs top-1 routing (mean FD_dom): " + "; ".join(cmp) + ".")
    last = [r for r in run.records if r.k > 1 and r.fraction == run.s.fractions[-1] and r.router_flops > 0]
    if last and run.costs is not None:
        shares = sorted({(r.k, r.router_flops / (r.router_flops + r.expert_flops)) for r in last})
        out.append(f"- The learned router's training ({run.s.router_steps} steps x {run.costs.router_batch}) is "
                   + ", ".join(f"{sh * 100:.0f}% at K={k}" for k, sh in shares)
                   + " of the ensemble's training FLOPs (the paper: about 4%); the learned-router rows had that much "
                   "more training compute than the monolith, the centroid rows none. `bench.routing` measures how often "
                   "each router picks the right expert.")
    return out


def report(run: Run, img_dir: Path, doc_rel: Path | None, command: str | None = None,
           measured: str | None = None) -> tuple[str, float]:
    groups, table = final_table(run)
    tag = run.s.tag
    plot_path = img_dir / f"quality-{tag}-fd-vs-flops.png"
    plot(run, plot_path)
    grid_paths = {}
    for method in ["monolith", *(f"K={k}" for k in run.s.ks)]:
        p = img_dir / f"quality-{tag}-{method.replace('=', '').lower()}.png"
        if method in run.grids:
            x = run.grids[method]
            save_grid(x, p, ncol=10, scale=4 if x.shape[-1] <= 16 else 2)
        if p.exists():  # re-rendering from JSON keeps the grids of the measured run
            grid_paths[method] = p

    def rel(p: Path) -> str:
        if doc_rel is None:
            return str(p)
        try:
            return str(p.resolve().relative_to(doc_rel.resolve()))
        except ValueError:
            return str(p)

    lines, ratio = reading(run, groups)
    c = run.costs
    s = run.s
    cfg = run.config(1, s.seeds[0]).model.resolved()
    b = run.config(1, s.seeds[0]).train
    setup = (f"- Setup ({s.label} run): dataset `{s.dataset}`, DiT hidden {cfg.hidden}, depth {cfg.depth}, patch "
             f"{cfg.patch_size} ({c.expert_fpi / 1e6:.1f} MFLOP forward per image), lr {b.lr:g}, t {b.t_sampling}, "
             f"{b.ema} EMA" + (f" (sigma_rel {b.ema_std:g})" if b.ema == "power" else f" ({b.ema_decay:g})")
             + f", lr warmup {b.warmup_fraction:g} of each run; monolith {s.budget} steps at batch {b.batch_size} (B); "
             f"paper split: each of K experts {s.budget} steps at batch B/K; current split: {s.budget}/K steps at "
             f"batch B; routers: {', '.join(s.routers)}"
             + (f" (learned: {s.router_steps} steps x {c.router_batch}, {c.router_fpi / 1e6:.2f} MFLOP per image)"
                if "learned" in s.routers else "")
             + f"; seeds {s.seeds} (each seed changes the partition, training, router and sampling seeds); "
             f"{s.n_samples} samples per evaluation, Heun with {s.sample_steps} steps; {s.split} split evaluated at "
             f"{s.fractions} of the budget" + (f", the {s.other} split at the full budget" if s.compare else "")
             + f"; {s.boot_rounds} bootstrap rounds. "
             + (f"Measured {measured}; this section was re-rendered from the JSON data." if measured else
                f"Wall time {(time.time() - T0) / 60:.1f} min; load average at the end: {load_str()}."))
    grids = "".join(f"| {m} |\n|---|\n| ![{m}]({rel(p)}) |\n\n" for m, p in grid_paths.items())
    md = (section_header(NAME, f"Ensemble vs monolith at equal training FLOPs: {s.dataset}"
                                 + ("" if s.label == "default" else f" ({s.label} run)"), command) + table
          + f"\n![FD_dom vs training FLOPs]({rel(plot_path)})\n\n" + "\n".join(lines + [setup])
          + "\n\nSamples at the full budget (seed " + str(s.seeds[0]) + f", {s.split} split, top-1, {s.routers[0]} "
          "router for the ensembles, EMA weights; first 100 of the evaluated samples, class labels drawn like the "
          "training set):\n\n" + grids)
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    global T0
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run: 1 seed, K=4 only, budget 240 steps, 100 samples")
    mode.add_argument("--full", action="store_true", help="budget 6000 steps, 1000 samples, 32 sampling steps")
    ap.add_argument("--dataset", default="digits", choices=sorted(DATASETS), help="dataset (default digits)")
    ap.add_argument("--budget", type=int, default=None, help="monolith training steps (overrides the mode)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds are FIRST..FIRST+N-1: split the seeds over machines, then merge with --from-json")
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="ensemble sizes (default 4 8; quick 4)")
    ap.add_argument("--samples", type=int, default=None, help="samples per evaluation")
    ap.add_argument("--split", choices=SPLITS, default="paper",
                    help="the headline split: paper (each of K experts N steps at batch B/K, default) or current "
                         "(N/K steps at batch B); the other is also trained at the full budget, side by side")
    ap.add_argument("--no-compare", action="store_true", help="train the headline split only")
    ap.add_argument("--routings", nargs="+", choices=ROUTINGS, default=None,
                    help="routings evaluated at the full budget (default top1 top2; quick and full: all)")
    ap.add_argument("--boot", type=int, default=None, help="paired bootstrap rounds (default 200)")
    ap.add_argument("--routers", nargs="+", choices=ROUTERS, default=None,
                    help="routers evaluated (default both; centroid alone skips training the learned router)")
    ap.add_argument("--fractions", type=float, nargs="+", default=None,
                    help="fractions of the budget evaluated (the last must be 1)")
    ap.add_argument("--router-steps", type=int, default=None, help="learned router training steps")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="also distill each full-budget ensemble into one student in this many steps (router "
                         "'student' in the table; its training FLOPs include the ensemble's)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="seeds run in parallel processes, one torch thread each (default: one per core, at most "
                         "one per seed)")
    ap.add_argument("--doc", type=Path, default=None,
                    help=f"markdown file for the section (default {RESULTS_MD.name}; quick runs only print)")
    ap.add_argument("--img-dir", type=Path, default=None, help="where the PNGs go (default docs/img)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (plans, checkpoints)")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="re-render the section from saved quality-DATASET.json files (no training); several files "
                         "of the same settings and different seeds are merged into docs/data")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        return rerender(args.from_json, args.doc or RESULTS_MD, args.img_dir or IMG_DIR)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    T0 = time.time()
    fashion = args.dataset == "fashion-mnist"
    if args.quick:
        s = Settings(args.dataset, 240, args.ks or [4], [0], [0.5, 1.0], 100, 6, 50, "quick")
    elif args.full:
        s = Settings(args.dataset, 6000, args.ks or [4, 8], [0, 1, 2], [0.0625, 0.125, 0.25, 0.5, 1.0], 1000, 32, 800,
                     "full")
    else:
        s = Settings(args.dataset, 1600, args.ks or [4, 8], [0, 1, 2], [0.125, 0.25, 0.5, 1.0], 400, 16, 800, "default")
    if fashion and not (args.quick or args.full):
        # The recorded run (docs/RESULTS.md): what a shared 2-core box gave in an hour, three seeds and both splits.
        # Both routers and larger budgets: --routers learned centroid --budget N --fractions ...
        s.budget, s.fractions, s.n_samples, s.sample_steps, s.routers = 400, [1.0], 300, 12, ["centroid"]
    s.split, s.compare = args.split, not args.no_compare
    s.boot_rounds = args.boot if args.boot is not None else (100 if fashion else 200)
    if not (args.quick or args.full):
        s.routings = ["top1", "top2"]
    if args.routings:
        s.routings = list(dict.fromkeys(["top1", *args.routings]))  # top-1 is what the ratio compares
    if args.budget:
        s.budget = args.budget
    if args.routers:
        s.routers = list(dict.fromkeys(args.routers))
    if args.fractions:
        if sorted(args.fractions) != args.fractions or args.fractions[-1] != 1.0 or args.fractions[0] <= 0:
            ap.error("--fractions must be increasing, in (0, 1], and end with 1")
        s.fractions = args.fractions
    if args.router_steps is not None:
        if args.router_steps < 1:
            ap.error("--router-steps must be >= 1")
        s.router_steps = args.router_steps
    if args.seeds or args.first_seed:
        s.seeds = list(range(args.first_seed, args.first_seed + (args.seeds or len(s.seeds))))
    if args.samples:
        s.n_samples = args.samples
    if args.distill_steps < 0:
        ap.error("--distill-steps must be >= 0")
    s.distill_steps = args.distill_steps
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.first_seed < 0 or (args.seeds is not None and args.seeds < 1):
        ap.error("--first-seed must be >= 0 and --seeds >= 1")
    if any(k < 2 for k in s.ks) or s.budget < max(s.ks):
        ap.error("--ks must be >= 2 and the budget at least the largest K")
    base = DATASETS[s.dataset].get("train.batch_size", 64)
    if any(base % k for k in s.ks):
        ap.error(f"the paper split needs each K to divide the batch {base}")
    if s.boot_rounds < 0:
        ap.error("--boot must be >= 0")
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-quality-"))
    doc = args.doc if args.doc is not None else (None if args.quick else RESULTS_MD)
    img_dir = args.img_dir or (root / "img" if doc is None else IMG_DIR)
    try:
        run = Run(s, root, load_dataset(s.dataset))
        run_all(run, args.jobs if args.jobs is not None else min(len(s.seeds), os.cpu_count() or 1))
        if doc is not None:  # the records first: a report can be re-rendered from them (--from-json)
            data = (DATA_DIR if doc == RESULTS_MD else doc.parent) / f"quality-{s.tag}.json"
            write_atomic(data, json.dumps({"settings": asdict(s), "command": command_line(), "date": now_str(),
                                           "records": [asdict(r) for r in run.records]}, indent=1).encode())
        md, ratio = report(run, img_dir, doc.parent if doc is not None else None)
        if doc is not None:
            write_section(doc, s.section, md, intro=INTRO)
        print(md)
        print_ratio("best top-1 ensemble/monolith FD_dom at equal training FLOPs", ratio)
    finally:
        if args.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _load_saved(path: Path) -> dict:
    """One saved run, checked: its settings and records load, and it names its command and date."""
    try:
        data = json.loads(path.read_text())
        Settings(**data["settings"])
        for r in data["records"]:
            Record(**r)
        if not (isinstance(data["command"], str) and isinstance(data["date"], str)):
            raise ValueError("command and date must be strings")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SystemExit(f"{path}: not a saved bench.quality run ({type(exc).__name__}: {exc})") from None
    return data


def merge_runs(paths: list[Path]) -> dict:
    """Saved runs as one: runs of the same settings and disjoint seeds (parallel `--first-seed` processes), then
    runs of the other split (`--split S --no-compare` in parallel processes) with the same settings otherwise and
    the same seeds, whose ensembles join as the side-by-side split. The monolith is the same model in both (same
    config and seed; CPU training is deterministic): its FD_dom must agree, and the first run's is kept."""
    runs = [_load_saved(p) for p in paths]
    first = runs[0]["settings"]
    base = dict(first, seeds=[])
    seeds: list[int] = []
    others: list[tuple[Path, dict]] = []
    for path, r in zip(paths, runs):
        if dict(r["settings"], seeds=[]) != base:
            if dict(r["settings"], split=first["split"], compare=first["compare"]) == first and not first["compare"]:
                others.append((path, r))
                continue
            raise SystemExit(f"{path}: settings differ from {paths[0]} (only the seeds, or the split of a run of the "
                             "same seeds, may differ)")
        if set(r["settings"]["seeds"]) & set(seeds):
            raise SystemExit(f"{path}: seeds {r['settings']['seeds']} were already loaded")
        seeds += r["settings"]["seeds"]
    records = [rec for path, r in zip(paths, runs) if all(path != o for o, _ in others) for rec in r["records"]]
    settings = dict(base, seeds=sorted(seeds))
    if others:
        mono = {(m["seed"], m["weights"]): m["fd_dom"] for m in records if m["k"] == 1 and m["fraction"] == 1.0}
        for path, r in others:
            for rec in r["records"]:
                if rec["k"] > 1:
                    records.append(rec)
                elif rec["fraction"] == 1.0 and not math.isclose(mono.get((rec["seed"], rec["weights"]), math.nan),
                                                                  rec["fd_dom"], rel_tol=1e-6):
                    raise SystemExit(f"{path}: its monolith (seed {rec['seed']}) differs from {paths[0]}'s; not the "
                                     "same model, so the runs cannot be joined")
        settings["compare"] = True
    return {"settings": settings, "command": " ; ".join(dict.fromkeys(r["command"] for r in runs)),
            "date": max(r["date"] for r in runs), "records": records}


def rerender(paths: list[Path], doc: Path, img_dir: Path) -> int:
    """Rebuild the plot and the section from saved records (costs and the real-data floor are recomputed)."""
    torch.set_num_threads(1)
    data = merge_runs(paths)
    s = Settings(**data["settings"])
    if len(paths) > 1 and doc == RESULTS_MD:
        write_atomic(DATA_DIR / f"quality-{s.tag}.json", json.dumps(data, indent=1).encode())
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-quality-"))
    try:
        run = Run(s, root, load_dataset(s.dataset))
        run.records = [Record(**r) for r in data["records"]]
        run.restore()
        md, ratio = report(run, img_dir, doc.parent, data.get("command"), data.get("date"))
        write_section(doc, s.section, md, intro=INTRO)
        print(md)
        print_ratio("best top-1 ensemble/monolith FD_dom at equal training FLOPs", ratio)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
