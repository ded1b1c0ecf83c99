"""Watching a node, in this process: live progress, the peer record's live fields, Prometheus text at /metrics,
the dashboard's page and JSON, console lines of events, log flags on every subcommand, the status table's width."""

from __future__ import annotations

import io
import json
import logging
import math
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ddm_node.cli import main
from ddm_node.cli.logs import HoldUntilReady, level_for
from ddm_node.core.errors import DDMError
from ddm_node.core.events import Event, EventKind, EventLog
from ddm_node.core.live import MAX_POINTS, LiveProgress
from ddm_node.core.meter import Count, Gauge, Timer
from ddm_node.node.state import NodeState, Phase
from ddm_node.observe.metrics import About, EventCounts, NodeMetrics
from ddm_node.observe.server import MonitorServer
from ddm_node.observe.view import Feed, SwarmView
from ddm_node.swarm.records import CheckpointRecord, Claim, PeerRecord

PEER = "12D3KooWHPmjMnsMBwLTJvWNnh7qgUvkjVeHuGniGo9tQ1ygBwoM"
K1, K2 = "1" * 64, "2" * 64
H = "ab" * 32


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.headers["Content-Type"], res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


# ------------------------------------------------------------------------------------------ live progress


def test_live_progress_rate_loss_eta_and_a_bounded_curve():
    clock = Clock()
    live = LiveProgress(shard=3, target=1000, images_per_step=64, clock=clock, wall=clock)
    live.start(100)
    s = live.stats()
    assert (s.step, s.loss, s.images_per_s, s.eta_s) == (100, None, None, None)  # nothing timed or read yet
    clock.t += 2.0
    live.update(120, [1.0] * 20)
    s = live.stats()
    assert s.step == 120 and s.images_per_s == pytest.approx(10 * 64) and s.eta_s == pytest.approx(880 / 10)
    assert s.loss == pytest.approx(1.0)  # bias-corrected: a constant loss smooths to itself
    live.update(121, [float("nan"), 3.0])  # a non-finite value is skipped, never published
    assert math.isfinite(live.stats().loss) and 1.0 < live.stats().loss < 3.0
    for step in range(122, 122 + 5 * MAX_POINTS):
        clock.t += 0.01
        live.update(step, [0.5])
    curve = live.curve()
    assert len(curve) <= MAX_POINTS and curve[0][0] < 130 and curve[-1][0] > 122 + 4 * MAX_POINTS
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))


def test_trainer_reports_losses_without_a_per_step_sync_when_lazy(tiny_cfg):
    """on_losses hears every step's loss: one by one on the CPU path, in batches on the GPU path (lazy losses)."""
    import dataclasses

    import torch

    from ddm_node.train.trainer import LOSS_CHECK_STEPS, Trainer

    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (64,))
    train = dataclasses.replace(tiny_cfg.train, checkpoint_every=1000)  # no checkpoint drains in between
    for lazy in (False, True):
        model = dataclasses.replace(tiny_cfg.model, image_size=8, channels=1, num_classes=10)  # as a plan fits it
        trainer = Trainer(model, train, x, y, device="cpu")
        trainer.lazy_loss = lazy
        heard: list[tuple[int, int]] = []
        trainer.run(LOSS_CHECK_STEPS + 5, on_losses=lambda step, losses: heard.append((step, len(losses))))
        assert sum(n for _, n in heard) == LOSS_CHECK_STEPS + 5 and heard[-1][0] == LOSS_CHECK_STEPS + 5
        assert max(n for _, n in heard) == (LOSS_CHECK_STEPS if lazy else 1)


# ------------------------------------------------------------------------------------------ the peer record


def test_peer_record_live_fields_are_optional_and_validated():
    base = dict(peer_id=PEER, public_key=K1, grpc="a:1", maddrs=[], version="v", heartbeat=1.8e9, state="training",
                shard=0)
    old = PeerRecord.from_value(base)  # a peer without live fields (an older version)
    assert (old.step, old.loss, old.images_per_s, old.eta) == (None, None, None, None)
    live = PeerRecord.from_value({**base, "step": 40, "loss": 0.25, "images_per_s": 800.0, "eta": 12})
    assert (live.step, live.loss, live.images_per_s, live.eta) == (40, 0.25, 800.0, 12.0)
    for field, bad in (("loss", float("nan")), ("loss", float("inf")), ("loss", -1.0), ("loss", 1e7),
                       ("images_per_s", "fast"), ("eta", True), ("step", -3), ("step", 1.5)):
        with pytest.raises(DDMError, match=field):
            PeerRecord.from_value({**base, field: bad})


def test_heartbeat_live_fields_are_clamped_to_what_readers_accept():
    state = NodeState()
    assert state.live_fields() == {}
    clock = Clock()
    state.live = LiveProgress(0, 10, 10**9, clock=clock, wall=clock)
    state.live.start(0)
    clock.t += 1.0
    state.live.update(5, [2e7])  # an absurd rate and loss: clamped, so the heartbeat is never refused
    fields = state.live_fields()
    rec = PeerRecord(PEER, K1, "a:1", (), "v", 1.8e9, "training", 0, **fields).validated()
    assert rec.step == 5 and rec.loss == 1e6 and rec.images_per_s == 1e9


# ------------------------------------------------------------------------------------------ /metrics


def _metrics(state: NodeState, log: EventLog, held=()) -> NodeMetrics:
    about = About("0.1.0", K1, PEER, "cd" * 32, "127.0.0.1:5")
    return NodeMetrics(state, EventCounts(log), lambda: about, lambda: list(held))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_parses_and_holds_step_loss_and_counters(tmp_path):
    state = NodeState(phase=Phase.TRAINING, active=1)
    clock = Clock()
    state.live = LiveProgress(1, 300, 32, clock=clock, wall=clock)
    state.live.start(0)
    clock.t += 2.0
    state.live.update(40, [0.5] * 40)
    state.meter.add(Count.BYTES_SERVED, 1000)
    state.meter.add(Count.BYTES_FETCHED, 300)
    state.meter.add(Count.FETCH_FAILURES, label="unreachable")
    state.meter.add(Count.FETCH_FAILURES, label="unreachable")
    state.meter.set(Gauge.MIRROR_LAG, 50, label="0")
    state.meter.observe(Timer.DHT_CALL, 0.02, label="get")
    state.meter.observe(Timer.DHT_CALL, 3.0, label="get")
    log = EventLog(tmp_path / "events.jsonl", "me")
    metrics = _metrics(state, log, held=[1])
    log.record(EventKind.CHECKPOINT, shard=1, step=20)
    other = NodeState()  # a second island in the same process: its own registry, its own numbers
    other_metrics = _metrics(other, EventLog(tmp_path / "other.jsonl", "other"))
    with MonitorServer(metrics.registry(), None) as server, MonitorServer(other_metrics.registry(), None) as server2:
        code, ctype, body = get(server.start() + "metrics")
        assert code == 200 and ctype.startswith("text/plain")
        got = _samples(body.decode())
        _, _, body2 = get(server2.start() + "metrics")
        got2 = _samples(body2.decode())
    assert got[("ddm_training_step", (("shard", "1"),))] == 40
    assert got[("ddm_training_loss", (("shard", "1"),))] == pytest.approx(0.5)
    assert got[("ddm_training_images_per_second", (("shard", "1"),))] == pytest.approx(20 * 32)
    assert got[("ddm_training_target_steps", (("shard", "1"),))] == 300
    assert got[("ddm_phase", (("phase", "training"),))] == 1 and got[("ddm_phase", (("phase", "idle"),))] == 0
    assert got[("ddm_lease_held", (("slot", "1"),))] == 1
    assert got[("ddm_checkpoints_published_total", ())] == 1
    assert got[("ddm_bytes_served_total", ())] == 1000 and got[("ddm_bytes_fetched_total", ())] == 300
    assert got[("ddm_fetch_failures_total", (("reason", "unreachable"),))] == 2
    assert got[("ddm_mirror_lag_steps", (("shard", "0"),))] == 50
    assert got[("ddm_dht_call_seconds_count", (("op", "get"),))] == 2
    assert got[("ddm_dht_call_seconds_bucket", (("le", "0.025"), ("op", "get")))] == 1
    assert got[("ddm_dht_call_seconds_bucket", (("le", "+Inf"), ("op", "get")))] == 2
    assert not any(name == "ddm_training_step" for name, _ in got2)  # not training: no step sample
    assert got2[("ddm_bytes_served_total", ())] == 0 and got2[("ddm_checkpoints_published_total", ())] == 0


# ------------------------------------------------------------------------------------------ the dashboard


class FakeSwarm:
    """The read side of a Swarm from lists (what collect_status reads)."""

    def __init__(self, peers=(), claims=None, ckpts=None):
        self._peers, self._claims, self._ckpts = list(peers), claims or {}, ckpts or {}

    def peers(self):
        return list(self._peers)

    def claims(self, shard):
        return self._claims.get(shard, [])

    def checkpoints(self, shard):
        return self._ckpts.get(shard, [])

    def replicas(self, shard):
        return []

    def routers(self):
        return []


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan

    cfg = load_config(overrides={"partition.experts": 2, "train.steps": 300, "swarm.heartbeat": 1.0})
    return make_plan(cfg, load_dataset("digits"))


def test_swarm_view_document_live_steps_curves_and_silent_peers(plan, monkeypatch):
    now = [1.8e9]
    monkeypatch.setattr("ddm_node.clients.status.dht_time", lambda: now[0])
    claim = Claim(0, PEER, K1, "a:1", now[0] - 5, expires_at=now[0] + 600)
    other = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBiMFR2vBH5z3Qe"

    def beat(step, loss, age=0.5):
        return PeerRecord(PEER, K1, "a:1", (), "0.1.0", now[0] - age, "training", 0, step=step, loss=loss,
                          images_per_s=640.0, eta=20.0)

    def idle():
        return PeerRecord(other, K2, "b:1", (), "0.1.0", now[0] - 0.5, "idle", -1)

    swarm = FakeSwarm([idle()])
    view = SwarmView(lambda: (swarm, plan), Feed(), interval=1.0, me=K2, clock=lambda: now[0])
    assert view.snapshot()["run"] is None  # before the first poll: no data (the page says "starting")
    view.poll()
    swarm._claims = {0: [claim]}
    for step, loss in ((40, 0.9), (80, 0.7), (120, 0.5)):
        now[0] += 2
        swarm._peers = [beat(step, loss), idle()]
        view.poll()
    doc = view.snapshot()
    s0, s1 = doc["shards"]
    assert (s0["state"], s0["step"], s0["live_step"], s0["checkpoints"]) == ("training", 120, 120, 0)
    assert s0["loss"] == 0.5 and s0["images_per_s"] == 640.0 and s0["eta_s"] == 20.0 and not s0["owner_silent"]
    assert [list(p) for p in s0["curve"]] == [[40, 0.9], [80, 0.7], [120, 0.5]]
    assert s1["state"] == "pending" and s1["curve"] == []
    json.dumps(doc, allow_nan=False)  # what the server sends
    texts = [e["text"] for e in doc["events"]]
    assert f"peer {PEER[-8:]} joined (version 0.1.0)" in texts and f"shard 0: claimed by {PEER[-8:]}" in texts
    # the trainer falls silent: its record ages, then vanishes from the DHT; the page is told
    now[0] += 10
    swarm._peers = [beat(120, 0.5, age=10.0), idle()]
    view.poll()
    doc = view.snapshot()
    assert doc["shards"][0]["owner_silent"] and doc["silent_after"] < 10
    assert [p["silent"] for p in doc["peers"] if p["public_key"] == K1] == [True]
    now[0] += 5
    swarm._peers = [idle()]
    view.poll()
    doc = view.snapshot()
    gone = [p for p in doc["peers"] if p["public_key"] == K1]
    assert gone and gone[0]["silent"] and gone[0]["heartbeat_age"] >= 15  # still listed, as silent
    assert f"peer {PEER[-8:]} went silent" in [e["text"] for e in doc["events"]]
    assert [p["silent"] for p in doc["peers"] if p["public_key"] == K2] == [False]


def test_dashboard_server_serves_the_page_assets_json_and_sample(plan, tmp_path):
    swarm = FakeSwarm([], {}, {0: [CheckpointRecord(0, 100, H, H, K1, "a:1", False)]})
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    view = SwarmView(lambda: (swarm, plan), Feed(), me=None, samples=tmp_path / "samples")
    view.poll()
    with MonitorServer(None, view) as server:
        url = server.start()
        code, ctype, page = get(url)
        assert code == 200 and ctype.startswith("text/html") and b"/static/app.js" in page
        assert b"https://" not in page and b"http://" not in page  # nothing from a CDN
        for asset, kind in (("static/app.js", "javascript"), ("static/style.css", "css")):
            code, ctype, body = get(url + asset)
            assert code == 200 and kind in ctype and len(body) > 1000 and b"https://" not in body
        assert b"innerHTML" not in get(url + "static/app.js")[2]  # peer strings only ever go in as text
        code, ctype, body = get(url + "api/swarm")
        doc = json.loads(body)
        assert code == 200 and ctype == "application/json"
        assert doc["run"]["num_shards"] == 2 and doc["shards"][0]["newest_step"] == 100
        assert doc["sample"]["name"] == "grid.png"
        assert get(url + doc["sample"]["url"].lstrip("/"))[2].startswith(b"\x89PNG")
        assert get(url + "metrics")[0] == 404  # a dashboard client has no node metrics
        assert get(url + "../etc/passwd")[0] == 404


# ------------------------------------------------------------------------------------------ console and flags


def test_event_lines_and_listeners(tmp_path, caplog):
    log = EventLog(tmp_path / "events.jsonl", "me")
    heard = []
    log.subscribe(heard.append)
    log.subscribe(lambda e: 1 / 0)  # a broken listener is not the node's problem
    with caplog.at_level(logging.INFO, logger="ddm_node.core.events"):
        log.record(EventKind.START, grpc="127.0.0.1:5", peer_id=PEER, run_id="cd" * 32,
                   maddrs=("/ip4/127.0.0.1/tcp/1/p2p/" + PEER,))
        log.record(EventKind.CHECKPOINT, shard=2, step=250)
        log.record(EventKind.RELEASE, shard=2, reason="stopping")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"ready: peer {PEER}, gRPC 127.0.0.1:5, run {'cd' * 32}, DHT /ip4/127.0.0.1/tcp/1/p2p/{PEER}",
                     "shard 2: checkpoint at step 250 published", "shard 2: handed back (stopping)"]
    assert [e.kind for e in heard] == [EventKind.START, EventKind.CHECKPOINT, EventKind.RELEASE]
    back = Event.from_json((tmp_path / "events.jsonl").read_text().splitlines()[0])
    assert back.maddrs == ("/ip4/127.0.0.1/tcp/1/p2p/" + PEER,) and back.run_id == "cd" * 32


def test_log_flags_before_and_after_the_subcommand(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k"), "-v"]) == 0
    assert main(["-q", "keygen", "--out", str(tmp_path / "k2"), "--log-format", "json"]) == 0
    assert level_for("start", 0, 0) == logging.INFO and level_for("keygen", 0, 0) == logging.WARNING
    assert level_for("start", 1, 0) == logging.DEBUG and level_for("start", 0, 1) == logging.WARNING
    assert level_for("keygen", 2, 0) == logging.DEBUG and level_for("keygen", 0, 5) == logging.CRITICAL
    from ddm_node.cli.main import build_parser

    args = build_parser().parse_args(["-v", "status", "--initial-peers", "/p2p/x", "--run", "r", "-v", "-q"])
    assert (args.verbose, args.quiet) == (1, 1)  # a flag before the subcommand is kept, not reset
    args = build_parser().parse_args(["-vv", "keygen", "--out", "k"])
    assert (args.verbose, args.quiet, args.log_format, args.log_file) == (2, 0, "text", None)
    log_file = tmp_path / "log.jsonl"
    assert main(["keygen", "--out", str(tmp_path / "k3"), "-vv", "--log-file", str(log_file), "--log-format",
                 "json"]) == 0
    logging.getLogger("ddm_node.test").info("a line with %s", "args")
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"t", "time", "level", "logger", "message"} <= set(records[-1])
    assert records[-1]["message"] == "a line with args" and records[-1]["level"] == "INFO"
    assert main(["keygen", "--out", str(tmp_path / "k4"), "--log-file", str(tmp_path / "no" / "dir" / "f")]) == 2
    assert "No such file or directory" in capsys.readouterr().err.strip().splitlines()[-1]


def test_start_holds_info_lines_until_ready():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    hold = HoldUntilReady(handler)
    handler.addFilter(hold)
    logger = logging.getLogger("ddm_node.test.hold")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("starting")
        logger.warning("a warning passes")
        assert out.getvalue() == "a warning passes\n"  # a failing start-up prints its one error line only
        hold.release()
        logger.info("after")
        assert out.getvalue().splitlines() == ["a warning passes", "starting", "after"]
    finally:
        logger.removeHandler(handler)


def test_status_table_adapts_to_the_width(monkeypatch):
    from rich.console import Console

    from ddm_node.clients.status import (
        WIDE_DEFAULT,
        Owner,
        RouterStatus,
        RunStatus,
        ShardStatus,
        columns_for,
        output_console,
        render,
    )

    shard = ShardStatus(0, "training", Owner(PEER, K1), 120, 300, 0.4, 0, 0, 0, None, live_step=120, loss=0.4321,
                        images_per_s=640.0, eta_s=75.0)
    status = RunStatus("cd" * 32, "digits", 1, 300, False, [shard], RouterStatus("disabled", None, None, 0, None, None))
    for width, shown, hidden in ((200, ["replicas", "owner", "loss"], []), (110, ["owner", "ETA"], ["replicas"]),
                                 (70, ["loss", "img/s", "ETA"], ["owner", "heartbeat", "replicas"])):
        names = [n for n, _ in columns_for(width)]
        assert all(n in names for n in shown) and not any(n in names for n in hidden), (width, names)
        console = Console(file=io.StringIO(), width=width)
        console.print(render(status, width))
        text = console.file.getvalue()
        assert "0.4321" in text and "1m15s" in text and "120 / 300" in text
        assert max(len(line) for line in text.splitlines()) <= width
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    assert output_console().width == WIDE_DEFAULT
    monkeypatch.setenv("COLUMNS", "123")
    assert output_console().width == 123


def test_tensorboard_is_skipped_cleanly_without_the_package(monkeypatch, tmp_path, caplog):
    import sys

    from ddm_node.observe.tensorboard import ScalarWriter, summary_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with caplog.at_level(logging.WARNING):
        assert summary_writer(tmp_path / "tb") is None
    assert "tensorboard package is not installed" in caplog.text

    class Writer:
        def __init__(self):
            self.scalars, self.closed = [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    clock = Clock()
    live = LiveProgress(2, 100, 8, clock=clock, wall=clock)
    live.start(0)
    clock.t += 1
    live.update(10, [0.3] * 10)
    writer = Writer()
    scalars = ScalarWriter(writer, lambda: live)
    assert scalars.write() and not scalars.write()  # nothing moved: nothing written twice
    assert ("shard_2/loss", pytest.approx(0.3), 10) in writer.scalars
    assert any(tag == "shard_2/images_per_s" for tag, _, _ in writer.scalars)
    scalars.close()
    assert writer.closed


@pytest.mark.parametrize("as_json", [True, False])
def test_status_watch_refreshes_until_interrupted(monkeypatch, capsys, as_json):
    from ddm_node.clients import status as st

    def status_at(step):
        shard = st.ShardStatus(0, "training", st.Owner(PEER, K1), step, 300, 0.5, 0, 0, 0, None, live_step=step,
                               loss=0.5, images_per_s=640.0, eta_s=10.0)
        return st.RunStatus("cd" * 32, "digits", 1, 300, False, [shard],
                            st.RouterStatus("disabled", None, None, 0, None, None))

    class Swarm:
        closed = False

        def shutdown(self):
            self.closed = True

    swarm, steps, sleeps = Swarm(), iter([10, 20, 30, 40]), []
    monkeypatch.setattr(st, "join_swarm", lambda peers, run: swarm)
    monkeypatch.setattr(st, "fetch_plan", lambda *a, **k: None)
    monkeypatch.setattr(st, "collect_status", lambda s, plan: status_at(next(steps)))

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt  # Ctrl-C: a clean exit

    monkeypatch.setattr(st.time, "sleep", sleep)
    assert st.run_status(["/p2p/x"], "cd" * 32, as_json=as_json, watch=2.5) == 0
    out = capsys.readouterr().out
    assert sleeps == [2.5, 2.5, 2.5] and swarm.closed
    if as_json:
        assert [json.loads(line)["shards"][0]["step"] for line in out.splitlines()] == [10, 20, 30]
    else:
        assert "30 / 300" in out  # the newest refresh is what is left on screen
