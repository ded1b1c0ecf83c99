"""Shared test fixtures: every process a test run spawns is found and reaped, even after failures.

Each pytest run tags its environment with a unique DDM_TEST_SESSION value. Children inherit it
(daemons, hivemind's DHT child, p2pd), so at the end we can find exactly our own leftovers by
their environment, wherever they were reparented, and fail the run if any survived. With pytest-xdist each
worker is its own run with its own tag (a worker must not count another's live daemons as its leftovers).
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

SESSION_TAG = f"{uuid.uuid4().hex}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
os.environ["DDM_TEST_SESSION"] = SESSION_TAG
# Nothing downloads in tests: the hub libraries read these at import, and children inherit them.
# pytest-xdist workers get COLUMNS=80; piped CLI output (status tables) is meant to be as wide as a serial run's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"


def tagged_processes() -> list[psutil.Process]:
    """Live processes (other than this one) carrying this run's DDM_TEST_SESSION tag."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("DDM_TEST_SESSION") == SESSION_TAG and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def reap(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """After the whole run, no daemon, DHT child or p2pd started by the tests may still be alive."""
    yield
    deadline = time.time() + 10
    left = tagged_processes()
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = tagged_processes()
    if left:
        names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in left if p.is_running()]
        reap(left)
        pytest.fail(f"processes left behind by the tests (now killed): {names}")


@pytest.fixture
def tiny_cfg():
    """A config small enough to train an expert in a few seconds on one core."""
    from ddm_node.core.config import load_config

    return load_config(
        overrides={
            "model.hidden": 32, "model.depth": 2, "model.heads": 2,
            "train.steps": 60, "train.batch_size": 32, "train.checkpoint_every": 20, "train.warmup_steps": 5,
            "router.steps": 60, "router.batch_size": 64,
            "sample.steps": 8, "partition.experts": 2,
        }
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: the machine is shared, and two threads on a busy box are several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Tests that start island daemons (`islands`: `ddm-node start` processes that train, torchrun groups) run one at a
# time across the pytest-xdist workers: each holds a file lock shared by the run's workers from its setup (module
# fixtures included) to its teardown, while other tests go on beside it. Two swarms at once pushed the load on 2
# cores to 9-10, past what the wall-clock bounds (stop, claim, takeover, stall detection) allow (3 failures in one
# such run, 2026-12-03); one swarm beside one other test is a serial run's load. Tests with DHT peers, gRPC servers
# or one in-process island (`multiproc` alone) are not held: with every `multiproc` test locked, the suite's wall
# time was the sum of those tests (21 min 36 s on a slow day, 2026-12-03). Files are the unit of distribution
# (`--dist loadfile` in addopts), so a module fixture (a trained ensemble, a swarm) is built once, not once per
# worker. (xdist's `--dist loadgroup` did not group anything with pytest 9.2 and xdist 3.8 here: a static
# `xdist_group` marker still spread over both workers.)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None or item.get_closest_marker("islands") is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"ddm-tests-swarm-{run}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
