"""Sampling throughput of the routed ensemble against one expert alone, side by side.

A K=4 digits ensemble (tiny DiT experts and the learned router; trained here once and cached in the temp
dir, shared with bench.transfer) samples `--n` class-conditional images with the Heun ODE solver. Sides,
interleaved in rotating order in one run, one torch thread:
- expert 0 alone (the same `Expert` wrapper the ensemble uses, no router);
- top-1, top-2 and full routing, each with the learned router and with the centroid router.
Figures: images/s and the median per-repetition ratio to the single expert. A per-call breakdown
(expert forward on the whole batch, on K groups of the batch, and each router's forward) explains them.

Run: `python -m bench.sampling` (about 5-10 minutes including training) or `--quick`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (BENCHMARKS_MD, Timer, interleave, markdown_table, median, median_ratio, print_ratio,
                          section_header, trained_digits, write_section)

NAME = "bench.sampling"
GOAL = 0.9


@dataclass
class Settings:
    n: int
    steps: int
    reps: int
    expert_steps: int
    router_steps: int


class Sides:
    """Velocity functions for every side and the fixed noise/labels they all sample from."""

    def __init__(self, s: Settings, cache_dir: Path | None = None):
        from ddm_node.bundle import load_bundle
        from ddm_node.generate import class_labels
        from router.ensemble import EnsembleVelocity, Expert

        self.s = s
        run = trained_digits(expert_steps=s.expert_steps, router_steps=s.router_steps, cache_dir=cache_dir)
        self.bundle = load_bundle(run.bundle)
        b = self.bundle
        c, h, w = b.plan.shape
        self.noise = torch.randn((s.n, c, h, w), generator=torch.Generator().manual_seed(0))
        self.y = class_labels(b.plan, s.n, 0)
        self.experts = {k: Expert(m, m.cfg.num_classes) for k, m in b.models.items()}
        self.routers = {"learned": b.router("learned"), "centroid": b.router("centroid")}
        self.velocity = {"expert 0 alone": self.experts[0]}
        for routing in ("top1", "top2", "full"):
            for kind, router in self.routers.items():
                self.velocity[f"{routing}, {kind} router"] = EnsembleVelocity(self.experts, router, routing=routing)
        self.cost: dict[str, tuple[float, float]] = {}  # name -> (expert samples per image per call, router calls)

    def measure(self, name: str):
        from router.sampler import sample

        v = self.velocity[name]
        calls = 2 * self.s.steps  # Heun

        def run() -> float:
            if hasattr(v, "reset_counters"):
                v.reset_counters()
            with Timer() as t:
                sample(v, self.noise, self.s.steps, "heun", self.y)
            if hasattr(v, "reset_counters"):
                self.cost[name] = (v.expert_samples / (self.s.n * calls), v.router_calls / calls)
            return self.s.n / t.seconds

        return run

    def breakdown(self, reps: int = 5) -> list[list]:
        """Milliseconds per velocity call (batch n at t = 0.5): what each part of an ensemble call costs."""
        n, k = self.s.n, len(self.experts)
        x, t, y = self.noise, torch.full((n,), 0.5), self.y
        model = self.experts[0]
        parts = {
            "expert forward, whole batch": lambda: model(x, t, y),
            f"expert forward, {k} groups of n/{k}": lambda: [model(x[i::k], t[i::k], y[i::k]) for i in range(k)],
            "learned router forward": lambda: self.routers["learned"].log_probs(x, t, y),
            "centroid router": lambda: self.routers["centroid"].log_probs(x, t, y),
        }

        def timer(fn):
            def run() -> float:
                with torch.inference_mode(), Timer() as tm:
                    fn()
                return tm.seconds * 1000
            return run

        vals = interleave({name: timer(fn) for name, fn in parts.items()}, reps, warmup=1)
        base = median(vals["expert forward, whole batch"])
        return [[name, median(v), median(v) / base] for name, v in vals.items()]


def report(s: Settings, sides: Sides, vals: dict[str, list[float]], parts: list[list], quick: bool) -> tuple[str, float]:
    base = vals["expert 0 alone"]
    rows = []
    for name, v in vals.items():
        per_img, router = sides.cost.get(name, (1.0, 0.0))
        rows.append([name, median(v), median_ratio(v, base), per_img, router])
    ratio = median_ratio(vals["top1, learned router"], base)
    ratio_c = median_ratio(vals["top1, centroid router"], base)
    ms = {r[0]: r[1] for r in parts}
    k = len(sides.experts)
    e_whole, e_groups = ms["expert forward, whole batch"], ms[f"expert forward, {k} groups of n/{k}"]
    r_learned, r_centroid = ms["learned router forward"], ms["centroid router"]
    ideal = e_whole / (e_whole + r_learned)
    bigger = ("the router" if r_learned > e_groups - e_whole else f"splitting the batch into {k} groups")
    ecfg, rcfg = sides.bundle.models[0].cfg, sides.bundle.learned.net.cfg
    grouped = e_whole / (e_groups + r_learned)
    goal_line = lambda r: "met" if r >= GOAL else f"missed by {GOAL - r:.3f}"  # noqa: E731
    reading = [
        f"- Goal: top-1 / single expert >= {GOAL}. Learned router **{ratio:.3f}** ({goal_line(ratio)}), "
        f"centroid router **{ratio_c:.3f}** ({goal_line(ratio_c)}); medians of {len(base)} interleaved repetitions.",
        f"- What a top-1 call costs (batch {s.n}): the expert on the whole batch takes {e_whole:.1f} ms; split into "
        f"{k} groups (top-1 runs each expert on the samples that chose it) {e_groups:.1f} ms; the learned router "
        f"adds {r_learned:.1f} ms, the centroid router {r_centroid:.1f} ms. Router cost alone would allow "
        f"{ideal:.3f}; router and grouping together {grouped:.3f}; the rest of the gap is indexing and "
        f"scattering the groups back. The larger loss is {bigger}. The learned router is a DiT of depth "
        f"{rcfg.depth} on {(rcfg.image_size // rcfg.patch_size) ** 2} tokens against the expert's depth {ecfg.depth} "
        f"on {(ecfg.image_size // ecfg.patch_size) ** 2} tokens; on a CPU a tiny model's forward is far from linear "
        "in its FLOPs (fixed per-call overhead of many small kernels), so the router costs more than its FLOP share.",
        "- top-2 and full routing cost about 2x and 4x the expert passes (the `expert passes / image` column: "
        "samples through experts per image per velocity call); full routing runs each expert on the whole batch.",
        f"- Setup: digits 8x8, K={k}, tiny experts ({sides.bundle.models[0].cfg.hidden} hidden, depth "
        f"{sides.bundle.models[0].cfg.depth}), {s.n} images per run, Heun {s.steps} steps ({2 * s.steps} velocity "
        f"calls), experts trained {s.expert_steps} steps, router {s.router_steps} steps, one torch thread.",
    ]
    if quick:
        reading.append("- **Quick run**: barely trained models and few repetitions; use the full run for numbers.")
    md = (section_header(NAME, "Sampling throughput of the ensemble")
          + markdown_table(["sampler", "images/s (median)", "ratio to expert alone", "expert passes / image",
                            "router calls / velocity call"], rows)
          + "\nCost of the parts of one velocity call (interleaved, median):\n\n"
          + markdown_table(["part", "ms", "x expert forward"], parts)
          + "\n" + "\n".join(reading) + "\n")
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small batch, few steps and repetitions")
    ap.add_argument("--n", type=int, default=None, help="images per sampling run (default 256, quick 64)")
    ap.add_argument("--steps", type=int, default=None, help="Heun steps (default 8, quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7, quick 2)")
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
    s = Settings(args.n or (64 if q else 256), args.steps or (2 if q else 8), args.reps or (2 if q else 7),
                 args.expert_steps or (40 if q else 400), args.router_steps or (30 if q else 300))
    sides = Sides(s, args.cache_dir)
    vals = interleave({name: sides.measure(name) for name in sides.velocity}, s.reps, warmup=1,
                      budget_s=args.budget_min * 60)
    parts = sides.breakdown(3 if q else 9)
    md, ratio = report(s, sides, vals, parts, q)
    write_section(args.doc, NAME, md)
    print(md)
    print_ratio("top-1 ensemble/single expert sampling images/s", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
