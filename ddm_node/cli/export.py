"""`ddm-node export` (a bundle as a diffusers pipeline directory) and `ddm-node push` (upload it to the hub)."""

from __future__ import annotations

import argparse


def cmd_export(args) -> int:
    from ddm_node.export.diffusers_dir import export

    out = export(args.ensemble, args.out, args.format, args.router)
    print(f"{out}: load with DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_push(args) -> int:
    from ddm_node.export.push import push

    print(push(args.dir, args.repo, token=args.token, private=args.private))
    return 0


def add_export_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an ensemble bundle as a diffusers pipeline directory (needs diffusers)")
    p.add_argument("--ensemble", required=True, help="bundle directory")
    p.add_argument("--format", default="diffusers", help="diffusers (the only format)")
    p.add_argument("--router", default="auto", choices=["auto", "learned", "centroid"],
                   help="the router to export (auto: the learned one when the bundle has it)")
    p.add_argument("--out", required=True, help="new directory (an existing one is refused)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload an exported directory to a Hugging Face hub repo (needs huggingface_hub)")
    p.add_argument("dir", help="a directory `ddm-node export` wrote")
    p.add_argument("--repo", required=True, metavar="ID", help="owner/name")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the cached login)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)
