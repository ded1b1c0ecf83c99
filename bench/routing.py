"""Routing accuracy and calibration: how often each router sends a noised training image to its own cluster's
expert, and how sure it is when it does.

For K = 4 and 8 (the bench.quality plans of the dataset), every training image x0 (label y, cluster k) is
noised to x_t = (1-t) x0 + t eps at several t, and each router's top-1 choice argmax_k p(k | x_t, t, y) is
compared with k. Calibration: mean confidence (the top-1 probability) minus accuracy, per t; 0 is calibrated,
> 0 overconfident. Routers: the learned one (sees y); the centroid router from pixel statistics alone; the
class-aware centroid router (per-(cluster, class) components and the temperature each expert fits on its own
data, router/fit.py); the same without the temperature (T = 1); the class-aware router as it was before
(pixel components and the class histogram taken as independent, T = 1); and, as a floor, the label alone
(p(k | y) from the class histograms). Also the learned router's share of the training FLOPs at bench.quality's
settings.

Run: `python -m bench.routing` (digits, a few minutes), `--dataset fashion-mnist` (10000 of the 54000
training images; about half an hour on a loaded core), `--quick` for a smoke run (prints only). The printed
ratio is the class-aware centroid router's accuracy over the learned router's, K = 8, mean over t.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from bench.common import RESULTS_MD, markdown_table, print_ratio, section_header, write_section
from bench.quality import DATASETS
from ddm_node.core.config import Config, load_config
from ddm_node.core.model import flops_per_image
from ddm_node.data.datasets import load_dataset
from ddm_node.data.plan import make_plan
from ddm_node.train.router_job import plan_router_data
from router.centroid import CentroidRouter, ClusterStats
from router.learned import router_flops_per_image, router_model_config, train_router, training_share

NAME = "bench.routing"
TS = (0.1, 0.3, 0.5, 0.7, 0.9)
AWARE = "centroid, class-aware"
ROUTERS = ("learned", "centroid, pixels", AWARE, "centroid, class-aware, T = 1",
           "centroid, class-aware, before (naive, T = 1)", "label alone")
QUALITY_BUDGET = {"digits": 1600, "fashion-mnist": 2400}  # bench.quality's default monolith steps per dataset
SURE = 0.99  # "wrong and sure": a wrong routing with a top-1 probability above this


@dataclass
class Scores:
    """Per router, per t: accuracy, mean confidence, and the share of routings that are wrong with p > SURE."""

    acc: dict[str, list[float]]
    conf: dict[str, list[float]]
    sure_wrong: dict[str, list[float]]
    images: int

    def gap(self, name: str) -> list[float]:
        return [c - a for c, a in zip(self.conf[name], self.acc[name])]


def config(dataset: str, k: int, router_steps: int, seed: int = 0) -> Config:
    over = dict(DATASETS.get(dataset, {}))
    over.update({"data.dataset": dataset, "partition.experts": k, "router.steps": router_steps, "router.seed": seed})
    return load_config(overrides=over)


def routers(x: torch.Tensor, cluster: torch.Tensor, y: torch.Tensor, cfg: Config, experts: list[int],
            num_classes: int) -> dict[str, object]:
    """Every router of ROUTERS but the label alone, from the routers' data."""
    sub, seed = cfg.partition.sub_centroids, cfg.partition.seed
    members = [cluster == i for i in experts]
    aware = {i: ClusterStats.from_data(x[m], sub, seed=seed, y=y[m], num_classes=num_classes)
             for i, m in zip(experts, members)}
    pixels = {i: ClusterStats.from_data(x[m], sub, seed=seed) for i, m in zip(experts, members)}
    naive = {i: dataclasses.replace(pixels[i], calib_t=None, calib_temp=None, class_counts=aware[i].class_counts)
             for i in experts}
    uncalibrated = {i: dataclasses.replace(s, calib_t=None, calib_temp=None) for i, s in aware.items()}
    c, h = x.shape[1], x.shape[2]
    return {
        "learned": train_router(x, cluster, y, num_classes, h, c, experts, cfg.router),
        "centroid, pixels": CentroidRouter(pixels),
        AWARE: CentroidRouter(aware),
        "centroid, class-aware, T = 1": CentroidRouter(uncalibrated),
        "centroid, class-aware, before (naive, T = 1)": CentroidRouter(naive),
    }


def measure(dataset: str, k: int, router_steps: int, max_images: int, seed: int = 0) -> Scores:
    """Accuracy and calibration per router and t for a K-shard plan of `dataset` (the bench.quality settings)."""
    cfg = config(dataset, k, router_steps, seed)
    ds = load_dataset(dataset)
    plan = make_plan(cfg, ds)
    x, cluster, y, _ = plan_router_data(plan, ds)
    num_classes = plan.cfg.model.num_classes  # the plan fills it from the dataset
    experts = [s.index for s in plan.shards]
    rs = routers(x, cluster, y, cfg, experts, num_classes)
    counts = torch.stack([torch.bincount(y[cluster == i], minlength=num_classes) for i in experts]).double()
    label_post = (counts + 0.5) / (counts + 0.5).sum(0, keepdim=True)  # p(k | y) [K, C], smoothed like the router
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x), generator=g)[:max_images].sort().values
    x, cluster, y = x[pick], cluster[pick], y[pick]
    out = Scores({n: [] for n in ROUTERS}, {n: [] for n in ROUTERS}, {n: [] for n in ROUTERS}, len(x))
    with torch.no_grad():
        for t in TS:
            xt = (1 - t) * x + t * torch.randn(x.shape, generator=g)
            probs = {name: r.log_probs(xt, t, y).double().exp() for name, r in rs.items()}
            probs["label alone"] = label_post[:, y].T
            for name, p in probs.items():
                conf, top = p.max(1)
                right = (torch.tensor(experts)[top] == cluster).double()
                out.acc[name].append(float(right.mean()))
                out.conf[name].append(float(conf.mean()))
                out.sure_wrong[name].append(float(((conf > SURE) & (right == 0)).double().mean()))
    return out


def flop_lines(dataset: str) -> list[str]:
    """The learned router's share of the training FLOPs at bench.quality's settings, with its patch now and with
    the router size's own patch (max_patch 0, as before)."""
    out = []
    for k in (4, 8):
        cfg = config(dataset, k, 800)
        ds = load_dataset(dataset)
        c, h, _ = ds.shape
        expert = flops_per_image(dataclasses.replace(cfg.model, image_size=h, channels=c,
                                                     num_classes=ds.num_classes))
        expert_images = QUALITY_BUDGET[dataset] * cfg.train.batch_size
        shares = []
        for rcfg in (cfg.router, dataclasses.replace(cfg.router, max_patch=0)):
            model = router_model_config(rcfg, h, c, ds.num_classes).resolved()
            router = router_flops_per_image(model, k) * rcfg.steps * rcfg.batch_size
            shares.append((model.patch_size, (h // model.patch_size) ** 2, training_share(router, expert * expert_images)))
        (p, n, now), (p0, n0, before) = shares
        out.append(f"K={k}: patch {p} ({n} token{'s' if n > 1 else ''}) {now * 100:.1f}%, "
                   f"against {before * 100:.1f}% with the size's own patch {p0} ({n0} tokens)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=sorted(QUALITY_BUDGET))
    ap.add_argument("--quick", action="store_true", help="smoke run: router 100 steps, 1000 images, print only")
    ap.add_argument("--images", type=int, default=None, help="training images evaluated (default: all of digits', "
                    "10000 of Fashion-MNIST's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    steps = 100 if args.quick else 800
    cap = args.images or (1000 if args.quick else 10000 if args.dataset == "fashion-mnist" else 1 << 30)
    results = {k: measure(args.dataset, k, steps, cap) for k in (4, 8)}
    md = report(args.dataset, results, steps, time.time() - t0)
    if not args.quick:
        section = NAME if args.dataset == "digits" else f"{NAME}.{args.dataset}"
        write_section(RESULTS_MD, section, md)
    print(md)
    mean8 = {n: statistics.fmean(a) for n, a in results[8].acc.items()}
    print_ratio("class-aware centroid / learned router top-1 routing accuracy (K=8, mean over t)",
                mean8[AWARE] / mean8["learned"])
    return 0


def report(dataset: str, results: dict[int, Scores], steps: int, wall: float) -> str:
    """The section: accuracy and calibration tables, the FLOP share, and what they say."""
    cols = [*(f"t={t}" for t in TS)]
    acc = markdown_table(["plan", "router", *cols, "mean"], [
        [f"K={k}", n, *(f"{a:.3f}" for a in s.acc[n]), f"{statistics.fmean(s.acc[n]):.3f}"]
        for k, s in results.items() for n in ROUTERS])
    cal = markdown_table(["plan", "router", *cols, "largest |gap|"], [
        [f"K={k}", n, *(f"{g:+.3f}" for g in s.gap(n)), f"{max(abs(g) for g in s.gap(n)):.3f}"]
        for k, s in results.items() for n in ROUTERS])
    worst = max(max(abs(g) for g in s.gap(AWARE)) for s in results.values())
    sure = {k: (s.sure_wrong[AWARE][0], s.sure_wrong["centroid, class-aware, before (naive, T = 1)"][0])
            for k, s in results.items()}
    n = results[8].images
    setting = " (the bench.quality setting)" if steps == 800 else " (quick: undertrained)"
    lines = [
        f"- {n} training images of {dataset} (the routers' own data), each noised once per t; learned router "
        f"{steps} steps x 128{setting}; centroid routers from up to 4 components per cluster (pixels) or per "
        "(cluster, class) (class-aware). Calibration is mean confidence minus accuracy: > 0 is overconfident.",
        f"- Class-aware centroid router: largest |confidence - accuracy| over t and K = {worst:.3f} "
        f"({'within' if worst <= 0.05 else 'outside'} the 0.05 goal). Wrong with p > {SURE} at t = 0.1: "
        + ", ".join(f"K={k} {now * 100:.1f}% (before {was * 100:.1f}%)" for k, (now, was) in sure.items()) + ".",
        "- Learned router's share of an ensemble's training FLOPs at bench.quality's settings (monolith budget "
        f"{QUALITY_BUDGET[dataset]} steps x 64, router 800 x 128; `router_flops_per_image`, `flops_per_image`): "
        + "; ".join(flop_lines(dataset)) + ".",
        f"- Wall time {wall:.0f} s.",
    ]
    title = f"Routing accuracy and calibration of the routers on {dataset}"
    return (section_header(NAME, title) + "Top-1 routing accuracy:\n\n" + acc + "\nCalibration (mean confidence "
            "minus accuracy):\n\n" + cal + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
