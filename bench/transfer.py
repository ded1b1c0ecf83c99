"""Checkpoint transfer, side by side in one run: loopback throughput against raw TCP, bytes on the wire of the
inference weights against their fp32 size, and throughput against the link rate over shaped links.

Loopback (one file of `--size-mib` fp32 weights; servers in their own processes, the client here; every path
once per repetition in rotating order; medians; CPU seconds of both processes per GiB moved):
- raw TCP: a socket server sends the file in 1 MiB blocks; the client `recv_into`s and writes a file. Also with
  an fsync, and with the download's own writer thread hashing (sha256) and a single fsync + rename: a verified,
  durable download without gRPC, the most any verified download can reach here.
- gRPC stream: `NodeClient.fetch_stream`, chunks read and dropped (the transport alone).
- fetch_file: the real download (`ddm_node.transfer.download.fetch_file`): chunks read from the serialized message
  without copies (`wire.decode_chunk`) and checked on the gRPC thread, append + sha256 on the part file's writer
  thread, one fsync, rename. Also with protobuf parsing the chunks (two copies each, as before), with 2 and 4 MiB
  chunks, with the writing and hashing on the gRPC thread as before issue 14, and with `compress=True` (zstd after
  a shuffle).

Inference weights: the trained digits experts' EMA (from their training states), written as the expert artifact
writes it (bf16 safetensors) and as it was written before (fp32); wire bytes = serialized `Chunk` messages of the
stream `fetch_file` asks for (zstd, byte shuffle allowed), against the fp32 file.

Shaped links (bench/transfer_links.py): 100 Mbit/s and 1 Gbit/s tbf on a veth pair into a network namespace;
skipped, with the reason, where namespaces are not permitted.

Run: `python -m bench.transfer` (a few minutes; trains or reuses the cached digits ensemble of bench.sampling)
or `--quick`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    BENCHMARKS_MD,
    interleave,
    load_str,
    markdown_table,
    median,
    median_ratio,
    print_ratio,
    section_header,
    trained_digits,
    write_section,
)
from bench.transfer_links import Link, LinkResult, shaped
from bench.transfer_serve import (
    GIB,
    MIB,
    Child,
    InlineWriter,
    Sample,
    measure,
    raw_fetch,
    serve_grpc,
    serve_raw,
    stream_bytes,
    write_artifact,
)

NAME = "bench.transfer"
LOOPBACK_GOAL, WIRE_GOAL, LINK_GOAL = 0.6, 0.55, 0.9
RAW, RAW_FSYNC, RAW_VERIFIED = "raw TCP", "raw TCP + fsync", "raw TCP + sha256 (writer thread) + fsync"
STREAM, FETCH, INLINE, ZSTD = "gRPC stream", "fetch_file", "fetch_file, write + hash on the gRPC thread", \
    "fetch_file + zstd (shuffle)"
PROTOBUF = "fetch_file, chunks parsed by protobuf"
HASH, FSYNC = "(sha256 pass over the file, no transfer)", "(write the file + fsync, no transfer)"
CHUNKS = (2 << 20, 4 << 20)  # chunk sizes compared with the default 1 MiB


@dataclass
class Settings:
    size_mib: int
    reps: int
    links: list[Link]
    link_reps: int
    expert_steps: int
    router_steps: int
    cache_dir: Path | None = None


# ---------------------------------------------------------------- files


def fp32_weights(n_bytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n_bytes // 4, dtype=np.float32) * 0.02


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def published(tensors: dict) -> bytes:
    """The expert file as `train.checkpoint.write_checkpoint` writes it (bf16)."""
    from ddm_node.train.checkpoint import inference_tensors

    return safetensors_bytes(inference_tensors(tensors))


def expert_emas(run) -> list[dict]:
    """Each trained expert's EMA in fp32, exactly, from its training state."""
    from safetensors.torch import load_file

    out = []
    for k in range(len(list(run.bundle.glob("expert_*")))):
        state = load_file(str(run.state_file(k)))
        out.append({name[4:]: t for name, t in state.items() if name.startswith("ema.")})
    return out


@dataclass
class Files:
    big: object  # FileEntry of the loopback file (also served raw as weights.bin)
    links: dict[int, tuple[object, object]]  # mib -> (fp32, bf16) entries
    weights: list[tuple[str, int, object, object | None]]  # (label, fp32 file bytes, sent entry, its fp32 entry)


def build_files(s: Settings, srv: Path) -> Files:
    """Write the served artifacts."""
    import torch

    from ddm_node.core.manifest import read_manifest

    def artifact(name: str, files: dict[str, bytes]) -> dict:
        write_artifact(srv / name, files)
        return read_manifest(srv / name).files

    big = fp32_weights(s.size_mib << 20, 0).tobytes()
    (srv / "weights.bin").write_bytes(big)  # the raw server's copy of the same bytes
    entries = {"big": artifact("big", {"w.bin": big})["w.bin"]}
    links = {}
    for link in s.links:
        if link.mib not in links:
            x = torch.from_numpy(fp32_weights(link.mib << 20, link.mib))
            (srv / f"link-{link.mib}.bin").write_bytes(x.numpy().tobytes())
            m = artifact(f"link-{link.mib}", {"fp32.bin": x.numpy().tobytes(), "bf16.bin": published({"w": x})})
            links[link.mib] = (m["fp32.bin"], m["bf16.bin"])
    run = trained_digits(expert_steps=s.expert_steps, router_steps=s.router_steps, cache_dir=s.cache_dir)
    emas = expert_emas(run)
    files = {}
    for k, ema in enumerate(emas):
        files[f"e{k}-fp32"], files[f"e{k}-bf16"] = safetensors_bytes(ema), published(ema)
    state = run.state_file(0).read_bytes()
    m = artifact("weights", {**files, "state": state})
    weights = [(f"trained expert {k} (EMA)", m[f"e{k}-fp32"].size, m[f"e{k}-bf16"], m[f"e{k}-fp32"])
               for k in range(len(emas))]
    weights.append(("trained expert 0, training state (fp32, exact)", m["state"].size, m["state"], None))
    return Files(entries["big"], links, weights)


# ---------------------------------------------------------------- loopback


def loopback(s: Settings, srv: Path, files: Files, tmp: Path) -> dict[str, list[Sample]]:
    from ddm_node.core.manifest import sha256_file
    from ddm_node.transfer import holder
    from ddm_node.transfer.download import fetch_file

    big, size = files.big, files.big.size
    children: dict[str, Child] = {}
    try:
        children["grpc"] = Child("grpc", srv)
        children["raw"] = Child("raw", srv)
        for chunk in CHUNKS:
            children[f"grpc {chunk}"] = Child("grpc", srv, chunk=chunk)
        grpc_addr, raw_addr = children["grpc"].address, children["raw"].address
        samples: dict[str, list[Sample]] = {}

        def side(name: str, fn, server: str | None):
            def run() -> float:
                sample = measure(fn, children[server] if server else None)
                samples.setdefault(name, []).append(sample)
                for f in tmp.glob("out*"):
                    f.unlink()
                return size / sample.seconds / MIB
            return run

        def inline() -> None:
            threaded, holder.PartWriter = holder.PartWriter, InlineWriter
            try:
                fetch_file([grpc_addr], big, tmp / "out.bin")
            finally:
                holder.PartWriter = threaded

        def protobuf() -> None:
            from proto import ddm_pb2

            ours, holder.decode_chunk = holder.decode_chunk, ddm_pb2.Chunk.FromString
            try:
                fetch_file([grpc_addr], big, tmp / "out.bin")
            finally:
                holder.decode_chunk = ours

        def write_fsync() -> None:
            with open(tmp / "out.bin", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        data = (srv / "weights.bin").read_bytes()
        sides = {
            RAW: side(RAW, lambda: raw_fetch(raw_addr, "weights.bin", tmp / "out.bin", size), "raw"),
            RAW_FSYNC: side(RAW_FSYNC, lambda: raw_fetch(raw_addr, "weights.bin", tmp / "out.bin", size, True), "raw"),
            RAW_VERIFIED: side(RAW_VERIFIED, lambda: raw_fetch(raw_addr, "weights.bin", tmp / "out.bin", size,
                                                               sha256=big.sha256), "raw"),
            STREAM: side(STREAM, lambda: stream_bytes(grpc_addr, big.sha256, False), "grpc"),
            FETCH: side(FETCH, lambda: fetch_file([grpc_addr], big, tmp / "out.bin"), "grpc"),
            **{f"{FETCH}, {c >> 20} MiB chunks": side(
                f"{FETCH}, {c >> 20} MiB chunks",
                lambda c=c: fetch_file([children[f"grpc {c}"].address], big, tmp / "out.bin"), f"grpc {c}")
               for c in CHUNKS},
            PROTOBUF: side(PROTOBUF, protobuf, "grpc"),
            INLINE: side(INLINE, inline, "grpc"),
            ZSTD: side(ZSTD, lambda: fetch_file([grpc_addr], big, tmp / "out.bin", compress=True), "grpc"),
            HASH: side(HASH, lambda: sha256_file(srv / "weights.bin"), None),
            FSYNC: side(FSYNC, write_fsync, None),
        }
        interleave(sides, s.reps, warmup=1)
        for name in samples:
            samples[name] = samples[name][-s.reps:]  # the warm-up's samples out
        return samples
    finally:
        for c in children.values():
            c.close()


# ---------------------------------------------------------------- bytes on the wire


def wire_rows(srv: Path, files: Files) -> list[list]:
    """Per weights file: sizes and serialized message bytes sent plain, zstd, zstd after a shuffle."""
    import grpc

    from ddm_node.transfer.server import channel_options
    from ddm_node.transfer.store import DEFAULT_MAX_MESSAGE
    from proto import ddm_pb2, ddm_pb2_grpc

    child = Child("grpc", srv)
    try:
        def wire(sha: str, compression: str, shuffle: bool) -> int:
            with grpc.insecure_channel(child.address, options=channel_options(DEFAULT_MAX_MESSAGE)) as channel:
                request = ddm_pb2.FetchRequest(sha256=sha, compression=compression, shuffle=shuffle)
                return sum(c.ByteSize() for c in ddm_pb2_grpc.DDMNodeStub(channel).Fetch(request, timeout=600))

        rows = []
        for label, fp32_size, sent, _ in files.weights:
            packed = wire(sent.sha256, "zstd", True)
            rows.append([label, fp32_size / MIB, sent.size / MIB, wire(sent.sha256, "", False) / MIB,
                         wire(sent.sha256, "zstd", False) / MIB, packed / MIB, packed / fp32_size])
        return rows
    finally:
        child.close()


# ---------------------------------------------------------------- report


def goal_line(measured: float, goal: float, at_least: bool) -> str:
    if (measured >= goal) if at_least else (measured <= goal):
        return "met"
    return f"missed by {abs(measured - goal):.3f}"


def cpu_per_gib(samples: list[Sample], size: int) -> tuple[float, float]:
    return (median([x.client_cpu for x in samples]) * GIB / size, median([x.server_cpu for x in samples]) * GIB / size)


def report(s: Settings, size: int, loop: dict[str, list[Sample]], wires: list[list],
           links: list[LinkResult] | str, load_before: str, quick: bool) -> tuple[str, float]:
    speed = {name: [size / x.seconds / MIB for x in v] for name, v in loop.items()}
    raw = speed[RAW]
    ratio = median_ratio(speed[FETCH], raw)
    tp_rows = []
    for name, v in speed.items():
        per_rep = [x / y for x, y in zip(v, raw)]
        client, server = cpu_per_gib(loop[name], size)
        tp_rows.append([name, median(v), median(per_rep), f"{min(per_rep):.3f}-{max(per_rep):.3f}", client,
                        server, client + server])
    experts = [r for r in wires if r[0].startswith("trained expert") and "state" not in r[0]]
    wire_ratio = sum(r[5] for r in experts) / sum(r[1] for r in experts)
    summary = [[f"loopback: {FETCH} / raw TCP (median of {len(raw)})", f">= {LOOPBACK_GOAL}", ratio,
                goal_line(ratio, LOOPBACK_GOAL, True)],
               [f"loopback: {FETCH} / {RAW_FSYNC} (the same disk work; no goal)", "–",
                median_ratio(speed[FETCH], speed[RAW_FSYNC]), ""],
               [f"loopback: {FETCH} / {RAW_VERIFIED} (the same disk and hash work, no gRPC; no goal)", "–",
                median_ratio(speed[FETCH], speed[RAW_VERIFIED]), ""],
               [f"inference weights ({len(experts)} trained experts): bytes on the wire / fp32 file", f"<= {WIRE_GOAL}",
                wire_ratio, goal_line(wire_ratio, WIRE_GOAL, False)]]
    link_md = ""
    if isinstance(links, str):
        summary.append(["shaped links", f">= {LINK_GOAL}", "–", f"not measured: {links}"])
    else:
        link_rows = []
        for r in links:
            lr = median(r.fetch) / r.link.mib_per_s
            summary.append([f"{r.link.label} link: {FETCH} / link rate (median of {len(r.fetch)})", f">= {LINK_GOAL}",
                            lr, goal_line(lr, LINK_GOAL, True)])
            link_rows.append([r.link.label, f"{r.link.mib} MiB", r.link.mib_per_s, median(r.raw),
                              median(r.raw) / r.link.mib_per_s, median(r.fetch), lr, r.plain_wire,
                              median(r.packed) / r.link.mib_per_s, r.packed_wire])
        link_md = ("\nShaped links (tbf on both ends of the namespace's veth, burst 2 ms of the rate; MiB/s of file "
                   "bytes; wire = the kernel's transmit counter / fp32 file size):\n\n" + markdown_table(
                       ["link", "file", "link MiB/s", "raw TCP MiB/s", "raw / link", f"{FETCH} MiB/s",
                        f"{FETCH} / link", "wire / file", "bf16 expert, packed: fp32-equivalent / link",
                        "bf16 expert, packed: wire / fp32"], link_rows))
    reading = _reading(speed, loop, size, wires, links if not isinstance(links, str) else [], ratio, wire_ratio)
    md = (section_header(NAME, "Checkpoint transfer")
          + f"- Load average before the run: {load_before}\n\n"
          + markdown_table(["figure", "goal", "measured", ""], summary)
          + f"\nLoopback, {s.size_mib} MiB of fp32 weights (CPU: seconds per GiB moved, medians):\n\n"
          + markdown_table(["path", "MiB/s", "ratio to raw TCP", "range", "client CPU", "server CPU", "total CPU"],
                           tp_rows)
          + "\nInference weights on the wire (serialized `Chunk` messages; MiB):\n\n"
          + markdown_table(["weights", "fp32 file", "as published", "wire, plain", "wire, zstd",
                            "wire, zstd + shuffle (fetch_file)", "wire / fp32 file"], wires)
          + link_md + "\n" + "\n".join(reading) + "\n")
    if quick:
        md += "\n- **Quick run**: small files and few repetitions; use the full run for numbers.\n"
    return md, ratio


def _reading(speed: dict[str, list[float]], loop: dict[str, list[Sample]], size: int, wires: list[list],
             links: list[LinkResult], ratio: float, wire_ratio: float) -> list[str]:
    """What the figures say, from this run's numbers."""
    raw = speed[RAW]

    def r(name: str) -> float:
        return median_ratio(speed[name], raw)

    def cpu(name: str) -> float:
        return sum(cpu_per_gib(loop[name], size))

    need = cpu(RAW) / LOOPBACK_GOAL
    floor = cpu(RAW_VERIFIED)
    disk = r(FSYNC)  # the file written and fsynced, no network at all
    if disk < LOOPBACK_GOAL:
        reach = (f"Writing the file and fsyncing it with no network at all ({FSYNC.strip('()')}) runs at {disk:.3f} "
                 f"of raw TCP, which never fsyncs: on this machine's disk no durable download can reach "
                 f"{LOOPBACK_GOAL} of raw TCP; against raw TCP with the same fsync ({RAW_FSYNC}) {FETCH} runs at "
                 f"{median_ratio(speed[FETCH], speed[RAW_FSYNC]):.3f}.")
    elif need < floor:
        reach = (f"The disk is not the limit ({FSYNC.strip('()')}: {disk:.3f} of raw TCP) but the CPU is: "
                 f"{LOOPBACK_GOAL} would need at most {need:.2f} CPU-s/GiB in all; raw TCP + sha256 + fsync take "
                 f"{floor:.2f}, out of reach on 2 shared cores without dropping the hash check.")
    else:
        reach = (f"Neither the disk ({disk:.3f}) nor the CPU a verified download needs ({floor:.2f} CPU-s/GiB, "
                 f"{LOOPBACK_GOAL} allows {need:.2f}) stops {LOOPBACK_GOAL} here: the rest is the gRPC transport's.")
    bigger = {c: r(f"{FETCH}, {c >> 20} MiB chunks") for c in CHUNKS}
    helps = [c for c, v in bigger.items() if v > ratio]
    lines = [
        f"- Loopback: {FETCH} runs at **{ratio:.3f}** of raw TCP ({goal_line(ratio, LOOPBACK_GOAL, True)}), "
        f"{median_ratio(speed[FETCH], speed[RAW_FSYNC]):.3f} of raw TCP + fsync (the same disk work) and "
        f"{median_ratio(speed[FETCH], speed[RAW_VERIFIED]):.3f} of a verified, durable download without any gRPC "
        f"({RAW_VERIFIED}). {reach} CPU per GiB moved (both processes): raw TCP {cpu(RAW):.2f} s, {FETCH} "
        f"{cpu(FETCH):.2f} s; a sha256 pass over the file alone {sum(cpu_per_gib(loop[HASH], size)):.2f} s, "
        f"the gRPC stream alone {cpu(STREAM):.2f} s ({r(STREAM):.3f} of raw TCP).",
        f"- Side by side: chunks parsed by protobuf (two more copies of each) {r(PROTOBUF):.3f} of raw TCP, "
        f"{cpu(PROTOBUF):.2f} CPU-s/GiB; read in place ({FETCH}) {ratio:.3f}, {cpu(FETCH):.2f} CPU-s/GiB. The receive "
        f"path before issue 14 (append + sha256 on the gRPC thread): {r(INLINE):.3f}. Larger chunks: "
        + ", ".join(f"{c >> 20} MiB {v:.3f}" for c, v in bigger.items())
        + (f" (better than 1 MiB: {', '.join(f'{c >> 20} MiB' for c in helps)})." if helps else
           " (no better than 1 MiB, which stays).")
        + f" zstd costs {cpu(ZSTD):.2f} CPU-s/GiB on fp32 weights ({r(ZSTD):.3f} of raw TCP): worth it only where the "
        "link, not the CPU, is the limit, and only on data that packs (bf16 experts below; data packs).",
    ]
    experts = [w for w in wires if "state" not in w[0]]
    state = next((w for w in wires if "state" in w[0]), None)
    if experts:
        fp32 = sum(w[1] for w in experts)
        lines.append(
            f"- Inference weights: bf16 halves the file ({sum(w[2] for w in experts) / fp32:.3f} of fp32); zstd alone "
            f"takes it to {sum(w[4] for w in experts) / fp32:.3f}, zstd after the byte shuffle (what {FETCH} asks for "
            f"on an expert) to **{wire_ratio:.3f}** ({goal_line(wire_ratio, WIRE_GOAL, False)})."
            + (f" The fp32 training state would pack to {state[6]:.3f} only: states travel plain." if state else ""))
    for lr in links:
        lines.append(
            f"- {lr.link.label}: {FETCH} {median(lr.fetch) / lr.link.mib_per_s:.3f} of the link rate, raw TCP "
            f"{median(lr.raw) / lr.link.mib_per_s:.3f} (TCP/IP and Ethernet headers alone allow 1448/1514 = 0.956 on a "
            f"1500-byte MTU); the packed bf16 expert delivers fp32-sized weights "
            f"{median(lr.packed) / lr.link.mib_per_s:.2f}x as fast as the link carries fp32 bytes.")
    if links:
        lines.append("- Wire / file on shaped links is the veth's transmit counter, which counts what tbf hands it: "
                     "offload packets larger than the burst split into MTU-sized ones (headers counted per packet), "
                     "smaller ones whole (headers once per up to 64 KiB: about 1.0 at 1 Gbit/s).")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small files, few repetitions")
    ap.add_argument("--size-mib", type=int, default=None, help="loopback file size (default 256, quick 16)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 11, quick 2)")
    ap.add_argument("--link-reps", type=int, default=None, help="repetitions per shaped link (default 5, quick 1)")
    ap.add_argument("--no-links", action="store_true", help="skip the shaped links")
    ap.add_argument("--expert-steps", type=int, default=None,
                    help="training steps of the cached digits experts (default 400, quick 40)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the trained ensemble is cached (default: TMPDIR/ddm-bench-cache)")
    ap.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section to")
    ap.add_argument("--serve", nargs=4, metavar=("MODE", "DIR", "HOST", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        mode, directory, host, chunk = args.serve
        serve_grpc(Path(directory), host, int(chunk)) if mode == "grpc" else serve_raw(Path(directory), host)
        return 0
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    q = args.quick
    links = [Link("100 Mbit/s", "100mbit", 100e6, 4 if q else 32), Link("1 Gbit/s", "1gbit", 1e9, 16 if q else 256)]
    s = Settings(args.size_mib or (16 if q else 256), args.reps or (2 if q else 11), [] if args.no_links else links,
                 args.link_reps or (1 if q else 5), args.expert_steps or (40 if q else 400), 30 if q else 300,
                 args.cache_dir)
    load_before = load_str()
    tmp = Path(tempfile.mkdtemp(prefix="ddm-bench-transfer-"))
    try:
        srv = tmp / "srv"
        srv.mkdir()
        files = build_files(s, srv)
        loop = loopback(s, srv, files, tmp)
        wires = wire_rows(srv, files)
        link_results = shaped(s.links, srv, files.links, tmp, s.link_reps) if s.links else "skipped (--no-links)"
        md, ratio = report(s, files.big.size, loop, wires, link_results, load_before, q)
        write_section(args.doc, NAME, md)
        print(md)
        print(json.dumps({k: round(median([files.big.size / x.seconds / MIB for x in v]), 1)
                          for k, v in loop.items()}))
        print_ratio("fetch_file/raw TCP throughput", ratio)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
