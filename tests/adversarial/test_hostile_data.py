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

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import MAX_MANIFEST_BYTES, Manifest, read_manifest
from ddm_node.train import checkpoint as ckpt

from .hostile_world import TTL, events, has, island, messages, open_world, train_world

# ------------------------------------------------------------------------------------------ the loader


def test_bounded_loader_refuses_depth_size_and_non_finite_numbers():
    from ddm_node.core.jsonsafe import loads, nesting_depth

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
        ckpt.load_expert(tmp_path, verify=False)  # the expert's config.json (a state's is read the same way)
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


# ------------------------------------------------------------------------------------------ a real swarm

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The plan, and H's checkpoints of shards 0 and 1 at steps 2 and 4 of a 6-step budget (made once)."""
    return train_world(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def world(trained, tmp_path):
    with open_world(trained, tmp_path) as w:
        yield w


_messages, _has, _island, _events = messages, has, island, events


@pytest.mark.multiproc
def test_nested_json_kills_no_island_no_assembly_no_mirror(world, tmp_path, caplog, capsys):
    """E announces ~60 KB of nested brackets (served under their own sha256) as shard 0's final checkpoint (step 8 of
    6, so that every reader tries it first), a
    replica of shard 1, stats and the router, and a checkpoint of shard 1 it signed whose config.json files are
    the same brackets. Before the fix, the first done check raised RecursionError: the island died at start,
    `assemble` at its first candidate, the mirror sweep at its first shard."""
    from ddm_node.cli import main
    from ddm_node.core.events import EventKind
    from ddm_node.ensemble.bundle import read_index
    from ddm_node.swarm.records import CheckpointRecord, ReplicaRecord, RouterRecord, StatsRecord

    from .evil_peer import seal_copy

    w, e = world, world.evil
    key, sv = e.key, e.servicer
    nested = b"[" * 30_000 + b"]" * 30_000
    bad = hashlib.sha256(nested).hexdigest()
    sv.manifests[bad] = (nested, b"")
    e.swarm.announce(CheckpointRecord(0, 8, bad, bad, key, e.address, True), ttl=TTL)
    e.swarm.announce(ReplicaRecord(1, 5, bad, bad, key, key, e.address), ttl=TTL)
    e.swarm.announce(StatsRecord(0, bad, e.address), ttl=TTL)
    e.swarm.announce(RouterRecord(bad, 2, e.address, key), ttl=TTL)
    # a correctly signed checkpoint whose config.json files are the nested brackets
    src = ckpt.checkpoint_dir(w.work, 1, 4)
    signed = {}
    for part in (ckpt.EXPERT, ckpt.STATE):
        extra = dict(read_manifest(src / part).extra, step=7)
        m = seal_copy(src / part, tmp_path / "E" / part, e.identity, {ckpt.CONFIG_FILE: nested}, step=7, extra=extra)
        sv.hold(tmp_path / "E" / part)
        signed[part] = m.id
    e.swarm.announce(CheckpointRecord(1, 7, signed[ckpt.EXPERT], signed[ckpt.STATE], key, e.address,
                                                 False), ttl=TTL)

    caplog.set_level(logging.INFO, logger="ddm_node")
    me = Identity.generate()
    island = _island(w, tmp_path / "island", me)
    try:
        island.start()
        assert not island.progress.shard_done(0) and not island.progress.router_done()  # the done checks

        island.mirror.sweep()  # the sweep completes, with H's copies
        for shard in (0, 1):
            got = ckpt.latest_checkpoint(island.work_dir, shard)
            assert got is not None and read_manifest(got / ckpt.EXPERT).id == w.ids[(shard, 4)][0]

        island.work_loop()  # trains both shards to the budget and the router
        ev = _events(island.work_dir)
        kinds = {(x.kind, x.shard) for x in ev}
        assert {(EventKind.DONE, 0), (EventKind.DONE, 1), (EventKind.ROUTER, None)} <= kinds

        out = tmp_path / "bundle"  # `assemble` while the island serves
        rc = main(["assemble", "--initial-peers", *w.maddrs, "--run", w.run_id, "--out", str(out),
                   "--min-experts", "2", "--wait", "0"])
        assert rc == 0, capsys.readouterr().err
        index = read_index(out)
        assert {(x["shard"], x["step"], x["publisher"]) for x in index["experts"]} == {
            (0, 6, me.public_hex), (1, 6, me.public_hex)}
        assert index["router"]["kind"] == "learned"
    finally:
        island.shutdown()
    m = _messages(caplog)
    assert _has(m, "not counting expert " + bad[:12], "nested deeper than")
    assert _has(m, "not counting router " + bad[:12], "nested deeper than")
    assert _has(m, "mirror of shard 0 step 8 failed", "nested deeper than")
    assert _has(m, "mirror of shard 1 step 7 failed", "config.json", "nested deeper than")
    assert _has(m, "shard 0 expert step 8", key[:12], "nested deeper than")  # assemble
    assert _has(m, "shard 1 expert step 7", "config.json", "nested deeper than")
    assert not any("RecursionError" in x for x in m)


@pytest.mark.multiproc
def test_out_of_range_state_is_quarantined_and_remembered_across_restarts(world, tmp_path, caplog):
    """E signs training states of shards 0 and 1 at step 5 (H's step-4 tensors, E's key) whose `extra` says
    `"eps": 10**400`, and announces them. The mirror does not take shard 1's. Shard 0's is already in the
    island's work dir, as a mirror kept it before this fix; loading it fails, and the island quarantines it
    (WORK/quarantine/, WORK/rejects.json) and goes on from H's step 4. Then the island is stopped and started
    again: it neither loads nor asks for E's states, and finishes. Before the fix, float(10**400) raised
    OverflowError out of the work loop at every start, and the mirror copied and served shard 1's."""
    from ddm_node.core.events import EventKind
    from ddm_node.swarm.records import CheckpointRecord

    from .evil_peer import seal_copy

    w, e = world, world.evil
    poisoned = {}
    for shard in (0, 1):
        src = ckpt.checkpoint_dir(w.work, shard, 4)
        dst = tmp_path / "E" / f"shard{shard}"
        xm = seal_copy(src / ckpt.EXPERT, dst / ckpt.EXPERT, e.identity, step=5, extra={"step": 5})
        extra = dict(read_manifest(src / ckpt.STATE).extra, step=5, eps=10**400)
        sm = seal_copy(src / ckpt.STATE, dst / ckpt.STATE, e.identity, step=5, extra=extra)
        assert b'"eps":1' + b"0" * 400 in (dst / ckpt.STATE / "manifest.json").read_bytes()
        for part in (ckpt.EXPERT, ckpt.STATE):
            e.servicer.hold(dst / part)
        e.swarm.announce(CheckpointRecord(shard, 5, xm.id, sm.id, e.key, e.address, False), ttl=TTL)
        poisoned[shard] = (xm.id, sm.id, dst)
    work = tmp_path / "island"
    shutil.copytree(poisoned[0][2], ckpt.checkpoint_dir(work, 0, 5))  # what a mirror before the fix kept

    caplog.set_level(logging.INFO, logger="ddm_node")
    me = Identity.generate()
    # First life: stopped (as by a signal) right after the quarantine, before anything else is trained
    island = _island(w, work, me)
    try:
        island.start()
        island.mirror.sweep()
        got = ckpt.latest_checkpoint(work, 1)  # shard 1: H's step 4, not E's step 5
        assert got is not None and read_manifest(got / ckpt.EXPERT).id == w.ids[(1, 4)][0]
        record = island.events.record

        def stop_after_quarantine(kind, **fields):
            if kind is EventKind.REJECTED:
                island.stop.set()
            return record(kind, **fields)

        island.events.record = stop_after_quarantine
        island.work_loop()
    finally:
        island.shutdown()
    first = _events(work)
    assert [(x.shard, x.step, x.publisher) for x in first if x.kind is EventKind.REJECTED] == [(0, 5, e.key[:12])]
    quarantined = sorted((work / "quarantine").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in quarantined] == ["shard_000-step_00000005"]
    assert read_manifest(quarantined[0] / ckpt.STATE).id == poisoned[0][1]  # moved aside, not deleted
    assert not ckpt.checkpoint_dir(work, 0, 5).exists()
    remembered = json.loads((work / "rejects.json").read_text())["rejects"]
    assert {(tuple(r["manifests"]), r["step"]) for r in remembered} == {
        ((poisoned[s][0], poisoned[s][1]), 5) for s in (0, 1)}

    # Second life: same key, same work dir; E's states are neither loaded nor asked for
    asked_before = len(e.servicer.calls)
    island = _island(w, work, me)
    try:
        island.start()
        island.work_loop()
    finally:
        island.shutdown()
    second = _events(work)[len(first):]
    assert {(EventKind.DONE, 0), (EventKind.ROUTER, None)} <= {(x.kind, x.shard) for x in second}
    assert (EventKind.DONE, 1) in {(x.kind, x.shard) for x in first + second}  # in either life (rendezvous order)
    assert not any(x.kind is EventKind.REJECTED for x in second)
    assert (0, 4, "swarm", w.honest.public_hex[:12]) in {(x.shard, x.step, x.source, x.publisher) for x in second
                                                           if x.kind is EventKind.RESUME}
    poisoned_ids = {i for shard in (0, 1) for i in poisoned[shard][:2]}
    assert not [c for c in e.servicer.calls[asked_before:] if c[1] in poisoned_ids]
    m = _messages(caplog)
    assert _has(m, "mirror of shard 1 step 5 failed", "verifies but does not load", "'eps' must be a number")
    assert _has(m, "shard 0: checkpoint step 5 by " + e.key[:12], "verified but does not load",
                "'eps' must be a number", "quarantined in")
    assert _has(m, "reject list", "2 checkpoint(s) found bad earlier")
