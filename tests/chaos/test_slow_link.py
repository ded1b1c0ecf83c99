"""Scenario 3: assembly over slow links, and a transfer cut midway that resumes at its offset.

Topology: publisher P and mirror M each in a network namespace behind a veth on the lab bridge; the
assembler (this test process) in the root namespace. The expert is big enough (hidden 256, depth 4: a 10 MB
bf16 weights file, about 7 MB on the wire packed) that the transfer takes seconds once both links are limited with
`tc qdisc ... tbf rate 20mbit burst 32kbit latency 400ms`. Assembly fetches from P first (the
publisher); when the `.part` file reaches a seeded fraction of the size, P's process group is killed:
the stream breaks, P's retries fail, and the client moves to M, resuming at the `.part` file's length.
Bytes on the wire come from the kernel's tx counters of P's and M's veth ends.
"""

from __future__ import annotations

import io
import threading
import time

import pytest
from rich.console import Console

from ddm_node.cli import main
from ddm_node.clients.assemble import assemble
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.workdir import WorkDir
from ddm_node.data.packing import pack_path
from ddm_node.data.plan import Plan
from ddm_node.ensemble.bundle import read_index
from ddm_node.swarm.dht import Swarm

from .harness import maddr, netlab, verified_copy

pytestmark = [pytest.mark.multiproc, pytest.mark.islands, pytest.mark.usefixtures("need_netns")]

RATE = "20mbit"
CONFIG = """
partition: {experts: 1}
model: {hidden: 256, depth: 4, heads: 2}
train: {steps: 2, batch_size: 16, checkpoint_every: 2, warmup_steps: 1}
swarm: {lease_ttl: 6, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}
"""


def test_assembly_over_slow_links_resumes_a_cut_transfer_at_its_offset(net, report, rng, tmp_path):
    with netlab() as lab:
        run_id = net.partition(CONFIG)
        p_node, m_node = lab.add("P"), lab.add("M")
        p = net.start("P", "--plan", str(net.root / "plan"), "--host", p_node.ip, wrap=p_node.wrap)
        p_info = net.wait_ready(p)
        net.wait_for(lambda ev: any(e.kind is EventKind.CLAIM and e.name == "P" for e in ev), 60, "P's claim")
        m = net.start("M", "--run", run_id, "--initial-peers", maddr(p_info), "--host", m_node.ip, wrap=m_node.wrap)
        net.wait_ready(m)
        done = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.DONE), None), 120, "the shard")
        step = done.step
        net.wait_for(lambda ev: verified_copy(m.work, 0, step), 60, "M to mirror the final checkpoint")
        expert = next((WorkDir(p.work).step(0, step) / "expert").glob("model.safetensors"))
        size = expert.stat().st_size
        cut_at = rng.uniform(0.25, 0.6)  # .part grows by whole 1 MiB chunks: the cut lands on the next boundary

        lab.limit("P", RATE)
        lab.limit("M", RATE)
        out = tmp_path / "bundle"
        tx0 = {n: lab.tx_bytes(n) for n in ("P", "M")}
        result: dict = {}
        with Swarm(Identity.generate(), run_id, initial_peers=[maddr(p_info)], host=lab.gateway,
                   client_mode=True) as reader:
            plan = Plan.load(net.root / "plan")

            def run():
                try:
                    result["out"] = assemble(reader, plan, out, min_experts=1, console=Console(file=io.StringIO()))
                except BaseException as exc:  # re-raised below
                    result["error"] = exc

            t0 = time.time()
            worker = threading.Thread(target=run)
            worker.start()
            part, offset = None, 0
            while worker.is_alive() and offset < cut_at * size:
                sizes = {f: _size(f) for f in tmp_path.glob(".bundle.parts-*/.expert_0*.dl-*/.incoming/*.part")}
                part = max((f for f in sizes if sizes[f] > 0), key=sizes.get, default=None)
                offset = sizes[part] if part else 0
                time.sleep(0.02)
            assert part is not None, f"assembly finished before the cut ({result}) after {time.time() - t0:.1f} s"
            t_cut = time.time()
            net.kill(p)  # the publisher dies mid-transfer
            offset = part.stat().st_size
            tx_p = lab.tx_bytes("P") - tx0["P"]
            worker.join(timeout=240)
            elapsed = time.time() - t0
        assert not worker.is_alive(), "assembly did not finish"
        if "error" in result:
            raise result["error"]
        tx_m = lab.tx_bytes("M") - tx0["M"]
        index = read_index(out)
        assert [e["step"] for e in index["experts"]] == [step]
        assert main(["verify", str(out)]) == 0

        # Resumed, not restarted: M sent the rest of the file (plus protocol overhead and the small stats
        # artifact), not all of it. What P sent past the .part length was in flight when it died (at most
        # one 1 MiB chunk, which gRPC delivers whole or not at all): lost, fetched again from M. Experts travel
        # zstd-packed, so the tail's wire size is what the server's packer makes of it from the cut on.
        # The assembler also fetches the plan's held-out data pack (zstd-packed too), from M once P is gone.
        tail, whole = _packed(expert, offset), _packed(expert, 0)
        eval_pack = pack_path(net.root / "plan", plan.packs.eval) if plan.packs and plan.packs.eval else None
        pack_wire = sum(_packed(f, 0) for f in eval_pack.iterdir() if f.is_file()) if eval_pack else 0
        refetched = tx_m - tail - pack_wire
        rate_bps = tx_p * 8 / max(1e-3, t_cut - t0)  # P's link until the cut (the manifest calls included)
        report.add(file_bytes=size, cut_at_bytes=offset, cut_fraction=round(offset / size, 2), wire_bytes_from_p=tx_p,
                   wire_bytes_from_m=tx_m, packed_file_bytes=whole, packed_tail_bytes=tail, packed_eval_pack=pack_wire,
                   m_bytes_beyond_packed_tail=refetched, assembly_s=round(elapsed, 1), link=RATE,
                   p_rate_mbit=round(rate_bps / 1e6, 1))
        report.note(f"expert file {size} bytes ({whole} packed); P killed at .part {offset} bytes ({offset / size:.0%}); "
                    f"wire: P sent {tx_p}, M sent {tx_m}: the tail from the cut packs to {tail}, the held-out pack to "
                    f"{pack_wire} (M sent {refetched:+d}: overhead, manifests and stats, less what of P's last chunks "
                    f"reached the .part after the cut, less the pack if P served it); "
                    f"assembly took {elapsed:.1f} s over {RATE} links")
        assert 0 < offset < size, "the cut did not land inside the file"
        assert whole - tail > 0.2 * whole, "the cut came too late to tell a resume from a restart"
        assert tx_m < 1.1 * (tail + pack_wire) + (128 << 10), "M re-sent more than the missing tail: no resume"
        # P, then M sent over their own 20 Mbit/s links one after the other (experts travel packed: wire < file).
        assert elapsed > (tx_p + tx_m) * 8 / 20e6 * 0.8, "the links were not limited"


def _packed(path, offset: int) -> int:
    """Bytes of chunk data a Fetch stream from `offset` carries with zstd + shuffle (what the server sends)."""
    from ddm_node.transfer.store import DEFAULT_CHUNK
    from ddm_node.transfer.wire import Packer

    packer, total, pos = Packer(allow_shuffle=True), 0, offset
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(DEFAULT_CHUNK - pos % DEFAULT_CHUNK):
            total += len(packer.pack(block)[0])
            pos += len(block)
    return total


def _size(path) -> int:
    """A .part file's size, 0 once it was renamed into place (the poll races the download)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
