"""How a Fetch stream packs file bytes: zstd per chunk, after a byte shuffle when that packs smaller.

A byte shuffle regroups a chunk's bytes by their position within each value of `width` bytes (all first
bytes, then all second bytes, ...), as blosc does: the sign and exponent bytes of bf16 or fp32 weights then
sit together, where zstd finds their redundancy (bf16 weights: about 1.4x with the shuffle, 1.26x without).
It is a wire encoding only: files are stored and content-addressed (sha256) as they are, and the client
undoes the shuffle before a byte is written or hashed. The server picks the width once per stream, on its
first chunk of some size (the width whose frame is smallest, or none), and sends a chunk raw whenever packing
does not make it smaller.

Chunks leave the server as bytes encoded here (`encode_chunk`), exactly as protobuf serializes a `Chunk`: building
the message and serializing it copies each chunk twice more (measured once, 2026-12-03, 2 shared cores: 1.0-2.6
server CPU-s per GiB streamed that way, 0.8 with pre-encoded chunks). The client reads them the same way
(`decode_chunk`): the chunk's data stays a view into the received message, where protobuf would copy it twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

ZSTD_LEVEL = 1  # level 1 compresses weights as well as level 3 at twice the speed (ENVIRONMENT.md)
WIDTHS = (2, 4)  # bf16 / fp16 values, fp32 values
PROBE_MIN = 4096  # the width is picked on the first chunk of at least this many bytes


def shuffle(data: bytes, width: int) -> bytes:
    """The bytes grouped by position within each `width`-byte value; a tail shorter than a value stays last."""
    a = np.frombuffer(data, dtype=np.uint8)
    n = len(a) // width * width
    values = a[:n].reshape(-1, width)
    out = np.empty((width, n // width), dtype=np.uint8)
    for j in range(width):
        out[j] = values[:, j]
    return out.tobytes() + a[n:].tobytes()


def unshuffle(data: bytes, width: int) -> bytes:
    """The inverse of `shuffle` (same length)."""
    a = np.frombuffer(data, dtype=np.uint8)
    n = len(a) // width * width
    m = n // width
    out = np.empty((m, width), dtype=np.uint8)
    for j in range(width):
        out[:, j] = a[j * m:(j + 1) * m]
    return out.tobytes() + a[n:].tobytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(offset: int, data: bytes, compressed: bool, total_size: int, shuffle: int) -> bytes:
    """A serialized `ddm.v1.Chunk` (fields in number order, defaults left out, as protobuf writes them); the data
    is copied once. Every number is >= 0."""
    if min(offset, total_size, shuffle) < 0:
        raise ValueError("chunk fields must be >= 0")
    parts = []
    if offset:
        parts += (b"\x08", _varint(offset))
    if data:
        parts += (b"\x12", _varint(len(data)), data)
    if compressed:
        parts.append(b"\x18\x01")
    if total_size:
        parts += (b"\x20", _varint(total_size))
    if shuffle:
        parts += (b"\x28", _varint(shuffle))
    return b"".join(parts)


class ChunkError(ValueError):
    """Bytes that are not a serialized `Chunk`."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded `ddm.v1.Chunk`; `data` is a view into the received message (no copy)."""

    offset: int = 0
    data: memoryview | bytes = b""
    compressed: bool = False
    total_size: int = 0
    shuffle: int = 0


_MAX_VARINT = 10  # bytes of a 64-bit varint
_INT64 = (1 << 63, 1 << 64)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT, len(buf))):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, i + 1
        shift += 7
    raise ChunkError("truncated or overlong varint")


def _int64(v: int) -> int:
    return v - _INT64[1] if v >= _INT64[0] else v


def decode_chunk(message: bytes) -> Chunk:
    """A serialized `Chunk` as protobuf parses it (fields in any order, the last of a repeated field wins, unknown
    varint / fixed / length-delimited fields skipped), its data a view into `message`. Anything malformed
    (truncated, a known field with the wrong wire type, groups, field 0) raises ChunkError."""
    buf = memoryview(message)
    fields: dict[int, int | memoryview] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ChunkError("field number 0")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            n, pos = _read_varint(buf, pos)
            if n > end - pos:
                raise ChunkError("a field runs past the end of the message")
            value, pos = buf[pos:pos + n], pos + n
        elif wire_type in (1, 5) and number > 5:
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise ChunkError("a field runs past the end of the message")
            continue
        else:
            raise ChunkError(f"field {number} has wire type {wire_type}")
        if (number == 2) != (wire_type == 2) and number <= 5:
            raise ChunkError(f"field {number} has wire type {wire_type}")
        if number <= 5:
            fields[number] = value
    return Chunk(offset=_int64(fields.get(1, 0)), data=fields.get(2, b""), compressed=bool(fields.get(3, 0)),
                 total_size=_int64(fields.get(4, 0)), shuffle=fields.get(5, 0) & 0xFFFFFFFF)


class Packer:
    """Packs the chunks of one stream: `pack(block)` -> (data, compressed, shuffle width)."""

    def __init__(self, allow_shuffle: bool, level: int = ZSTD_LEVEL) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level)  # one frame per chunk, content size in its header
        self.width: int | None = None if allow_shuffle else 0  # None: not chosen yet

    def pack(self, block: bytes) -> tuple[bytes, bool, int]:
        if not block:
            return block, False, 0
        if self.width is None:
            return self._probe(block)
        width = self.width if len(block) >= self.width else 0
        packed = self._zstd.compress(shuffle(block, width) if width else block)
        if len(packed) < len(block):  # incompressible blocks go raw: never bigger than chunk_size
            return packed, True, width
        return block, False, 0

    def _probe(self, block: bytes) -> tuple[bytes, bool, int]:
        """Pack the first chunk of at least PROBE_MIN bytes every way; the smallest frame sets the stream's width
        (ties: no shuffle). Shorter chunks before it (a resumed stream's first) go unshuffled."""
        best, best_width = self._zstd.compress(block), 0
        if len(block) >= PROBE_MIN:
            for width in WIDTHS:
                packed = self._zstd.compress(shuffle(block, width))
                if len(packed) < len(best):
                    best, best_width = packed, width
            self.width = best_width
        if len(best) < len(block):
            return best, True, best_width
        return block, False, 0
