"""The Fetch wire encoding (zstd after a byte shuffle) and the part-file writer thread of a download."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
import zstandard
from test_transfer import Evil, entry_of, make_artifact, net, random_bytes  # noqa: F401  (net: a fixture)

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.transfer import ArtifactStore, fetch_file
from ddm_node.transfer import partfile as pf
from ddm_node.transfer.partfile import PartHash, PartWriter
from ddm_node.transfer.wire import WIDTHS, ChunkError, Packer, decode_chunk, encode_chunk, shuffle, unshuffle
from proto import ddm_pb2, ddm_pb2_grpc


def bf16_weights(n: int, seed: int = 0) -> bytes:
    """n bf16 values like trained weights (N(0, 0.02)), as a safetensors file stores them (little-endian)."""
    x = np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype("<u2").tobytes()


# ---------------------------------------------------------------- chunks as the server encodes them

@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 1 << 20, (1 << 40) + 5, (1 << 63) - 1])
@pytest.mark.parametrize("data, compressed, shuffle_width", [(b"", False, 0), (b"x", True, 2), (b"y" * 200, False, 4)])
def test_encoded_chunks_are_what_protobuf_serializes(offset, data, compressed, shuffle_width):
    for total in (0, 5, min(offset + len(data), (1 << 63) - 1), (1 << 63) - 1):
        ours = encode_chunk(offset, data, compressed, total, shuffle_width)
        assert ours == ddm_pb2.Chunk(offset=offset, data=data, compressed=compressed, total_size=total,
                                     shuffle=shuffle_width).SerializeToString()
        back = ddm_pb2.Chunk.FromString(ours)
        assert (back.offset, back.data, back.compressed, back.total_size, back.shuffle) == (
            offset, data, compressed, total, shuffle_width)
    with pytest.raises(ValueError):
        encode_chunk(-1, b"", False, 0, 0)


def _fields(c) -> tuple:
    return (c.offset, bytes(c.data), c.compressed, c.total_size, c.shuffle)


@pytest.mark.parametrize("offset, total", [(0, 0), (1, 5), (300, 1 << 20), ((1 << 63) - 1, (1 << 63) - 1), (-1, -5)])
@pytest.mark.parametrize("data, compressed, shuffle_width", [(b"", False, 0), (b"x", True, 2), (b"y" * 200, True, 4)])
def test_decoded_chunks_are_what_protobuf_parses(offset, total, data, compressed, shuffle_width):
    message = ddm_pb2.Chunk(offset=offset, data=data, compressed=compressed, total_size=total,
                            shuffle=shuffle_width).SerializeToString()
    got = decode_chunk(message)
    assert _fields(got) == _fields(ddm_pb2.Chunk.FromString(message))
    assert isinstance(got.data, memoryview) or not data  # a view into the message, not a copy


def test_decode_chunk_reads_any_field_order_repeats_and_unknown_fields_as_protobuf_does():
    other = ddm_pb2.Chunk(offset=7, data=b"first").SerializeToString()
    unknown = (b"\x30\x05"  # field 6, varint
               b"\x3a\x03abc"  # field 7, bytes
               b"\x41" + b"\0" * 8  # field 8, fixed64
               + b"\x4d" + b"\0" * 4)  # field 9, fixed32
    message = encode_chunk(0, b"second", True, 9, 2) + unknown + other  # offset 7 and data "first" come last: they win
    assert _fields(decode_chunk(message)) == _fields(ddm_pb2.Chunk.FromString(message)) == (7, b"first", True, 9, 2)


@pytest.mark.parametrize("message", [
    b"\x12\x05abc",  # data runs past the end
    b"\x08",  # truncated varint
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint over 10 bytes
    b"\x10\x01",  # data (field 2) as a varint
    b"\x0a\x01x",  # offset (field 1) as bytes
    b"\x09" + b"\0" * 8,  # offset as fixed64
    b"\x03",  # a group
    b"\x00\x01",  # field 0
    b"\x41\0\0",  # a fixed64 cut short
])
def test_decode_chunk_refuses_malformed_messages(message):
    with pytest.raises(ChunkError):
        decode_chunk(message)


def test_a_holder_sending_a_malformed_chunk_is_dropped(tmp_path, net):  # noqa: F811
    """Protobuf keeps a known field of the wrong wire type as an unknown field (and serializes it again); our
    decoder refuses the message, and the holder is dropped before a byte is written."""
    data = random_bytes(5000)
    bogus = ddm_pb2.Chunk.FromString(encode_chunk(0, data, False, len(data), 0) + b"\x0a\x01x")
    evil = Evil(fetch=lambda request, context: iter([bogus]))
    with pytest.raises(IntegrityError, match="malformed chunk .*field 1 has wire type 2"):
        fetch_file([net.evil(evil)], entry_of(data), tmp_path / "f.bin", retries=0)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


# ---------------------------------------------------------------- shuffle

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("n", [0, 1, 3, 8, 1001, 4096])
def test_shuffle_groups_bytes_by_position_and_unshuffle_inverts_it(width, n):
    data = random_bytes(n, seed=n)
    packed = shuffle(data, width)
    whole = n // width * width
    assert packed == b"".join(data[j:whole:width] for j in range(width)) + data[whole:]
    assert unshuffle(packed, width) == data


def test_packer_picks_the_shuffle_that_packs_bf16_weights_smallest_and_keeps_it():
    block = bf16_weights(1 << 18)  # 512 KiB
    packer = Packer(allow_shuffle=True)
    data, compressed, width = packer.pack(block)
    plain = len(zstandard.ZstdCompressor(level=1).compress(block))
    assert compressed and width == 2 and len(data) < 0.92 * plain  # the shuffle earns its place on bf16
    assert unshuffle(zstandard.ZstdDecompressor().decompress(data), 2) == block
    noise = random_bytes(1 << 16)
    assert packer.pack(noise) == (noise, False, 0)  # incompressible: raw, whatever the stream's width
    assert packer.pack(block)[2] == 2 and packer.width == 2
    # A client that did not allow it never gets a shuffled chunk; nor does an incompressible first chunk set one.
    assert Packer(allow_shuffle=False).pack(block)[1:] == (True, 0)
    first_noise = Packer(allow_shuffle=True)
    assert first_noise.pack(noise) == (noise, False, 0) and first_noise.width == 0
    # A resumed stream's short first chunk does not decide: the next full one does.
    resumed = Packer(allow_shuffle=True)
    assert resumed.pack(block[:100])[2] == 0 and resumed.width is None
    assert resumed.pack(block)[2] == 2 and resumed.width == 2


def test_fetch_with_compression_round_trips_shuffled_chunks(tmp_path, net):  # noqa: F811
    """bf16 weights over a real server: zstd frames of shuffled bytes on the wire, the file intact on disk,
    its sha256 the stored file's (the shuffle is a wire encoding, not a storage format)."""
    block = 64 * 1024
    data = bf16_weights(3 * block // 2 + 5)  # three chunks and an odd tail: not a whole number of values
    make_artifact(tmp_path / "a", {"model.safetensors": data})
    store = ArtifactStore()
    store.register(tmp_path / "a")
    address = net.honest(store, chunk_size=block)
    part = tmp_path / "out.bin.part"
    part.write_bytes(data[:1000])  # resumed mid-chunk: the next chunk ends at the chunk boundary
    got = fetch_file([address], entry_of(data), tmp_path / "out.bin", compress=True)
    assert got.read_bytes() == data
    with grpc.insecure_channel(address) as channel:
        request = ddm_pb2.FetchRequest(sha256=entry_of(data).sha256, compression="zstd", shuffle=True, offset=1000)
        chunks = list(ddm_pb2_grpc.DDMNodeStub(channel).Fetch(request, timeout=5))
        old_client = ddm_pb2.FetchRequest(sha256=entry_of(data).sha256, compression="zstd")
        unshuffled = list(ddm_pb2_grpc.DDMNodeStub(channel).Fetch(old_client, timeout=5))
    assert [c.offset for c in chunks] == [1000, block, 2 * block, 3 * block]
    widths = {c.shuffle for c in chunks[:-1] if c.compressed}  # the 10-byte tail does not compress
    assert all(c.compressed for c in chunks[:-1]) and len(widths) == 1 and widths <= set(WIDTHS)
    assert all(c.shuffle == 0 for c in unshuffled) and any(c.compressed for c in unshuffled)
    assert sum(len(c.data) for c in chunks) < sum(len(c.data) for c in unshuffled)


@pytest.mark.parametrize("chunk, compress, why", [
    (lambda data: ddm_pb2.Chunk(offset=0, data=data, shuffle=2, total_size=len(data)), True, "shuffled by 2"),
    (lambda data: ddm_pb2.Chunk(offset=0, data=zstandard.ZstdCompressor().compress(shuffle(data, 2)), compressed=True,
                                shuffle=3, total_size=len(data)), True, "shuffled by 3"),
    (lambda data: ddm_pb2.Chunk(offset=0, data=zstandard.ZstdCompressor().compress(shuffle(data, 2)), compressed=True,
                                shuffle=2, total_size=len(data)), False, "not asked for"),
])
def test_a_holder_that_shuffles_out_of_protocol_is_dropped(tmp_path, net, chunk, compress, why):  # noqa: F811
    data = bf16_weights(5000)
    evil = Evil(fetch=lambda request, context: iter([chunk(data)]))
    with pytest.raises(IntegrityError, match=why):
        fetch_file([net.evil(evil)], entry_of(data), tmp_path / "f.bin", compress=compress, retries=0)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


# ---------------------------------------------------------------- the writer thread

def test_part_writer_appends_hashes_reports_and_bounds_what_it_queues(tmp_path, monkeypatch):
    part = tmp_path / "f.part"
    hasher = PartHash(part)
    hasher.sync()
    gate = threading.Event()
    written: list[int] = []

    def slow_disk(n: int) -> None:  # the writer's callback runs on its thread, after each append
        gate.wait(5)
        written.append(n)

    monkeypatch.setattr(pf, "FLUSH_EVERY", 1000)  # background flushes on the way
    pieces = [random_bytes(700, seed=i) for i in range(6)]
    with open(part, "ab") as f:
        w = PartWriter(f, hasher, slow_disk, limit=1500)
        put = threading.Thread(target=lambda: [w.put(p) for p in pieces])
        put.start()
        time.sleep(0.3)
        assert put.is_alive()  # the disk holds the first piece: the queue fills to its limit and put waits
        assert w._queued <= 1500 + 700
        gate.set()
        put.join(5)
        w.close()
    whole = b"".join(pieces)
    assert part.read_bytes() == whole and written == [700] * 6
    assert hasher.result() == entry_of(whole)


def test_a_write_error_reaches_the_receive_thread_and_nothing_after_it_is_written(tmp_path):
    class Full:
        def __init__(self):
            self.data = b""

        def tell(self):
            return 0

        def write(self, b):
            if len(self.data) >= 10:
                raise OSError(28, "No space left on device")
            self.data += bytes(b)

        def flush(self):
            pass

        def fileno(self):
            return -1

    f = Full()
    w = PartWriter(f, PartHash(tmp_path / "x"), None)
    w.put(b"0123456789")
    w.put(b"more")  # fails on the writer thread
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):
            w.put(b"again")
            time.sleep(0.01)
    with pytest.raises(OSError, match="No space"):
        w.close()
    assert f.data == b"0123456789"


def test_part_writer_flushes_to_disk_on_the_way_and_a_flush_error_reaches_close(tmp_path, monkeypatch):
    """Flushes run beside the writes (not only at the end), and an fdatasync error is not lost: close raises it."""
    calls: list[int] = []
    real = pf.os.fdatasync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(pf, "FLUSH_EVERY", 1000)
    monkeypatch.setattr(pf.os, "fdatasync", counted)
    part = tmp_path / "f.part"
    with open(part, "ab") as f:
        w = PartWriter(f, PartHash(part), None)
        for i in range(5):
            w.put(random_bytes(1500, seed=i))
            time.sleep(0.05)
        assert calls, "no flush while the file was being written"
        w.close()
    assert part.stat().st_size == 7500

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pf.os, "fdatasync", failing)
    with open(tmp_path / "g.part", "ab") as f:
        w = PartWriter(f, PartHash(tmp_path / "g.part"), None)
        w.put(random_bytes(1500))
        with pytest.raises(OSError, match="Input/output"):
            w.close()


def test_disk_errors_during_a_download_are_one_line_local_errors(tmp_path, net, monkeypatch):  # noqa: F811
    data = random_bytes(300_000)
    make_artifact(tmp_path / "a", {"f.bin": data})
    store = ArtifactStore()
    store.register(tmp_path / "a")
    address = net.honest(store, chunk_size=64 * 1024)
    real = PartWriter._append

    def full(self, b):
        if self._pos >= 128 * 1024:
            raise OSError(28, "No space left on device")
        real(self, b)

    monkeypatch.setattr(PartWriter, "_append", full)
    with pytest.raises(DDMError, match="cannot write .*No space left") as info:
        fetch_file([address], entry_of(data), tmp_path / "f.bin")
    assert not isinstance(info.value, IntegrityError)  # our disk, not the holder's fault
    assert (tmp_path / "f.bin.part").read_bytes() == data[:128 * 1024]  # what was written stays, for a resume
    monkeypatch.setattr(PartWriter, "_append", real)
    assert fetch_file([address], entry_of(data), tmp_path / "f.bin").read_bytes() == data
    assert hashlib.sha256((tmp_path / "f.bin").read_bytes()).hexdigest() == entry_of(data).sha256
