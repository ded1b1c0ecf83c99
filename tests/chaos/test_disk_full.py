"""Scenario 4: the work dir's filesystem fills up during a checkpoint write.

Each island's work dir is a small tmpfs sized from the measured size C of one checkpoint:
- "tight" (room for one checkpoint and a half): the 2nd checkpoint does not fit even after pruning.
  Decided behaviour: the island logs `DISK FULL ...`, records a `disk_full` event, gives the shard
  back (releases its claim), stops training and mirroring, stays up and keeps serving its newest
  checkpoint, which stays intact and verified; its heartbeat state reads `disk_full`. No crash, no loop.
- "roomy" (two and a half): the 3rd checkpoint does not fit while two are kept; the island prunes to
  the newest checkpoint, retries, keeps only one from then on, and finishes the shard.
"""

from __future__ import annotations

import time

import pytest
import torch

from ddm_node.core.config import load_config
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.trainer import Trainer
from ddm_node.transfer.client import NodeClient
from ddm_node.transfer.download import fetch_artifact

from .harness import island_log_tail, tmpfs

pytestmark = [pytest.mark.multiproc, pytest.mark.islands, pytest.mark.slow, pytest.mark.usefixtures("need_mount")]  # -m slow

EVERY, STEPS = 20, 100
CONFIG = """
data: {{dataset: digits}}
partition: {{experts: 1, seed: {seed}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: {steps}, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
swarm: {{lease_ttl: 4, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}}
"""


def checkpoint_bytes(tmp) -> int:
    """Bytes (rounded to 4 KiB pages, as tmpfs counts them) of one checkpoint of the test model."""
    cfg = load_config(overrides={"model.hidden": 32, "model.depth": 2, "model.heads": 2, "train.batch_size": 32,
                                 "model.image_size": 8, "model.channels": 1, "model.num_classes": 10})
    trainer = Trainer(cfg.model, cfg.train, torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (64,)))
    trainer.train_step()  # the optimizer state exists from the first step on
    step_dir = ckpt.write_checkpoint(tmp, "0" * 64, 0, trainer, "calibration", Identity.generate())
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in step_dir.rglob("*") if f.is_file())


def test_full_disk_during_checkpoint_write(net, report, tmp_path):
    c = checkpoint_bytes(tmp_path / "calibrate")
    runs = {name: net.partition(CONFIG.format(seed=seed, steps=STEPS, every=EVERY), name=f"plan-{name}")
            for name, seed in (("tight", 1), ("roomy", 2))}
    plan_bytes = (net.root / "plan-tight" / "plan.json").stat().st_size
    fixed = plan_bytes + 160 * 1024  # plan copy, stats artifact, events, announce file, directories
    sizes = {"tight": fixed + int(1.5 * c), "roomy": fixed + int(2.5 * c)}
    report.note(f"one checkpoint = {c} bytes; tmpfs sizes {sizes}")
    disks = {name: net.root / "disks" / name for name in runs}
    with tmpfs(disks["tight"], sizes["tight"]), tmpfs(disks["roomy"], sizes["roomy"]):
        try:
            procs = {name: net.start(name, "--plan", str(net.root / f"plan-{name}"), work=disks[name])
                     for name in runs}
            info = {name: net.wait_ready(p) for name, p in procs.items()}

            # tight: the 2nd checkpoint does not fit even after pruning -> disk_full, shard released, still serving
            full = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.DISK_FULL), None), 120,
                                "the tight island to report a full disk")
            assert full.name == "tight" and full.shard == 0 and full.step == EVERY, full
            kept = ckpt.checkpoint_dir(disks["tight"], 0, EVERY)
            ckpt.verify_checkpoint(kept, require_signature=True)
            assert [d.name for d in ckpt.list_checkpoints(disks["tight"], 0)] == [kept.name]
            assert "DISK FULL" in island_log_tail(procs["tight"], 200)
            with NodeClient(info["tight"]["grpc"]) as client:
                refs = [r for r in client.list_artifacts(runs["tight"], "expert", 0) if r.step == EVERY]
            assert len(refs) == 1, "the kept checkpoint is not served"
            got = fetch_artifact([info["tight"]["grpc"]], refs[0].manifest_id, tmp_path / "fetched" / "expert")
            assert got.step == EVERY and got.publisher == info["tight"]["public_key"]
            with Swarm(Identity.generate(), runs["tight"], initial_peers=info["tight"]["maddrs"][:1],
                       client_mode=True) as reader:
                deadline = time.time() + 20
                while True:
                    states = {p.public_key: p.state for p in reader.peers()}
                    live = [c for c in reader.claims(0) if c.live(reader.now())]
                    if states.get(info["tight"]["public_key"]) == "disk_full" and not live:
                        break
                    assert time.time() < deadline, f"peer states {states}, live claims {live}"
                    time.sleep(0.5)
            time.sleep(3)  # no crash loop, no new claim: it stays up, serving
            tight_ev = [e for e in net.events() if e.name == "tight"]
            assert procs["tight"].alive, island_log_tail(procs["tight"])
            assert not [e for e in tight_ev if e.kind is EventKind.CLAIM and e.t > full.t]

            # roomy: the 3rd checkpoint fails while two are kept; prune to one, retry, finish the shard
            done = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.DONE and e.name == "roomy"),
                                                None), 120, "the roomy island to finish")
            assert done.step == STEPS
            roomy_log = island_log_tail(procs["roomy"], 10**5)
            assert "disk full writing shard 0" in roomy_log
            steps = ckpt.list_checkpoints(disks["roomy"], 0)
            assert steps[0].name == f"step_{STEPS:08d}" and len(steps) == 1
            ckpt.verify_checkpoint(steps[0], require_signature=True)
            retries = roomy_log.count("disk full writing shard 0")
            report.add(checkpoint_bytes=c, tight_disk=sizes["tight"], roomy_disk=sizes["roomy"],
                       tight_kept_step=EVERY, tight_state="disk_full (serving, shard released)",
                       roomy_disk_full_retries=retries, roomy_finished_step=STEPS)
            report.note(f"tight: disk_full at step {EVERY + EVERY} -> kept step {EVERY} verified, fetched over gRPC, "
                        f"claim released, still alive; roomy: {retries} prune-and-retry, finished at {STEPS}")
        finally:
            net.stop_all(timeout=20)
