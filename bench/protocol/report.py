"""The `bench.scale --protocol` section: per-size tables, growth exponents (log-log least squares) and the reading."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.common import markdown_table, median, section_header
from bench.protocol.run import SizeResult
from bench.protocol.shared import KindTraffic

NAME = "bench.scale.protocol"  # the section's markers (an HTML comment may not hold "--")
ANNOUNCED = ("ckpt", "replica", "stats", "plan")


def exponent(ns: Sequence[float], values: Sequence[float | None]) -> float | None:
    """The slope of log(value) over log(n) by least squares (values <= 0 or None left out); None under 2 points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@dataclass(frozen=True)
class View:
    """One size's figures as the tables and the exponents use them; rates per island per minute of product time."""

    r: SizeResult
    scale: float

    def per_min(self, count: float) -> float:
        return count / self.r.n / (self.r.window_s / self.scale / 60) if self.r.window_s else 0.0

    def kind(self, name: str) -> KindTraffic:
        return self.r.traffic.get(name, KindTraffic())

    def calls(self, attr: str) -> list[float]:
        return [s * 1000 for t in self.r.traffic.values() for s in getattr(t, attr)]

    @property
    def claim(self) -> float | None:
        return median(self.r.claim_s) if self.r.claim_s else None

    @property
    def get_ms(self) -> float | None:
        return median(self.calls("get_s")) if self.calls("get_s") else None

    @property
    def put_ms(self) -> float | None:
        return median(self.calls("put_s")) if self.calls("put_s") else None

    @property
    def probe_ms(self) -> float | None:
        return median(self.r.probe_get_ms) if self.r.probe_get_ms else None

    @property
    def peers_bytes(self) -> float | None:
        k = self.r.keys.get("peers")
        return k.bytes_mean if k else None

    @property
    def gets_per_min(self) -> float:
        return self.per_min(sum(t.gets for t in self.r.traffic.values()))

    @property
    def read_kib_per_min(self) -> float:
        return self.per_min(sum(t.get_bytes for t in self.r.traffic.values())) / 1024

    @property
    def heartbeat(self) -> tuple[float, float]:
        t = self.kind("peers")
        return self.per_min(t.puts), self.per_min(t.put_bytes) / 1024

    @property
    def announced(self) -> tuple[float, float]:
        return (self.per_min(sum(self.kind(k).puts for k in ANNOUNCED)),
                self.per_min(sum(self.kind(k).put_bytes for k in ANNOUNCED)) / 1024)

    @property
    def assembly_s(self) -> float | None:
        return self.r.assembly.seconds if self.r.assembly else None

    @property
    def manifests(self) -> float | None:
        return float(self.r.assembly.manifest_fetches) if self.r.assembly else None


EXPONENTS: list[tuple[str, Callable[[View], float | None], str]] = [
    ("claim latency (start -> claim won, median)", lambda v: v.claim, ""),
    ("DHT get latency (islands' gets in the window, median)", lambda v: v.get_ms, ""),
    ("DHT put latency (median)", lambda v: v.put_ms, ""),
    ("DHT get latency (one client get per claim key, median)", lambda v: v.probe_ms, ""),
    ("peers-key bytes (one read)", lambda v: v.peers_bytes, "O(N): one record per island"),
    ("DHT gets per island per minute", lambda v: v.gets_per_min, ""),
    ("bytes read per island per minute", lambda v: v.read_kib_per_min, ""),
    ("heartbeat bytes per island per minute", lambda v: v.heartbeat[1], ""),
    ("announcement puts per island per minute", lambda v: v.announced[0], ""),
    ("assembly time (one pass, every shard)", lambda v: v.assembly_s, ""),
    ("manifest fetches per assembly", lambda v: v.manifests, "O(K): one expert + one stats manifest per shard"),
]


def exponents(views: list[View]) -> list[tuple[str, float | None, str]]:
    ns = [v.r.n for v in views]
    return [(name, exponent(ns, [get(v) for v in views]), note) for name, get, note in EXPONENTS]


def tables(views: list[View]) -> str:
    claims = markdown_table(
        ["islands = shards", "DHT peers", "claim s med / max", "all claimed (s)", "lost claim races",
         "shards unclaimed / held twice"],
        [[v.r.n, v.r.hosts, f"{fmt(v.claim)} / {fmt(max(v.r.claim_s) if v.r.claim_s else None)}",
          fmt(v.r.all_claimed_s), v.r.lost_races, f"{v.r.unclaimed} / {v.r.double_held}"] for v in views])
    dht = markdown_table(
        ["islands", "get ms med / p90", "put ms med / p90", "client get ms med", "gets / island / min",
         "KiB read / island / min", "heartbeats / island / min (KiB)", "announcements / island / min (KiB)"],
        [[v.r.n, f"{fmt(v.get_ms, 0)} / {fmt(pct(v.calls('get_s'), 0.9), 0)}",
          f"{fmt(v.put_ms, 0)} / {fmt(pct(v.calls('put_s'), 0.9), 0)}", fmt(v.probe_ms, 0), fmt(v.gets_per_min),
          fmt(v.read_kib_per_min), f"{v.heartbeat[0]:.1f} ({v.heartbeat[1]:.1f})",
          f"{v.announced[0]:.1f} ({v.announced[1]:.1f})"] for v in views])
    kinds = list(views[-1].r.keys) if views else []
    keys = markdown_table(["islands", *[f"{k}: records / bytes per key (max)" for k in kinds]],
                          [[v.r.n, *[_key(v, k) for k in kinds]] for v in views])
    placed = markdown_table(
        ["islands", "mirror copies per shard min / max", "shards placed exactly by the rule", "shards mirrored per "
         "island max / mean", "assembly (s)", "experts assembled", "manifest fetches", "assembly DHT gets"],
        [[v.r.n, f"{min(v.r.copies, default=0)} / {max(v.r.copies, default=0)}", f"{v.r.placement_exact} of {v.r.n}",
          f"{max(v.r.held, default=0)} / {sum(v.r.held) / max(1, len(v.r.held)):.2f}", fmt(v.assembly_s),
          v.r.assembly.experts if v.r.assembly else "-", v.r.assembly.manifest_fetches if v.r.assembly else "-",
          v.r.assembly.dht_gets if v.r.assembly else "-"] for v in views])
    res = markdown_table(["islands", "CPU % (both cores, window)", "RSS GiB (all processes)", "load 1/5/15"],
                         [[v.r.n, fmt(v.r.cpu, 0), fmt(v.r.rss_gib), v.r.load] for v in views])
    return (claims + "\nDHT calls in the steady window (islands' own calls; rates per island per minute of product "
            "time):\n\n" + dht + "\nRecords and bytes per key (one reader, after the window):\n\n" + keys
            + "\nMirror placement (R = 2) and assembly (a client outside the islands, one pass):\n\n" + placed
            + "\nResources:\n\n" + res)


def _key(v: View, kind: str) -> str:
    k = v.r.keys.get(kind)
    return "-" if k is None else f"{k.records_mean:.1f} / {k.bytes_mean:,.0f} ({k.bytes_max:,})"


def exponent_table(views: list[View]) -> str:
    rows = [[name, "-" if e is None else f"{e:.2f}", note] for name, e, note in exponents(views)]
    return markdown_table(["figure", f"growth exponent over n = {', '.join(str(v.r.n) for v in views)}", "note"],
                          rows)


def render(results: list[SizeResult], scale: float, setup: str, reading: list[str], title: str) -> str:
    views = [View(r, scale) for r in results if not r.error]
    failed = [f"- n={r.n}: **did not finish**: {r.error}" for r in results if r.error]
    return (section_header(NAME, title) + tables(views) + "\nGrowth exponents (slope of log(figure) over log(n), "
            "least squares; 0 = flat, 1 = linear):\n\n" + exponent_table(views) + "\n"
            + "\n".join(failed + reading + [setup]) + "\n")
