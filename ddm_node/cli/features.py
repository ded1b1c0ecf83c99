"""`ddm-node features` (encoder features into an .npy file) and partition's `--features` flag."""

from __future__ import annotations

import argparse

from ddm_node.core.config import Features, choices
from ddm_node.core.errors import DDMError

FEATURES_METAVAR = "pca|dataset|npy:PATH"


def features_overrides(text: str | None) -> dict[str, str]:
    """Config overrides for partition's `--features` flag: pca, dataset, or npy:PATH (an [N, F] .npy file)."""
    if text is None:
        return {}
    if text.startswith("npy:") and len(text) > 4:
        return {"partition.features": "npy", "partition.features_path": text[4:]}
    if text in choices(Features) and text != "npy":
        return {"partition.features": text}
    raise DDMError(f"--features must be {FEATURES_METAVAR.replace('|', ', ')}, got {text!r}")


def cmd_features(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.encoder import encode_dataset, load_encoder

    ds = load_dataset(args.dataset)
    encoder = load_encoder(args.encoder, device=args.device)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        task = prog.add_task(f"{encoder.model_type} features", total=len(ds))
        out = encode_dataset(ds, encoder, args.out, batch_size=args.batch_size,
                             on_batch=lambda done: prog.update(task, completed=done))
    console.print(f"{out.n} x {out.dim} {encoder.model_type} features of {ds.spec} written to {out.path}; "
                  f"partition with --features npy:{out.path}")
    print(out.path)
    return 0


def add_features_parser(sub: argparse._SubParsersAction, positive) -> None:
    """The `features` subcommand; `positive` is main's non-negative integer parser."""
    p = sub.add_parser("features", help="compute image features with a pretrained encoder (DINOv2, CLIP) into an "
                                        ".npy file for `partition --features npy:PATH`")
    p.add_argument("--encoder", required=True, metavar="NAME_OR_DIR",
                   help="a save_pretrained directory or a hub id (e.g. facebook/dinov2-small); needs transformers")
    p.add_argument("--dataset", required=True, help="the dataset spec, exactly as partition will use it")
    p.add_argument("--out", required=True, help="the .npy file to write (float32 [N, F], one row per sample)")
    p.add_argument("--batch-size", dest="batch_size", type=positive("--batch-size"), default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_features)
