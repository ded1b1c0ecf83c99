"""The README's test command runs the suite in random order with the seed printed (pytest-randomly).

What the project's own configuration does, checked by running pytest on a few of its test files in a child process
with nothing but that configuration (pyproject.toml's addopts; PYTEST_ADDOPTS cleared): the header names the seed,
two seeds collect the same tests in different orders, and one seed collects them in the same order twice (so a
failure seen in CI reruns with `-p randomly --randomly-seed=N`). The dev extra installs the plugin and .ci/run runs
the plain README command (no `-p no:randomly`). Whether the whole suite passes in random order is what CI's run says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Small, import-light files with many tests: 2 seeds give different orders with near certainty.
FILES = ["tests/test_config.py", "tests/test_addresses.py"]


def pytest_run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args, *FILES], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"pytest {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


def collected(seed: int) -> list[str]:
    out = pytest_run("-q", f"--randomly-seed={seed}")  # the option exists only when the config loads the plugin
    return [line for line in out.splitlines() if "::" in line]


def test_the_configured_suite_runs_in_a_seeded_random_order_and_prints_the_seed():
    header = pytest_run()
    assert re.search(r"^Using --randomly-seed=\d+$", header, re.M), f"no seed in the header:\n{header[:600]}"
    first, second, again = collected(1), collected(2), collected(1)
    assert len(first) > 20 and sorted(first) == sorted(second), (len(first), len(second))
    assert first != second, "seeds 1 and 2 collect the tests in the same order: the order is not random"
    assert first == again, "one seed gave two orders: a failure could not be rerun in its order"


def test_the_dev_extra_and_ci_keep_random_order():
    project = (REPO / "pyproject.toml").read_text()  # read as text: tomllib is not in Python 3.10
    dev = re.search(r"^dev = \[(.*?)\]$", project, re.M | re.S)
    assert dev and '"pytest-randomly' in dev.group(1), "the dev extra must install pytest-randomly"
    assert re.search(r'^addopts = ".*-p randomly"$', project, re.M), "addopts must load pytest-randomly (-p randomly)"
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^\.venv/bin/pytest$", ci, re.M) and "no:randomly" not in ci, "CI must run the README command"
