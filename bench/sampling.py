"""Sampling throughput of the routed ensemble against one expert alone, side by side.

A K=4 digits ensemble (tiny DiT experts and the learned router; trained here once and cached in the temp
dir, shared with bench.transfer) samples `--n` class-conditional images with the Heun ODE solver. Sides,
interleaved in rotating order in one run, one torch thread:
- expert 0 alone (the same `Expert` wrapper the ensemble uses, no router), on the whole batch;
- expert 0 alone on the batch cut into K chunks (what top-1 does to the batch, minus the routing);
- top-1, top-2 and full routing, each with the learned router and with the centroid router.
Figures: images per wall-clock second and per CPU-second of this process, each as the median of the
per-repetition ratios to the single expert. A per-call breakdown (expert forward on the whole batch and
on K chunks, each router's forward) explains them.

Run: `python -m bench.sampling` (about 5-10 minutes including training) or `--quick`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    BENCHMARKS_MD,
    interleave,
    markdown_table,
    median,
    median_ratio,
    print_ratio,
    section_header,
    trained_digits,
    write_section,
)

NAME = "bench.sampling"
GOAL = 0.9
BASE = "expert 0 alone"


@dataclass
class Settings:
    n: int
    steps: int
    reps: int
    expert_steps: int
    router_steps: int


class Chunked:
    """One expert run on the batch cut into k contiguous chunks (the batch shapes top-1 produces)."""

    def __init__(self, expert, k: int):
        self.expert, self.k = expert, k

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        ys = [None] * self.k if y is None else y.chunk(self.k)
        return torch.cat([self.expert(xc, tc, yc) for xc, tc, yc in zip(x.chunk(self.k), t.chunk(self.k), ys)])


class Sides:
    """Velocity functions for every side and the fixed noise/labels they all sample from."""

    def __init__(self, s: Settings, cache_dir: Path | None = None):
        from ddm_node.ensemble.bundle import load_bundle
        from ddm_node.ensemble.generate import class_labels
        from router.ensemble import EnsembleVelocity, Expert

        self.s = s
        run = trained_digits(expert_steps=s.expert_steps, router_steps=s.router_steps, cache_dir=cache_dir)
        self.bundle = load_bundle(run.bundle)
        b = self.bundle
        c, h, w = b.plan.shape
        self.noise = torch.randn((s.n, c, h, w), generator=torch.Generator().manual_seed(0))
        self.y = class_labels(b.plan, s.n, 0)
        self.experts = {k: Expert(m, m.cfg.num_classes, objective=b.objectives[k]) for k, m in b.models.items()}
        self.k = len(self.experts)
        self.routers = {"learned": b.router("learned"), "centroid": b.router("centroid")}
        self.velocity = {BASE: self.experts[0],
                         f"expert 0 alone, batch in {self.k} chunks": Chunked(self.experts[0], self.k)}
        for routing in ("top1", "top2", "full"):
            for kind, router in self.routers.items():
                self.velocity[f"{routing}, {kind} router"] = EnsembleVelocity(self.experts, router, routing=routing)
        self.cost: dict[str, tuple[float, float]] = {}  # name -> (expert samples per image per call, router calls)
        self.cpu: dict[str, list[float]] = {name: [] for name in self.velocity}  # images per CPU-second

    def measure(self, name: str):
        from router.sampler import sample

        v = self.velocity[name]
        calls = 2 * self.s.steps  # Heun

        def run() -> float:
            if hasattr(v, "reset_counters"):
                v.reset_counters()
            t0, c0 = time.perf_counter(), time.process_time()
            sample(v, self.noise, self.s.steps, "heun", self.y)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if hasattr(v, "reset_counters"):
                self.cost[name] = (v.expert_samples / (self.s.n * calls), v.router_calls / calls)
            self.cpu[name].append(self.s.n / cpu)
            return self.s.n / wall

        return run

    def breakdown(self, reps: int, calls: int) -> list[list]:
        """CPU milliseconds per velocity call (batch n at t = 0.5): what each part of an ensemble call costs."""
        n, k = self.s.n, self.k
        x, t, y = self.noise, torch.full((n,), 0.5), self.y
        model = self.experts[0]
        chunked = Chunked(model, k)
        parts = {
            "expert forward, whole batch": lambda: model(x, t, y),
            f"expert forward, {k} chunks of n/{k}": lambda: chunked(x, t, y),
            "learned router forward": lambda: self.routers["learned"].log_probs(x, t, y),
            "centroid router": lambda: self.routers["centroid"].log_probs(x, t, y),
        }

        def timer(fn):
            def run() -> float:  # mean of `calls` back-to-back calls: one ms-long call is too noisy here
                with torch.inference_mode():
                    c0 = time.process_time()
                    for _ in range(calls):
                        fn()
                    return (time.process_time() - c0) * 1000 / calls
            return run

        vals = interleave({name: timer(fn) for name, fn in parts.items()}, reps, warmup=1)
        base = median(vals["expert forward, whole batch"])
        return [[name, median(v), median(v) / base] for name, v in vals.items()]


def report(s: Settings, sides: Sides, vals: dict[str, list[float]], parts: list[list], quick: bool) -> tuple[str, float]:
    k = sides.k
    chunk_name = f"expert 0 alone, batch in {k} chunks"
    base, base_cpu = vals[BASE], sides.cpu[BASE]
    rows = []
    for name, v in vals.items():
        per_img, router = sides.cost.get(name, (1.0, 0.0))
        rows.append([name, median(v), median_ratio(v, base), median_ratio(sides.cpu[name], base_cpu), per_img, router])
    ratio = median_ratio(vals["top1, learned router"], base)
    ratio_c = median_ratio(vals["top1, centroid router"], base)
    cpu_l = median_ratio(sides.cpu["top1, learned router"], base_cpu)
    cpu_c = median_ratio(sides.cpu["top1, centroid router"], base_cpu)
    vs_chunks = median_ratio(sides.cpu["top1, learned router"], sides.cpu[chunk_name])
    ms = {r[0]: r[1] for r in parts}
    e_whole, e_chunks = ms["expert forward, whole batch"], ms[f"expert forward, {k} chunks of n/{k}"]
    r_learned, r_centroid = ms["learned router forward"], ms["centroid router"]
    ecfg, rcfg = sides.bundle.models[0].cfg, sides.bundle.learned.net.cfg
    verdict = lambda r: "met" if r >= GOAL else f"missed by {GOAL - r:.3f}"  # noqa: E731
    reading = [
        f"- Goal: top-1 / single expert >= {GOAL}. Images/s (wall clock): learned router **{ratio:.3f}** "
        f"({verdict(ratio)}), centroid router **{ratio_c:.3f}** ({verdict(ratio_c)}). Per CPU-second: "
        f"{cpu_l:.3f} and {cpu_c:.3f}. Medians of {len(base)} interleaved repetitions; on this shared machine a "
        "single repetition's ratio can be off by 20%, the CPU figures less so.",
        f"- Top-1 cuts the batch into one group per expert. The expert alone on {k} chunks of {s.n // k} takes "
        f"{e_chunks:.1f} CPU-ms against {e_whole:.1f} on the whole batch of {s.n} ({e_chunks / e_whole:.2f}x: "
        + ("smaller activations stay in cache, so splitting helps at this batch size" if e_chunks < e_whole else
           "fixed per-call costs weigh more on small batches, so splitting costs")
        + "). Against the expert alone on the same chunked batch, top-1 with the learned router runs at "
        f"{vs_chunks:.3f} per CPU-second: the routing's own cost.",
        f"- That routing cost is {(1 / vs_chunks - 1) * 100:.0f}% extra time; the learned router's forward "
        f"accounts for {r_learned / e_chunks * 100:.0f} points of it ({r_learned:.1f} CPU-ms per call, "
        f"{r_learned / e_whole * 100:.0f}% of an expert forward on the whole batch; a DiT of depth {rcfg.depth} on "
        f"{(rcfg.image_size // rcfg.patch_size) ** 2} tokens against the expert's depth {ecfg.depth} on "
        f"{(ecfg.image_size // ecfg.patch_size) ** 2}), {r_centroid:.1f} for the centroid router (a Gaussian "
        "mixture over the published sub-centroids). The rest is gathering and scattering the groups, and "
        "groups of unequal size (the router's choices are not uniform).",
        "- top-2 and full routing pay 2x and 4x the expert passes (`expert passes / image`: samples through "
        "experts per image per velocity call), and full routing runs each expert on the whole batch.",
        f"- Setup: digits 8x8, K={k}, tiny experts ({ecfg.hidden} hidden, depth {ecfg.depth}), {s.n} images per "
        f"run, Heun {s.steps} steps ({2 * s.steps} velocity calls), experts trained {s.expert_steps} steps, router "
        f"{s.router_steps} steps, one torch thread.",
    ]
    if quick:
        reading.append("- **Quick run**: barely trained models and few repetitions; use the full run for numbers.")
    md = (section_header(NAME, "Sampling throughput of the ensemble")
          + markdown_table(["sampler", "images/s (median)", "ratio to expert alone", "ratio per CPU-s",
                            "expert passes / image", "router calls / velocity call"], rows)
          + "\nCPU cost of the parts of one velocity call (interleaved, median):\n\n"
          + markdown_table(["part", "CPU ms", "x expert forward"], parts)
          + "\n" + "\n".join(reading) + "\n")
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small batch, few steps and repetitions")
    ap.add_argument("--n", type=int, default=None, help="images per sampling run (default 256, quick 64)")
    ap.add_argument("--steps", type=int, default=None, help="Heun steps (default 4, quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 15, quick 2)")
    ap.add_argument("--expert-steps", type=int, default=None,
                    help="training steps of the cached digits experts (default 400, quick 40)")
    ap.add_argument("--router-steps", type=int, default=None,
                    help="training steps of the cached learned router (default 300, quick 30)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the trained ensemble is cached (default: TMPDIR/ddm-bench-cache)")
    ap.add_argument("--budget-min", type=float, default=20.0,
                    help="stop adding repetitions (after 2) when the next would end past this many minutes")
    ap.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section to")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    q = args.quick
    s = Settings(args.n or (64 if q else 256), args.steps or (2 if q else 4), args.reps or (2 if q else 15),
                 args.expert_steps or (40 if q else 400), args.router_steps or (30 if q else 300))
    sides = Sides(s, args.cache_dir)
    measures = {name: sides.measure(name) for name in sides.velocity}
    for fn in measures.values():  # warm-up pass, not recorded
        fn()
    sides.cpu = {name: [] for name in sides.velocity}
    vals = interleave(measures, s.reps, budget_s=args.budget_min * 60)
    parts = sides.breakdown(3 if q else 15, 2 if q else 5)
    md, ratio = report(s, sides, vals, parts, q)
    write_section(args.doc, NAME, md)
    print(md)
    print_ratio("top-1 ensemble/single expert sampling images/s", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
