"""gRPC server of a node: serves what an `ArtifactStore` registered, by content hash only."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator

import grpc
import zstandard

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import KINDS
from ddm_node.transfer.store import (ANY_SHARD, DEFAULT_CHUNK, DEFAULT_MAX_MESSAGE, ArtifactStore, NodeInfoData,
                                     is_hex64)
from proto import ddm_pb2, ddm_pb2_grpc

log = logging.getLogger(__name__)

ZSTD_LEVEL = 1  # level 1 compresses weights as well as level 3 at twice the speed (ENVIRONMENT.md)
MESSAGE_OVERHEAD = 4096  # room for the non-data fields of a Chunk inside max_message


def channel_options(max_message: int) -> list[tuple[str, int]]:
    """Explicit message size limits; gRPC's default receive limit (4 MiB) is too small for our chunks."""
    return [("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)]


def format_address(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _Servicer(ddm_pb2_grpc.DDMNodeServicer):
    """The DDMNode service over a store. Every request field is validated before use."""

    def __init__(self, server: "TransferServer") -> None:
        self._server = server
        self._store = server.store

    def Info(self, request: ddm_pb2.InfoRequest, context: grpc.ServicerContext) -> ddm_pb2.NodeInfo:
        info = self._server.info
        run_ids = sorted(set(info.run_ids) | self._store.run_ids())
        return ddm_pb2.NodeInfo(peer_id=info.peer_id, public_key=info.public_key, version=info.version,
                                run_ids=run_ids, grpc_address=info.grpc_address)

    def ListArtifacts(self, request: ddm_pb2.ListRequest, context: grpc.ServicerContext) -> ddm_pb2.ArtifactList:
        if request.run_id and not is_hex64(request.run_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id must be empty or 64 lowercase hex chars")
        if request.kind and request.kind not in KINDS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind (one of {', '.join(KINDS)})")
        if request.shard < ANY_SHARD:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard must be >= {ANY_SHARD} ({ANY_SHARD} = any)")
        refs = self._store.list(request.run_id or None, request.kind or None,
                                None if request.shard == ANY_SHARD else request.shard)
        return ddm_pb2.ArtifactList(artifacts=[
            ddm_pb2.ArtifactRef(manifest_id=r.manifest_id, kind=r.kind, run_id=r.run_id, shard=r.shard, step=r.step,
                                publisher=r.publisher, total_size=r.total_size) for r in refs])

    def GetManifest(self, request: ddm_pb2.ManifestRequest, context: grpc.ServicerContext) -> ddm_pb2.SignedManifest:
        if not is_hex64(request.manifest_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "manifest_id must be 64 lowercase hex chars")
        stored = self._store.manifest(request.manifest_id)
        if stored is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no manifest {request.manifest_id}")
        return ddm_pb2.SignedManifest(manifest=stored.raw, signature=stored.signature)

    def GetPlan(self, request: ddm_pb2.PlanRequest, context: grpc.ServicerContext) -> ddm_pb2.PlanBlob:
        if not is_hex64(request.run_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id must be 64 lowercase hex chars")
        plan = self._store.plan(request.run_id)
        if plan is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no plan for run {request.run_id}")
        if len(plan) > self._server.max_message - MESSAGE_OVERHEAD:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"plan is {len(plan)} bytes, over the {self._server.max_message}-byte message limit")
        return ddm_pb2.PlanBlob(plan=plan)

    def Fetch(self, request: ddm_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[ddm_pb2.Chunk]:
        if not is_hex64(request.sha256):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 64 lowercase hex chars")
        if request.offset < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offset must be >= 0")
        if request.compression not in ("", "zstd"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "compression must be '' or 'zstd'")
        path = self._store.path_for(request.sha256)
        if path is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.sha256}")
        try:
            f = open(path, "rb")
        except OSError as exc:
            log.warning("registered file %s is unreadable: %s", path, exc)
            context.abort(grpc.StatusCode.NOT_FOUND, f"file {request.sha256} is no longer available")
        with f:
            yield from self._stream(f, request, context)

    def _stream(self, f, request: ddm_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[ddm_pb2.Chunk]:
        size = os.fstat(f.fileno()).st_size
        if request.offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({size} bytes)")
        f.seek(request.offset)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if request.compression == "zstd" else None
        pos = request.offset
        while context.is_active():
            block = f.read(self._server.chunk_size)
            data, compressed = block, False
            if compressor is not None and block:
                packed = compressor.compress(block)  # one frame per chunk, content size in its header
                if len(packed) < len(block):  # incompressible blocks go raw: never bigger than chunk_size
                    data, compressed = packed, True
            # At the end of the file (offset == size) one empty chunk still tells the client the size.
            if block or pos == request.offset:
                yield ddm_pb2.Chunk(offset=pos, data=data, compressed=compressed, total_size=size)
            if not block:
                return
            pos += len(block)


class TransferServer:
    """A node's gRPC endpoint. `start()` binds (port 0 picks a free one) and returns "host:port"."""

    def __init__(self, store: ArtifactStore, info: NodeInfoData, host: str = "127.0.0.1", port: int = 0,
                 chunk_size: int = DEFAULT_CHUNK, max_message: int = DEFAULT_MAX_MESSAGE, workers: int = 4) -> None:
        if chunk_size <= 0 or chunk_size + MESSAGE_OVERHEAD > max_message:
            raise DDMError(f"chunk_size {chunk_size} must be positive and fit in max_message {max_message} "
                           f"with {MESSAGE_OVERHEAD} bytes to spare")
        if workers < 1:
            raise DDMError(f"workers must be >= 1, got {workers}")
        self.store = store
        self.info = info
        self.host = host
        self.port = port
        self.chunk_size = chunk_size
        self.max_message = max_message
        self.workers = workers
        self._server: grpc.Server | None = None
        self.address = ""

    def start(self) -> str:
        """Bind and serve in background threads; returns the bound "host:port"."""
        if self._server is not None:
            raise DDMError(f"transfer server already running at {self.address}")
        # Streams hold a worker each; queued calls beyond this bound are refused (RESOURCE_EXHAUSTED,
        # which clients retry) instead of piling up without limit.
        server = grpc.server(ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ddm-transfer"),
                             options=channel_options(self.max_message) + [("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=self.workers * 4)
        ddm_pb2_grpc.add_DDMNodeServicer_to_server(_Servicer(self), server)
        try:
            port = server.add_insecure_port(format_address(self.host, self.port))
        except RuntimeError as exc:
            raise DDMError(f"cannot listen on {format_address(self.host, self.port)}: {exc}") from None
        if port == 0:
            raise DDMError(f"cannot listen on {format_address(self.host, self.port)} (address in use or invalid)")
        server.start()
        self._server = server
        self.port = port
        self.address = format_address(self.host, port)
        if not self.info.grpc_address:
            self.info = replace(self.info, grpc_address=self.address)
        log.info("transfer server listening on %s", self.address)
        return self.address

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; running streams get `grace` seconds to finish."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> "TransferServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)
