"""bench.transfer's parts that move bytes: the servers (child processes, optionally inside a network namespace),
the raw-socket clients they are compared with, and CPU accounting of both sides."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BLOCK = 1 << 20
MIB = float(1 << 20)
GIB = float(1 << 30)
RUN_ID = hashlib.sha256(b"bench.transfer").hexdigest()


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


def serve_grpc(directory: Path, host: str, chunk: int) -> None:
    """Child: serve every artifact under `directory` over gRPC; print the address; exit when stdin closes."""
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    store = ArtifactStore()
    for art in sorted(p for p in directory.iterdir() if p.is_dir()):
        store.register(art)
    server = TransferServer(store, NodeInfoData(peer_id="bench", public_key="0" * 64), host=host, chunk_size=chunk)
    print(server.start(), flush=True)
    sys.stdin.read()
    server.stop(0)


def serve_raw(directory: Path, host: str) -> None:
    """Child: a TCP server; a client sends a file name and a newline, the server sends the file's bytes."""
    lsock = socket.create_server((host, 0))
    print(f"{host}:{lsock.getsockname()[1]}", flush=True)

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
    """A server child process in its own process group (inside a namespace when `wrap` is `ip netns exec NS`);
    its first stdout line is its address. The `exec` keeps the pid: `cpu()` reads the server's own CPU time."""

    def __init__(self, mode: str, directory: Path, host: str = "127.0.0.1", wrap: list[str] | None = None,
                 chunk: int = BLOCK) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [*(wrap or []), sys.executable, "-m", "bench.transfer", "--serve", mode, str(directory), host, str(chunk)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.close()
            raise RuntimeError(f"{mode} server did not start")
        self.address = line

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


def raw_fetch(address: str, name: str, dest: Path, size: int, fsync: bool = False, sha256: str | None = None) -> None:
    """Receive a file from `serve_raw`. With `sha256`: hashed and written by the download's own writer thread
    (transfer/partfile.py), fsynced once and renamed after the check: a verified, durable download minus gRPC."""
    from ddm_node.core.manifest import FileEntry
    from ddm_node.transfer.partfile import PartHash, PartWriter, finish

    host, port = address.rsplit(":", 1)
    part = dest.with_name(dest.name + ".part")
    hasher = PartHash(part)
    got = 0
    with socket.create_connection((host, int(port))) as s, open(part if sha256 else dest, "wb") as f:
        hasher.sync()
        s.sendall(name.encode() + b"\n")
        writer = PartWriter(f, hasher, None) if sha256 else None
        while True:
            buf = bytearray(BLOCK)
            n = s.recv_into(buf)
            if not n:
                break
            if writer is not None:
                writer.put(memoryview(buf)[:n])
            else:
                f.write(memoryview(buf)[:n])
            got += n
        if writer is not None:
            writer.close()
        elif fsync:
            f.flush()
            os.fsync(f.fileno())
    if got != size:
        raise RuntimeError(f"raw TCP moved {got} bytes, expected {size}")
    if sha256 is not None:
        if hasher.result() != FileEntry(sha256, size):
            raise RuntimeError("raw TCP delivered a file with the wrong sha256")
        finish(part, dest)


def stream_bytes(address: str, sha256: str, compress: bool) -> tuple[int, int]:
    """Read a whole Fetch stream and drop it; returns (file bytes carried, serialized message bytes)."""
    from ddm_node.transfer.client import NodeClient
    from ddm_node.transfer.wire import decode_chunk

    payload = wire = 0
    with NodeClient(address, timeout=600) as client:
        for message in client.fetch_stream(sha256, 0, compress, timeout=600):
            payload += len(decode_chunk(message).data)
            wire += len(message)
    return payload, wire


class InlineWriter:
    """The receive path before issue 14, for comparison: the gRPC thread itself appends and hashes each chunk
    (same interface as `transfer.partfile.PartWriter`)."""

    def __init__(self, f, hasher, written, limit: int = 0, name: str = "") -> None:
        self.f, self.hasher, self.written = f, hasher, written

    def put(self, data: bytes) -> None:
        self.f.write(data)
        self.hasher.update(data)
        if self.written is not None:
            self.written(len(data))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- measuring


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Sample:
    seconds: float
    client_cpu: float  # CPU seconds of this process (every thread)
    server_cpu: float  # CPU seconds of the server's process (0 when there is none)


def measure(fn: Callable[[], object], server: Child | None) -> Sample:
    s0 = server.cpu() if server is not None else 0.0
    c0, t0 = own_cpu(), time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return Sample(t, own_cpu() - c0, (server.cpu() - s0) if server is not None else 0.0)
