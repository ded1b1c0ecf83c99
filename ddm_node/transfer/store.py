"""What a node serves: verified artifact directories and plan files, indexed by content hash.

The gRPC server answers only from this index. A request names a sha256 or a manifest id, never a
path, so a peer cannot make the server read anything that was not registered here.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node import __version__
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import MANIFEST, SIGNATURE, Manifest, check_signature, verify_artifact

DEFAULT_CHUNK = 1 << 20  # bytes of file data per streamed message
DEFAULT_MAX_MESSAGE = 8 << 20  # gRPC send/receive limit set on both sides
ANY_SHARD = -2  # ListRequest.shard value meaning "any shard" (-1 is a real value: no shard)
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ArtifactRef:
    """One artifact a node holds, as listed by `ListArtifacts`."""

    manifest_id: str
    kind: str
    run_id: str
    shard: int
    step: int
    publisher: str
    total_size: int


@dataclass
class NodeInfoData:
    """What `Info` reports about a node. An empty `grpc_address` is filled with the bound address."""

    peer_id: str
    public_key: str
    version: str = __version__
    run_ids: list[str] = field(default_factory=list)
    grpc_address: str = ""


@dataclass(frozen=True)
class StoredArtifact:
    """A registered artifact: its directory and the exact manifest bytes and signature to serve."""

    directory: Path
    manifest: Manifest
    raw: bytes
    signature: bytes

    @property
    def id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def ref(self) -> ArtifactRef:
        m = self.manifest
        return ArtifactRef(self.id, m.kind, m.run_id, m.shard, m.step, m.publisher,
                           sum(e.size for e in m.files.values()))


def is_hex64(value: str) -> bool:
    """True for a lowercase 64-char hex string (a sha256, manifest id or run id)."""
    return isinstance(value, str) and bool(HEX64.match(value))


def parse_signed_manifest(raw: bytes, signature: bytes | None, trusted_keys: Iterable[str] | None,
                          source: str, expected_id: str | None = None) -> Manifest:
    """Check untrusted manifest bytes: id, canonical form, fields, signature and trust.

    Canonical bytes are required so that one manifest has exactly one id (sha256 of its bytes).
    """
    got_id = hashlib.sha256(raw).hexdigest()
    if expected_id is not None and got_id != expected_id:
        raise IntegrityError(f"{source}: manifest sha256 {got_id[:16]} does not match the id {expected_id[:16]}")
    manifest = Manifest.from_bytes(raw, source)
    if manifest.to_bytes() != raw:
        raise IntegrityError(f"{source}: manifest bytes are not canonical JSON")
    check_signature(manifest, raw, signature or None, trusted_keys, source)
    return manifest


class ArtifactStore:
    """Thread-safe index: manifest id -> artifact, file sha256 -> paths, run id -> plan bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._artifacts: dict[str, StoredArtifact] = {}
        # One file content can belong to several artifacts (an unchanged config.json); keep every owner
        # so unregistering one artifact does not stop serving the others.
        self._files: dict[str, list[tuple[str, Path]]] = {}
        self._plans: dict[str, bytes] = {}

    def register(self, directory: str | Path, trusted_keys: Iterable[str] | None = None) -> Manifest:
        """Verify a sealed artifact directory (signature required, every file hashed) and serve it.

        Registering the same manifest again replaces the earlier entry. Raises IntegrityError when the
        directory does not verify.
        """
        directory = Path(directory).resolve()
        verified = verify_artifact(directory, require_signature=True, trusted_keys=trusted_keys)
        try:
            raw = (directory / MANIFEST).read_bytes()
            signature = (directory / SIGNATURE).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"{directory}: cannot read manifest ({exc.strerror or exc})") from None
        # Re-check the bytes we will serve: they must be the ones whose files were just hashed.
        manifest = parse_signed_manifest(raw, signature, trusted_keys, str(directory / MANIFEST))
        if manifest.to_bytes() != verified.to_bytes():
            raise IntegrityError(f"{directory / MANIFEST}: changed while it was being registered")
        stored = StoredArtifact(directory, manifest, raw, signature)
        with self._lock:
            self._drop(stored.id)
            self._artifacts[stored.id] = stored
            for name, entry in manifest.files.items():
                self._files.setdefault(entry.sha256, []).append((stored.id, directory / name))
        return manifest

    def unregister(self, manifest_id: str) -> bool:
        """Stop serving an artifact; False when it was not registered."""
        with self._lock:
            return self._drop(manifest_id)

    def _drop(self, manifest_id: str) -> bool:
        stored = self._artifacts.pop(manifest_id, None)
        if stored is None:
            return False
        for entry in stored.manifest.files.values():
            owners = [o for o in self._files.get(entry.sha256, []) if o[0] != manifest_id]
            if owners:
                self._files[entry.sha256] = owners
            else:
                self._files.pop(entry.sha256, None)
        return True

    def register_plan(self, raw: bytes) -> str:
        """Serve a plan file; returns its run id (sha256 of the bytes)."""
        if not isinstance(raw, (bytes, bytearray)) or not raw:
            raise DDMError("a plan must be non-empty bytes")
        run_id = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._plans[run_id] = bytes(raw)
        return run_id

    def list(self, run_id: str | None = None, kind: str | None = None, shard: int | None = None) -> list[ArtifactRef]:
        """Artifacts matching every given filter (None = any), sorted by run, kind, shard, step, id."""
        with self._lock:
            refs = [s.ref() for s in self._artifacts.values()]
        refs = [r for r in refs if (run_id is None or r.run_id == run_id) and (kind is None or r.kind == kind)
                and (shard is None or r.shard == shard)]
        return sorted(refs, key=lambda r: (r.run_id, r.kind, r.shard, r.step, r.manifest_id))

    def manifest(self, manifest_id: str) -> StoredArtifact | None:
        """The registered artifact with this manifest id, or None."""
        with self._lock:
            return self._artifacts.get(manifest_id)

    def path_for(self, sha256: str) -> Path | None:
        """A path holding the registered file with this sha256, or None (never a path from outside)."""
        with self._lock:
            owners = self._files.get(sha256)
            return owners[-1][1] if owners else None

    def plan(self, run_id: str) -> bytes | None:
        """The registered plan bytes for a run id, or None."""
        with self._lock:
            return self._plans.get(run_id)

    def run_ids(self) -> set[str]:
        """Every run id the store has a plan or an artifact for."""
        with self._lock:
            return set(self._plans) | {s.manifest.run_id for s in self._artifacts.values()}
