"""`ddm-node pack` (data packs for an existing plan) and partition's `--no-packs` flag."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_packs_flag(p: argparse.ArgumentParser) -> None:
    """partition's `--no-packs`."""
    p.add_argument("--no-packs", dest="packs", action="store_false",
                   help="write no data packs: every island then needs the dataset (a version-1 plan)")


def with_packs(plan, ds, out: str | Path, packs: bool = True):
    """The plan with its data packs written under OUT/packs/ (unchanged with `packs` False)."""
    from ddm_node.data.packing import write_plan_packs

    return write_plan_packs(plan, ds, out) if packs else plan


def cmd_pack(args) -> int:
    from rich.console import Console

    from ddm_node.core.manifest import write_atomic
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import PLAN_FILE, Plan, check_dataset

    path = Path(args.plan)
    plan = Plan.load(path)
    directory = path if path.is_dir() else path.parent
    out = Path(args.out) if args.out else directory
    ds = load_dataset(plan.dataset)
    check_dataset(plan, ds)
    packed = with_packs(plan, ds, out)
    console = Console(stderr=True)
    if packed.run_id != plan.run_id:
        kept = ""
        if out == directory:  # the old plan stays readable beside the new one: its run id is another run's
            write_atomic(directory / f"plan-{plan.run_id[:12]}.json", plan.to_bytes())
            kept = f"; the old plan is kept as plan-{plan.run_id[:12]}.json"
        console.print(f"[yellow]the plan now records its packs, which makes it a new run (id below){kept}[/]")
    packed.save(out)
    total = sum(r.size for r in packed.packs.shards) + (packed.packs.eval.size if packed.packs.eval else 0)
    console.print(f"{len(packed.packs.shards)} shard packs{' and the held-out pack' if packed.packs.eval else ''} "
                  f"({total} bytes) under {out / 'packs'}; plan {out / PLAN_FILE}")
    print(packed.run_id)
    return 0


def add_pack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="write the data packs of an existing plan (islands without the dataset train "
                                    "from them); needs the plan's dataset")
    p.add_argument("--plan", required=True, help="plan directory or plan.json")
    p.add_argument("--out", help="directory for plan.json and packs/ (default: the plan's directory)")
    p.set_defaults(func=cmd_pack)
