"""Sample quality at equal training FLOPs: one monolithic expert against ensembles of K = 4 and K = 8 experts.

Everything runs in this process through the library (no daemon): `make_plan` partitions the dataset,
`train_shard` trains each expert, `train_plan_router` the learned router, `write_bundle`/`load_bundle`
make the ensemble, `generate`/`score` sample and evaluate it against the plan's held-out split.

Equal FLOPs: every expert has the same architecture and batch size; the monolith (K = 1, all the data)
trains for B steps, each of the K experts for B / K steps on its own cluster, so the experts together see
exactly as many images as the monolith. Training FLOPs = 3 x `flops_per_image` (forward + backward) x
images seen. The learned router's training FLOPs are counted on top, for the ensembles, and shown.

Evaluated at several fractions of the budget (for the FD-vs-FLOPs plot: the monolith and top-1 routing
with both routers), and at the full budget with every router (learned, centroid) and routing (top-1,
top-2, full). Repeated for several seeds (the training seed, the router seed and the sampling seed change;
the partition does not). FD_dom and KID are in the features of the repository's domain classifier
(`ddm_node.ensemble.metrics`, not Inception: FD_dom is not FID).

Run: `python -m bench.quality` (digits, 3 seeds, budget 1600 monolith steps; about 31 CPU-minutes, so
about 16 minutes on 2 cores: seeds run in parallel processes, `--jobs`), `--full` (digits, 3 seeds, budget
6000 steps = the default plan's 1500 per expert at K = 4, more samples and sampling steps; about 1.5
hours), `--dataset fashion-mnist` (needs `apt-get install dataset-fashion-mnist`; a small 28x28 DiT,
budget 2400 steps, 3 seeds; about 35 CPU-minutes per seed, so about an hour on 2 cores) or `--quick`
(1 seed, tiny budget; 1-3 minutes; prints its section, writes docs only with `--doc`). Seeds can also
run on separate machines (`--first-seed N --seeds 1 --doc DIR/RESULTS.md`) and be merged with
`--from-json DIR*/quality-DATASET.json`. The printed ratio is ensemble FD_dom / monolith FD_dom at the
full budget for the best ensemble configuration.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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
from ddm_node.core.model import flops_per_image
from ddm_node.data.datasets import Dataset, load_dataset
from ddm_node.data.plan import Plan, make_plan
from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, write_bundle
from ddm_node.ensemble.generate import generate, reference_split, save_grid, score
from ddm_node.ensemble.metrics import Scores
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

# Per dataset: config overrides on top of the library defaults (a CPU-sized model for each). The EMA
# horizon (1 / (1 - decay) steps) and the warmup are short because every expert restarts both: with the
# library's 0.99 an expert of 100 steps would still carry 37% of its initial weights in its EMA.
DATASETS: dict[str, dict] = {
    "digits": {"model.size": "tiny", "train.batch_size": 64, "train.lr": 0.002, "train.ema_decay": 0.95,
               "train.warmup_steps": 20},
    "fashion-mnist": {"model.size": "tiny", "model.image_size": 28, "model.patch_size": 4,
                      "partition.pca_dim": 64, "train.batch_size": 64, "train.lr": 0.001,
                      "train.ema_decay": 0.98, "train.warmup_steps": 50},
}


@dataclass
class Settings:
    dataset: str
    budget: int  # monolith steps; each of K experts trains budget / K
    ks: list[int]
    seeds: list[int]
    fractions: list[float]
    n_samples: int
    sample_steps: int
    router_steps: int
    label: str  # quick / default / full

    def steps(self, k: int, fraction: float) -> int:
        return max(1, round(self.budget * fraction / k))

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
class Run:
    s: Settings
    root: Path
    ds: Dataset
    records: list[Record] = field(default_factory=list)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    costs: Costs | None = None
    floor: list[Scores] = field(default_factory=list)  # real training images scored like samples, per seed

    def log(self, msg: str) -> None:
        print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)

    def config(self, k: int, seed: int):
        over = dict(DATASETS.get(self.s.dataset, {}))
        over.update({"data.dataset": self.s.dataset, "partition.experts": k, "train.steps": self.s.steps(k, 1.0),
                     "train.checkpoint_every": self.s.steps(k, 1.0), "train.seed": seed, "train.threads": 1,
                     "router.seed": seed, "router.steps": self.s.router_steps, "sample.steps": self.s.sample_steps,
                     "sample.solver": "heun"})
        return load_config(overrides=over)

    def seed(self, seed: int) -> None:
        """The monolith and every ensemble size for one seed."""
        for k in [1, *self.s.ks]:
            self.one(k, seed)

    def one(self, k: int, seed: int) -> None:
        """Train a K-expert plan (K = 1: the monolith) fraction by fraction, evaluating at each."""
        cfg = self.config(k, seed)
        plan_dir = self.root / f"s{seed}-k{k}"
        plan = make_plan(cfg, self.ds)
        plan.save(plan_dir / "plan")
        plan = Plan.load(plan_dir / "plan")
        if k == 1:
            self.floor.append(self.real_floor(plan, seed))
        self.costs = costs_of(cfg, plan)
        router_dir, router_flops = None, 0.0
        if k > 1:
            t = time.time()
            router_dir = train_plan_router(plan, plan_dir / "router", dataset=self.ds)
            router_flops = 3 * self.costs.router_fpi * cfg.router.batch_size * cfg.router.steps
            self.log(f"seed {seed} K={k}: router trained in {time.time() - t:.0f}s")
        for fraction in self.s.fractions:
            steps = self.s.steps(k, fraction)
            t = time.time()
            for shard in range(k):
                train_shard(plan, shard, plan_dir / "work", steps=steps, dataset=self.ds)
            self.log(f"seed {seed} K={k}: {steps} steps per expert ({fraction:g} of the budget) in "
                     f"{time.time() - t:.0f}s")
            out = plan_dir / f"bundle-{steps}"
            write_bundle(out, plan, sources_from_work_dirs([plan_dir / "work"], range(k)), router_dir)
            bundle = load_bundle(out)
            final = fraction == self.s.fractions[-1]
            combos = [("-", "top1")] if k == 1 else (
                [(r, m) for r in ROUTERS for m in ROUTINGS] if final else [(r, "top1") for r in ROUTERS])
            expert_flops = 3 * self.costs.expert_fpi * cfg.train.batch_size * steps * k
            for router, routing in combos:
                self.evaluate(bundle, plan, k, seed, fraction, steps, expert_flops, router_flops, router, routing, final)
            shutil.rmtree(out, ignore_errors=True)

    def restore(self) -> None:
        """Costs and the real-data floor for records loaded from JSON (both are deterministic and cheap)."""
        for seed in self.s.seeds:
            cfg = self.config(1, seed)
            plan = make_plan(cfg, self.ds)
            self.costs = costs_of(cfg, plan)
            self.floor.append(self.real_floor(plan, seed))

    def real_floor(self, plan: Plan, seed: int) -> Scores:
        """n real training images scored against the held-out split: the best any model can do here."""
        _ref, x_train, _y = reference_split(plan, self.ds)
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:self.s.n_samples]
        sc = score(x_train[pick], plan, self.ds, seed=seed)
        self.log(f"seed {seed} real training images: FD_dom {sc.fd_dom:.2f} KID {sc.kid:.4f}")
        return sc

    def evaluate(self, bundle, plan: Plan, k: int, seed: int, fraction: float, steps: int, expert_flops: float,
                 router_flops: float, router: str, routing: str, final: bool) -> None:
        sc = SampleConfig(steps=self.s.sample_steps, solver="heun", routing=routing,
                          router="auto" if router == "-" else router)
        t = time.time()
        samples = generate(bundle, self.s.n_samples, sc, seed=seed, dataset=self.ds)
        scores = score(samples.x, plan, self.ds, seed=seed)
        calls = self.s.n_samples * 2 * self.s.sample_steps  # Heun: two velocity calls per step, per sample
        routed = calls * self.costs.router_fpi if router == "learned" else 0.0  # centroid: a few dot products
        cost = (samples.expert_samples * self.costs.expert_fpi + routed) / (calls * self.costs.expert_fpi)
        rec = Record(k, seed, fraction, steps, expert_flops, router_flops, router, routing, scores.fd_dom, scores.kid,
                     scores.precision, scores.recall, cost, time.time() - t)
        self.records.append(rec)
        self.log(f"seed {seed} {rec.method} {router}/{routing} @{steps}: FD_dom {scores.fd_dom:.2f} KID "
                 f"{scores.kid:.4f} P {scores.precision:.2f} R {scores.recall:.2f} (cost x{cost:.2f}, "
                 f"{rec.seconds:.0f}s)")
        if final and seed == self.s.seeds[0] and routing == "top1" and router in ("-", "learned"):
            self.grids[rec.method] = samples.x[:100].clone()


T0 = time.time()


def run_seed(job: tuple[Settings, Path, int]) -> tuple[list[Record], dict[str, torch.Tensor], list[Scores], Costs]:
    """Every configuration of one seed (a worker process of `--jobs`): its records, grids, floor and costs."""
    s, root, seed = job
    torch.set_num_threads(1)
    run = Run(s, root, load_dataset(s.dataset))
    run.seed(seed)
    return run.records, run.grids, run.floor, run.costs


def run_all(run: Run, jobs: int) -> None:
    """All seeds, `jobs` of them at a time in spawned processes (one torch thread each), into `run`."""
    if jobs <= 1 or len(run.s.seeds) == 1:
        for seed in run.s.seeds:
            run.seed(seed)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has started torch's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for records, grids, floor, costs in pool.map(run_seed, [(run.s, run.root, seed) for seed in run.s.seeds]):
            run.records += records
            run.grids.update(grids)
            run.floor += floor
            run.costs = costs


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


def final_table(run: Run) -> tuple[list[dict], str]:
    """Rows of the full-budget comparison, grouped over seeds (mean ± std)."""
    last = run.s.fractions[-1]
    groups: dict[tuple[int, str, str], list[Record]] = {}
    for r in run.records:
        if r.fraction == last:
            groups.setdefault((r.k, r.router, r.routing), []).append(r)
    rows, out = [], []
    for (k, router, routing), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], ROUTINGS.index(kv[0][2]))):
        fd = [r.fd_dom for r in rs]
        out.append({"k": k, "router": router, "routing": routing, "fd": stats(fd)[0], "records": rs})
        routed = rs[0].router_flops if router == "learned" else 0.0  # the centroid router is not trained
        total = rs[0].expert_flops + routed
        rows.append([rs[0].method, router, "-" if k == 1 else routing, pm(fd, 2), pm([r.kid for r in rs], 3),
                     f"{statistics.fmean(r.precision for r in rs):.2f}", f"{statistics.fmean(r.recall for r in rs):.2f}",
                     f"{total / 1e12:.2f}" + (f" (router {routed / total * 100:.1f}%)" if routed else ""),
                     f"{statistics.fmean(r.sample_cost for r in rs):.2f}x", len(rs)])
    if run.floor:
        f = run.floor
        rows.append([f"real training images ({run.s.n_samples})", "-", "-", pm([x.fd_dom for x in f], 2),
                     pm([x.kid for x in f], 3), f"{statistics.fmean(x.precision for x in f):.2f}",
                     f"{statistics.fmean(x.recall for x in f):.2f}", "-", "-", len(f)])
    table = markdown_table(["model", "router", "routing", "FD_dom (mean ± std)", "KID (mean ± std)",
                            "precision", "recall", "training TFLOPs", "sampling FLOPs vs monolith", "seeds"], rows)
    return out, table


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[Record]]] = {}
    for r in run.records:
        if r.routing != "top1":
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
    ax.set_title(f"{run.s.dataset}: FD_dom vs training FLOPs (mean ± std over {len(run.s.seeds)} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ensemble_wins(run: Run) -> list[str]:
    """Fractions of the budget at which some ensemble (top-1, mean over seeds) had a lower FD_dom than the monolith."""
    wins = []
    for f in run.s.fractions:
        groups: dict[tuple[int, str], list[float]] = {}
        for r in run.records:
            if r.fraction == f and r.routing == "top1":
                groups.setdefault((r.k, r.router), []).append(r.fd_dom)
        mono = groups.pop((1, "-"), None)
        if mono and groups:
            (k, router), vals = min(groups.items(), key=lambda kv: statistics.fmean(kv[1]))
            if statistics.fmean(vals) < statistics.fmean(mono):
                wins.append(f"{f:g} of the budget: K={k} {router}")
    return wins


def _top1_by_fraction(run: Run) -> list[str]:
    """'1/8: 6.3 / K=4 8.7 / 8.9, K=8 ...' per evaluated fraction of the budget."""
    out = []
    for f in run.s.fractions:
        def mean_fd(k: int, router: str) -> float | None:
            vals = [r.fd_dom for r in run.records if r.fraction == f and r.k == k and r.router == router
                    and r.routing == "top1"]
            return statistics.fmean(vals) if vals else None
        mono = mean_fd(1, "-")
        parts = [f"{f:g} of the budget: {mono:.2f}" if mono is not None else f"{f:g}: -"]
        for k in run.s.ks:
            a, b = mean_fd(k, "learned"), mean_fd(k, "centroid")
            if a is not None and b is not None:
                parts.append(f"K={k} {a:.2f} / {b:.2f}")
        out.append(", ".join(parts))
    return out


def routing_lines(run: Run, groups: list[dict]) -> list[str]:
    """What the routers and routings did here, from the numbers."""
    fd = {(g["k"], g["router"], g["routing"]): g["fd"] for g in groups}
    out = []
    full_worse = [k for k in run.s.ks if fd.get((k, "learned", "full"), 0) > fd.get((k, "learned", "top1"), math.inf)]
    if full_worse:
        out.append(f"- Routing: with the learned router, full routing (K times the sampling FLOPs) was worse than top-1 "
                   f"for K = {', '.join(map(str, full_worse))}, as in the paper (ImageNet top-1 9.84 vs full 10.52): "
                   "mixing velocities of experts that each model only their own cluster blurs samples when the "
                   "router is unsure, while top-1 commits to one expert per sample and step.")
    ratios = [(k, fd[(k, "centroid", "top1")] / fd[(k, "learned", "top1")]) for k in run.s.ks
              if (k, "centroid", "top1") in fd and (k, "learned", "top1") in fd]
    if ratios:
        out.append("- Centroid vs learned router at top-1: the centroid router's FD_dom is "
                   + ", ".join(f"{r:.1f}x the learned one's at K={k}" for k, r in ratios)
                   + ". The centroid router uses only published statistics (per cluster: 4 diagonal-Gaussian "
                   "sub-centroids in pixel space and the class histogram); it costs nothing to train and needs no "
                   "data beyond each expert's own, where the learned router needs every shard's data. How often each "
                   "router picks the right expert is measured directly by `bench.routing` (its section in this file).")
    last = [r for r in run.records if r.k > 1 and r.fraction == run.s.fractions[-1]]
    if last and run.costs is not None:
        share = last[0].router_flops / (last[0].router_flops + last[0].expert_flops)
        out.append(f"- The learned router's training ({run.s.router_steps} steps x {run.costs.router_batch}) is "
                   f"{share * 100:.0f}% of each ensemble's total at the full budget (the paper: about 4%), so the "
                   "learned-router rows had that much more training compute than the monolith; the plot's x axis "
                   "counts expert FLOPs only.")
    return out


def reading(run: Run, groups: list[dict]) -> tuple[list[str], float]:
    mono = next(g for g in groups if g["k"] == 1)
    ens = [g for g in groups if g["k"] > 1]
    best = min(ens, key=lambda g: g["fd"])
    ratio = best["fd"] / mono["fd"]
    lines = [f"- **Ratio printed** (ensemble / monolith FD_dom at equal training FLOPs, best ensemble "
             f"configuration: K={best['k']}, {best['router']} router, {best['routing']}): **{ratio:.3f}** "
             f"({'the ensemble is better' if ratio < 1 else 'the monolith is better'})."]
    if run.floor:
        floor = stats([x.fd_dom for x in run.floor])[0]
        lines.append(f"- Floor: real training images score FD_dom {floor:.2f} against the same held-out split; the "
                     f"monolith ends at {mono['fd']:.2f} ({mono['fd'] / floor:.2f}x the floor), the best ensemble at "
                     f"{best['fd']:.2f} ({best['fd'] / floor:.2f}x)."
                     + (" Both are near the floor, where the ratio says little: the plot and the next line show the "
                        "whole budget." if mono["fd"] < 2 * floor else ""))
    by_frac = _top1_by_fraction(run)
    if by_frac:
        lines.append("- Along the budget (top-1, mean over seeds; monolith / K=... learned / centroid): "
                     + "; ".join(by_frac) + ".")
        wins = _ensemble_wins(run)
        lines.append(f"- An ensemble at top-1 beat the monolith at {len(wins)} of {len(run.s.fractions)} budgets"
                     + (f" ({', '.join(wins)})." if wins else ": on this dataset the ensemble loses at every "
                        "budget measured (numbers in the line above)."))
    for k in run.s.ks:
        gk = {(g["router"], g["routing"]): g["fd"] for g in groups if g["k"] == k}
        if not gk:
            continue
        top1 = gk.get(("learned", "top1"))
        bk = min(gk, key=gk.get)
        wins = sum(1 for v in gk.values() if v < mono["fd"])
        lines.append(f"- K={k}: learned top-1 (the default) is {top1 / mono['fd']:.2f}x the monolith's FD_dom; best "
                     f"here is {bk[0]} {bk[1]} at {gk[bk] / mono['fd']:.2f}x; {wins} of {len(gk)} configurations beat "
                     f"the monolith. Learned vs centroid router at top-1: "
                     f"{gk.get(('learned', 'top1'), math.nan):.2f} vs {gk.get(('centroid', 'top1'), math.nan):.2f}; "
                     f"full routing: {gk.get(('learned', 'full'), math.nan):.2f} vs "
                     f"{gk.get(('centroid', 'full'), math.nan):.2f}.")
    spread = [stats([r.fd_dom for r in g["records"]])[1] for g in groups if len(g["records"]) > 1]
    if spread:
        lines.append(f"- Seed spread: the std of FD_dom over seeds is {min(spread):.2f}-{max(spread):.2f}; differences "
                     "smaller than about twice that are not resolved by this run.")
    lines += [
        "- Why an ensemble can lose (an interpretation; this run does not test it): each expert sees only its "
        "cluster (1/K of the data) for 1/K of the "
        "steps, so it learns that cluster with the same number of epochs as the monolith, but it cannot share "
        "what clusters have in common (strokes, backgrounds). With tiny models on a small dataset the "
        "monolith is not capacity-limited, which removes the ensemble's main advantage (K times the parameters "
        "at the same training FLOPs); the paper's gain (ImageNet FID 6.08 vs 8.49 at equal FLOPs; top-1 9.84 vs "
        "monolith 12.81 at 1.08x sampling FLOPs) comes from large data and models where capacity matters.",
        *routing_lines(run, groups),
        "- FD_dom is a Frechet distance in the 64-dimensional features of a small classifier trained on the same "
        f"dataset, with {run.s.n_samples} samples against the plan's held-out split; it ranks samples consistently "
        "but its values are not comparable with FID, and with a few hundred reference images it is biased upwards "
        "(the same bias for every row).",
    ]
    return lines, ratio


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
    setup = (f"- Setup ({s.label} run): dataset `{s.dataset}`, DiT hidden {cfg.hidden}, depth {cfg.depth}, patch "
             f"{cfg.patch_size} ({c.expert_fpi / 1e6:.1f} MFLOP forward per image), batch {c.batch}; monolith "
             f"{s.budget} steps, each of K experts {s.budget}/K steps; learned router {s.router_steps} steps x "
             f"{c.router_batch} ({c.router_fpi / 1e6:.2f} MFLOP per image); seeds {s.seeds}; {s.n_samples} samples per "
             f"evaluation, Heun with {s.sample_steps} steps; checkpoints evaluated at {s.fractions} of the budget. "
             + (f"Measured {measured}; this section was re-rendered from the JSON data." if measured else
                f"Wall time {(time.time() - T0) / 60:.1f} min; load average at the end: {load_str()}."))
    grids = "".join(f"| {m} |\n|---|\n| ![{m}]({rel(p)}) |\n\n" for m, p in grid_paths.items())
    md = (section_header(NAME, f"Ensemble vs monolith at equal training FLOPs: {s.dataset}"
                                 + ("" if s.label == "default" else f" ({s.label} run)"), command) + table
          + f"\n![FD_dom vs training FLOPs]({rel(plot_path)})\n\n" + "\n".join(lines + [setup])
          + "\n\nSamples at the full budget (seed " + str(s.seeds[0]) + ", top-1, learned router for the "
          "ensembles; first 100 of the evaluated samples, class labels drawn like the training set):\n\n" + grids)
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
        # 28x28 on one CPU core: ~6 steps/s at batch 64, so a smaller budget and evaluation than digits'
        # (about 35 CPU-minutes per seed; the seeds run in parallel processes, see --jobs)
        s.budget, s.fractions, s.n_samples, s.sample_steps = 2400, [0.25, 0.5, 1.0], 300, 12
    if args.budget:
        s.budget = args.budget
    if args.seeds or args.first_seed:
        s.seeds = list(range(args.first_seed, args.first_seed + (args.seeds or len(s.seeds))))
    if args.samples:
        s.n_samples = args.samples
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.first_seed < 0 or (args.seeds is not None and args.seeds < 1):
        ap.error("--first-seed must be >= 0 and --seeds >= 1")
    if any(k < 2 for k in s.ks) or s.budget < max(s.ks):
        ap.error("--ks must be >= 2 and the budget at least the largest K")
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-quality-"))
    doc = args.doc if args.doc is not None else (None if args.quick else RESULTS_MD)
    img_dir = args.img_dir or (root / "img" if doc is None else IMG_DIR)
    try:
        run = Run(s, root, load_dataset(s.dataset))
        run_all(run, args.jobs if args.jobs is not None else min(len(s.seeds), os.cpu_count() or 1))
        md, ratio = report(run, img_dir, doc.parent if doc is not None else None)
        if doc is not None:
            write_section(doc, s.section, md, intro=INTRO)
            data = (DATA_DIR if doc == RESULTS_MD else doc.parent) / f"quality-{s.tag}.json"
            write_atomic(data, json.dumps({"settings": asdict(s), "command": command_line(), "date": now_str(),
                                           "records": [asdict(r) for r in run.records]}, indent=1).encode())
        print(md)
        print_ratio("ensemble/monolith FD_dom at equal training FLOPs (best routing)", ratio)
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
    """Saved runs of the same settings and disjoint seeds (parallel `--first-seed` processes) as one."""
    runs = [_load_saved(p) for p in paths]
    base = dict(runs[0]["settings"], seeds=[])
    seeds: list[int] = []
    for path, r in zip(paths, runs):
        if dict(r["settings"], seeds=[]) != base:
            raise SystemExit(f"{path}: settings differ from {paths[0]} (only the seeds may differ)")
        if set(r["settings"]["seeds"]) & set(seeds):
            raise SystemExit(f"{path}: seeds {r['settings']['seeds']} were already loaded")
        seeds += r["settings"]["seeds"]
    return {"settings": dict(base, seeds=sorted(seeds)), "command": " ; ".join(dict.fromkeys(r["command"] for r in runs)),
            "date": max(r["date"] for r in runs), "records": [rec for r in runs for rec in r["records"]]}


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
        print_ratio("ensemble/monolith FD_dom at equal training FLOPs (best routing)", ratio)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
