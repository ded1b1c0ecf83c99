"""Checkpoint transfer: our gRPC fetch against a raw TCP socket, and bytes on the wire with and without zstd.

Throughput (one file of `--size-mib` fp32 weights, loopback, servers in their own processes, the client here;
sides interleaved in rotating order, median of the per-repetition ratios to raw TCP):
- raw TCP: a socket server sends the file in 1 MiB blocks; the client `recv_into`s and writes a file.
- gRPC stream: `NodeClient.fetch_stream`, chunks read and dropped (the transport alone).
- fetch_file: the real download (`ddm_node.transfer.client.fetch_file`): protocol checks, `.part` file,
  sha256 of the whole file, fsync, rename.
- fetch_file + zstd: the same with `compress=True` (server compresses each 1 MiB chunk, level 1).

Compression (each file served by the same gRPC server; wire bytes = serialized `Chunk` messages received):
fp32 random weights, real trained expert weights (EMA and training state), bf16-valued fp32, bf16 storage,
each with and without a byte shuffle (bytes regrouped by position within the value, as blosc does).

Run: `python -m bench.transfer` (a few minutes; trains or reuses the cached digits ensemble of
bench.sampling) or `--quick`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

NAME = "bench.transfer"
GOAL = 0.8
BLOCK = 1 << 20
RUN_ID = hashlib.sha256(b"bench.transfer").hexdigest()
MIB = float(1 << 20)
SPEED_MIN = 8 << 20
RAW_FSYNC = "raw TCP + fsync"
HASH = "(sha256 pass over the file, no transfer)"
FSYNC = "(write the file + fsync, no transfer)"  # files below this size get no speed columns


# ---------------------------------------------------------------- test files


def byte_shuffle(raw: bytes, width: int) -> bytes:
    """Regroup bytes by position within each `width`-byte value (all first bytes, then all second bytes...)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    n = len(a) // width * width
    return a[:n].reshape(-1, width).T.tobytes() + a[n:].tobytes()


def to_bf16_valued(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bf16 (round-to-nearest-even), still stored as fp32."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def to_bf16_bytes(x: np.ndarray) -> bytes:
    """bf16 storage: the upper 16 bits of the bf16-rounded fp32 values."""
    return (to_bf16_valued(x).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def safetensors_floats(path: Path) -> np.ndarray:
    """All floating tensors of a safetensors file, flattened into one fp32 array."""
    from safetensors.numpy import load_file

    parts = [v.astype(np.float32).ravel() for v in load_file(str(path)).values() if v.dtype.kind == "f"]
    return np.concatenate(parts)


@dataclass
class Variant:
    label: str
    data: bytes


def variants(name: str, x: np.ndarray) -> list[Variant]:
    """The distribution formats compared for one set of fp32 weights."""
    bf = to_bf16_valued(x)
    return [Variant(f"{name}: fp32", x.astype(np.float32).tobytes()),
            Variant(f"{name}: fp32, byte shuffle", byte_shuffle(x.astype(np.float32).tobytes(), 4)),
            Variant(f"{name}: bf16-valued fp32", bf.tobytes()),
            Variant(f"{name}: bf16-valued fp32, byte shuffle", byte_shuffle(bf.tobytes(), 4)),
            Variant(f"{name}: bf16 storage", to_bf16_bytes(x)),
            Variant(f"{name}: bf16 storage, byte shuffle", byte_shuffle(to_bf16_bytes(x), 2))]


def write_artifact(directory: Path, files: dict[str, bytes]) -> str:
    """A sealed, signed artifact holding `files`; returns its manifest id."""
    from ddm_node.core.identity import Identity
    from ddm_node.core.manifest import FileEntry, Manifest, seal

    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    m = Manifest(kind="expert", run_id=RUN_ID, shard=0, step=0, config_hash="bench",
                 files={n: FileEntry("", 0) for n in files})
    return seal(directory, m, Identity.generate()).id


# ---------------------------------------------------------------- servers (child processes)


def serve_grpc(directory: Path) -> None:
    """Child: serve every artifact under `directory` over gRPC; print the address; exit when stdin closes."""
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    store = ArtifactStore()
    for art in sorted(p for p in directory.iterdir() if p.is_dir()):
        store.register(art)
    server = TransferServer(store, NodeInfoData(peer_id="bench", public_key="0" * 64))
    print(server.start(), flush=True)
    sys.stdin.read()
    server.stop(0)


def serve_raw(directory: Path) -> None:
    """Child: a TCP server; a client sends a file name and a newline, the server sends the file's bytes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"127.0.0.1:{lsock.getsockname()[1]}", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            name = conn.makefile("rb").readline().decode().strip()
            path = directory / Path(name).name  # a bare name: this server only serves its own directory
            with open(path, "rb") as f:
                while block := f.read(BLOCK):
                    conn.sendall(block)

    def accept() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()
    lsock.close()


class Child:
    """A server child process in its own process group; its first stdout line is its address."""

    def __init__(self, mode: str, directory: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.transfer", "--serve", mode, str(directory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.close()
            raise RuntimeError(f"{mode} server did not start")
        self.address = line

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


# ---------------------------------------------------------------- clients (this process)


def raw_fetch(address: str, name: str, dest: Path, size: int, fsync: bool = False) -> None:
    host, port = address.rsplit(":", 1)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    got = 0
    with socket.create_connection((host, int(port))) as s, open(dest, "wb") as f:
        s.sendall(name.encode() + b"\n")
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            f.write(view[:n])
            got += n
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if got != size:
        raise RuntimeError(f"raw TCP moved {got} bytes, expected {size}")


def stream_bytes(address: str, sha256: str, compress: bool) -> tuple[int, int]:
    """Read a whole Fetch stream and drop it; returns (file bytes carried, serialized message bytes)."""
    from ddm_node.transfer.client import NodeClient

    payload = wire = 0
    with NodeClient(address, timeout=600) as client:
        for chunk in client.fetch_stream(sha256, 0, compress, timeout=600):
            payload += len(chunk.data)
            wire += chunk.ByteSize()
    return payload, wire


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the benchmark


@dataclass
class Settings:
    size_mib: int
    comp_mib: int
    reps: int
    expert_steps: int
    router_steps: int
    cache_dir: Path | None = None


def build_files(s: Settings, srv: Path) -> tuple[dict, list[tuple[str, int, str]]]:
    """Write the served artifacts; returns (big file entry, [(label, size, sha256)] for compression)."""
    from ddm_node.core.manifest import read_manifest

    rng = np.random.default_rng(0)
    n = s.size_mib * (1 << 20) // 4
    big = (rng.standard_normal(n, dtype=np.float32) * 0.02).tobytes()
    write_artifact(srv / "big", {"weights.bin": big})
    (srv / "weights.bin").write_bytes(big)  # the raw server's copy of the same bytes
    big_entry = read_manifest(srv / "big").files["weights.bin"]

    run = trained_digits(expert_steps=s.expert_steps, router_steps=s.router_steps, cache_dir=s.cache_dir)
    rand = rng.standard_normal(s.comp_mib * (1 << 20) // 4, dtype=np.float32) * 0.02
    groups = [("random N(0, 0.02)", rand),
              ("trained expert EMA", safetensors_floats(run.expert_weights())),
              ("trained expert state", safetensors_floats(run.state_file()))]
    comp = []
    files = {}
    for name, x in groups:
        for v in variants(name, x):
            files[f"{len(files):02d}.bin"] = v.data
            comp.append((v.label, len(v.data)))
    # the real files as they are on disk, header included
    for label, path in (("trained expert EMA: model.safetensors as written", run.expert_weights()),
                        ("trained expert state: state.safetensors as written", run.state_file())):
        data = path.read_bytes()
        files[f"{len(files):02d}.bin"] = data
        comp.append((label, len(data)))
    write_artifact(srv / "comp", files)
    m = read_manifest(srv / "comp").files
    return big_entry, [(label, size, m[name].sha256) for (label, size), name in zip(comp, sorted(files))]


def throughput(s: Settings, grpc_addr: str, raw_addr: str, big, tmp: Path, local: Path) -> dict[str, list[float]]:
    from ddm_node.transfer.download import fetch_file

    size = big.size

    def raw(fsync: bool = False):
        def run() -> float:
            dest = tmp / "raw.bin"
            t = timed(lambda: raw_fetch(raw_addr, "weights.bin", dest, size, fsync))
            dest.unlink()
            return size / t / MIB
        return run

    def stream() -> float:
        return size / timed(lambda: stream_bytes(grpc_addr, big.sha256, False)) / MIB

    def fetch(compress: bool):
        def run() -> float:
            dest = tmp / "fetched.bin"
            t = timed(lambda: fetch_file([grpc_addr], big, dest, compress=compress))
            dest.unlink()
            return size / t / MIB
        return run

    def hash_pass() -> float:
        from ddm_node.core.manifest import sha256_file

        return size / timed(lambda: sha256_file(local)) / MIB

    def write_fsync() -> float:
        data = local.read_bytes()
        dest = tmp / "written.bin"

        def run() -> None:
            with open(dest, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        t = timed(run)
        dest.unlink()
        return size / t / MIB

    return interleave({"raw TCP": raw(), RAW_FSYNC: raw(True), "gRPC stream": stream, "fetch_file": fetch(False),
                       "fetch_file + zstd": fetch(True), HASH: hash_pass, FSYNC: write_fsync}, s.reps, warmup=1)


def compression(grpc_addr: str, comp: list[tuple[str, int, str]], reps: int) -> list[list]:
    """Per file: size, wire bytes plain and zstd, ratio, delivered MiB/s plain and zstd (median of reps)."""
    rows = []
    for label, size, sha in comp:
        _, wire = stream_bytes(grpc_addr, sha, False)
        _, zwire = stream_bytes(grpc_addr, sha, True)
        speed: list[object] = ["–", "–"]
        if size >= SPEED_MIN:  # smaller files measure per-call latency, not throughput
            vals = interleave({"plain": lambda: size / timed(lambda: stream_bytes(grpc_addr, sha, False)) / MIB,
                               "zstd": lambda: size / timed(lambda: stream_bytes(grpc_addr, sha, True)) / MIB}, reps)
            speed = [median(vals["plain"]), median(vals["zstd"])]
        rows.append([label, size / MIB, wire / MIB, zwire / MIB, wire / zwire, *speed])
    return rows


def report(s: Settings, vals: dict[str, list[float]], rows: list[list], quick: bool) -> tuple[str, float]:
    raw = vals["raw TCP"]
    ratio = median_ratio(vals["fetch_file"], raw)
    hashed, synced = vals.pop(HASH), vals.pop(FSYNC)

    def row(name: str, v: list[float]) -> list:
        per_rep = [x / y for x, y in zip(v, raw)]
        return [name, median(v), median_ratio(v, raw), f"{min(per_rep):.3f}-{max(per_rep):.3f}"]

    tp_rows = [row(name, v) for name, v in vals.items()] + [row(HASH, hashed), row(FSYNC, synced)]
    r_stream = median_ratio(vals["gRPC stream"], raw)
    r_durable = median_ratio(vals["fetch_file"], vals[RAW_FSYNC])
    r_safety = median_ratio(vals["fetch_file"], vals["gRPC stream"])
    fp32_rand = next(r for r in rows if r[0] == "random N(0, 0.02): fp32")
    bf_shuf = next(r for r in rows if r[0] == "random N(0, 0.02): bf16-valued fp32, byte shuffle")
    ema = {r[0].split(": ", 1)[1]: r for r in rows if r[0].startswith("trained expert EMA: ")}
    base = ema["fp32"][3]  # zstd wire MiB of the fp32 EMA weights
    best = min(ema.values(), key=lambda r: r[3])
    zstd_speed = median(vals["fetch_file + zstd"])
    reading = [
        f"- Goal: fetch_file / raw TCP >= {GOAL}. Measured **{ratio:.3f}** (median of {len(raw)} interleaved "
        "repetitions): " + ("met." if ratio >= GOAL else
                            f"missed by {GOAL - ratio:.3f}."),
        f"- Why, part 1, the transport: the gRPC stream alone (chunks read and dropped) reaches {r_stream:.3f} of "
        "raw TCP. Python gRPC moves each 1 MiB chunk through protobuf parsing and HTTP/2 framing in two processes "
        "that both need CPU, where the raw socket is a `sendall` and a `recv_into` per block; on this loaded "
        "machine that ratio swings widely between repetitions (see the range column).",
        f"- Why, part 2, the safety steps: fetch_file runs at {r_safety:.3f} of the bare stream. It checks each "
        "chunk's offset and size, appends it to a `.part` file and to a running sha256 (since 2026-11-27; before, "
        "a second pass read the file back), then fsyncs and renames the file. For scale: a sha256 pass alone runs "
        f"at {median(hashed):,.0f} MiB/s here and writing + fsyncing the file at {median(synced):,.0f} MiB/s, "
        "each comparable to the transfer itself. The fsync is the price of a crash-safe commit and stays. Like for "
        f"like, against raw TCP that also fsyncs what it received, fetch_file runs at **{r_durable:.3f}**. Real "
        "checkpoints are small (tiny expert 1.3 MB, its training state 5 MB), where per-call latency, not "
        "throughput, dominates.",
        f"- zstd on fp32 random weights: wire/file {fp32_rand[3] / fp32_rand[1]:.3f} (ENVIRONMENT.md measured "
        f"1.08x), and the download runs at {zstd_speed:,.0f} MiB/s instead of {median(vals['fetch_file']):,.0f}: "
        "the server compresses and the client decompresses every chunk to save a few percent of the bytes. "
        f"bf16-valued fp32 with a byte shuffle: {bf_shuf[4]:.2f}x on random weights, "
        f"{ema['bf16-valued fp32, byte shuffle'][4]:.2f}x on the trained expert (ENVIRONMENT.md: 2.82x).",
        f"- Trained expert weights (EMA, fp32): zstd gives {ema['fp32'][4]:.2f}x. Smallest on the wire: "
        f"**{best[0].split(': ', 1)[1]}** + zstd, {best[3] / ema['fp32'][1]:.3f} of the fp32 file "
        f"({ema['fp32'][1] / best[3]:.2f}x smaller, {base / best[3]:.2f}x smaller than fp32 + zstd).",
        "- zstd pays off on any link slower than the `stream MiB/s, zstd` column (the CPU-bound rate on "
        "loopback; noisy here), i.e. on WAN links between islands, not on loopback or a datacenter LAN.",
        "- **Recommendation** (not implemented; the checkpoint format is unchanged): keep training states "
        "(exact resume needs every fp32 bit) as fp32 safetensors and send them without zstd "
        "(`swarm.compress: false`, the default). For distributing inference weights to samplers, publish bf16 "
        "storage with a 2-byte shuffle and zstd: half the bytes before compression, and the shuffle puts the "
        "exponent bytes together where zstd finds them. bf16-valued fp32 + shuffle + zstd reaches a similar wire "
        "size while keeping the fp32 file layout, at twice the bytes on disk.",
        f"- Throughput file: {s.size_mib} MiB of N(0, 0.02) fp32; 1 MiB chunks (gRPC) and 1 MiB blocks (raw).",
    ]
    if quick:
        reading.append("- **Quick run**: small files and few repetitions; use the full run for numbers.")
    md = (section_header(NAME, "Checkpoint transfer")
          + markdown_table(["path", "MiB/s (median)", "ratio to raw TCP (median)", "range over repetitions"],
                           tp_rows)
          + "\nBytes on the wire (serialized gRPC `Chunk` messages) and delivery speed on loopback:\n\n"
          + markdown_table(["file", "size MiB", "wire MiB", "wire MiB, zstd", "zstd gain", "stream MiB/s", "stream MiB/s, zstd"],
                           rows)
          + "\n" + "\n".join(reading) + "\n")
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small files, few repetitions")
    ap.add_argument("--size-mib", type=int, default=None, help="throughput file size (default 256, quick 16)")
    ap.add_argument("--comp-mib", type=int, default=None, help="random weights for compression (default 32, quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 11, quick 2)")
    ap.add_argument("--expert-steps", type=int, default=None,
                    help="training steps of the cached digits experts (default 400, quick 40)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the trained ensemble is cached (default: TMPDIR/ddm-bench-cache)")
    ap.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section to")
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        (serve_grpc if args.serve[0] == "grpc" else serve_raw)(Path(args.serve[1]))
        return 0
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    q = args.quick
    steps = args.expert_steps or (40 if q else 400)
    s = Settings(args.size_mib or (16 if q else 256), args.comp_mib or (2 if q else 32), args.reps or (2 if q else 11),
                 steps, 30 if q else 300, args.cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix="ddm-bench-transfer-"))
    children: list[Child] = []
    try:
        srv = tmp / "srv"
        srv.mkdir()
        big, comp = build_files(s, srv)
        children.append(Child("grpc", srv))
        children.append(Child("raw", srv))
        grpc_addr, raw_addr = children[0].address, children[1].address
        vals = throughput(s, grpc_addr, raw_addr, big, tmp, srv / "weights.bin")
        rows = compression(grpc_addr, comp, max(1, s.reps // 2))
        md, ratio = report(s, vals, rows, q)
        write_section(args.doc, NAME, md)
        print(md)
        print(json.dumps({k: round(median(v), 1) for k, v in vals.items()}))
        print_ratio("fetch_file/raw TCP throughput", ratio)
    finally:
        for c in children:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
