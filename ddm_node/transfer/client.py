"""gRPC client: talks to one node (`NodeClient`); `download` fetches verified files and artifacts from many.

Nothing a peer sends is trusted: manifests are checked against their id, signature and the trusted
keys, plans against their run id, listed ids for their form.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import grpc

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import Manifest
from ddm_node.transfer.server import SERVICE, channel_options
from ddm_node.transfer.store import (
    ANY_SHARD,
    DEFAULT_MAX_MESSAGE,
    ArtifactRef,
    NodeInfoData,
    is_hex64,
    parse_signed_manifest,
)
from proto import ddm_pb2, ddm_pb2_grpc

DEFAULT_TIMEOUT = 30.0  # seconds for a unary call, and the fixed part of a stream's deadline
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}$")


class PeerError(DDMError):
    """A gRPC call to a peer failed; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def check_address(address: str) -> str:
    """Accept only `host:port` (no `unix:` or other gRPC target schemes a peer record could smuggle in)."""
    if not isinstance(address, str) or not _ADDRESS.match(address):
        raise DDMError(f"bad peer address {address!r} (want host:port)")
    return address


class NodeClient:
    """One connection to one node. Use as a context manager; every failed call raises PeerError."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.address = check_address(address)
        self.timeout = timeout
        self.max_message = max_message
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message))
        self._stub = ddm_pb2_grpc.DDMNodeStub(self._channel)
        # Fetch answers arrive as the serialized Chunk bytes: `wire.decode_chunk` reads them without copying the data.
        self._fetch = self._channel.unary_stream(f"/{SERVICE}/Fetch",
                                                 request_serializer=ddm_pb2.FetchRequest.SerializeToString,
                                                 response_deserializer=None)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peer_error(self, what: str, exc: grpc.RpcError) -> PeerError:
        """The PeerError for a failed call `what` (its message names this node and the status code)."""
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "ERROR"
        return PeerError(f"{self.address}: {what}: {name}: {details}", code)

    def _call(self, what: str, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.peer_error(what, exc) from None

    def info(self) -> NodeInfoData:
        """The node's identity, version, runs and advertised address (as the node claims them)."""
        r = self._call("Info", self._stub.Info, ddm_pb2.InfoRequest())
        return NodeInfoData(peer_id=r.peer_id, public_key=r.public_key, version=r.version, run_ids=list(r.run_ids),
                            grpc_address=r.grpc_address)

    def list_artifacts(self, run_id: str | None = None, kind: str | None = None,
                       shard: int | None = None) -> list[ArtifactRef]:
        """Artifacts the node lists. Entries are claims only: verify via `get_manifest` before use."""
        request = ddm_pb2.ListRequest(run_id=run_id or "", kind=kind or "",
                                      shard=ANY_SHARD if shard is None else shard)
        r = self._call("ListArtifacts", self._stub.ListArtifacts, request)
        refs = []
        for a in r.artifacts:
            if not is_hex64(a.manifest_id) or not is_hex64(a.run_id):
                raise IntegrityError(f"{self.address}: ListArtifacts returned a malformed id")
            refs.append(ArtifactRef(a.manifest_id, a.kind, a.run_id, a.shard, a.step, a.publisher, a.total_size))
        return refs

    def get_manifest(self, manifest_id: str,
                     trusted_keys: Iterable[str] | None = None) -> tuple[Manifest, bytes, bytes]:
        """(manifest, raw bytes, signature), checked: sha256(raw) == id, canonical, signed, trusted."""
        if not is_hex64(manifest_id):
            raise DDMError(f"bad manifest id {manifest_id!r} (want 64 lowercase hex chars)")
        r = self._call("GetManifest", self._stub.GetManifest, ddm_pb2.ManifestRequest(manifest_id=manifest_id))
        source = f"{self.address} manifest {manifest_id[:16]}"
        manifest = parse_signed_manifest(r.manifest, r.signature, trusted_keys, source, expected_id=manifest_id)
        return manifest, bytes(r.manifest), bytes(r.signature)

    def get_plan(self, run_id: str) -> bytes:
        """A run's plan bytes, checked: sha256(plan) == run_id."""
        if not is_hex64(run_id):
            raise DDMError(f"bad run id {run_id!r} (want 64 lowercase hex chars)")
        r = self._call("GetPlan", self._stub.GetPlan, ddm_pb2.PlanRequest(run_id=run_id))
        got = hashlib.sha256(r.plan).hexdigest()
        if got != run_id:
            raise IntegrityError(f"{self.address}: plan sha256 {got[:16]} does not match run id {run_id[:16]}")
        return bytes(r.plan)

    def fetch_stream(self, sha256: str, offset: int, compress: bool, timeout: float):
        """The raw `Fetch` response stream: serialized chunks (`wire.decode_chunk`), unchecked, packed as `wire.Packer`
        packs them with `compress`; `fetch_file` is the safe way to download."""
        request = ddm_pb2.FetchRequest(sha256=sha256, offset=offset, compression="zstd" if compress else "",
                                       shuffle=compress)  # this client undoes a byte shuffle (transfer/wire.py)
        return self._fetch(request, timeout=timeout)
