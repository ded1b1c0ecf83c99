"""A node's persistent libp2p identity: the private key behind its peer id, kept in a file.

hivemind draws a fresh libp2p key (hence a fresh peer id, the `/p2p/<id>` end of every multiaddr) each time a
DHT starts unless p2pd is given a key file. A bootstrap whose id changes on every restart strands every box
that was told its old address, so the daemon keeps one key per work directory (WORK/p2p.key) and hands it to
p2pd. This key only names the node on the libp2p network; records and checkpoints are signed with the
separate Ed25519 identity (`--identity`), so the two keys never sign for each other. The file format is p2pd's:
a libp2p `PrivateKey` protobuf. New keys are Ed25519 (as p2pd draws for itself: ids start with 12D3KooW); an RSA
key file written by hivemind (`P2P.generate_identity`) is read as well.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ddm_node.core.errors import DDMError

MAX_KEY_FILE = 16 * 1024  # an Ed25519 key file is 68 bytes, an RSA-2048 one ~1.2 kB; anything far larger is not a key file


def peer_id_of(path: Path) -> str:
    """The base58 peer id of a libp2p key file; DDMError (one line) when it is not one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DDMError(f"cannot read the libp2p key {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_FILE:
        raise DDMError(f"{path} is not a libp2p key file ({len(raw)} bytes); move it away to make a new one")
    try:
        return _peer_id(raw)
    except Exception:  # protobuf, DER and key-type errors all mean the same to the user
        raise DDMError(f"{path} is not a libp2p key file (corrupt?); move it away to make a new one, "
                       "which gives this node a new peer id") from None


def ensure_p2p_identity(path: Path) -> str:
    """The peer id of the key in `path`, first writing a new key there (mode 0600, atomically) if there is none."""
    path = Path(path)
    if not path.exists():
        _write_new_key(path)
    return peer_id_of(path)


def _peer_id(raw: bytes) -> str:
    """libp2p's peer id of a serialized private key: the multihash of the serialized public key (inlined, as
    identity multihash, when that is at most 42 bytes: Ed25519), base58."""
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    key = crypto_pb2.PrivateKey.FromString(raw)
    if key.key_type != crypto_pb2.KeyType.Ed25519:
        return PeerID.from_identity(raw).to_base58()  # hivemind's own (RSA) key files
    if len(key.data) != 64:  # libp2p stores the 32-byte seed followed by the 32-byte public key
        raise ValueError("an Ed25519 libp2p key holds 64 bytes")
    seed, public = key.data[:32], key.data[32:]
    if Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != public:
        raise ValueError("the Ed25519 key's public half does not match its seed")
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public).SerializeToString()
    return PeerID(bytes([0x00, len(encoded)]) + encoded).to_base58()


def _write_new_key(path: Path) -> None:
    from hivemind.proto import crypto_pb2

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    data = seed + private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=data)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key.SerializeToString())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DDMError(f"cannot write the libp2p key {path}: {exc.strerror or exc}") from None
