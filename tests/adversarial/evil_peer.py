"""A misbehaving peer that speaks the real protocol, and forgeries for it to serve.

- `EvilServicer` is a real gRPC `DDMNodeServicer` (the generated `proto.ddm_pb2_grpc` base class) whose
  handlers serve real artifact bytes, but per file can flip a byte, stream forever, send more than the
  file holds, or send a message over the client's limit; it serves any manifest bytes and signature it
  is given (forged ones included), any plan bytes for any run id, and any listing.
- `EvilPeer` runs that servicer on 127.0.0.1 and joins the run's DHT through a real
  `ddm_node.swarm.dht.Swarm` under its own Identity: its records are validly signed and owned, and
  lie in their content (false steps, false kinds, records "by" someone else, wrong types, huge values).
- `GarbagePeer` is a raw `hivemind.DHT` without our record validator: it stores whatever it likes
  (unsigned records under another peer's owner marker, plain values, bytes subkeys, huge values).
- Forgeries: `forge_publisher` (publisher field says A, signature by B), `seal_copy` (a copy of a real
  artifact with changed fields, validly sealed by another key), `pickle_payload` (a pickle that would
  create a marker file if anything ever unpickled it), `write_wrong_tensors`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import MANIFEST, SIGNATURE, Manifest, read_manifest, seal
from ddm_node.swarm.dht import Swarm, dht_key, dht_time
from proto import ddm_pb2, ddm_pb2_grpc

CHUNK = 64 * 1024
HUGE = 9 << 20  # one message over the client's 8 MiB receive limit
STORE_TIMEOUT = 30.0
BIG_RECORD = 12 * 1024  # 3x the DHT record cap; one pipe write (hivemind's own pipe breaks on bigger requests)


class EvilServicer(ddm_pb2_grpc.DDMNodeServicer):
    """Answers like a node, with the misbehaviour the test configures. Thread-safe enough for tests."""

    def __init__(self, public_key: str):
        self.public_key = public_key
        self.manifests: dict[str, tuple[bytes, bytes]] = {}  # manifest id -> (bytes, signature), forged or not
        self.files: dict[str, bytes] = {}  # sha256 -> content
        self.mode: dict[str, str] = {}  # sha256 -> "flip" | "endless" | "oversized" | "huge" (default honest)
        self.plans: dict[str, bytes] = {}  # run id -> whatever bytes it answers GetPlan with
        self.listing: list[ddm_pb2.ArtifactRef] = []  # ListArtifacts answer, whatever the filter
        self.calls: list[tuple[str, str]] = []  # (rpc, id) in arrival order
        self._lock = threading.Lock()

    def _log(self, rpc: str, what: str) -> None:
        with self._lock:
            self.calls.append((rpc, what))

    def hold(self, directory: Path, list_it: bool = False) -> Manifest:
        """Serve an artifact directory exactly as it is on disk (its manifest bytes, signature and files)."""
        directory = Path(directory)
        raw = (directory / MANIFEST).read_bytes()
        sig = (directory / SIGNATURE).read_bytes() if (directory / SIGNATURE).exists() else b""
        m = Manifest.from_bytes(raw)
        self.manifests[m.id] = (raw, sig)
        for name, entry in m.files.items():
            self.files[entry.sha256] = (directory / name).read_bytes()
        if list_it:
            self.listing.append(ddm_pb2.ArtifactRef(manifest_id=m.id, kind=m.kind, run_id=m.run_id, shard=m.shard,
                                                    step=m.step, publisher=m.publisher,
                                                    total_size=sum(e.size for e in m.files.values())))
        return m

    # -- the RPCs ---------------------------------------------------------------------------------

    def Info(self, request, context):
        self._log("Info", "")
        return ddm_pb2.NodeInfo(peer_id="evil", public_key=self.public_key, version="0.0.0-evil")

    def ListArtifacts(self, request, context):
        self._log("ListArtifacts", request.kind)
        return ddm_pb2.ArtifactList(artifacts=self.listing)

    def GetManifest(self, request, context):
        self._log("GetManifest", request.manifest_id)
        if request.manifest_id not in self.manifests:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such manifest")
        raw, sig = self.manifests[request.manifest_id]
        return ddm_pb2.SignedManifest(manifest=raw, signature=sig)

    def GetPlan(self, request, context):
        self._log("GetPlan", request.run_id)
        return ddm_pb2.PlanBlob(plan=self.plans.get(request.run_id, b'{"not": "a plan"}'))

    def Fetch(self, request, context):
        self._log("Fetch", request.sha256)
        data = self.files.get(request.sha256)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such file")
        mode = self.mode.get(request.sha256, "honest")
        size, pos = len(data), request.offset
        if mode == "huge":
            yield ddm_pb2.Chunk(offset=pos, data=os.urandom(HUGE), total_size=size)
            return
        if mode == "oversized":  # everything that is left, and then some, in one chunk
            yield ddm_pb2.Chunk(offset=pos, data=data[pos:] + b"\0" * CHUNK, total_size=size)
            return
        if mode == "flip":
            data = bytearray(data)
            data[size // 2] ^= 0xFF
            data = bytes(data)
        while pos < size and context.is_active():
            block = data[pos:pos + CHUNK]
            yield ddm_pb2.Chunk(offset=pos, data=block, total_size=size)
            pos += len(block)
        if mode == "endless":  # the file never ends: keep streaming past its size while anyone listens
            for _ in range(100_000):
                if not context.is_active():
                    return
                yield ddm_pb2.Chunk(offset=pos, data=b"\xAA" * CHUNK, total_size=size)
                pos += CHUNK


class EvilPeer:
    """An EvilServicer on 127.0.0.1 plus (when given a run id) a real Swarm under the peer's own key."""

    def __init__(self, identity: Identity, run_id: str | None = None, initial_peers: list[str] = ()):
        self.identity = identity
        self.key = identity.public_hex
        self.servicer = EvilServicer(self.key)
        limit = 64 << 20  # it may send more than any honest node would
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_send_message_length", limit),
                                           ("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
        ddm_pb2_grpc.add_DDMNodeServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.swarm: Swarm | None = None
        try:
            if run_id is not None:
                self.swarm = Swarm(identity, run_id, initial_peers=list(initial_peers))
        except BaseException:
            self.server.stop(0).wait()
            raise

    @property
    def marker(self) -> str:
        return self.swarm.marker

    def store_owned(self, kind: str, shard: int | None, value: object, ttl: float = 600.0) -> bool:
        """Store any value under our own owner subkey, bypassing Swarm.put's checks (our validator signs it)."""
        key = dht_key(self.swarm.run_id, kind, shard)
        return _stored(self.swarm.dht, key, value, ttl, self.marker)

    def store_as(self, kind: str, shard: int | None, value: object, subkey: object, ttl: float = 600.0) -> bool:
        """Store under someone else's subkey: our validator does not sign it, honest peers reject it."""
        key = dht_key(self.swarm.run_id, kind, shard)
        return _stored(self.swarm.dht, key, value, ttl, subkey)

    def close(self) -> None:
        self.server.stop(0).wait()
        if self.swarm is not None:
            self.swarm.shutdown()


def _stored(dht, key: str, value: object, ttl: float, subkey: object) -> bool:
    """A raw hivemind store with a deadline (a DHT child that died must fail the test, not hang it).
    Requests must stay under 16 KiB: the DHT child reads its pipe without blocking, and a request that
    the sender writes in more than one piece (multiprocessing splits those over 16 KiB) can kill it."""
    future = dht.store(key, value, dht_time() + ttl, subkey=subkey, return_future=True)
    return bool(future.result(timeout=STORE_TIMEOUT))


class GarbagePeer:
    """A raw hivemind DHT peer WITHOUT our record validator: it keeps and offers whatever it stores."""

    def __init__(self, initial_peers: list[str]):
        import hivemind

        self.dht = hivemind.DHT(initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                                nat_port_map=False)

    def store(self, key: str, value: object, subkey: object = None, ttl: float = 3600.0) -> bool:
        return _stored(self.dht, key, value, ttl, subkey)

    def close(self) -> None:
        self.dht.shutdown()


# ---------------------------------------------------------------------------------------- forgeries


class _Boom:
    """Unpickling this creates `path`: proof that somebody unpickled peer data."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payload(marker: Path) -> bytes:
    """A pickle (as torch.save would write one) that creates `marker` when loaded."""
    return pickle.dumps({"weight": _Boom(str(marker)), "step": 8}, protocol=2)


def write_wrong_tensors(path: Path) -> None:
    """A well-formed safetensors file whose tensors fit no model of the run."""
    import torch
    from safetensors.torch import save_file

    save_file({"bogus.weight": torch.zeros(3, 3)}, str(path))


def seal_copy(src: Path, dst: Path, identity: Identity, replace_files: dict[str, bytes] | None = None,
              **fields) -> Manifest:
    """Copy a real artifact, swap file contents and manifest fields, and seal it validly with `identity`
    (publisher = identity): a correctly signed manifest over whatever the files now are."""
    dst.mkdir(parents=True, exist_ok=True)
    original = read_manifest(src)
    for name in original.files:
        shutil.copyfile(src / name, dst / name)
    for name, content in (replace_files or {}).items():
        (dst / name).write_bytes(content)
    (dst / SIGNATURE).unlink(missing_ok=True)
    return seal(dst, replace(original, **fields), identity)


def forge_publisher(src: Path, claimed: str, signer: Identity, **fields) -> tuple[Manifest, bytes, bytes]:
    """A manifest whose publisher field says `claimed` but whose signature is `signer`'s: (manifest, raw, sig)."""
    m = replace(read_manifest(src), publisher=claimed, **fields)
    raw = m.to_bytes()
    return m, raw, signer.sign(raw)


def keys_before(n: int, limit: str) -> list[Identity]:
    """`n` fresh identities whose public keys sort before `limit` (their DHT records are read first)."""
    out = []
    while len(out) < n:
        ident = Identity.generate()
        if ident.public_hex < limit:
            out.append(ident)
    return sorted(out, key=lambda i: i.public_hex)


def key_after(prefix: str) -> Identity:
    """A fresh identity whose public key sorts at or after `prefix`."""
    while True:
        ident = Identity.generate()
        if ident.public_hex >= prefix:
            return ident
