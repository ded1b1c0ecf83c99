"""`ddm-node embed-text` (captions into a dataset's text embeddings) and `sample`'s `--prompt` / `--prompts`."""

from __future__ import annotations

import argparse

from ddm_node.core.errors import DDMError


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """`--prompt TEXT` (repeatable) and `--prompts FILE` (one per line) of `sample`."""
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="condition on this text (repeatable; a text-conditioned run; one grid column per prompt)")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (with or instead of --prompt)")


def read_prompts(args) -> list[str] | None:
    """The prompts of `--prompt` and `--prompts`, in that order; None when neither was given."""
    from ddm_node.data.text import read_captions

    prompts = list(getattr(args, "prompt", None) or [])
    if getattr(args, "prompts", None):
        prompts += read_captions(args.prompts)[0]
    if prompts and any(not p.strip() for p in prompts):
        raise DDMError("--prompt: empty prompts are not allowed (leave the flag out for unconditional text)")
    return prompts or None


def cmd_embed_text(args) -> int:
    from rich.console import Console

    from ddm_node.data.text_encoder import embed_captions

    console = Console(stderr=True)
    info = embed_captions(args.encoder, args.captions, args.out, batch_size=args.batch_size, device=args.device)
    console.print(f"{info.count} x {info.dim} text embeddings of {args.captions} written to {args.out} "
                  f"(encoder {info.encoder}, files sha256 {info.sha256[:12]}..); partition with --dataset "
                  f"latents:{args.out}")
    print(args.out)
    return 0


def add_embed_text_parser(sub: argparse._SubParsersAction, positive) -> None:
    """The `embed-text` subcommand; `positive` is main's integer parser."""
    p = sub.add_parser("embed-text", help="embed one caption per sample with a CLIP or T5 text encoder into a "
                                          "latents:DIR dataset (text.npy + text.json)")
    p.add_argument("--encoder", required=True, metavar="NAME_OR_DIR",
                   help="a save_pretrained directory with the model and its tokenizer, or a hub id "
                        "(e.g. openai/clip-vit-base-patch32); needs transformers")
    p.add_argument("--captions", required=True, metavar="FILE", help="UTF-8 text, one caption per line per sample")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the dataset directory (with x.npy: one caption per sample), or a new directory")
    p.add_argument("--batch-size", dest="batch_size", type=positive("--batch-size"), default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_embed_text)
