"""A hivemind record validator that binds every DHT record to a node's persistent Ed25519 key.

Modeled on hivemind's `RSASignatureValidator`, with three differences:

- The key is our persistent `Identity` (hivemind's RSA validator can only make fresh keys).
- The owner marker `[owner:<64-hex public key>]` must be the WHOLE subkey (a str). hivemind hashes
  keys before they reach a validator (`DHTRecord.key` is the 20-byte DHTID, see
  hivemind/dht/node.py and protocol.py), so a validator cannot tell a `ddm/...` key from any other
  key. Only the subkey travels in clear (msgpack of the subkey). Hence this validator rejects EVERY
  record that is not owned and signed: on a DHT that registers it, only owned records exist. This
  also blocks two attacks on hivemind's storage: a plain (subkey-less) value with a later
  expiration replaces a whole dictionary of subkeys, and a bytes subkey next to str subkeys makes
  the storage heap raise TypeError on comparison.
- A size cap (values over `MAX_VALUE_BYTES`) and an expiration cap (`MAX_TTL` seconds ahead, with
  slack for clock skew), so a peer cannot park large or near-permanent records on others.
- The value must be a well-formed typed record: plain msgpack (no extension types) that one of the
  record classes of records.py accepts (`from_value`). The key is hashed, so the validator cannot
  know which kind belongs there; readers check the kind (dht.py). Without this check one signed
  value that is not msgpack made hivemind fail to decode every value under its key: the key went
  unreadable for everyone (a get hung until its timeout and returned nothing).

Signature: Ed25519 over msgpack([DOMAIN, key, subkey, value-without-signature, expiration_time]),
appended to the value as `SIG_MAGIC + 64 signature bytes` (fixed length, so stripping is a slice).
The domain string keeps a record signature from ever being valid as a manifest signature (the
same key signs both).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity, verify_signature
from ddm_node.swarm.records import RECORD_TYPES

logger = logging.getLogger(__name__)

DOMAIN = b"ddm-node/dht-record/v1"
SIG_MAGIC = b"\x00ddmsig1"
SIG_LEN = 64  # Ed25519 signatures are always 64 bytes
SUFFIX_LEN = len(SIG_MAGIC) + SIG_LEN
MAX_VALUE_BYTES = 4096  # serialized value, signature excluded
MAX_TTL = 24 * 3600.0  # longest expiration accepted, seconds ahead of now
CLOCK_SLACK = 300.0  # tolerated clock skew between peers, seconds

_OWNER_RE = re.compile(r"^\[owner:([0-9a-f]{64})\]$")
# What hivemind's readers get when a stored value does not decode (see `strip_value`): msgpack nil,
# which every record class rejects, so readers skip that one value and read the rest.
UNREADABLE = MSGPackSerializer.dumps(None)


def owner_marker(public_hex: str) -> str:
    """The subkey under which the key `public_hex` writes its records."""
    return f"[owner:{public_hex}]"


def owner_of_subkey(subkey: object) -> str | None:
    """The 64-hex owner named by a subkey (as the application sees it), or None if it names none."""
    if not isinstance(subkey, str):
        return None
    match = _OWNER_RE.match(subkey)
    return match.group(1) if match else None


def _owner_of_subkey_bytes(subkey_bytes: bytes) -> str | None:
    try:
        subkey = MSGPackSerializer.loads(subkey_bytes)
    except Exception:  # any malformed msgpack from the wire
        return None
    return owner_of_subkey(subkey)


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} in a record value")


def decode_value(value: bytes) -> object:
    """The msgpack object in a stored value (signature stripped); ValueError/TypeError-like errors when it is
    not plain msgpack. Same options as hivemind's MSGPackSerializer.loads, minus extension types (hivemind
    would run their decoders; ours never writes any), so a value this accepts decodes there too."""
    return msgpack.loads(value, ext_hook=_no_ext, raw=False)


def parse_any(value: bytes) -> object | None:
    """The typed record a stored value holds, trying every record class; None when it is none of them."""
    try:
        obj = decode_value(value)
    except Exception:  # any malformed msgpack: ExtraData, FormatError, UnicodeDecodeError, ValueError, ...
        return None
    if not isinstance(obj, dict):
        return None
    for cls in RECORD_TYPES:
        try:
            return cls.from_value(obj)
        except DDMError:
            continue
    return None


def _signed_bytes(record: DHTRecord) -> bytes:
    """What the owner signs: the record with its value stripped of any signature."""
    return MSGPackSerializer.dumps(
        [DOMAIN, bytes(record.key), bytes(record.subkey), bytes(record.value), float(record.expiration_time)]
    )


class Ed25519RecordValidator(RecordValidatorBase):
    """Signs our own records and admits only records signed by the owner their subkey names.

    Register exactly one on every DHT of the swarm (`record_validators=[Ed25519RecordValidator(id)]`).
    """

    def __init__(self, identity: Identity):
        self._identity = identity
        self._public_hex = identity.public_hex
        self._marker = owner_marker(self._public_hex)

    @property
    def public_hex(self) -> str:
        return self._public_hex

    @property
    def local_marker(self) -> str:
        """The subkey this node writes under (its owner marker)."""
        return self._marker

    def sign_value(self, record: DHTRecord) -> bytes:
        """Append the owner's signature when `signer` holds the key the record's subkey names; leave other values
        unchanged."""
        identity = self.signer(_owner_of_subkey_bytes(record.subkey))
        if identity is None:
            return record.value
        return record.value + SIG_MAGIC + identity.sign(_signed_bytes(record))

    def signer(self, owner: str | None) -> Identity | None:
        """The key that signs `owner`'s records on this DHT: ours for our own records, else None (left unsigned, and
        then refused by every validator). bench.protocol's shared DHT peers sign for several island keys."""
        return self._identity if owner == self._public_hex else None

    def validate(self, record: DHTRecord) -> bool:
        """True only for an owned, correctly signed record within the size and expiration caps."""
        try:
            return self._validate(record)
        except Exception:  # a validator must never raise inside hivemind's RPC handlers
            logger.debug("record validation raised", exc_info=True)
            return False

    def _validate(self, record: DHTRecord) -> bool:
        owner = _owner_of_subkey_bytes(record.subkey)
        if owner is None:
            logger.debug("rejecting a DHT record without an owner subkey")
            return False
        value = bytes(record.value)
        if len(value) < SUFFIX_LEN or value[-SUFFIX_LEN:-SIG_LEN] != SIG_MAGIC:
            logger.debug("rejecting an unsigned DHT record of %s", owner[:12])
            return False
        if len(value) - SUFFIX_LEN > MAX_VALUE_BYTES:
            logger.debug("rejecting an oversized DHT record of %s (%d bytes)", owner[:12], len(value))
            return False
        if not math.isfinite(record.expiration_time):  # NaN passes every comparison below, and breaks storage heaps
            logger.debug("rejecting a DHT record of %s with a non-finite expiration", owner[:12])
            return False
        if record.expiration_time > get_dht_time() + MAX_TTL + CLOCK_SLACK:
            logger.debug("rejecting a DHT record of %s that expires too far ahead", owner[:12])
            return False
        stripped = dataclasses.replace(record, value=value[:-SUFFIX_LEN])
        if parse_any(stripped.value) is None:
            logger.debug("rejecting a DHT record of %s that is no known record type", owner[:12])
            return False
        if not verify_signature(owner, _signed_bytes(stripped), value[-SIG_LEN:]):
            logger.debug("rejecting a DHT record with a bad signature for %s", owner[:12])
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        """Remove our signature suffix; a value that does not decode becomes `UNREADABLE` (msgpack nil).

        hivemind calls this on every value of a key it returns, then decodes each; one value that does
        not decode raised there and lost the whole key (the get never finished). `validate` keeps such
        values out, but a node can still meet one (stored by an older version, or injected into its
        storage): this turns it into a value that readers skip, and the rest of the key is read.
        """
        value = bytes(record.value)
        if len(value) >= SUFFIX_LEN and value[-SUFFIX_LEN:-SIG_LEN] == SIG_MAGIC:
            value = value[:-SUFFIX_LEN]
        try:
            decode_value(value)
        except Exception:  # any malformed msgpack
            logger.debug("a stored DHT value does not decode; readers get nil instead")
            return UNREADABLE
        return value

    @property
    def priority(self) -> int:
        # Like hivemind's signature validator: validate before any validator that parses values.
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # A second validator with the same key is a duplicate: absorb it. One with another key is
        # not mergeable; two signing validators on one DHT would strip each other's signatures, so
        # a DHT must be given exactly one (Swarm does that).
        return isinstance(other, Ed25519RecordValidator) and other.public_hex == self._public_hex
