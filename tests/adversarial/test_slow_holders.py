"""Holders that stall or trickle cannot hold a fetch; listings cannot flood assembly with fakes.

Real gRPC on 127.0.0.1: an honest `TransferServer` and `SlowPeer`s (tests/adversarial/slow_peer.py) that
stall (never send a byte, never answer a manifest call) or trickle (a burst at every attempt, then
silence). Budgets are made small here (the module constants of ddm_node.transfer.budget) so that the
properties show in seconds:

- with one honest holder and any number of stalling or trickling ones, a fetch finishes within 2x the
  honest-only time plus one connect timeout (files, whole artifacts, and through the DHT: a checkpoint
  for mirror/resume and an assembly, where Sybils announce the honest publisher's manifests under their
  own keys sorting first);
- a trickler is dropped by its average rate over all its attempts; slow holders are remembered;
- only addresses announced under the manifest's publisher key are tried first;
- one lister's thousand fake stats cost at most a handful of manifest calls, once.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import FileEntry, Manifest, seal
from ddm_node.exchange import candidates, fetch
from ddm_node.transfer import budget
from ddm_node.transfer.download import fetch_artifact, fetch_file
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData

from .slow_peer import SlowPeer

CONNECT = 1.0  # seconds: the connect timeout of these tests
MIN_RATE = 4 << 20  # bytes/s
BIG = 256 << 20  # bytes: big enough that the honest time dominates the fixed costs of racing (64 MiB: 0.14 s,
# and 1.44 s against a 1.28 s bound once in a full suite run on 2 cores)
RUN = hashlib.sha256(b"slow-run").hexdigest()
KEY = Identity.generate()


def random_bytes(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(n)


@pytest.fixture
def small_budgets(monkeypatch):
    """Small budgets, and a process with no memory of earlier slow holders, failed listings or manifests."""
    monkeypatch.setattr(budget, "CONNECT_TIMEOUT", CONNECT)
    monkeypatch.setattr(budget, "MIN_RATE", MIN_RATE)
    forget()
    yield
    forget()


def forget() -> None:
    budget.SLOW.clear()
    candidates.FAILED_LISTINGS.clear()
    fetch._SIGNED = fetch._SignedManifests()


@pytest.fixture
def peers():
    made: list = []

    def make(**kw) -> SlowPeer:
        peer = SlowPeer(Identity.generate(), **kw)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def honest(tmp_path):
    """An honest TransferServer serving one artifact with one big file; yields (address, manifest, data)."""
    data = random_bytes(BIG)
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "big.bin").write_bytes(data)
    (d / "small.json").write_bytes(b'{"a": 1}')
    placeholder = {n: FileEntry("0" * 64, 0) for n in ("big.bin", "small.json")}
    m = seal(d, Manifest("expert", RUN, 0, 100, "cfg", placeholder), KEY)
    store = ArtifactStore()
    store.register(d)
    server = TransferServer(store, NodeInfoData("honest", KEY.public_hex))
    address = server.start()
    yield address, m, data, d
    server.stop(0)


def timed(fn, limit: float):
    """(result, seconds) of fn() run in a thread; fails when it takes longer than `limit` (the thread is left
    to end when the test's servers stop)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    elapsed = time.monotonic() - start
    assert not worker.is_alive(), f"still running after {elapsed:.1f} s"
    if "error" in out:
        raise out["error"]
    return out["value"], elapsed


def side_by_side(honest_fn, slow_fn, limit: float, runs: int = 3):
    """(honest-only seconds, seconds with slow holders, the last slow run's result), measured interleaved.

    The machine is shared and its noise only ever adds time, so each arm's fastest of `runs` alternating
    runs is its estimate; both functions start from a process that remembers nothing (`forget`).
    """
    honest, slow, result = [], [], None
    for _ in range(runs):
        forget()
        honest.append(timed(honest_fn, 60)[1])
        forget()
        result, elapsed = timed(slow_fn, limit)
        slow.append(elapsed)
    print(f"honest-only runs {[round(t, 2) for t in honest]} s; with slow holders {[round(t, 2) for t in slow]} s")
    return min(honest), min(slow), result


# ---------------------------------------------------------------- files and artifacts


def test_fetch_file_past_stalling_and_trickling_holders(tmp_path, small_budgets, peers, honest):
    address, m, data, _ = honest
    entry = m.files["big.bin"]
    stallers = [peers() for _ in range(3)]
    tricklers = [peers() for _ in range(3)]
    for p in stallers:
        p.servicer.hold_file(data, "stall")
    for p in tricklers:
        p.servicer.hold_file(data, "trickle")
    runs = iter(range(100))
    bad = [p.address for pair in zip(stallers, tricklers) for p in pair]  # stall, trickle, stall, ...
    t_honest, elapsed, got = side_by_side(
        lambda: fetch_file([address], entry, tmp_path / f"h{next(runs)}"),
        lambda: fetch_file(bad + [address], entry, tmp_path / "slow" / f"f{next(runs)}", timeout=5), 90)
    bound = 2 * t_honest + CONNECT
    print(f"honest-only {t_honest:.2f} s; with 6 slow holders first {elapsed:.2f} s; bound {bound:.2f} s")
    assert got.read_bytes() == data
    assert elapsed <= bound, f"{elapsed:.2f} s > 2 x {t_honest:.2f} + {CONNECT} s"
    assert not list((tmp_path / "slow").glob("f*.*")), "racing lanes left files behind"
    # The stallers sent nothing while the honest holder sent the file: remembered, tried last next time
    # (so not asked at all when the honest holder delivers).
    assert all(p.address in budget.SLOW for p in stallers)
    calls = [len(p.servicer.calls) for p in stallers]
    fetch_file([p.address for p in stallers] + [address], entry, tmp_path / "g", timeout=5)
    assert [len(p.servicer.calls) for p in stallers] == calls


def test_trickler_is_dropped_by_its_average_rate_over_all_attempts(tmp_path, small_budgets, peers, honest):
    address, m, data, _ = honest
    entry = m.files["big.bin"]
    trickler = peers()
    trickler.servicer.hold_file(data, "trickle")  # 1 MiB at once at every attempt, then silence
    # Before: each attempt's MiB reset the failure count, so this "progress" went on for minutes.
    limit = CONNECT + (1 << 20) / MIN_RATE + 3.0
    with pytest.raises(DDMError, match="too slow"):
        timed(lambda: fetch_file([trickler.address], entry, tmp_path / "f", retries=3, backoff=0.01, timeout=5),
              limit)
    assert trickler.address in budget.SLOW
    kept = (tmp_path / "f.part").stat().st_size
    assert kept >= 1 << 20  # its bytes stay: the next holder resumes after them
    got: list[int] = []
    fetch_file([trickler.address, address], entry, tmp_path / "f", progress=got.append, timeout=5)
    assert (tmp_path / "f").read_bytes() == data
    assert sum(got) == len(data) - kept  # the remembered trickler went last: the honest holder resumed the .part


def test_fetch_artifact_past_holders_that_stall_even_the_manifest(tmp_path, small_budgets, peers, honest):
    address, m, data, directory = honest
    silent = [peers() for _ in range(3)]
    for p in silent:
        p.servicer.stall_manifests = True
        p.servicer.hold(directory)
        for e in m.files.values():
            p.servicer.mode[e.sha256] = "stall"
    runs = iter(range(100))
    dest = tmp_path / "a"
    t_honest, elapsed, got = side_by_side(
        lambda: fetch_artifact([address], m.id, tmp_path / f"h{next(runs)}"),
        lambda: fetch_artifact([p.address for p in silent] + [address], m.id, dest / f"{next(runs)}", timeout=5),
        90)
    bound = 2 * t_honest + CONNECT
    print(f"honest-only {t_honest:.2f} s; with 3 silent holders first {elapsed:.2f} s; bound {bound:.2f} s")
    assert got.id == m.id and (sorted(dest.iterdir())[-1] / "big.bin").read_bytes() == data
    assert elapsed <= bound, f"{elapsed:.2f} s > 2 x {t_honest:.2f} + {CONNECT} s"


# ---------------------------------------------------------------- through the DHT: Sybils announce H's manifests


class View:
    """The reader's swarm with only the checkpoint records of `keys` (the honest-only view, or some Sybils)."""

    def __init__(self, swarm, *keys: str):
        self._swarm, self._keys = swarm, set(keys)

    def checkpoints(self, shard: int):
        return [r for r in self._swarm.checkpoints(shard) if r.publisher in self._keys]

    def __getattr__(self, name: str):
        return getattr(self._swarm, name)


FAKES = 1000  # fake stats manifest ids one Sybil lists


@pytest.fixture(scope="module")
def sybil_world(tmp_path_factory):
    """H trained shard 0 (a final step-2 checkpoint of about 100 MB with its state, so that the honest transfer
    time, not the fixed cost of racing, dominates) and serves it, its stats and the plan. Three Sybils whose
    keys sort before H's announce H's genuine checkpoint under their OWN keys as checkpoint records (so each
    is "a publisher" to the record) at their own addresses: S (stalls everything, manifests and listings
    too), T (answers manifests, trickles 16 KiB per attempt then goes silent), L (serves honestly, and
    lists a thousand fake stats manifests). A reader DHT peer sees all four records."""
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.swarm.dht import Swarm
    from ddm_node.swarm.records import CheckpointRecord, PlanRecord, StatsRecord
    from ddm_node.train import checkpoint as ckpt
    from ddm_node.train.expert import train_shard
    from proto import ddm_pb2

    from .evil_peer import EvilPeer, key_after, keys_before

    root = tmp_path_factory.mktemp("sybils")
    cfg = load_config(overrides={
        "model.hidden": 384, "model.depth": 4, "model.heads": 2, "train.steps": 2, "train.batch_size": 16,
        "train.checkpoint_every": 2, "train.warmup_steps": 1, "partition.experts": 1, "swarm.router_job": False,
    })
    ds = load_dataset("digits")
    plan = make_plan(cfg, ds)
    h = key_after("c")
    ids = keys_before(3, "8")
    train_shard(plan, 0, root / "H", steps=2, identity=h, dataset=ds)
    step_dir = ckpt.checkpoint_dir(root / "H", 0, 2)
    store = ArtifactStore()
    store.register_plan(plan.to_bytes())
    expert, state = store.register(step_dir / ckpt.EXPERT), store.register(step_dir / ckpt.STATE)
    stats = store.register(ckpt.stats_dir(root / "H", 0))
    server = TransferServer(store, NodeInfoData("H", h.public_hex))
    made: list = []
    try:
        address = server.start()
        h_swarm = Swarm(h, plan.run_id)
        made.append(h_swarm)
        maddrs = h_swarm.visible_maddrs()
        h_swarm.announce(PlanRecord(plan.run_id, address), ttl=900)
        h_record = CheckpointRecord(0, 2, expert.id, state.id, h.public_hex, address, True)
        h_swarm.announce(h_record, ttl=900)
        h_swarm.announce(StatsRecord(0, stats.id, address), ttl=900)
        s = SlowPeer(ids[0], plan.run_id, maddrs, trickle=16 * 1024)
        made.append(s)
        t = SlowPeer(ids[1], plan.run_id, maddrs, trickle=16 * 1024)
        made.append(t)
        lister = EvilPeer(ids[2], plan.run_id, maddrs)
        made.append(lister)
        s.servicer.stall_manifests = s.servicer.stall_listing = True
        for peer, mode in ((s, "stall"), (t, "trickle"), (lister, "honest")):
            for part in (ckpt.EXPERT, ckpt.STATE):
                m = peer.servicer.hold(step_dir / part)
                for e in m.files.values():
                    peer.servicer.mode[e.sha256] = mode
            peer.swarm.announce(CheckpointRecord(0, 2, expert.id, state.id, peer.key, peer.address, True),
                                           ttl=900)
        lister.servicer.listing = [ddm_pb2.ArtifactRef(manifest_id=f"{i:064x}", kind="stats", run_id=plan.run_id,
                                                       shard=0, step=0, publisher=lister.key, total_size=1000)
                                   for i in range(FAKES)]  # ids that sort before any real one
        reader = Swarm(Identity.generate(), plan.run_id, initial_peers=maddrs, client_mode=True)
        made.append(reader)
        deadline = time.monotonic() + 60
        while len(reader.checkpoints(0)) < 4:
            assert time.monotonic() < deadline, "the reader never saw the four checkpoint records"
            time.sleep(0.5)
        yield dict(plan=plan, root=root, h=h, address=address, h_record=h_record, reader=reader, s=s, t=t,
                   lister=lister, expert=expert, state=state)
    finally:
        for thing in reversed(made):
            thing.close() if hasattr(thing, "close") else thing.shutdown()
        server.stop(0)


@pytest.mark.multiproc
def test_only_the_manifests_publisher_goes_first(sybil_world):
    from ddm_node.exchange.candidates import expert_candidates, publisher_first

    w = sybil_world
    c = expert_candidates(w["reader"].checkpoints(0), w["reader"].replicas(0))[0]
    sybils = [w["s"].address, w["t"].address, w["lister"].address]
    assert c.holders == sybils + [w["address"]]  # every record says "publisher"; the Sybils' keys sort first
    assert c.announcers[w["address"]] == {w["h"].public_hex} and c.announcers[w["s"].address] == {w["s"].key}
    assert c.holders_for(w["h"].public_hex) == [w["address"]] + sybils
    assert publisher_first(c.holders, w["t"].key)[0] == w["t"].address  # its own key only
    assert publisher_first(list(c.holders), w["h"].public_hex) == c.holders  # no keys known: order kept


@pytest.mark.multiproc
def test_checkpoint_fetch_for_mirror_and_resume_past_sybils(sybil_world, small_budgets, tmp_path):
    from ddm_node.exchange.candidates import checkpoint_candidates
    from ddm_node.exchange.fetch import fetch_checkpoint
    from ddm_node.train.limits import ArtifactRules

    w = sybil_world
    rules = ArtifactRules.for_plan(w["plan"])
    runs = iter(range(100))

    def honest_only():
        return fetch_checkpoint(tmp_path / f"h{next(runs)}", 0, checkpoint_candidates([w["h_record"]], [])[0],
                                rules, None)

    c = checkpoint_candidates(w["reader"].checkpoints(0), w["reader"].replicas(0))[0]
    assert c.holders[0] == w["s"].address  # the stalling Sybil is asked first
    t_honest, elapsed, got = side_by_side(
        honest_only, lambda: fetch_checkpoint(tmp_path / f"w{next(runs)}", 0, c, rules, None), 120)
    bound = 2 * t_honest + CONNECT
    print(f"honest-only {t_honest:.2f} s; with the Sybils {elapsed:.2f} s; bound {bound:.2f} s")
    assert (got / "expert" / "manifest.json").is_file() and (got / "state" / "manifest.json").is_file()
    assert elapsed <= bound, f"{elapsed:.2f} s > 2 x {t_honest:.2f} + {CONNECT} s"
    # Files came from the publisher only: the trickler was never asked for a byte.
    assert not [call for call in w["t"].servicer.calls if call[0] == "Fetch"]


def _assemble(view, plan, out):
    import io

    from rich.console import Console

    from ddm_node.clients.assemble import assemble

    return assemble(view, plan, out, min_experts=1, console=Console(file=io.StringIO()))


@pytest.mark.multiproc
def test_assembly_past_stalling_and_trickling_sybils(sybil_world, small_budgets, tmp_path):
    from ddm_node.ensemble.bundle import read_index

    w = sybil_world
    reader, plan, h = w["reader"], w["plan"], w["h"].public_hex
    runs = iter(range(100))

    t_honest, elapsed, out = side_by_side(
        lambda: _assemble(View(reader, h), plan, tmp_path / f"h{next(runs)}"),
        lambda: _assemble(View(reader, h, w["s"].key, w["t"].key), plan, tmp_path / f"bundle{next(runs)}"), 120)
    bound = 2 * t_honest + CONNECT
    print(f"honest-only {t_honest:.2f} s; with the Sybils {elapsed:.2f} s; bound {bound:.2f} s")
    index = read_index(out)
    assert [(e["shard"], e["step"], e["publisher"]) for e in index["experts"]] == [(0, 2, h)]
    assert elapsed <= bound, f"{elapsed:.2f} s > 2 x {t_honest:.2f} + {CONNECT} s"
    assert not [call for call in w["t"].servicer.calls if call[0] == "Fetch"]  # files from the publisher


@pytest.mark.multiproc
def test_a_listing_flood_costs_a_few_manifest_calls_once(sybil_world, small_budgets, tmp_path):
    """L announces H's expert under its own key (so assembly asks it for the shard's stats too) and lists a
    thousand fake stats manifests whose ids sort before the real one. Before: assembly asked L for every
    fake's manifest before the real one's, at every pass."""
    from ddm_node.ensemble.bundle import read_index

    w = sybil_world
    lister = w["lister"]
    fakes = {f"{i:064x}" for i in range(FAKES)}

    def fake_calls() -> int:
        return sum(1 for rpc, what in lister.servicer.calls if rpc == "GetManifest" and what in fakes)

    view = View(w["reader"], w["h"].public_hex, lister.key)
    before = fake_calls()
    out, _ = timed(lambda: _assemble(view, w["plan"], tmp_path / "bundle"), 120)
    tried = fake_calls() - before
    print(f"fake stats manifests asked for: {tried}")
    assert [(e["shard"], e["step"]) for e in read_index(out)["experts"]] == [(0, 2)]
    assert 0 < tried <= candidates.LISTED_PER_HOLDER
    _assemble(view, w["plan"], tmp_path / "again")  # failed pairs and a failing lister are remembered
    assert fake_calls() - before == tried


def test_a_racer_continues_from_the_part_so_far(tmp_path, small_budgets, peers, honest):
    """A .part holds 1 MiB from an earlier call; the first holder trickles 1 MiB more and goes silent; the honest
    holder raced in starts from a copy of those 2 MiB: nothing is downloaded twice, and no copy is left."""
    address, m, data, _ = honest
    entry = m.files["big.bin"]
    trickler = peers()
    trickler.servicer.hold_file(data, "trickle")
    (tmp_path / "f.part").write_bytes(data[:1 << 20])
    got: list[int] = []
    timed(lambda: fetch_file([trickler.address, address], entry, tmp_path / "f", progress=got.append, timeout=5), 30)
    assert (tmp_path / "f").read_bytes() == data
    assert sum(got) == len(data) - (1 << 20)  # the trickler's MiB, then the honest rest
    assert [p.name for p in tmp_path.glob("f*")] == ["f"]
