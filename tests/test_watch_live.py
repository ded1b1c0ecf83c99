"""Watching a live island (`ddm-node start` as a process on 127.0.0.1): the console's ready line with a dialable
multiaddr, progress lines, `status --json` showing the training shard's live step and loss before its first
checkpoint, and Prometheus text at /metrics with its step and loss."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest
from live_swarm import config, log_tail, net  # noqa: F401 (net is a fixture)
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"ready: peer (\S+), gRPC (\S+), run ([0-9a-f]{64}), DHT (/\S+/p2p/\S+)")
PROGRESS = re.compile(r"shard 0: step (\d+)/100000 \(\d+%\), (\d+) img/s, loss ([0-9.]+), ETA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn, timeout: float, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        assert proc.alive, f"the island exited while waiting for {what}:\n{log_tail(proc, 30)}"
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{log_tail(proc, 30)}")


@pytest.mark.multiproc
@pytest.mark.islands
def test_a_training_island_talks_and_status_shows_live_step_and_loss_before_any_checkpoint(net):  # noqa: F811
    run_id = net.partition(config(k=1, steps=100000, every=50000))  # no checkpoint for minutes
    port = free_port()
    t0 = time.monotonic()
    proc = net.start("island1", "--plan", str(net.root / "plan"), "--metrics-port", str(port))
    ready = wait_for("the ready line", lambda: READY.search(proc.log.read_text(errors="replace")), 120, proc)
    ready_s = time.monotonic() - t0
    print(f"ready line {ready_s:.1f} s after launch")  # -s shows it
    assert ready_s < 30, f"the ready line came {ready_s:.1f} s after launch"
    peer_id, grpc, run, maddr = ready.groups()
    assert run == run_id and maddr.endswith(f"/p2p/{peer_id}") and re.fullmatch(r"127\.0\.0\.1:\d+", grpc)

    def live_row():  # `status` joins through the multiaddr of the ready line: it is dialable
        doc = json.loads(net.cli("status", "--initial-peers", maddr, "--run", run_id, "--json"))
        row = doc["shards"][0]
        known = row["live_step"] and row["loss"] is not None and row["images_per_s"] is not None
        return (row, doc) if known else None  # the first heartbeat may come before a rate is measured

    row, doc = wait_for("a live step in status", live_row, 90, proc)
    assert row["state"] == "training" and row["checkpoints"] == 0 and row["newest_step"] is None
    assert row["step"] == row["live_step"] > 0 and 0 < row["loss"] < 10 and row["images_per_s"] > 0
    assert row["eta_s"] > 0 and row["owner"]["peer_id"] == peer_id
    (peer,) = doc["peers"]
    assert peer["step"] > 0 and peer["loss"] is not None and peer["shard"] == 0

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("ddm_training_step", (("shard", "0"),))] >= row["step"]
    assert 0 < samples[("ddm_training_loss", (("shard", "0"),))] < 10
    assert samples[("ddm_lease_held", (("slot", "0"),))] == 1
    assert samples[("ddm_dht_call_seconds_count", (("op", "store"),))] > 0

    line = wait_for("a progress line", lambda: PROGRESS.search(proc.log.read_text(errors="replace")), 60, proc)
    assert int(line.group(1)) > 0 and float(line.group(3)) > 0
    text = proc.log.read_text(errors="replace")
    assert "shard 0: claimed" in text and "shard 0: training from step 0" in text
    assert text.index("ready: peer") < text.index("shard 0: claimed")
