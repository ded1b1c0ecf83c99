"""`ddm-node encode`: a dataset's images through a diffusers VAE into a `latents:DIR` dataset (data/latents.py)."""

from __future__ import annotations

import argparse


def cmd_encode(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ddm_node.cli.logs import stderr_console
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.latents import encode_latents
    from ddm_node.data.vae import load_vae

    ds = load_dataset(args.dataset)
    vae = load_vae(args.vae, device=args.device)
    console = stderr_console()
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console)
    task = prog.add_task("encode", total=len(ds))

    def advance(done: int) -> None:
        prog.start()  # at the first batch: a refused --out or a finished DIR shows no bar
        prog.update(task, completed=done)

    try:
        out = encode_latents(ds, vae, args.out, batch=args.batch, size=args.size, on_batch=advance)
    finally:
        prog.stop()
    c, h, w = out.shape
    what = "already held" if out.already else "written to"
    resumed = f" (resumed at {out.resumed_at})" if out.resumed_at and not out.already else ""
    console.print(f"{out.n} latents {c}x{h}x{w} of {ds.spec} {what} {out.path}{resumed}; "
                  f"partition with --dataset latents:{out.path}")
    print(f"latents:{out.path}")
    return 0


def add_encode_parser(sub: argparse._SubParsersAction, positive) -> None:
    """The `encode` subcommand; `positive` is main's non-negative integer parser."""
    p = sub.add_parser("encode", help="encode a dataset's images with a diffusers VAE (AutoencoderKL) into a "
                                      "latents:DIR dataset")
    p.add_argument("--vae", required=True, metavar="NAME_OR_DIR",
                   help="a save_pretrained directory or a hub id (owner/name[/subfolder], e.g. "
                        "stabilityai/sd-vae-ft-mse); needs diffusers")
    p.add_argument("--dataset", required=True, help="the image dataset spec (digits, fashion-mnist, npz:PATH, ...)")
    p.add_argument("--out", required=True, help="the latents directory to write (x.npy, y.npy, vae.json)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=positive("--batch"), default=64)
    p.add_argument("--size", type=positive("--size"), default=None,
                   help="encode images at SIZE x SIZE (default: their size rounded up to the VAE's factor)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_encode)
