"""The README's main job, as a user runs it: the installed `ddm-node demo --quick`, then its report.md.

The demo (ddm_node/cli/demo.py) starts four islands, SIGKILLs one that passed half of its shard, starts a
replacement, waits for every shard and the router, assembles, verifies, samples and evaluates. This test
runs the installed console script (the one `pip install -e .` put beside this Python), then checks what the
report says against the islands' own event logs and files: the killed island and its shard, the step the
takeover resumed from (a takeover from scratch, when the victim died before any mirror held its work, is
reported as xfail: the README promises a resume from a mirror), the bundle (verified again here), the
samples image, and that nothing the demo started (island, DHT child, p2pd) is still running afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from ddm_node.core.events import EventKind, read_events

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

DEMO_TIMEOUT = 900.0  # --quick takes about 2 minutes on 2 idle cores
QUICK_STEPS = 200


def installed_ddm_node() -> str:
    """The console script installed with this interpreter (the README's .venv/bin/ddm-node)."""
    beside = Path(sys.executable).parent / "ddm-node"
    found = str(beside) if beside.is_file() else shutil.which("ddm-node")
    if found is None:
        pytest.fail("no installed ddm-node command beside this Python or on PATH (pip install -e '.[dev]')")
    return found


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries DDM_DEMO_TAG=tag (everything the demo started inherits it)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("DDM_DEMO_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid}:{' '.join(p.cmdline()[:4])}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{p.pid}:?"


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_installed_demo_quick_report(tmp_path):
    out = tmp_path / "demo-out"
    tag = uuid.uuid4().hex
    cmd = [installed_ddm_node(), "demo", "--quick", "--out", str(out)]
    seen: set[str] = set()  # kinds of descendants seen while it ran: the no-leftover check means something
    t0 = time.monotonic()
    demo = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, DDM_DEMO_TAG=tag))
    try:
        while demo.poll() is None and time.monotonic() - t0 < DEMO_TIMEOUT:
            try:
                for child in psutil.Process(demo.pid).children(recursive=True):
                    line = " ".join(child.cmdline()[:6])
                    seen |= {k for k in ("p2pd", "ddm_node.cli") if k in line}
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
            time.sleep(1.0)
        if demo.poll() is None:
            demo.kill()
        stdout, stderr = demo.communicate(timeout=60)
        seconds = time.monotonic() - t0
        time.sleep(1.0)  # let the last reaped children vanish from the process table
        left = [describe(p) for p in tagged(tag)]
    finally:
        kill_all(tagged(tag))
    print(f"ddm-node demo --quick: {seconds:.0f} s")
    assert demo.returncode == 0, f"demo exit {demo.returncode} after {seconds:.0f}s\n{stderr[-3000:]}"
    assert left == [], f"left running by the demo (now killed): {left}"
    assert seen == {"p2pd", "ddm_node.cli"}, f"never saw the demo's islands and p2pd running: {seen}"

    report_path = out / "report.md"
    assert stdout.strip().splitlines()[-1] == str(report_path)
    report = report_path.read_text()
    islands = {p.parent.name: read_events(p, p.parent.name) for p in sorted((out / "islands").glob("*/events.jsonl"))}
    assert sorted(islands) == [f"island{i}" for i in range(1, 6)]

    # the killed island and its shard
    m = re.search(r"\*\*(island\d) was killed\*\* \(SIGKILL of its process group\) while training shard (\d)\.", report)
    assert m, report
    victim, shard = m.group(1), int(m.group(2))
    assert victim != "island5"
    victim_cps = [e.step for e in islands[victim] if e.kind is EventKind.CHECKPOINT and e.shard == shard]
    assert max(victim_cps) >= QUICK_STEPS // 2
    assert not any(e.kind is EventKind.DONE and e.shard == shard for e in islands[victim])

    # the takeover: another island resumed the shard from one of the victim's checkpoints and finished it
    m = re.search(rf"Shard {shard}: the killed island's last published checkpoint was step (\d+); "
                  r"the takeover resumed at step (\d+|-)\.", report)
    assert m, report
    published = int(m.group(1))
    assert published == max(victim_cps), (published, victim_cps)
    row = next(line for line in report.splitlines() if line.startswith(f"| {shard} |"))
    assert victim in row and row.endswith(f"| {QUICK_STEPS} |"), row
    finishers = [n for n, ev in islands.items() if n != victim
                 and any(e.kind is EventKind.DONE and e.shard == shard and e.step == QUICK_STEPS for e in ev)]
    assert len(finishers) == 1 and finishers[0] in row, (finishers, row)
    resumes = [e for e in islands[finishers[0]] if e.kind is EventKind.RESUME and e.shard == shard]
    assert m.group(2) != "-", f"{finishers[0]} trained shard {shard} from scratch: {row}"
    resumed = int(m.group(2))
    assert QUICK_STEPS // 2 <= resumed <= published and resumed in victim_cps, (published, resumed)
    assert resumed in [e.step for e in resumes], resumes
    victim_key = islands[victim][0].island  # the key prefix its events carry
    assert f"step {resumed} via" in row and f"(published by {victim_key}) on {finishers[0]}" in row, row
    for k in range(4):  # every shard reached the budget
        assert re.search(rf"^\| {k} \|.*\| {QUICK_STEPS} \|$", report, re.M), k

    # the bundle: four experts and the learned router, verifying with the installed command
    index = json.loads((out / "bundle" / "model_index.json").read_text())
    assert sorted(e["shard"] for e in index["experts"]) == [0, 1, 2, 3] and index["missing"] == []
    assert all(e["step"] == QUICK_STEPS for e in index["experts"]) and index["router"]["kind"] == "learned"
    res = subprocess.run([installed_ddm_node(), "verify", str(out / "bundle")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr

    # the samples: the image the report shows, a grid of 100 8x8 digits, not blank
    assert "![samples](samples.png)" in report
    with Image.open(out / "samples.png") as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert img.format == "PNG" and min(pixels.shape) >= 80 and pixels.std() > 10, (img.size, float(pixels.std()))
    assert re.search(r"FD_dom \d+\.\d+, KID -?\d+\.\d+ ± \d+\.\d+, precision \d\.\d\d, recall \d\.\d\d", report)
