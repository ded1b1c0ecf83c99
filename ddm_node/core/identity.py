"""A node's persistent Ed25519 identity: signs checkpoint manifests and binds its DHT records."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ddm_node.core.errors import DDMError

PUBLIC_HEX_LEN = 64  # 32-byte Ed25519 public key, hex


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key and its public key in hex (the node's name in manifests and records)."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a PEM (PKCS8) key file written by `save`; a clear error when unreadable or not Ed25519."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DDMError(f"cannot read identity file {path}: {exc.strerror or exc}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise DDMError(f"identity file {path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise DDMError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the key with mode 0600, atomically; refuse to replace an existing key unless asked."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DDMError(f"identity file {path} already exists; refusing to overwrite a key")
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @property
    def public_hex(self) -> str:
        raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw.hex()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def verify_signature(public_hex: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_hex`'s Ed25519 signature of `data`; False on any malformed input."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(signature, data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
