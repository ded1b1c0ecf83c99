"""gRPC server of a node: serves what an `ArtifactStore` registered, by content hash only.

No client can pin it (docs/TRANSFER.md, "Limits"): Fetch streams are capped in all and per peer host,
each must be read at a minimum average rate and end within a deadline (a watchdog cancels it
otherwise), workers are kept free for unary calls, and HTTP/2 keepalive and connection idle/age limits
close dead, idle and everlasting connections.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import KINDS
from ddm_node.core.meter import Count, Meter
from ddm_node.transfer.store import ANY_SHARD, DEFAULT_CHUNK, DEFAULT_MAX_MESSAGE, ArtifactStore, NodeInfoData, is_hex64
from ddm_node.transfer.wire import Packer, encode_chunk
from proto import ddm_pb2, ddm_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "ddm.v1.DDMNode"
MESSAGE_OVERHEAD = 4096  # room for the non-data fields of a Chunk inside max_message

WORKERS = 16  # server threads; a Fetch stream holds one for its whole life
UNARY_RESERVE = 4  # workers Fetch streams may never take: Info, ListArtifacts, GetManifest and GetPlan always run
STREAMS_PER_PEER = 8  # concurrent Fetch streams from one peer host
STREAM_DEADLINE = 3600.0  # seconds a Fetch stream may last, whatever the client asked
MIN_READ_RATE = 32 * 1024  # bytes/s a client must read a stream at on average, after READ_GRACE seconds
READ_GRACE = 20.0  # seconds a stream may go without the client taking a chunk (at its start too)
KEEPALIVE_MS = 60_000  # ping a connection's peer after this long without activity ...
KEEPALIVE_TIMEOUT_MS = 20_000  # ... and close the connection when the ping is not answered within this
MAX_IDLE_MS = 300_000  # close connections with no call for this long
MAX_AGE_MS = 1_800_000  # close every connection after this long (clients reconnect; streams resume) ...
MAX_AGE_GRACE_MS = 300_000  # ... letting its running calls finish within this
MAX_STREAMS_PER_CONNECTION = 16  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
MAX_METADATA = 16 * 1024  # bytes of request headers
MIN_PING_INTERVAL_MS = 10_000  # a client pinging more often than this (without data) is a ping flood ...
MAX_PING_STRIKES = 2  # ... and is sent away (GOAWAY) after this many strikes


def channel_options(max_message: int) -> list[tuple[str, int]]:
    """Explicit message size limits; gRPC's default receive limit (4 MiB) is too small for our chunks."""
    return [("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)]


def server_options(max_message: int) -> list[tuple[str, int]]:
    """Message limits, keepalive, connection idle/age limits and HTTP/2 settings of a node's server."""
    return channel_options(max_message) + [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", MAX_IDLE_MS),
        ("grpc.max_connection_age_ms", MAX_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_AGE_GRACE_MS),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.max_metadata_size", MAX_METADATA),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"): what per-peer caps count."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    if not peer.startswith(("ipv4:", "ipv6:")):
        return peer
    if address.startswith("["):
        return address[1:address.find("]")] if "]" in address else address
    return address.rsplit(":", 1)[0]


class _Stream:
    """One open Fetch stream, as the watchdog sees it."""

    def __init__(self, host: str, context: grpc.ServicerContext, now: float, deadline: float) -> None:
        self.host, self.context, self.started, self.deadline = host, context, now, deadline
        self.sent = 0
        self.last_sent = now  # when the transport last took a chunk (the client reads)
        self.closed = False


class _Streams:
    """The open Fetch streams: at most `total` at once and `per_peer` per peer host; each must take a chunk at
    least every `grace` seconds, be read at `min_rate` bytes/s on average after `grace` seconds, and end
    within `deadline` seconds (`overdue`). The transport takes a few MiB before a handler blocks, so the
    silence rule is what catches a client that never reads."""

    def __init__(self, total: int, per_peer: int, deadline: float, min_rate: float, grace: float) -> None:
        self.total, self.per_peer, self.deadline, self.min_rate, self.grace = total, per_peer, deadline, min_rate, grace
        self._lock = threading.Lock()
        self._open: list[_Stream] = []

    def open(self, host: str, context: grpc.ServicerContext) -> _Stream | str:
        """A new stream, or why it is refused."""
        with self._lock:
            if len(self._open) >= self.total:
                return f"server busy: {self.total} streams open"
            if sum(1 for s in self._open if s.host == host) >= self.per_peer:
                return f"too many streams from {host} (at most {self.per_peer} at once)"
            now = time.monotonic()
            stream = _Stream(host, context, now, now + self.deadline)
            self._open.append(stream)
            return stream

    def close(self, stream: _Stream) -> None:
        with self._lock:
            if not stream.closed:
                stream.closed = True
                self._open.remove(stream)

    def count(self, host: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self._open if host is None or s.host == host)

    def overdue(self, now: float) -> list[tuple[_Stream, str]]:
        """Streams past their deadline or read too slowly, with the reason; they are closed here."""
        out = []
        with self._lock:
            for s in list(self._open):
                age = now - s.started
                if now > s.deadline:
                    why = f"past the {self.deadline:g} s stream deadline"
                elif now - s.last_sent > self.grace:
                    why = f"nothing read for {now - s.last_sent:.1f} s ({s.sent} bytes in {age:.1f} s)"
                elif age > self.grace and s.sent < self.min_rate * (age - self.grace):
                    why = (f"read {s.sent} bytes in {age:.1f} s (at least {self.min_rate:.0f} bytes/s "
                           f"after {self.grace:g} s)")
                else:
                    continue
                s.closed = True
                self._open.remove(s)
                out.append((s, why))
        return out


def format_address(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _Servicer(ddm_pb2_grpc.DDMNodeServicer):
    """The DDMNode service over a store. Every request field is validated before use."""

    def __init__(self, server: TransferServer) -> None:
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

    def Fetch(self, request: ddm_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized `Chunk`s of a file from `offset` (see `wire.encode_chunk`)."""
        if not is_hex64(request.sha256):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 64 lowercase hex chars")
        if request.offset < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offset must be >= 0")
        if request.compression not in ("", "zstd"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "compression must be '' or 'zstd'")
        path = self._store.path_for(request.sha256)
        if path is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.sha256}")
        streams = self._server.streams
        ticket = streams.open(peer_host(context.peer()), context)
        if isinstance(ticket, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, ticket)
        context.add_callback(lambda: streams.close(ticket))  # however the call ends (a client's cancel too)
        try:
            try:
                f = open(path, "rb")
            except OSError as exc:
                log.warning("registered file %s is unreadable: %s", path, exc)
                context.abort(grpc.StatusCode.NOT_FOUND, f"file {request.sha256} is no longer available")
            with f:
                yield from self._stream(f, request, context, ticket)
        finally:
            streams.close(ticket)

    def _stream(self, f, request: ddm_pb2.FetchRequest, context: grpc.ServicerContext,
                ticket: _Stream) -> Iterator[bytes]:
        size = os.fstat(f.fileno()).st_size
        if request.offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({size} bytes)")
        f.seek(request.offset)
        packer = Packer(request.shuffle) if request.compression == "zstd" else None
        pos = request.offset
        chunk = self._server.chunk_size
        while context.is_active():
            # Chunks end at multiples of chunk_size (a resumed stream's first one is shorter): shuffled values
            # stay aligned, and part files grow by whole chunks.
            block = f.read(chunk - pos % chunk)
            data, compressed, width = block, False, 0
            if packer is not None:
                data, compressed, width = packer.pack(block)
            # At the end of the file (offset == size) one empty chunk still tells the client the size.
            if block or pos == request.offset:
                yield encode_chunk(pos, data, compressed, size, width)
                ticket.sent += len(data)  # the chunk was taken by the transport: the client reads
                if self._server.meter is not None:
                    self._server.meter.add(Count.BYTES_SERVED, len(data))
                ticket.last_sent = time.monotonic()
            if not block:
                return
            pos += len(block)


class _Registry:
    """Catches the method handlers the generated `add_DDMNodeServicer_to_server` registers."""

    def __init__(self) -> None:
        self.handlers: dict = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def _add_servicer(servicer: _Servicer, server: grpc.Server) -> None:
    """The generated registration, except that Fetch yields chunks already serialized (`wire.encode_chunk`)."""
    registry = _Registry()
    ddm_pb2_grpc.add_DDMNodeServicer_to_server(servicer, registry)
    handlers = registry.handlers
    handlers["Fetch"] = grpc.unary_stream_rpc_method_handler(
        servicer.Fetch, request_deserializer=ddm_pb2.FetchRequest.FromString, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class TransferServer:
    """A node's gRPC endpoint. `start()` binds (port 0 picks a free one) and returns "host:port"."""

    def __init__(self, store: ArtifactStore, info: NodeInfoData, host: str = "127.0.0.1", port: int = 0,
                 chunk_size: int = DEFAULT_CHUNK, max_message: int = DEFAULT_MAX_MESSAGE, workers: int = WORKERS,
                 streams_per_peer: int = STREAMS_PER_PEER, stream_deadline: float = STREAM_DEADLINE,
                 min_read_rate: float = MIN_READ_RATE, read_grace: float = READ_GRACE,
                 meter: Meter | None = None) -> None:
        if chunk_size <= 0 or chunk_size + MESSAGE_OVERHEAD > max_message:
            raise DDMError(f"chunk_size {chunk_size} must be positive and fit in max_message {max_message} "
                           f"with {MESSAGE_OVERHEAD} bytes to spare")
        if workers < 2:
            raise DDMError(f"workers must be >= 2 (one stays free for unary calls), got {workers}")
        if streams_per_peer < 1 or stream_deadline <= 0 or min_read_rate < 0 or read_grace < 0:
            raise DDMError("streams_per_peer must be >= 1, stream_deadline > 0, min_read_rate and read_grace >= 0")
        self.store = store
        self.info = info
        self.meter = meter  # bytes streamed to peers are counted here (Count.BYTES_SERVED)
        self.host = host
        self.port = port
        self.chunk_size = chunk_size
        self.max_message = max_message
        self.workers = workers
        # Streams never take the last workers: unary calls (GetPlan, GetManifest, ...) always find one.
        self.streams = _Streams(max(1, workers - min(UNARY_RESERVE, workers // 2)), streams_per_peer, stream_deadline,
                                min_read_rate, read_grace)
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.address = ""

    def start(self) -> str:
        """Bind and serve in background threads; returns the bound "host:port"."""
        if self._server is not None:
            raise DDMError(f"transfer server already running at {self.address}")
        # Streams hold a worker each; queued calls beyond this bound are refused (RESOURCE_EXHAUSTED,
        # which clients retry) instead of piling up without limit.
        server = grpc.server(ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ddm-transfer"),
                             options=server_options(self.max_message), maximum_concurrent_rpcs=self.workers * 4)
        _add_servicer(_Servicer(self), server)
        try:
            port = server.add_insecure_port(format_address(self.host, self.port))
        except RuntimeError as exc:
            raise DDMError(f"cannot listen on {format_address(self.host, self.port)}: {exc}") from None
        if port == 0:
            raise DDMError(f"cannot listen on {format_address(self.host, self.port)} (address in use or invalid)")
        server.start()
        self._server = server
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._police, daemon=True, name="ddm-transfer-watchdog")
        self._watchdog.start()
        self.port = port
        self.address = format_address(self.host, port)
        if not self.info.grpc_address:
            self.info = replace(self.info, grpc_address=self.address)
        log.info("transfer server listening on %s", self.address)
        return self.address

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; running streams get `grace` seconds to finish."""
        if self._server is not None:
            self._stop.set()
            self._server.stop(grace).wait()
            self._server = None
            if self._watchdog is not None:
                self._watchdog.join()
                self._watchdog = None

    def _police(self) -> None:
        """Cancel streams past their deadline or read too slowly: their workers go back to the pool."""
        period = max(0.05, min(1.0, self.streams.grace / 4))
        while not self._stop.wait(period):
            for stream, why in self.streams.overdue(time.monotonic()):
                log.info("cancelling a Fetch stream of %s: %s", stream.host, why)
                stream.context.cancel()

    def __enter__(self) -> TransferServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)
