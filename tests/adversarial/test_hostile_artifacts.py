"""Hostile artifacts, round two: what a signed artifact or a bundle may claim is bounded by the run's plan.

- Bundles: `model_index.json` names plain child directories only, `verify` checks exactly what the index lists
  (kind, shard, step and manifest of each entry) and nothing outside the bundle is ever read (an audit hook
  records every file the process opens).
- Sizes: a manifest that declares a file larger than the plan's model can fill is refused before any byte is
  fetched (mirror and resume through `fetch_checkpoint`, and `assemble`); the disk's free space is checked
  before a download starts.
- Configs: an expert's or state's config.json must be the plan's model config before a model is built from it;
  a router's config numbers are range-checked and its backbone must be the plan's.
- Done: a peer's "final" record counts only when a verified, loadable expert at the plan's step count backs it.

The world is real (tests/adversarial/hostile_world.py): a hivemind DHT, gRPC servers, artifacts made by the real
trainer and sealed with real keys; E is a peer with its own valid key that signs whatever it likes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.config import RouterConfig, canonical_json, to_dict
from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import FileEntry, Manifest, read_manifest, seal
from ddm_node.train import checkpoint as ckpt

from .hostile_world import TTL, has, messages, open_world, train_world

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_world(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def world(trained, tmp_path):
    from ddm_node.exchange.candidates import FAILED_LISTINGS
    from ddm_node.transfer.budget import SLOW

    FAILED_LISTINGS.clear()
    SLOW.clear()
    with open_world(trained, tmp_path) as w:
        yield w


def _rules(plan):
    from ddm_node.train.limits import ArtifactRules

    return ArtifactRules.for_plan(plan)


def _fetches(evil) -> list[str]:
    return [what for rpc, what in evil.servicer.calls if rpc == "Fetch"]


def _one_line_error(capsys, argv: list[str]) -> str:
    from ddm_node.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{argv[0]} accepted it: {err}"
    assert len(err.splitlines()) == 1, err
    return err


def _assemble(w, out: Path, capsys) -> dict:
    from ddm_node.cli import main
    from ddm_node.ensemble.bundle import read_index

    rc = main(["assemble", "--initial-peers", *w.maddrs, "--run", w.run_id, "--out", str(out), "--min-experts", "2",
               "--wait", "0"])
    assert rc == 0, capsys.readouterr().err
    return read_index(out)


def _reseal(w, shard: int, step: int, dst: Path, identity, replace_files: dict | None = None,
            state_files: dict | None = None):
    """H's step-4 checkpoint of `shard` sealed by `identity` as `step` (files swapped as given): (expert, state)."""
    from .evil_peer import seal_copy

    src = ckpt.checkpoint_dir(w.work, shard, 4)
    xm = seal_copy(src / ckpt.EXPERT, dst / ckpt.EXPERT, identity, replace_files, step=step,
                   extra=dict(read_manifest(src / ckpt.EXPERT).extra, step=step))
    sm = seal_copy(src / ckpt.STATE, dst / ckpt.STATE, identity, state_files, step=step,
                   extra=dict(read_manifest(src / ckpt.STATE).extra, step=step))
    return xm, sm


# ------------------------------------------------------------------------------------------ bundles

_OPENED: list[str] | None = None  # while a list: every path this process opens (resolved), via the audit hook


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            _OPENED.append(os.path.realpath(os.fsdecode(args[0])))
        except Exception:  # an audit hook must never raise
            pass


sys.addaudithook(_audit)


def _edit_index(bundle: Path, change) -> None:
    path = bundle / "model_index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def _swap_shards(index: dict) -> None:
    a, b = index["experts"]
    for field in ("dir", "manifest_id", "stats_manifest_id"):
        a[field], b[field] = b[field], a[field]


def _as_link(target: Path):
    def change(bundle: Path) -> None:
        victim = bundle / "expert_0"
        shutil.rmtree(victim)
        victim.symlink_to(target, target_is_directory=True)
    return change


def _file_link(target: Path):
    def change(bundle: Path) -> None:
        f = bundle / "expert_0" / ckpt.MODEL_FILE
        f.unlink()
        f.symlink_to(target)
    return change


def _stats_swap(bundle: Path) -> None:
    shutil.rmtree(bundle / "expert_0" / "stats")
    shutil.copytree(bundle / "expert_1" / "stats", bundle / "expert_0" / "stats")


def _kind_swap(bundle: Path) -> None:
    shutil.copytree(bundle / "expert_0" / "stats", bundle / "fake")
    stats_id = read_manifest(bundle / "fake").id
    _edit_index(bundle, lambda ix: ix["experts"][0].update(dir="fake", manifest_id=stats_id))


def test_a_hostile_bundle_index_is_one_line_and_nothing_outside_is_read(trained, tmp_path, capsys):
    """Each variant of a genuine, signed bundle (the artifacts are H's, sealed by the real trainer) is refused by
    `ddm-node verify` in one line and by `load_bundle`, and nothing outside the bundle is opened. Before the fix,
    verify accepted every variant but the last two: it checked only that each listed directory had a manifest
    whose id the index named, and read those through `..`, absolute paths and symlinks."""
    global _OPENED
    from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, write_bundle

    good = tmp_path / "good"
    write_bundle(good, trained.plan, sources_from_work_dirs([trained.work], [0, 1]), require_signature=True)
    outside = tmp_path / "outside"  # genuine artifacts of the run, outside any bundle
    shutil.copytree(good / "expert_0", outside / "expert_0")
    assert _verify_ok(good, capsys)

    variants = {
        "..": (lambda b: _edit_index(b, lambda ix: ix["experts"][0].update(dir="../outside/expert_0")),
               "plain child directory name"),
        "absolute": (lambda b: _edit_index(b, lambda ix: ix["experts"][0].update(dir=str(outside / "expert_0"))),
                     "plain child directory name"),
        "separator": (lambda b: _edit_index(b, lambda ix: ix["router"].update(kind="learned", dir="expert_1/stats")),
                      "plain child directory name"),
        "directory symlink": (_as_link(outside / "expert_0"), "a symlink"),
        "file symlink": (_file_link(outside / "expert_0" / ckpt.MODEL_FILE), "a symlink"),
        "shards swapped": (lambda b: _edit_index(b, _swap_shards), "model_index.json lists a expert of shard 0"),
        "stats of another shard": (_stats_swap, "model_index.json lists a stats of shard 0"),
        "stats listed as an expert": (_kind_swap, "is a stats of run"),
        "shard beyond the plan": (lambda b: _edit_index(b, lambda ix: ix["missing"].append(7)), "beyond the plan"),
    }
    for name, (change, needle) in variants.items():
        bundle = tmp_path / f"b-{len(os.listdir(tmp_path))}"
        shutil.copytree(good, bundle, symlinks=True)
        change(bundle)
        _OPENED = []
        try:
            err = _one_line_error(capsys, ["verify", str(bundle)])
            with pytest.raises(DDMError) as exc:
                load_bundle(bundle)
            opened = [p for p in _OPENED if p.startswith(str(outside.resolve()))]
        finally:
            _OPENED = None
        assert needle in err, f"{name}: {err}"
        assert "\n" not in str(exc.value), name
        assert not opened, f"{name}: read outside the bundle: {opened[:3]}"


def _verify_ok(bundle: Path, capsys) -> bool:
    from ddm_node.cli import main

    capsys.readouterr()
    return main(["verify", str(bundle)]) == 0


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.multiproc
def test_declared_sizes_beyond_the_plan_are_refused_before_any_download(world, tmp_path, capsys, caplog):
    """E re-seals H's checkpoints at step 5 (so every reader tries them first) with one file padded past what the
    plan's model can fill: shard 0's training state (mirror and resume) and shard 1's expert weights (assembly).
    Mirror/resume (`fetch_checkpoint`) and `assemble` refuse both from the signed manifest, without a single Fetch
    call to E, and use H's step 4. Then, with the disk reporting 4 KiB free, a genuine checkpoint is not fetched
    either: one line names what it needs and what is free. Before the fix, E's padded files were downloaded and
    the disk was never asked."""
    from ddm_node.exchange import fetch
    from ddm_node.exchange.candidates import Candidate, Holders, checkpoint_candidates
    from ddm_node.exchange.peers import join_swarm
    from ddm_node.swarm.records import CheckpointRecord

    w, e = world, world.evil
    rules = _rules(w.plan)
    src = {s: ckpt.checkpoint_dir(w.work, s, 4) for s in (0, 1)}
    state = (src[0] / ckpt.STATE / ckpt.STATE_FILE).read_bytes()
    weights = (src[1] / ckpt.EXPERT / ckpt.MODEL_FILE).read_bytes()
    limits = rules.files
    big_state = state + b"\0" * (limits[ckpt.STATE][ckpt.STATE_FILE] + 1 - len(state))
    big_weights = weights + b"\0" * (limits[ckpt.EXPERT][ckpt.MODEL_FILE] + 1 - len(weights))
    x0, s0 = _reseal(w, 0, 5, tmp_path / "E0", e.identity, state_files={ckpt.STATE_FILE: big_state})
    x1, s1 = _reseal(w, 1, 5, tmp_path / "E1", e.identity, {ckpt.MODEL_FILE: big_weights})
    for d in ("E0", "E1"):
        for part in (ckpt.EXPERT, ckpt.STATE):
            e.servicer.hold(tmp_path / d / part)
    e.swarm.announce(CheckpointRecord(0, 5, x0.id, s0.id, e.key, e.address, False), ttl=TTL)
    e.swarm.announce(CheckpointRecord(1, 5, x1.id, s1.id, e.key, e.address, False), ttl=TTL)

    caplog.set_level(logging.INFO, logger="ddm_node")
    reader = join_swarm(w.maddrs, w.run_id)
    try:
        for shard in (0, 1):  # what the mirror and a resuming island do
            cands = checkpoint_candidates(reader.checkpoints(shard), reader.replicas(shard))
            assert [c.step for c in cands] == [5, 4]
            with pytest.raises(fetch.RejectedArtifact, match="declares .* bytes; this run's"):
                fetch.fetch_checkpoint(tmp_path / f"m{shard}", shard, cands[0], rules, None)
            got = fetch.fetch_checkpoint(tmp_path / f"m{shard}", shard, cands[1], rules, None)
            assert read_manifest(got / ckpt.EXPERT).id == w.ids[(shard, 4)][0]
    finally:
        reader.shutdown()
    assert _fetches(e) == [], "E's padded files were downloaded"
    index = _assemble(w, tmp_path / "bundle", capsys)  # E's shard-0 expert is fine (only its state is padded)
    assert {(x["shard"], x["step"], x["publisher"]) for x in index["experts"]} == {
        (0, 5, e.key), (1, 4, w.honest.public_hex)}
    padded = {hashlib.sha256(big).hexdigest() for big in (big_state, big_weights)}
    assert not padded & set(_fetches(e)), "E's padded files were downloaded"
    assert has(messages(caplog), "shard 1 expert step 5", "model.safetensors declares", "this run's expert holds")

    # A full disk: E holds H's genuine step-4 checkpoint of shard 0 (H's signatures), the only holder asked
    for part in (ckpt.EXPERT, ckpt.STATE):
        e.servicer.hold(src[0] / part)
    genuine = Candidate(w.ids[(0, 4)], 4, Holders([e.address], {e.address: {w.honest.public_hex}}))
    usage, fetched = namedtuple("usage", "total used free"), len(_fetches(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
        with pytest.raises(fetch.NoSpace) as exc:
            fetch.fetch_checkpoint(tmp_path / "full", 0, genuine, rules, None)
    assert "need " in str(exc.value) and "0.0 MiB free" in str(exc.value) and "\n" not in str(exc.value)
    assert len(_fetches(e)) == fetched, "a download started on a full disk"
    assert not ckpt.checkpoint_dir(tmp_path / "full", 0, 4).exists()


# ------------------------------------------------------------------------------------------ configs


def _other_model(trained, tmp_path: Path, identity, hidden: int):
    """An expert and a state of shard 1 at step 5 whose config.json says `hidden` (weights to match), sealed."""
    import torch
    from safetensors.torch import save_file

    from ddm_node.core.model import DiT

    from .evil_peer import seal_copy

    cfg = trained.plan.cfg.model.resolved()
    other = type(cfg)(**{**to_dict(cfg), "hidden": hidden})
    src = ckpt.checkpoint_dir(trained.work, 1, 4)
    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in DiT(other).state_dict().items()}, str(weights))
    state_cfg = json.loads((src / ckpt.STATE / ckpt.CONFIG_FILE).read_text())
    state_cfg["model"] = to_dict(other)
    xm = seal_copy(src / ckpt.EXPERT, tmp_path / "X" / ckpt.EXPERT, identity,
                   {ckpt.MODEL_FILE: weights.read_bytes(), ckpt.CONFIG_FILE: canonical_json(to_dict(other))}, step=5,
                   extra={"step": 5})
    sm = seal_copy(src / ckpt.STATE, tmp_path / "X" / ckpt.STATE, identity, {ckpt.CONFIG_FILE: canonical_json(state_cfg)},
                   step=5, extra=dict(read_manifest(src / ckpt.STATE).extra, step=5))
    return xm, sm, tmp_path / "X"


def _router(plan, dst: Path, identity, size: str, experts: list[int], **numbers) -> Manifest:
    """A router artifact of the run with the given backbone size, experts and config numbers, sealed."""
    from safetensors.torch import save_file

    from router.learned import RouterNet, router_model_config

    c, h, _ = plan.shape
    cfg = RouterConfig(size=size)
    config = {"router": to_dict(cfg), "image_size": h, "channels": c, "num_classes": plan.num_classes,
              "experts": experts, **numbers}
    dst.mkdir(parents=True)
    net = RouterNet(router_model_config(cfg, h, c, plan.num_classes), len(experts))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_bytes(canonical_json(config))
    m = Manifest(kind="router", run_id=plan.run_id, shard=-1, step=2, config_hash="",
                 files={"model.safetensors": FileEntry("", 0), "config.json": FileEntry("", 0)})
    return seal(dst, m, identity)


@pytest.mark.multiproc
def test_a_peers_model_config_must_be_the_plans_before_any_model_is_built(world, trained, tmp_path, capsys, caplog,
                                                                          monkeypatch):
    """E signs shard 1 at step 5 with a model of hidden size 48 (the plan says 32; weights and configs match each
    other, so everything else verifies) and a learned router with a "tiny" backbone (the plan's is "router").
    `assemble` builds no model from E's configs and writes H's experts with the centroid router; the mirror and
    resume path refuse E's state; a router config with numbers out of range is one line. Before the fix, the
    bundle held E's hidden-48 expert and E's router, and the mirror kept E's state."""
    from ddm_node.exchange import fetch
    from ddm_node.exchange.candidates import checkpoint_candidates
    from ddm_node.exchange.peers import join_swarm
    from ddm_node.swarm.records import CheckpointRecord, RouterRecord
    from ddm_node.train.router_job import load_router

    w, e = world, world.evil
    rules = _rules(w.plan)
    xm, sm, edir = _other_model(trained, tmp_path, e.identity, hidden=48)
    for part in (ckpt.EXPERT, ckpt.STATE):
        e.servicer.hold(edir / part)
    e.swarm.announce(CheckpointRecord(1, 5, xm.id, sm.id, e.key, e.address, False), ttl=TTL)
    rm = _router(w.plan, tmp_path / "R", e.identity, "tiny", [0, 1])
    e.servicer.hold(tmp_path / "R")
    e.swarm.announce(RouterRecord(rm.id, 2, e.address, e.key), ttl=TTL)

    built = []
    real_dit = ckpt.DiT

    class Recorded(real_dit):
        def __init__(self, cfg):
            built.append(cfg.hidden)
            super().__init__(cfg)

    monkeypatch.setattr(ckpt, "DiT", Recorded)
    caplog.set_level(logging.INFO, logger="ddm_node")
    index = _assemble(w, tmp_path / "bundle", capsys)
    assert {(x["shard"], x["step"]) for x in index["experts"]} == {(0, 4), (1, 4)}
    assert index["router"]["kind"] == "centroid"
    assert 48 not in built, "a model was built from a peer's config"
    m = messages(caplog)
    assert has(m, "shard 1 expert step 5", "model config differs from the plan's (hidden)")
    assert has(m, "router step 2", "model config differs from the plan's (size, depth")

    reader = join_swarm(w.maddrs, w.run_id)
    try:  # mirror and resume: E's state carries the other model config
        c = checkpoint_candidates(reader.checkpoints(1), reader.replicas(1))[0]
        assert c.step == 5
        with pytest.raises(fetch.RejectedArtifact, match=r"config.json: model config differs from the plan's \(hidden\)"):
            fetch.fetch_checkpoint(tmp_path / "m", 1, c, rules, None)
    finally:
        reader.shutdown()

    for numbers, needle in (({"image_size": 0}, "image_size must be an integer in"),
                            ({"channels": 10**9}, "channels must be an integer in"),
                            ({"num_classes": -1}, "num_classes must be an integer in"),
                            ({"experts": [0, 9]}, "expert must be an integer in [0, 1]"),
                            ({"experts": [0, 0]}, "distinct")):
        d = tmp_path / f"r{len(os.listdir(tmp_path))}"
        experts = numbers.pop("experts", [0, 1])
        _router(w.plan, d, e.identity, "router", [0, 1], **numbers)
        if experts != [0, 1]:
            cfg = json.loads((d / "config.json").read_text())
            cfg["experts"] = experts
            (d / "config.json").write_bytes(canonical_json(cfg))
            (d / "manifest.sig").unlink()
            seal(d, read_manifest(d), e.identity)
        with pytest.raises(DDMError) as exc:
            load_router(d, rules=rules)
        assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


# ------------------------------------------------------------------------------------------ done


@pytest.mark.multiproc
def test_a_final_record_counts_only_with_a_verified_loadable_expert(world, tmp_path, caplog):
    """E announces shard 0 final at the plan's step count (6) in turn with: an expert whose weights file is empty,
    one whose weights are random bytes, a state manifest nobody serves, and H's genuine step-4 manifests under
    step 6 (the record's step is not the manifest's); and a learned router whose weights file is empty. None makes
    the shard or the router done for an island's done check; E's genuine re-seal at step 6 does (the control).
    Before the fix, the first three and the router made every island skip the work."""
    from ddm_node.core.workdir import WorkDir
    from ddm_node.exchange.done import DoneCheck
    from ddm_node.exchange.peers import join_swarm
    from ddm_node.node.progress import Progress
    from ddm_node.swarm.records import CheckpointRecord, RouterRecord

    from .evil_peer import seal_copy

    w, e = world, world.evil
    size = len((ckpt.checkpoint_dir(w.work, 0, 4) / ckpt.EXPERT / ckpt.MODEL_FILE).read_bytes())
    cases = []
    for name, files in (("empty weights", {ckpt.MODEL_FILE: b""}), ("random weights", {ckpt.MODEL_FILE: os.urandom(size)}),
                        ("genuine", None)):
        xm, sm = _reseal(w, 0, 6, tmp_path / name, e.identity, files)
        for part in (ckpt.EXPERT, ckpt.STATE):
            e.servicer.hold(tmp_path / name / part)
        cases.append((name, xm.id, sm.id))
    unserved = "ab" * 32
    genuine = cases.pop()
    cases.append(("state nobody serves", genuine[1], unserved))
    for part in (ckpt.EXPERT, ckpt.STATE):
        e.servicer.hold(ckpt.checkpoint_dir(w.work, 0, 4) / part)
    cases.append(("a step-4 checkpoint", *w.ids[(0, 4)]))

    router_src = tmp_path / "router-src"
    _router(w.plan, router_src, e.identity, "router", [0, 1])
    rm = seal_copy(router_src, tmp_path / "router", e.identity, {"model.safetensors": b""})
    e.servicer.hold(tmp_path / "router")
    assert e.swarm.announce(RouterRecord(rm.id, 2, e.address, e.key), ttl=TTL)

    caplog.set_level(logging.INFO, logger="ddm_node")
    rules = _rules(w.plan)
    reader = join_swarm(w.maddrs, w.run_id)
    try:
        work = WorkDir(tmp_path / "island")
        progress = Progress(w.plan, work, reader, DoneCheck(rules, None, work.root), router_job=True)
        for name, expert_id, state_id in cases:
            assert e.swarm.announce(CheckpointRecord(0, 6, expert_id, state_id, e.key, e.address, True), ttl=TTL)
            assert [r.expert_manifest for r in reader.checkpoints(0) if r.final] == [expert_id]
            assert not progress.shard_done(0), f"{name}: counted as done"
        assert not progress.router_done(), "an empty router counted as done"
        assert e.swarm.announce(CheckpointRecord(0, 6, genuine[1], genuine[2], e.key, e.address, True), ttl=TTL)
        assert progress.shard_done(0), "a genuine final checkpoint did not count"
        assert not [p for p in work.root.iterdir() if p.name.startswith(".done-check-")]  # scratch cleaned up
    finally:
        reader.shutdown()
    m = messages(caplog)
    assert has(m, "not counting expert " + cases[0][1][:12], "model.safetensors is empty")
    assert has(m, "not counting expert " + cases[1][1][:12], "verifies but does not load")
    assert has(m, "not counting expert " + cases[3][1][:12], "step is 4, expected 6")
    assert has(m, "not counting router " + rm.id[:12], "model.safetensors is empty")
