"""Peers that speak the real protocol and waste time: they stall (send nothing) or trickle (a burst, then silence).

- `SlowServicer` is the `EvilServicer` of evil_peer.py (real artifact bytes, real gRPC) with two more
  per-file Fetch modes: "stall" (no chunk at all) and "trickle" (`trickle` bytes from the requested
  offset, then silence, at every attempt); with `stall_manifests` or `stall_listing` it also never
  answers GetManifest or ListArtifacts. A stalled call waits until the client gives up (or `MAX_WAIT`).
- `SlowPeer` runs one on 127.0.0.1 and, given a run id, joins the DHT under its own key (as EvilPeer).
- `hold_file` serves bare bytes (no artifact) for fetch_file tests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.identity import Identity
from ddm_node.swarm.dht import Swarm
from proto import ddm_pb2, ddm_pb2_grpc

from .evil_peer import EvilPeer, EvilServicer

MAX_WAIT = 120.0  # seconds a stalled call lasts at most, so that a broken test still ends
TRICKLE = 1 << 20  # bytes a trickling holder sends per attempt before going silent


def _wait_cancelled(context, stop: threading.Event) -> None:
    """Hold the call open, sending nothing, until the client cancels it (or the peer closes)."""
    end = time.monotonic() + MAX_WAIT
    while context.is_active() and not stop.is_set() and time.monotonic() < end:
        stop.wait(0.02)


class SlowServicer(EvilServicer):
    def __init__(self, public_key: str, trickle: int = TRICKLE, chunk: int = 64 * 1024):
        super().__init__(public_key)
        self.trickle = trickle
        self.chunk = chunk
        self.stall_manifests = False
        self.stall_listing = False
        self.stop = threading.Event()  # set at close: stalled calls end at once

    def hold_file(self, data: bytes, mode: str = "honest") -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        self.mode[sha] = mode
        return sha

    def GetManifest(self, request, context):
        if self.stall_manifests:
            self._log("GetManifest", request.manifest_id)
            _wait_cancelled(context, self.stop)
            context.abort(grpc.StatusCode.UNAVAILABLE, "stalled")
        return super().GetManifest(request, context)

    def ListArtifacts(self, request, context):
        if self.stall_listing:
            self._log("ListArtifacts", request.kind)
            _wait_cancelled(context, self.stop)
            context.abort(grpc.StatusCode.UNAVAILABLE, "stalled")
        return super().ListArtifacts(request, context)

    def Fetch(self, request, context):
        mode = self.mode.get(request.sha256, "honest")
        if mode not in ("stall", "trickle"):
            yield from super().Fetch(request, context)
            return
        self._log("Fetch", request.sha256)
        data = self.files.get(request.sha256)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such file")
        if mode == "trickle":
            pos, end = request.offset, min(len(data), request.offset + self.trickle)
            while pos < end and context.is_active():
                block = data[pos:min(end, pos + self.chunk)]
                yield ddm_pb2.Chunk(offset=pos, data=block, total_size=len(data))
                pos += len(block)
        _wait_cancelled(context, self.stop)


class SlowPeer(EvilPeer):
    """A SlowServicer on 127.0.0.1 plus (when given a run id) a real Swarm under the peer's own key."""

    def __init__(self, identity: Identity, run_id: str | None = None, initial_peers: list[str] = (),
                 trickle: int = TRICKLE):
        self.identity = identity
        self.key = identity.public_hex
        self.servicer = SlowServicer(self.key, trickle)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        ddm_pb2_grpc.add_DDMNodeServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()
        self.swarm: Swarm | None = None
        try:
            if run_id is not None:
                self.swarm = Swarm(identity, run_id, initial_peers=list(initial_peers))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.servicer.stop.set()
        super().close()
