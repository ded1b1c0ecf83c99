"""A 100 MB artifact over shaped links, for docs/SCALE.md: `fetch_file` (the download path of every checkpoint fetch:
gRPC stream, writer thread, sha256, fsync) of 100 MB of fp32 weights (a training state travels plain) and of the same
weights as bf16 inference weights, zstd-packed after a byte shuffle (how an expert travels), over a veth pair into a
network namespace with `tc tbf` at 100 Mbit/s and 1 Gbit/s on both ends (bench/transfer_links.py, the chaos suite's
namespaces); raw TCP beside them. Needs root; says why not otherwise.

Run: `python -m bench.scale_links` (about 2 minutes; writes its section of docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from bench.common import BENCHMARKS_MD, markdown_table, median, print_ratio, section_header, write_section
from bench.transfer import fp32_weights, published
from bench.transfer_links import Link, LinkResult, shaped
from bench.transfer_serve import MIB, write_artifact

NAME = "bench.scale_links"
SIZE = 100_000_000  # bytes of fp32 weights: "a 100 MB artifact"
LINKS = [Link("100 Mbit/s", "100mbit", 100e6, 0), Link("1 Gbit/s", "1gbit", 1e9, 0)]


def build(srv: Path) -> dict[int, tuple[object, object]]:
    """The served files: fp32 weights (also raw, for the raw TCP server) and their bf16 as an expert publishes it."""
    import torch

    from ddm_node.core.manifest import read_manifest

    x = torch.from_numpy(fp32_weights(SIZE, 16))
    (srv / "link-0.bin").write_bytes(x.numpy().tobytes())
    write_artifact(srv / "link-0", {"fp32.bin": x.numpy().tobytes(), "bf16.bin": published({"w": x})})
    m = read_manifest(srv / "link-0").files
    return {0: (m["fp32.bin"], m["bf16.bin"])}


def report(results: list[LinkResult] | str, reps: int) -> tuple[str, float]:
    if isinstance(results, str):
        return section_header(NAME, "A 100 MB artifact over shaped links") + f"Not measured: {results}\n", float("nan")
    rows = []
    for r in results:
        fetch, raw, packed = median(r.fetch), median(r.raw), median(r.packed)
        rows.append([r.link.label, f"{SIZE / 1e6:.0f} MB", f"{SIZE / (r.link.bits_per_s / 8):.2f}",
                     f"{SIZE / raw / MIB:.2f}", f"{SIZE / fetch / MIB:.2f}", f"{fetch / r.link.mib_per_s:.3f}",
                     f"{SIZE / packed / MIB:.2f}", f"{r.packed_wire:.3f}"])
    table = markdown_table(["link", "artifact (fp32)", "link time (s)", "raw TCP (s)", "fetch_file, plain (s)",
                            "plain / link rate", "fetch_file, bf16 packed (s)", "packed wire / fp32"], rows)
    ratio = median(results[-1].fetch) / results[-1].link.mib_per_s
    md = (section_header(NAME, "A 100 MB artifact over shaped links") + table
          + f"\n- Medians of {reps} interleaved repetitions after a warm-up. Plain: 100 MB of fp32 weights as a training "
          "state travels. bf16 packed: the same weights as an expert publishes them (bf16, zstd after a byte shuffle; "
          "`exchange/fetch.py` PACKED_KINDS), timed to the end of the file: the time to move 100 MB of fp32 weights' "
          "worth of inference weights.\n- tbf on both ends of the namespace's veth (burst 2 ms of the rate); "
          "client in the root namespace, server in the namespace; one TCP stream.\n")
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale_links", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per link (after one warm-up)")
    ap.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section to")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ddm-bench-links-"))
    try:
        srv = tmp / "srv"
        srv.mkdir()
        results = shaped(LINKS, srv, build(srv), tmp, args.reps)
        md, ratio = report(results, args.reps)
        write_section(args.doc, NAME, md)
        print(md)
        print_ratio("1 Gbit/s link: fetch_file of 100 MB / link rate", ratio)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
