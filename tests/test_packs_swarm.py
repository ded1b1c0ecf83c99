"""Issue 14's proof: the partitioning box holds an npz dataset; two other islands start where the file does not
exist (the plan names it by a relative path, and they run in another directory), claim shards, fetch those
shards' data packs from the swarm, verify them and train to done; the router job learns from every pack; the
packs are mirrored (R = 2) so the data box can leave; then `assemble` and `eval` (from the held-out pack) work
on a box without the dataset."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from ddm_node.cli.localnet import LocalNet, all_done
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.data.pack import read_pack
from ddm_node.data.packing import pack_path, pack_slots, spec
from ddm_node.data.plan import Plan
from ddm_node.swarm.dht import Swarm
from tests.live_swarm import holds, of, signal_island, timeline, wait_until
from tests.pack_data import write_npz

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
data: {dataset: "npz:data.npz"}
partition: {experts: 3}
model: {hidden: 32, depth: 2, heads: 2}
train: {steps: 120, batch_size: 16, checkpoint_every: 60, warmup_steps: 5}
router: {steps: 20, batch_size: 32}
sample: {steps: 4}
swarm: {lease_ttl: 30, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, replicas: 2}
"""


def _held(work: Path, plan: Plan) -> set[int]:
    """The slots whose packs verify against the plan in a work dir."""
    out = set()
    for slot in pack_slots(plan):
        path = pack_path(work, spec(plan, slot).ref)
        try:
            read_pack(path, spec(plan, slot), keep=False)
            out.add(slot)
        except Exception:
            continue
    return out


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.islands
def test_islands_without_the_dataset_train_from_packs_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    home, away = tmp_path / "home", tmp_path / "away"  # the data box's directory, and everyone else's
    home.mkdir()
    away.mkdir()
    write_npz(home / "data.npz", n=300)
    net = LocalNet(tmp_path / "net")
    try:
        (home / "run.yaml").write_text(CONFIG)
        run_id = net.cli("partition", "--config", "run.yaml", "--out", str(net.root / "plan"),
                         cwd=home).strip().splitlines()[-1]
        plan = Plan.load(net.root / "plan")
        assert plan.packs is not None and plan.dataset == "npz:data.npz" and not (away / "data.npz").exists()
        with Swarm(Identity.generate(), run_id) as boot:
            maddr = boot.visible_maddrs()[0]
            data_box = net.start("island1", "--plan", str(net.root / "plan"), "--initial-peers", maddr, cwd=home)
            others = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr, cwd=away) for i in (2, 3)]
            for p in (data_box, *others):
                net.wait_ready(p, timeout=180)
            events = wait_until(net, all_done(3, router=True), 400, "every shard and the router done")
            for p in others:  # each trained a shard from a pack it fetched, never from a dataset it does not have
                trained = {e.shard for e in of(events, EventKind.DONE, name=p.name)}
                fetched = {e.shard for e in of(events, EventKind.PACK, name=p.name) if e.source == "fetched"}
                assert trained and trained <= fetched, (p.name, trained, fetched)
                assert not {e.source for e in of(events, EventKind.PACK, name=p.name)} & {"built", "imported"}
            assert {e.source for e in of(events, EventKind.PACK, name="island1")} == {"imported"}
            # R = 2 mirrors besides the data box (its publisher) hold every pack; then the data box may leave
            wait_until(net, lambda _: all(_held(p.work, plan) == set(pack_slots(plan)) for p in others), 120,
                       "islands 2 and 3 to hold every pack")
            for k in {e.shard for e in of(events, EventKind.DONE, name="island1")}:  # its experts, mirrored
                wait_until(net, lambda _, k=k: any(holds(p.work, k, plan.cfg.train.steps) for p in others), 120,
                           f"a mirror of shard {k}'s final checkpoint")
            assert signal_island(net, data_box, signal.SIGTERM, 60).code == 0
            peer = others[0].announce()["maddrs"][0]
            bundle = away / "bundle"
            net.cli("assemble", "--initial-peers", peer, "--run", run_id, "--out", str(bundle), "--wait", "120",
                    cwd=away)
        index = json.loads((bundle / "model_index.json").read_text())
        assert len(index["experts"]) == 3 and index["router"]["kind"] == "learned"
        assert index["eval_pack"]["sha256"] == plan.packs.eval.sha256
        out = json.loads(net.cli("eval", "--ensemble", str(bundle), "--n", "32", "--json", cwd=away))
        assert out["experts"] == [0, 1, 2] and out["fd_dom"] >= 0, out
        assert not (away / "data.npz").exists()
        assert timeline(net)
    finally:
        net.stop_all(timeout=30)
