"""The `ddm-node` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddm_node import __version__
from ddm_node.cli.distill import add_distill_parser
from ddm_node.cli.export import add_export_parsers
from ddm_node.cli.features import FEATURES_METAVAR, add_features_parser, features_overrides
from ddm_node.cli.flags import add_set_flag, positive
from ddm_node.cli.latents import add_encode_parser
from ddm_node.cli.logs import add_log_flags, setup_logging
from ddm_node.cli.observing import add_dashboard_parser
from ddm_node.cli.packs import add_pack_parser, add_packs_flag, with_packs
from ddm_node.cli.start import add_start_parser
from ddm_node.cli.text import add_embed_text_parser, add_prompt_flags, read_prompts
from ddm_node.core.config import RouterChoice, Routing, Solver, choices
from ddm_node.core.errors import DDMError

log = logging.getLogger("ddm_node")


# ------------------------------------------------------------------------------------------- helpers


def console():
    from ddm_node.cli.logs import stderr_console

    return stderr_console()


@contextmanager
def progress_bar(description: str, total: int, start: int = 0) -> Iterator:
    """A rich progress bar on stderr; yields a function advance(step, loss)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console(), transient=False) as prog:
        task = prog.add_task(description, total=total, completed=start, info="")

        def advance(step: int, loss: float | None = None) -> None:
            prog.update(task, completed=step + 1 if step + 1 <= total else total,
                        info="" if loss is None else f"loss {loss:.4f}")

        yield advance


def load_identity(path: str | None):
    if path is None:
        return None
    from ddm_node.core.identity import Identity

    return Identity.load(path)


def load_plan(path: str):
    from ddm_node.data.plan import Plan

    return Plan.load(path)


def sample_config(args, plan):
    """The plan's sample config with CLI flags applied."""
    from ddm_node.core.config import Config, from_dict, to_dict

    values = to_dict(plan.cfg)
    for key in ("steps", "routing", "solver", "router", "top_k", "cfg_scale"):
        value = getattr(args, key, None)
        if value is not None:
            values["sample"][key] = value
    return from_dict(values, Config, source="flags").sample


# ------------------------------------------------------------------------------------------- commands


def cmd_partition(args) -> int:
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan

    cfg = load_config(args.config, {"data.dataset": args.dataset, "partition.experts": args.experts,
                                    "train.steps": args.steps, **features_overrides(args.features)}, args.sets)
    ds = load_dataset(cfg.data.dataset)
    plan = with_packs(make_plan(cfg, ds), ds, args.out, args.packs)  # the data packs under OUT/packs/
    path = plan.save(args.out)
    sizes = ", ".join(str(len(s.ids)) for s in plan.shards)
    console().print(f"plan written to {path}: {len(plan.shards)} shards of {sizes} samples, "
                    f"{len(plan.eval_ids)} held out, {cfg.train.steps} steps per expert")
    print(plan.run_id)
    return 0


def cmd_train_expert(args) -> int:
    from ddm_node.train.expert import train_shard

    plan = load_plan(args.plan)
    plan.shard(args.shard)
    steps = plan.cfg.train.steps if args.steps is None else args.steps
    with progress_bar(f"expert {args.shard}", steps) as advance:
        path = train_shard(plan, args.shard, args.out, steps=steps, identity=load_identity(args.identity),
                           on_step=advance, device=args.device)
    print(path if path else f"shard {args.shard} already at step {steps}")
    return 0


def cmd_train_router(args) -> int:
    from ddm_node.train.router_job import train_plan_router

    plan = load_plan(args.plan)
    steps = plan.cfg.router.steps if args.steps is None else args.steps
    with progress_bar("router", steps) as advance:
        path = train_plan_router(plan, args.out, steps=steps, identity=load_identity(args.identity), on_step=advance)
    print(path)
    return 0


def cmd_bundle(args) -> int:
    from ddm_node.ensemble.bundle import sources_from_work_dirs, write_bundle

    plan = load_plan(args.plan)
    sources = sources_from_work_dirs(args.experts, [s.index for s in plan.shards])
    out = write_bundle(args.out, plan, sources, Path(args.router) if args.router else None)
    missing = [s.index for s in plan.shards if s.index not in sources]
    if missing:
        console().print(f"[yellow]missing shards: {missing}[/]")
    print(out)
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from ddm_node.core.manifest import write_atomic
    from ddm_node.ensemble.bundle import load_bundle
    from ddm_node.ensemble.generate import generate, save_grid
    from ddm_node.ensemble.images import bundle_vae, to_images

    prompts = read_prompts(args)  # the flags first: a bad one is the only line printed
    bundle = load_bundle(args.ensemble)
    vae = bundle_vae(bundle, args.vae)  # a latent run's VAE, checked before any sampling
    cfg = sample_config(args, bundle.plan)
    s = generate(bundle, args.n, cfg, seed=args.seed, prompts=prompts)
    images = to_images(vae, bundle, s.x)
    save_grid(images, args.out, ncol=len(prompts) if prompts else None)
    if args.npz:
        import io

        buf = io.BytesIO()
        arrays = {"x": s.x.numpy()} | ({"images": images.numpy()} if vae is not None else {})
        if s.y is not None:
            arrays["y"] = s.y.numpy()
        np.savez(buf, **arrays)
        write_atomic(args.npz, buf.getvalue())
    console().print(f"{args.n} samples in {s.seconds:.1f}s ({args.n / max(s.seconds, 1e-9):.1f} images/s), "
                    f"routing {cfg.routing}, router {s.router}, "
                    f"{s.expert_samples / (args.n * cfg.steps * (2 if cfg.solver == 'heun' else 1)):.2f} "
                    f"expert forwards per sample-step")
    print(args.out)
    return 0


def cmd_eval(args) -> int:
    from ddm_node.ensemble.bundle import load_bundle
    from ddm_node.ensemble.generate import bundle_eval_data, generate, score
    from ddm_node.ensemble.images import bundle_vae, image_eval_data, scored_images

    bundle = load_bundle(args.ensemble)
    vae = bundle_vae(bundle, args.vae)  # a latent run scores decoded images on both sides (ensemble/images.py)
    cfg = sample_config(args, bundle.plan)
    data = bundle_eval_data(bundle)  # the bundle's held-out pack, else the plan's dataset
    s = generate(bundle, args.n, cfg, seed=args.seed, data=data)
    scores = score(scored_images(vae, bundle, s.x), bundle.plan, seed=args.seed,
                   data=image_eval_data(vae, bundle, data))
    if args.json:
        import dataclasses

        out = dataclasses.asdict(scores) | {"routing": cfg.routing, "router": cfg.router, "steps": cfg.steps,
                                            "experts": sorted(bundle.models), "missing": bundle.missing,
                                            "seconds": s.seconds}
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"{scores.line()}  routing {cfg.routing}, experts {sorted(bundle.models)}")
    return 0


def cmd_keygen(args) -> int:
    from ddm_node.core.identity import Identity

    ident = Identity.generate()
    ident.save(args.out, overwrite=args.force)
    print(ident.public_hex)
    return 0


def cmd_status(args) -> int:
    from ddm_node.clients.status import run_status

    return run_status(args.initial_peers, args.run_id, as_json=args.json, timeout=args.timeout, watch=args.watch)


def cmd_assemble(args) -> int:
    from ddm_node.clients.assemble import run_assemble
    from ddm_node.core.identity import Identity

    identity = Identity.load(args.identity) if getattr(args, "identity", None) else None
    return run_assemble(args.initial_peers, args.run_id, args.out, identity=identity, min_experts=args.min_experts,
                        wait=args.wait)


def cmd_verify(args) -> int:
    from ddm_node.ensemble.bundle import verify_bundle

    index = verify_bundle(args.dir, require_signature=not args.allow_unsigned, trusted_keys=args.trusted_key or None)
    what = "a distilled student" if index.get("student") else f"{len(index['experts'])} experts"
    print(f"{args.dir}: OK, {what}, router {index['router']['kind']}, missing {index['missing'] or 'none'}")
    return 0


def cmd_demo(args) -> int:
    from ddm_node.cli.demo import run_demo

    return run_demo(args)


# ------------------------------------------------------------------------------------------- parser


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive("--steps"), help="ODE steps (default: the plan's sample.steps)")
    p.add_argument("--routing", choices=choices(Routing))
    p.add_argument("--top-k", dest="top_k", type=positive("--top-k"))
    p.add_argument("--router", choices=choices(RouterChoice))
    p.add_argument("--solver", choices=choices(Solver))
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", metavar="DIR", help="a latent run's VAE directory when it moved from where the plan "
                   "records it (its files must hash as recorded)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddm-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ddm-node {__version__}")
    add_log_flags(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("partition", help="cluster a dataset into K shards and write the run plan")
    p.add_argument("--config", help="YAML config (default: built-in defaults = configs/default.yaml)")
    p.add_argument("--dataset", help="digits | fashion-mnist | mnist | npz:PATH | folder:PATH")
    p.add_argument("--experts", type=positive("--experts"), help="number of shards K")
    p.add_argument("--steps", type=positive("--steps"), help="per-expert step budget")
    p.add_argument("--features", metavar=FEATURES_METAVAR, help="clustering features: PCA of pixels, the dataset's "
                   "own, or an [N, F] .npy file (ddm-node features writes one)")
    add_set_flag(p)
    add_packs_flag(p)
    p.add_argument("--out", required=True, help="directory for plan.json (and packs/)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("train-expert", help="train one shard's expert alone (no network)")
    p.add_argument("--plan", required=True, help="plan directory or plan.json")
    p.add_argument("--shard", required=True, type=positive("--shard"))
    p.add_argument("--steps", type=positive("--steps"))
    p.add_argument("--out", required=True, help="work directory for checkpoints")
    p.add_argument("--identity", help="key file to sign checkpoints with (ddm-node keygen)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's train.device)")
    p.set_defaults(func=cmd_train_expert)

    p = sub.add_parser("train-router", help="train the learned router on all shards")
    p.add_argument("--plan", required=True)
    p.add_argument("--steps", type=positive("--steps"))
    p.add_argument("--out", required=True, help="router artifact directory")
    p.add_argument("--identity")
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("bundle", help="write an ensemble bundle from local expert checkpoints")
    p.add_argument("--plan", required=True)
    p.add_argument("--experts", required=True, nargs="+", help="work directories of train-expert runs")
    p.add_argument("--router", help="router artifact directory (default: centroid router)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("sample", help="sample a PNG grid from an ensemble bundle")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--n", type=positive("--n"), default=64)
    add_sample_flags(p)
    p.add_argument("--out", required=True, help="PNG grid path")
    p.add_argument("--npz", help="also write the samples as .npz (x, y; a latent run: x latents, images decoded)")
    add_prompt_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FD_dom, KID, precision/recall of ensemble samples on the held-out split")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--n", type=positive("--n"), default=500)
    add_sample_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("keygen", help="write a new Ed25519 identity key (mode 0600)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=cmd_keygen)

    add_start_parser(sub)

    p = sub.add_parser("status", help="a table of the run's shards: owner, step, heartbeat, checkpoints, replicas")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--run", dest="run_id", required=True, metavar="RUN_ID")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the plan")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("assemble", help="fetch the newest verified expert of every shard and write a bundle")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--run", dest="run_id", required=True, metavar="RUN_ID")
    p.add_argument("--out", required=True)
    p.add_argument("--min-experts", type=positive("--min-experts"), default=1)
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for the swarm (a join no initial peer answers is tried again) and for "
                        "unfinished shards")
    p.add_argument("--identity", help="key file for this peer's DHT records (default: a throwaway key)")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("verify", help="check every signature and hash in a bundle")
    p.add_argument("dir")
    p.add_argument("--trusted-key", action="append", metavar="HEX", help="accept only these publishers")
    p.add_argument("--allow-unsigned", action="store_true", help="check hashes only (local bundles)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded digits dataset, with a report")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.set_defaults(func=cmd_demo)
    add_features_parser(sub, positive)
    add_encode_parser(sub, positive)
    add_distill_parser(sub, positive)
    add_export_parsers(sub)
    add_embed_text_parser(sub, positive)
    add_dashboard_parser(sub)
    for p in sub.choices.values():  # -v/-q and the log flags after the subcommand too
        add_log_flags(p, in_subcommand=True)
    add_pack_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # gRPC's C core logs to stderr on its own (a failed bind, fork warnings): keep errors to our one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE" if args.verbose < 2 else "ERROR")
    try:
        setup_logging(args.command, args.verbose, args.quiet, args.log_file, args.log_format)
        return args.func(args)
    except DDMError as exc:
        print(f"ddm-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or port problem no check caught: still one line, no traceback
        log.debug("%s failed", args.command, exc_info=True)
        print(f"ddm-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddm-node {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
