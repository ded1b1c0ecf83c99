"""Fixtures of the chaos suite: the seed, a LocalNet that always stops its islands, privilege probes.

Seed: `--chaos-seed N` or the DDM_CHAOS_SEED environment variable (default harness.DEFAULT_SEED).
Figures: printed by every test (run with -s); appended to docs/CHAOS.md when DDM_CHAOS_REPORT=1.
"""

from __future__ import annotations

import os
import random

import pytest

from ddm_node.cli.localnet import LocalNet

from .harness import DEFAULT_SEED, ChaosReport, mount_permitted, privileges


def pytest_addoption(parser):
    try:
        parser.addoption("--chaos-seed", type=int, default=None,
                         help="seed of the chaos suite's random choices (default: $DDM_CHAOS_SEED or fixed)")
    except ValueError:  # already added (conftest collected twice)
        pass


@pytest.fixture(scope="session")
def chaos_seed(request) -> int:
    try:
        opt = request.config.getoption("--chaos-seed")
    except ValueError:  # this conftest was not loaded early enough to register the option
        opt = None
    if opt is not None:
        return int(opt)
    return int(os.environ.get("DDM_CHAOS_SEED", DEFAULT_SEED))


@pytest.fixture
def rng(chaos_seed, request) -> random.Random:
    """A Random per test, seeded by the suite seed and the test's name (tests do not perturb each other)."""
    return random.Random(f"{chaos_seed}/{request.node.name}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.chaos_outcome = rep.outcome  # read by the report fixture's teardown


@pytest.fixture
def report(chaos_seed, request):
    """The test's ChaosReport; its figures are emitted after the test, with the test's outcome."""
    rep = ChaosReport(request.node.name, chaos_seed)
    yield rep
    rep.emit(getattr(request.node, "chaos_outcome", "error"))


@pytest.fixture
def net(tmp_path):
    n = LocalNet(tmp_path)
    try:
        yield n
    finally:
        n.stop_all(timeout=20)


@pytest.fixture(scope="session")
def need_netns():
    why = privileges()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")


@pytest.fixture(scope="session")
def need_mount():
    why = mount_permitted()
    if why:
        pytest.skip(f"tmpfs mounts unavailable: {why}")
