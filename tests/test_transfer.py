"""Transfer layer: real gRPC servers on 127.0.0.1 (threads in this process), honest and malicious."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import zstandard

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import MANIFEST, SIGNATURE, FileEntry, Manifest, copy_artifact, seal, verify_artifact
from ddm_node.transfer import (
    ArtifactStore,
    NodeClient,
    NodeInfoData,
    PeerError,
    TransferServer,
    fetch_artifact,
    fetch_file,
)
from ddm_node.transfer.download import download_dir
from proto import ddm_pb2, ddm_pb2_grpc

RUN = hashlib.sha256(b"run-a").hexdigest()
RUN_B = hashlib.sha256(b"run-b").hexdigest()
KEY = Identity.generate()
OTHER_KEY = Identity.generate()


def random_bytes(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(n)


def make_artifact(directory: Path, files: dict[str, bytes], identity: Identity | None = KEY, kind: str = "expert",
                  shard: int = 0, step: int = 100, run_id: str = RUN) -> Manifest:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    placeholder = {name: FileEntry("0" * 64, 0) for name in files}
    return seal(directory, Manifest(kind, run_id, shard, step, "cfg", placeholder), identity)


def entry_of(data: bytes) -> FileEntry:
    return FileEntry(hashlib.sha256(data).hexdigest(), len(data))


def dead_address() -> str:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def net():
    """Starts honest and malicious servers; stops every one of them at teardown."""
    servers: list = []

    class Net:
        def honest(self, store: ArtifactStore, **kw) -> str:
            server = TransferServer(store, NodeInfoData(peer_id="peer", public_key=KEY.public_hex), **kw)
            servers.append(server)
            return server.start()

        def evil(self, servicer: ddm_pb2_grpc.DDMNodeServicer) -> str:
            server = grpc.server(ThreadPoolExecutor(max_workers=2))
            ddm_pb2_grpc.add_DDMNodeServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers.append(server)
            return f"127.0.0.1:{port}"

    try:
        yield Net()
    finally:
        for server in servers:
            server.stop(0) if isinstance(server, TransferServer) else server.stop(0).wait()


class Evil(ddm_pb2_grpc.DDMNodeServicer):
    """A peer that answers with whatever the test gives it."""

    def __init__(self, fetch=None, manifest: tuple[bytes, bytes] | None = None, plan: bytes | None = None):
        self.fetch, self.signed, self.plan_bytes = fetch, manifest, plan
        self.requests: list[ddm_pb2.FetchRequest] = []

    def Fetch(self, request, context):
        self.requests.append(request)
        yield from self.fetch(request, context)

    def GetManifest(self, request, context):
        return ddm_pb2.SignedManifest(manifest=self.signed[0], signature=self.signed[1])

    def GetPlan(self, request, context):
        return ddm_pb2.PlanBlob(plan=self.plan_bytes)


# ---------------------------------------------------------------- store, list, info, manifest

def test_store_register_list_info_manifest(tmp_path, net):
    store = ArtifactStore()
    config = b'{"size": "tiny"}'
    m0 = make_artifact(tmp_path / "a0", {"model.safetensors": random_bytes(1000), "config.json": config})
    m1 = make_artifact(tmp_path / "a1", {"state.safetensors": random_bytes(500, 1), "config.json": config},
                       kind="state", shard=1, step=200)
    m2 = make_artifact(tmp_path / "a2", {"stats.safetensors": random_bytes(300, 2)}, kind="stats", shard=-1,
                       run_id=RUN_B)
    for d in ("a0", "a1", "a2"):
        store.register(tmp_path / d)
    plan_run = store.register_plan(b"a plan")
    address = net.honest(store)
    with NodeClient(address, timeout=5) as client:
        info = client.info()
        assert info.grpc_address == address and info.public_key == KEY.public_hex
        assert set(info.run_ids) == {RUN, RUN_B, plan_run}
        assert [r.manifest_id for r in client.list_artifacts(RUN)] == [m0.id, m1.id]
        everything = client.list_artifacts()
        assert everything == store.list() and {r.manifest_id for r in everything} == {m0.id, m1.id, m2.id}
        assert [r.manifest_id for r in client.list_artifacts(kind="state")] == [m1.id]
        assert [r.manifest_id for r in client.list_artifacts(shard=0)] == [m0.id]
        assert [r.manifest_id for r in client.list_artifacts(shard=-1)] == [m2.id]
        assert client.list_artifacts(RUN_B, kind="expert") == []
        ref = client.list_artifacts(RUN, shard=1)[0]
        assert (ref.kind, ref.step, ref.publisher, ref.total_size) == ("state", 200, KEY.public_hex, 500 + len(config))
        manifest, raw, sig = client.get_manifest(m0.id, trusted_keys=[KEY.public_hex])
        assert manifest == m0 and raw == (tmp_path / "a0" / MANIFEST).read_bytes()
        assert sig == (tmp_path / "a0" / SIGNATURE).read_bytes()
        with pytest.raises(PeerError, match="NOT_FOUND"):
            client.get_manifest("ab" * 32)
    # A file shared by two artifacts stays served until its last owner is unregistered.
    shared = hashlib.sha256(config).hexdigest()
    assert store.unregister(m0.id) and not store.unregister(m0.id)
    assert store.path_for(shared) == (tmp_path / "a1" / "config.json").resolve()
    assert store.path_for(m0.files["model.safetensors"].sha256) is None
    store.unregister(m1.id)
    assert store.path_for(shared) is None and store.manifest(m1.id) is None


def test_store_refuses_unsigned_and_altered_artifacts(tmp_path):
    store = ArtifactStore()
    make_artifact(tmp_path / "unsigned", {"a.bin": b"abc"}, identity=None)
    with pytest.raises(IntegrityError, match="not signed"):
        store.register(tmp_path / "unsigned")
    make_artifact(tmp_path / "altered", {"a.bin": b"abc"})
    (tmp_path / "altered" / "a.bin").write_bytes(b"abd")
    with pytest.raises(IntegrityError, match="sha256"):
        store.register(tmp_path / "altered")
    make_artifact(tmp_path / "ok", {"a.bin": b"abc"})
    with pytest.raises(IntegrityError, match="trusted"):
        store.register(tmp_path / "ok", trusted_keys=[OTHER_KEY.public_hex])
    assert store.list() == []
    with pytest.raises(DDMError):
        store.register_plan(b"")


def test_server_rejects_bad_requests(tmp_path, net):
    store = ArtifactStore()
    data = random_bytes(100)
    make_artifact(tmp_path / "a", {"f.bin": data})
    store.register(tmp_path / "a")
    address = net.honest(store)
    sha = hashlib.sha256(data).hexdigest()
    with grpc.insecure_channel(address) as channel:
        stub = ddm_pb2_grpc.DDMNodeStub(channel)

        def fetch_code(**kw) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Fetch(ddm_pb2.FetchRequest(**kw), timeout=5))
            return info.value.code()

        assert fetch_code(sha256="../etc/passwd") == grpc.StatusCode.INVALID_ARGUMENT
        assert fetch_code(sha256=str(tmp_path / "a" / "f.bin")) == grpc.StatusCode.INVALID_ARGUMENT
        assert fetch_code(sha256=sha.upper()) == grpc.StatusCode.INVALID_ARGUMENT
        assert fetch_code(sha256=sha, offset=-1) == grpc.StatusCode.INVALID_ARGUMENT
        assert fetch_code(sha256=sha, compression="gzip") == grpc.StatusCode.INVALID_ARGUMENT
        assert fetch_code(sha256=sha, offset=101) == grpc.StatusCode.OUT_OF_RANGE
        assert fetch_code(sha256="0" * 64) == grpc.StatusCode.NOT_FOUND
        # offset == size: one empty chunk that still reports the size
        end = list(stub.Fetch(ddm_pb2.FetchRequest(sha256=sha, offset=100), timeout=5))
        assert [(c.offset, c.data, c.total_size) for c in end] == [(100, b"", 100)]
        for request in (ddm_pb2.ListRequest(run_id="../x", shard=-2), ddm_pb2.ListRequest(kind="weights", shard=-2),
                        ddm_pb2.ListRequest(shard=-3)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListArtifacts(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetManifest(ddm_pb2.ManifestRequest(manifest_id="../manifest.json"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(DDMError, match="bad file entry"):
        fetch_file([address], FileEntry("../etc/passwd", 10), tmp_path / "x")
    with pytest.raises(DDMError, match="bad peer address"):
        NodeClient("unix:/tmp/socket")
    with pytest.raises(DDMError, match="chunk_size"):
        TransferServer(store, NodeInfoData("p", KEY.public_hex), chunk_size=8 << 20, max_message=8 << 20)


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("compress", [False, True])
def test_fetch_file_round_trip(tmp_path, net, compress):
    block = 64 * 1024  # chunks: random, random, zeros, zeros, a random tail
    data = random_bytes(2 * block) + b"\0" * (2 * block) + random_bytes(37_857, 1)
    make_artifact(tmp_path / "a", {"f.bin": data})
    store = ArtifactStore()
    store.register(tmp_path / "a")
    address = net.honest(store, chunk_size=block)
    got: list[int] = []
    dest = fetch_file([address], entry_of(data), tmp_path / "out" / "f.bin", progress=got.append, compress=compress)
    assert dest.read_bytes() == data and sum(got) == len(data) and len(got) == 5
    assert not (tmp_path / "out" / "f.bin.part").exists()
    # What is on the wire: zstd frames only where they are smaller than the raw block.
    with grpc.insecure_channel(address) as channel:
        request = ddm_pb2.FetchRequest(sha256=entry_of(data).sha256, compression="zstd" if compress else "")
        chunks = list(ddm_pb2_grpc.DDMNodeStub(channel).Fetch(request, timeout=5))
    assert [c.compressed for c in chunks] == [False, False, compress, compress, False]
    wire = sum(len(c.data) for c in chunks)
    assert wire < len(data) - block if compress else wire == len(data)


def test_chunks_over_grpc_default_limit(tmp_path, net):
    """5 MiB chunks pass only because both sides set their message limits explicitly (default is 4 MiB)."""
    data = random_bytes(6 << 20)
    make_artifact(tmp_path / "a", {"f.bin": data})
    store = ArtifactStore()
    store.register(tmp_path / "a")
    address = net.honest(store, chunk_size=5 << 20)
    got: list[int] = []
    fetch_file([address], entry_of(data), tmp_path / "f.bin", progress=got.append)
    assert got == [5 << 20, 1 << 20] and (tmp_path / "f.bin").read_bytes() == data


def test_resume_from_part_file(tmp_path, net):
    data = random_bytes(300_000)
    make_artifact(tmp_path / "a", {"f.bin": data})
    store = ArtifactStore()
    store.register(tmp_path / "a")
    address = net.honest(store, chunk_size=64 * 1024)
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(data[:123_456])
    got: list[int] = []
    fetch_file([address], entry_of(data), dest, progress=got.append)
    assert dest.read_bytes() == data and sum(got) == len(data) - 123_456
    # A .part holding someone else's bad bytes fails the hash; the holder gets one fresh try from byte 0.
    dest.unlink()
    Path(str(dest) + ".part").write_bytes(b"x" * 1000)
    got.clear()
    fetch_file([address], entry_of(data), dest, progress=got.append)
    assert dest.read_bytes() == data and sum(got) == (len(data) - 1000) + len(data)
    # A complete .part needs no network at all.
    Path(str(dest) + ".part").write_bytes(data)
    dest.unlink()
    assert fetch_file([dead_address()], entry_of(data), dest, retries=0).read_bytes() == data


def test_retry_resumes_after_broken_stream(tmp_path, net):
    data = random_bytes(50_000)
    size, sha = len(data), hashlib.sha256(data).hexdigest()

    def flaky(request, context):
        if len(evil.requests) == 1:  # first call: 20 000 bytes, then the connection "breaks"
            yield ddm_pb2.Chunk(offset=0, data=data[:20_000], total_size=size)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        yield ddm_pb2.Chunk(offset=request.offset, data=data[request.offset:], total_size=size)

    evil = Evil(fetch=flaky)
    address = net.evil(evil)
    got: list[int] = []
    dest = fetch_file([address], FileEntry(sha, size), tmp_path / "f.bin", progress=got.append, backoff=0.01)
    assert dest.read_bytes() == data and sum(got) == size
    assert [r.offset for r in evil.requests] == [0, 20_000]


def test_tampered_holder_is_dropped_for_an_honest_one(tmp_path, net, caplog):
    data = random_bytes(200_000)
    make_artifact(tmp_path / "a", {"f.bin": data})
    copy_artifact(tmp_path / "a", tmp_path / "b")
    bad_store, good_store = ArtifactStore(), ArtifactStore()
    bad_store.register(tmp_path / "a")
    good_store.register(tmp_path / "b")
    with open(tmp_path / "a" / "f.bin", "r+b") as f:  # flip one byte after registration
        f.seek(100_000)
        byte = f.read(1)
        f.seek(100_000)
        f.write(bytes([byte[0] ^ 1]))
    bad, good = net.honest(bad_store), net.honest(good_store)
    entry = entry_of(data)
    with pytest.raises(IntegrityError) as info:
        fetch_file([bad], entry, tmp_path / "x.bin")
    assert entry.sha256 in str(info.value) and bad in str(info.value) and "mismatch" in str(info.value)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()
    caplog.set_level(logging.WARNING, logger="ddm_node.transfer.download")
    dest = fetch_file([bad, good], entry, tmp_path / "f.bin")
    assert dest.read_bytes() == data
    assert any(bad in r.getMessage() and "mismatch" in r.getMessage() for r in caplog.records)


def test_unknown_sha_and_dead_holders(tmp_path, net):
    store = ArtifactStore()
    make_artifact(tmp_path / "a", {"f.bin": b"hello"})
    store.register(tmp_path / "a")
    address = net.honest(store)
    missing = entry_of(b"not there")
    start = time.monotonic()
    with pytest.raises(DDMError) as info:
        fetch_file([address], missing, tmp_path / "x", backoff=5.0)
    assert time.monotonic() - start < 3  # NOT_FOUND is final: no retries, no backoff sleeps
    assert not isinstance(info.value, IntegrityError)
    assert missing.sha256 in str(info.value) and address in str(info.value) and "NOT_FOUND" in str(info.value)
    # An unreachable holder is retried, then skipped for the next one.
    dead = dead_address()
    dest = fetch_file([dead, address], entry_of(b"hello"), tmp_path / "f", retries=2, backoff=0.01)
    assert dest.read_bytes() == b"hello"
    with pytest.raises(DDMError, match="gave up after 1 retries") as info:
        fetch_file([dead], entry_of(b"hello"), tmp_path / "g", retries=1, backoff=0.01)
    assert dead in str(info.value)


SIZE = 10_000
DATA = random_bytes(SIZE)


def _endless(request, context):
    pos = request.offset
    for _ in range(100_000):  # "forever" for the client; bounded so a broken test still ends
        yield ddm_pb2.Chunk(offset=pos, data=b"\1" * 1000, total_size=SIZE)
        pos += 1000


def _oversized(request, context):
    yield ddm_pb2.Chunk(offset=0, data=DATA + b"extra", total_size=SIZE)


def _wrong_offset(request, context):
    yield ddm_pb2.Chunk(offset=0, data=DATA[:1000], total_size=SIZE)
    yield ddm_pb2.Chunk(offset=2000, data=DATA[2000:3000], total_size=SIZE)


def _lying_size(request, context):
    yield ddm_pb2.Chunk(offset=0, data=DATA + DATA, total_size=2 * SIZE)


def _empty_forever(request, context):
    for _ in range(100_000):
        yield ddm_pb2.Chunk(offset=request.offset, data=b"", total_size=SIZE)


@functools.cache
def _bomb(sized: bool) -> bytes:
    """16 MiB of zeros in a few KiB: one frame with its size in the header, or a streamed one without."""
    if sized:
        return zstandard.ZstdCompressor(level=1).compress(b"\0" * (16 << 20))
    c = zstandard.ZstdCompressor(level=1).compressobj()
    return c.compress(b"\0" * (16 << 20)) + c.flush()


def _bomb_sized(request, context):
    yield ddm_pb2.Chunk(offset=0, data=_bomb(True), compressed=True, total_size=SIZE)


def _bomb_unsized(request, context):
    yield ddm_pb2.Chunk(offset=0, data=_bomb(False), compressed=True, total_size=SIZE)


@pytest.mark.parametrize("behaviour,compress,reason", [
    (_endless, False, "past the end"),
    (_oversized, False, "exceeds the file size"),
    (_wrong_offset, False, "expected 1000"),
    (_lying_size, False, "manifest says 10000"),
    (_empty_forever, False, "empty chunk"),
    (_bomb_sized, True, "claims 16777216 bytes"),
    (_bomb_unsized, True, "zstd"),
])
def test_malicious_stream_is_cut(tmp_path, net, behaviour, compress, reason):
    evil = Evil(fetch=behaviour)
    evil_address = net.evil(evil)
    entry = entry_of(DATA)
    got: list[int] = []
    with pytest.raises(IntegrityError, match=reason):
        fetch_file([evil_address], entry, tmp_path / "f.bin", progress=got.append, compress=compress, backoff=0.01)
    assert sum(got) <= SIZE and len(evil.requests) == 1  # a protocol violation drops the holder at once
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
    # With an honest holder behind it the file still arrives, uncorrupted.
    honest = Evil(fetch=lambda request, context: iter(
        [ddm_pb2.Chunk(offset=request.offset, data=DATA[request.offset:], total_size=SIZE)]))
    dest = fetch_file([evil_address, net.evil(honest)], entry, tmp_path / "f.bin", compress=compress)
    assert dest.read_bytes() == DATA


# ---------------------------------------------------------------- manifests and plans

def test_manifest_signature_and_trust(tmp_path, net):
    make_artifact(tmp_path / "a", {"f.bin": b"weights"})
    raw = (tmp_path / "a" / MANIFEST).read_bytes()
    manifest_id = hashlib.sha256(raw).hexdigest()
    store = ArtifactStore()
    store.register(tmp_path / "a")
    honest = net.honest(store)
    forged = net.evil(Evil(manifest=(raw, OTHER_KEY.sign(raw))))  # says publisher KEY, signed by OTHER_KEY
    with NodeClient(forged, timeout=5) as client, pytest.raises(IntegrityError, match="bad signature"):
        client.get_manifest(manifest_id)
    with NodeClient(honest, timeout=5) as client:
        with pytest.raises(IntegrityError, match="not in trusted_keys"):
            client.get_manifest(manifest_id, trusted_keys=[OTHER_KEY.public_hex])
        assert client.get_manifest(manifest_id, trusted_keys=[KEY.public_hex, OTHER_KEY.public_hex])[1] == raw
    # Another valid manifest under the requested id, and a signed but non-canonical one.
    make_artifact(tmp_path / "c", {"f.bin": b"other weights"})
    other_raw = (tmp_path / "c" / MANIFEST).read_bytes()
    swapped = net.evil(Evil(manifest=(other_raw, KEY.sign(other_raw))))
    with NodeClient(swapped, timeout=5) as client, pytest.raises(IntegrityError, match="does not match the id"):
        client.get_manifest(manifest_id)
    spaced = raw.replace(b",", b", ")
    loose = net.evil(Evil(manifest=(spaced, KEY.sign(spaced))))
    with NodeClient(loose, timeout=5) as client, pytest.raises(IntegrityError, match="not canonical"):
        client.get_manifest(hashlib.sha256(spaced).hexdigest())
    # fetch_artifact skips the forger; with only the forger, or an untrusted publisher, nothing lands.
    with pytest.raises(IntegrityError, match="bad signature"):
        fetch_artifact([forged], manifest_id, tmp_path / "out")
    with pytest.raises(IntegrityError, match="not in trusted_keys"):
        fetch_artifact([honest], manifest_id, tmp_path / "out", trusted_keys=[OTHER_KEY.public_hex])
    assert not (tmp_path / "out").exists()
    fetch_artifact([forged, honest], manifest_id, tmp_path / "out", trusted_keys=[KEY.public_hex])
    assert (tmp_path / "out" / "f.bin").read_bytes() == b"weights"


def test_plan_by_run_id(tmp_path, net):
    plan = b'{"experts": 4, "shards": [[1, 2], [3]]}'
    store = ArtifactStore()
    run_id = store.register_plan(plan)
    assert run_id == hashlib.sha256(plan).hexdigest()
    with NodeClient(net.honest(store), timeout=5) as client:
        assert client.get_plan(run_id) == plan
        with pytest.raises(PeerError, match="NOT_FOUND"):
            client.get_plan(RUN_B)
        with pytest.raises(DDMError, match="bad run id"):
            client.get_plan("../plan")
    with NodeClient(net.evil(Evil(plan=plan.replace(b"4", b"5"))), timeout=5) as client:
        with pytest.raises(IntegrityError, match="does not match run id"):
            client.get_plan(run_id)


# ---------------------------------------------------------------- whole artifacts

def test_fetch_artifact_round_trip_and_subset(tmp_path, net):
    files = {"config.json": b'{"a": 1}', "model.safetensors": random_bytes(150_000), "z.bin": b"z" * 5000}
    m = make_artifact(tmp_path / "src" / "a", files)
    store = ArtifactStore()
    store.register(tmp_path / "src" / "a")
    address = net.honest(store, chunk_size=32 * 1024)
    dest = tmp_path / "dl" / "step_100"
    got: list[int] = []
    assert fetch_artifact([address], m.id, dest, progress=got.append, compress=True).id == m.id
    assert verify_artifact(dest, trusted_keys=[KEY.public_hex]) == m
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, MANIFEST, SIGNATURE])
    assert sum(got) == sum(len(v) for v in files.values())
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["step_100"]  # no staging leftovers
    sub = tmp_path / "dl" / "config_only"
    fetch_artifact([address], m.id, sub, files=["config.json"])
    assert sorted(p.name for p in sub.iterdir()) == ["config.json", MANIFEST, SIGNATURE]
    verify_artifact(sub, files=["config.json"])
    with pytest.raises(DDMError, match="does not list"):
        fetch_artifact([address], m.id, tmp_path / "dl" / "x", files=["../../etc/passwd"])


def test_half_download_never_appears_and_resumes(tmp_path, net):
    files = {"a.bin": random_bytes(40_000), "b.bin": random_bytes(30_000, 1)}
    m = make_artifact(tmp_path / "src", files)
    copy_artifact(tmp_path / "src", tmp_path / "mirror")
    partial, full = ArtifactStore(), ArtifactStore()
    partial.register(tmp_path / "src")
    full.register(tmp_path / "mirror")
    (tmp_path / "src" / "b.bin").unlink()  # this holder can no longer serve b.bin
    only_partial = net.honest(partial)
    dest = tmp_path / "out" / "artifact"
    with pytest.raises(DDMError, match="NOT_FOUND"):
        fetch_artifact([only_partial], m.id, dest, retries=0)
    assert not dest.exists()
    assert (download_dir(dest, m.id) / "a.bin").read_bytes() == files["a.bin"]  # kept for the next call
    got: list[int] = []
    fetch_artifact([only_partial, net.honest(full)], m.id, dest, progress=got.append, backoff=0.01)
    assert sum(got) == len(files["b.bin"])  # a.bin was not downloaded again
    verify_artifact(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["artifact"]
    # Fetching again replaces the old copy in one rename (here with the subset this holder still has).
    fetch_artifact([only_partial], m.id, dest, files=["a.bin"])
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", MANIFEST, SIGNATURE]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["artifact"]


def test_concurrent_download_of_the_same_artifact_is_refused(tmp_path, net):
    m = make_artifact(tmp_path / "src", {"a.bin": b"a" * 100})
    store = ArtifactStore()
    store.register(tmp_path / "src")
    address = net.honest(store)
    dest = tmp_path / "out" / "artifact"
    work = download_dir(dest, m.id)
    work.mkdir(parents=True)
    with open(work / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another download in progress
        with pytest.raises(DDMError, match="another download"):
            fetch_artifact([address], m.id, dest)
    assert not dest.exists()
    fetch_artifact([address], m.id, dest)
    assert (dest / "a.bin").read_bytes() == b"a" * 100 and not work.exists()


def test_running_part_hash_follows_appends_truncation_and_deletion(tmp_path):
    """The running sha256 that replaces the read-back pass re-reads the file whenever its size is not the tracked one."""
    from ddm_node.transfer.partfile import PartHash as _PartHash

    part = tmp_path / "f.part"
    ph = _PartHash(part)
    assert ph.result() == FileEntry(hashlib.sha256(b"").hexdigest(), 0)  # no file yet
    part.write_bytes(b"prefix from an earlier run ")
    ph.sync()
    with open(part, "ab") as f:
        f.write(b"and the new bytes")
    ph.update(b"and the new bytes")
    whole = part.read_bytes()
    assert ph.result() == FileEntry(hashlib.sha256(whole).hexdigest(), len(whole))
    os.truncate(part, 6)  # a suspect tail cut off
    assert ph.result() == FileEntry(hashlib.sha256(b"prefix").hexdigest(), 6)
    part.unlink()
    assert ph.result().size == 0


# ---------------------------------------------------------------- the server cannot be pinned

def _serve_big(tmp_path, **kw) -> tuple[TransferServer, str, str]:
    """A TransferServer (its own settings `kw`) serving one 16 MiB file and a plan: (server, file sha, run id)."""
    data = random_bytes(16 << 20)
    make_artifact(tmp_path / "big", {"big.bin": data})
    store = ArtifactStore()
    store.register(tmp_path / "big")
    run_id = store.register_plan(b"the plan")
    server = TransferServer(store, NodeInfoData(peer_id="peer", public_key=KEY.public_hex), **kw)
    server.start()
    return server, entry_of(data).sha256, run_id


def _until(condition, limit: float = 5.0) -> bool:
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_unread_streams_do_not_pin_the_server(tmp_path):
    """Four Fetch streams held open and never read by one client: another client's GetPlan answers in under a
    second (before, the four streams held all four workers and GetPlan waited for its deadline)."""
    server, sha, run_id = _serve_big(tmp_path)  # the default settings
    try:
        with grpc.insecure_channel(server.address) as hog:
            stub = ddm_pb2_grpc.DDMNodeStub(hog)
            held = [stub.Fetch(ddm_pb2.FetchRequest(sha256=sha), timeout=60) for _ in range(4)]
            time.sleep(0.5)  # the handlers have filled the flow-control windows and block in their sends
            start = time.monotonic()
            with NodeClient(server.address, timeout=1.0) as other:
                assert other.get_plan(run_id) == b"the plan"
                assert other.info().public_key == KEY.public_hex
            assert time.monotonic() - start < 1.0
            for call in held:
                call.cancel()
    finally:
        server.stop(0)


def test_streams_capped_per_peer_and_cancelled_when_unread_or_too_long(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ddm_node.transfer.server")
    server, sha, _ = _serve_big(tmp_path, streams_per_peer=2, read_grace=0.3, min_read_rate=1 << 20)
    try:
        # No BDP probing: the HTTP/2 window stays small, so a stream the client does not read stops at the transport
        # (with it, the window can grow past the whole 16 MiB under load and the "unread" streams simply finish).
        with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stub = ddm_pb2_grpc.DDMNodeStub(channel)
            held = [stub.Fetch(ddm_pb2.FetchRequest(sha256=sha), timeout=60) for _ in range(2)]
            assert _until(lambda: server.streams.count() == 2)
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Fetch(ddm_pb2.FetchRequest(sha256=sha), timeout=5))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many streams" in info.value.details()
            # Unread past the grace: under the minimum read rate, cancelled by the server, workers back in the pool.
            assert _until(lambda: server.streams.count() == 0, 3.0)
            for call in held:
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() == grpc.StatusCode.CANCELLED
        assert sum("cancelling a Fetch stream" in r.getMessage() and "nothing read" in r.getMessage()
                   for r in caplog.records) == 2
        # A reader that keeps up is never cut, and the peer may open streams again.
        dest = fetch_file([server.address], FileEntry(sha, 16 << 20), tmp_path / "f")
        assert sha256_of(dest) == sha
    finally:
        server.stop(0)
    # A stream that outlives the server's deadline is cut however fast it is read; the client resumes it.
    server, sha, _ = _serve_big(tmp_path / "b", stream_deadline=0.3, min_read_rate=0, chunk_size=64 * 1024)
    try:
        with grpc.insecure_channel(server.address) as channel:
            call = ddm_pb2_grpc.DDMNodeStub(channel).Fetch(ddm_pb2.FetchRequest(sha256=sha), timeout=60)
            got = 0
            with pytest.raises(grpc.RpcError) as info:
                for chunk in call:
                    got += len(chunk.data)
                    time.sleep(0.01)  # about 6 MiB/s: read well, but for longer than the deadline
            assert info.value.code() == grpc.StatusCode.CANCELLED and got < 16 << 20
    finally:
        server.stop(0)


def test_idle_connections_are_closed(tmp_path, monkeypatch):
    """The server sends idle connections away (max_connection_idle): the client's channel goes IDLE."""
    from ddm_node.transfer import server as server_module

    monkeypatch.setattr(server_module, "MAX_IDLE_MS", 300)
    server, _, run_id = _serve_big(tmp_path)
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            channel.subscribe(states.append)
            assert ddm_pb2_grpc.DDMNodeStub(channel).GetPlan(ddm_pb2.PlanRequest(run_id=run_id), timeout=5).plan
            assert _until(lambda: states and states[-1] == grpc.ChannelConnectivity.READY)
            assert _until(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, 3.0), states
    finally:
        server.stop(0)


def test_peer_host():
    from ddm_node.transfer.server import peer_host

    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("ipv6:[::ffff:10.0.0.1]:1") == "::ffff:10.0.0.1"
    assert peer_host("unix:/tmp/x") == "unix:/tmp/x"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
