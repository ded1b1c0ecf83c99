"""bench.transfer over shaped links: the servers in a network namespace behind a veth pair whose both ends carry
`tc qdisc ... tbf` at the link rate (bench/netlab.py, the chaos suite's namespaces), the client in the root
namespace. Per rate, interleaved: raw TCP, `fetch_file` of fp32 weights (plain) and `fetch_file` of the same
number of bf16 weights as an expert publishes them (zstd after a byte shuffle); bytes on the wire are the kernel's
transmit counter of the namespace's veth end (TCP/IP and Ethernet headers included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bench.common import interleave, median
from bench.transfer_serve import MIB, Child, Sample, measure, raw_fetch

log = logging.getLogger(__name__)

BURST_S = 0.002  # tbf burst: 2 ms of the rate (at least 32 kbit); 32 kbit alone holds a 1 Gbit/s tbf far below it


@dataclass(frozen=True)
class Link:
    label: str
    rate: str  # for tc
    bits_per_s: float
    mib: int  # file size: a few seconds at the rate

    @property
    def mib_per_s(self) -> float:
        return self.bits_per_s / 8 / MIB

    @property
    def burst(self) -> str:
        return str(int(max(4096, self.bits_per_s / 8 * BURST_S)))  # bytes


@dataclass
class LinkResult:
    link: Link
    raw: list[float]  # MiB/s of file bytes
    fetch: list[float]
    packed: list[float]  # fp32-equivalent MiB/s: the fp32 size of the weights over the time the bf16 file took
    packed_wire: float  # kernel tx bytes / fp32 size of the weights
    plain_wire: float  # kernel tx bytes / file size, fp32 plain fetch


def shaped(links: list[Link], srv: Path, files: dict[int, tuple[object, object]], tmp: Path,
           reps: int) -> list[LinkResult] | str:
    """Measure every link; `files[mib]` is (fp32 file entry, bf16 file entry of the same values); the raw server
    serves the fp32 file as `link-{mib}.bin`. A string says why nothing was measured (no root, no `ip netns`)."""
    from bench.netlab import netlab, privileges

    why = privileges()
    if why is not None:
        return why
    out = []
    with netlab() as lab:
        node = lab.add("S")
        children = []
        try:
            grpc_child = Child("grpc", srv, host=node.ip, wrap=node.wrap)
            children.append(grpc_child)
            raw_child = Child("raw", srv, host=node.ip, wrap=node.wrap)
            children.append(raw_child)
            for link in links:
                lab.limit("S", link.rate, link.burst)
                fp32, bf16 = files[link.mib]
                out.append(_one(link, lab, grpc_child, raw_child, fp32, bf16, tmp, reps))
                lab.unlimit("S")
        finally:
            for c in children:
                c.close()
    return out


def _one(link: Link, lab, grpc_child: Child, raw_child: Child, fp32, bf16, tmp: Path, reps: int) -> LinkResult:
    from ddm_node.transfer.download import fetch_file

    wire: dict[str, list[float]] = {"fetch": [], "packed": []}

    def timed(fn, server: Child, size: int, key: str | None = None):
        def run() -> float:
            tx0 = lab.tx_bytes("S")
            sample: Sample = measure(fn, server)
            if key is not None:
                wire[key].append(lab.tx_bytes("S") - tx0)
            for f in tmp.glob("link-*"):
                f.unlink()
            return size / sample.seconds / MIB
        return run

    dest = tmp / "link-out.bin"
    name = f"link-{link.mib}.bin"
    vals = interleave({
        "raw": timed(lambda: raw_fetch(raw_child.address, name, dest, fp32.size), raw_child, fp32.size),
        "fetch": timed(lambda: fetch_file([grpc_child.address], fp32, dest), grpc_child, fp32.size, "fetch"),
        "packed": timed(lambda: fetch_file([grpc_child.address], bf16, dest, compress=True), grpc_child, fp32.size,
                        "packed"),
    }, reps, warmup=1)
    for key in wire:  # the warm-up's counts out
        wire[key] = wire[key][1:]
    log.info("%s: %s", link.label, {k: round(median(v), 1) for k, v in vals.items()})
    return LinkResult(link, vals["raw"], vals["fetch"], vals["packed"], median(wire["packed"]) / fp32.size,
                      median(wire["fetch"]) / fp32.size)
