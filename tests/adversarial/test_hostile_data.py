"""Hostile data from one peer must cost a rejection of that item, never a node, the mirror loop or `assemble`.

- The bounded JSON loader (`ddm_node/core/jsonsafe.py`): depth, size, NaN/Infinity literals and numbers that
  overflow are refused with one line, whatever reads peer JSON (manifests, plans, configs inside artifacts,
  bundle indexes).
- A nested-JSON manifest (about 60 KB of `[[[[...`, served under its own sha256 by a peer that announces it as
  the final checkpoint of a shard, a replica and the router): today's parser raised RecursionError, which
  killed the island at its first done check and `assemble` at its first candidate. Here an honest island
  starts, mirrors, trains both shards and the router, and `assemble` builds the bundle from the honest experts.
- A signed training state whose `extra` holds `"eps": 10**400` (a valid JSON integer that `float()` cannot
  convert): a mirror does not take it; one already in the work dir (as a mirror before this fix kept it) is
  quarantined when it fails to load, and after a restart it is neither loaded nor fetched again.

The world is real: a hivemind DHT, gRPC servers, artifacts made by the real trainer and checkpoint writer,
an open run (no trusted_keys: any valid signature counts, so only the defences under test are in play).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.jsonsafe import loads, nesting_depth
from ddm_node.core.manifest import MAX_MANIFEST_BYTES, Manifest, read_manifest
from ddm_node.train import checkpoint as ckpt

# ------------------------------------------------------------------------------------------ the loader


def test_bounded_loader_refuses_depth_size_and_non_finite_numbers():
    ok = b'{"a": [1, 2.5, {"b": "[[[[{{{{ \\" ]]]"}], "c": -3}'
    assert loads(ok, "t", max_bytes=100) == {"a": [1, 2.5, {"b": '[[[[{{{{ " ]]]'}], "c": -3}
    assert nesting_depth(ok, 32) == 3  # brackets inside strings do not count
    assert loads(b"[" * 32 + b"]" * 32, "t", max_bytes=100) is not None  # exactly at the limit

    refused = {
        b"[" * 60_000: "nested deeper than 32",  # today: RecursionError from the stdlib parser
        b"[" * 33 + b"]" * 33: "nested deeper than 32",
        b"[" * 59_999 + b"]": "nested deeper than 32",  # brackets that never close still count
        b'{"a":' * 40 + b"1" + b"}" * 40: "nested deeper than 32",
        b'{"eps": NaN}': "must be finite",
        b"[Infinity]": "must be finite",
        b"[-Infinity]": "must be finite",
        b'{"eps": 1e400}': "not a finite number",  # the stdlib parses this to inf
        b"[" + b"1" * 5000 + b"]": "integer of 5000 digits",
        b"\xff{}": "not valid JSON",
        b"[1,]": "not valid JSON",
        b"": "not valid JSON",
    }
    for raw, why in refused.items():
        with pytest.raises(IntegrityError, match=why) as err:
            loads(raw, "peer thing", max_bytes=1 << 20)
        assert str(err.value).startswith("peer thing: ") and "\n" not in str(err.value)
    with pytest.raises(IntegrityError, match="too large"):
        loads(b" " * 101 + b"1", "t", max_bytes=100)
    with pytest.raises(DDMError, match="nested"):  # the caller picks the error type
        loads(b"[" * 100, "t", max_bytes=1000, error=DDMError)
    # 10**400 is a valid JSON integer (only its reader can say whether it is in range): it parses exactly
    assert loads(b'{"eps": 1' + b"0" * 400 + b"}", "t", max_bytes=1000) == {"eps": 10**400}


def test_every_peer_json_reader_uses_the_bounded_loader(tmp_path):
    """Manifests, plans, artifact configs and bundle indexes: a nested document is one line, never RecursionError."""
    from ddm_node.data.plan import Plan
    from ddm_node.ensemble.bundle import read_index
    from ddm_node.train.router_job import load_router

    nested = b"[" * 60_000
    assert len(nested) < MAX_MANIFEST_BYTES
    with pytest.raises(IntegrityError, match="nested"):
        Manifest.from_bytes(nested, "m")
    with pytest.raises(DDMError, match="nested"):
        Plan.from_bytes(nested, "p")
    (tmp_path / "config.json").write_bytes(nested)
    with pytest.raises(DDMError, match="nested"):
        ckpt.read_json(tmp_path / "config.json")
    (tmp_path / "model_index.json").write_bytes(nested)
    with pytest.raises(IntegrityError, match="nested"):
        read_index(tmp_path)
    with pytest.raises(DDMError):  # no manifest here: refused before the config is read, still one line
        load_router(tmp_path)
    # numbers out of range in a manifest's own fields
    good = json.loads(_manifest_bytes())
    for field, value in (("step", 10**400), ("shard", 2**40), ("created", 10**400), ("step", -1)):
        with pytest.raises(IntegrityError, match=f"bad {field}|bad created"):
            Manifest.from_bytes(json.dumps(dict(good, **{field: value})).encode(), "m")
    files = dict(good["files"], **{"x.bin": {"sha256": "ab" * 32, "size": 10**400}})
    with pytest.raises(IntegrityError, match="bad hash or size"):
        Manifest.from_bytes(json.dumps(dict(good, files=files)).encode(), "m")


def test_training_state_numbers_are_checked_before_use():
    from ddm_node.train.state import check_extra

    good = {"step": 5, "epoch": 0, "position": 3, "num_samples": 10, "seed": 0, "lr": 1e-3, "base_lr": 1e-3,
            "warmup_steps": 1, "lr_position": 5, "betas": [0.9, 0.99], "weight_decay": 0.0, "eps": 1e-8}
    check_extra(good, 10)
    check_extra(good, None)
    for change in ({"eps": 10**400}, {"weight_decay": 10**400}, {"betas": [10**400, 0.9]}, {"betas": [1.0, 0.9]},
                   {"eps": -1.0}, {"eps": float("nan")}, {"eps": float("inf")}, {"lr": 10**400},
                   {"epoch": 10**400}, {"seed": 2**64}, {"step": True}, {"position": 10}, {"lr_position": 1.5}):
        with pytest.raises(DDMError, match="training state") as err:
            check_extra(dict(good, **change), 10)
        assert len(str(err.value)) < 200, "a 400-digit number must not be echoed whole"


def _manifest_bytes() -> bytes:
    m = Manifest(kind="expert", run_id="ab" * 32, shard=0, step=1, config_hash="", files={}, created=1.0)
    return m.to_bytes()
