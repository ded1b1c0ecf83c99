"""docker-compose.yml on a real Docker engine: build, a short run with one island killed mid-training, a verified
bundle, then `docker compose restart` with no container failing.

Marked `docker`: excluded from the default run and skipped unless `docker info` and `docker compose version`
answer. Run it with `pytest -m docker tests/test_compose_up.py -s` (docs/DEPLOY.md records its timings).
Extra compose files and an env file come from the environment, for engines that need them (on the project's
CI-like boxes `../shared/tools/docker-here.sh up` prints both):

    DDM_COMPOSE_FILES=/path/override.yml   (colon-separated, added after docker-compose.yml)
    DDM_COMPOSE_ENV_FILE=/path/env

The project name is unique per run, and `docker compose down -v` removes its containers, network and volumes
whatever happens (the image `ddm-node:local` is kept: it is what `docker compose up` builds anyway).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.multiproc, pytest.mark.islands]

ROOT = Path(__file__).resolve().parents[1]
ISLANDS = ["island1", "island2", "island3", "island4"]
STEPS = 300
EVAL_SAMPLES = 200  # the assembler evaluates again after the restart; 500 took > 10 min on a loaded 2-core box
BUILD_TIMEOUT = 1800.0
RUN_TIMEOUT = 1200.0  # from `up` to the assembler's exit 0 (a takeover waits one lease TTL, 30 s)
RESTART_SETTLE = 150.0  # after `docker compose restart`: every island back, the assembler done again


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        for cmd in (["docker", "info"], ["docker", "compose", "version"]):
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode != 0:
                return False
    except (OSError, subprocess.TimeoutExpired):
        return False
    return True


class Compose:
    """`docker compose` for one project: the shipped file, extra files and env file from the environment."""

    def __init__(self) -> None:
        self.project = f"ddmtest{uuid.uuid4().hex[:8]}"
        files = ["docker-compose.yml", *[f for f in os.environ.get("DDM_COMPOSE_FILES", "").split(":") if f]]
        self.base = ["docker", "compose", "-p", self.project, *[a for f in files for a in ("-f", f)]]
        if os.environ.get("DDM_COMPOSE_ENV_FILE"):
            self.base += ["--env-file", os.environ["DDM_COMPOSE_ENV_FILE"]]
        self.env = dict(os.environ, EXPERT_STEPS=str(STEPS), EVAL_SAMPLES=str(EVAL_SAMPLES))

    def __call__(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([*self.base, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            pytest.fail(f"docker compose {' '.join(args)}: exit {res.returncode}\n{res.stdout[-3000:]}"
                        f"\n{res.stderr[-3000:]}")
        return res

    def containers(self) -> dict[str, dict]:
        """service -> `docker inspect` of its container (state, exit code, restart count)."""
        ids = self("ps", "-a", "-q").stdout.split()
        if not ids:
            return {}
        out = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in json.loads(out)}

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", service, check=False).stdout

    def wait_exit(self, service: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.containers().get(service)
            if c is not None and c["State"]["Status"] == "exited":
                return c["State"]
            time.sleep(5)
        pytest.fail(f"{service} did not exit within {timeout:.0f} s; its log ends:\n{self.logs(service)[-3000:]}")


@pytest.fixture
def compose():
    if not engine_answers():
        pytest.skip("no Docker engine answers (docker info / docker compose version)")
    c = Compose()
    try:
        yield c
    finally:
        c("down", "-v", "--remove-orphans", "-t", "5", timeout=600, check=False)


@pytest.mark.timeout(3 * 3600)
def test_compose_runs_end_to_end_survives_a_killed_island_and_restarts_cleanly(compose):
    t = {}
    t0 = time.monotonic()
    compose("build", timeout=BUILD_TIMEOUT)
    t["build"] = time.monotonic() - t0
    print(f"build {t['build']:.0f} s", flush=True)

    t0 = time.monotonic()
    compose("up", "-d", timeout=600)
    # kill one island mid-training: the first one whose trainer started (its shard is taken over after the lease)
    victim = None
    while victim is None and time.monotonic() - t0 < RUN_TIMEOUT:
        victim = next((s for s in ISLANDS if "trainer:" in compose.logs(s)), None)
        time.sleep(2)
    assert victim is not None, "no island started training"
    time.sleep(3)
    compose("kill", victim)
    t["kill"] = time.monotonic() - t0
    state = compose.wait_exit("assembler", RUN_TIMEOUT)
    t["run"] = time.monotonic() - t0
    print(f"killed {victim} {t['kill']:.0f} s after up; assembler exit {state['ExitCode']} after {t['run']:.0f} s",
          flush=True)
    log = compose.logs("assembler")
    assert state["ExitCode"] == 0, f"assembler exit {state['ExitCode']}:\n{log[-3000:]}"
    assert re.search(r"4 of 4 experts", log) and "OK, 4 experts" in log, log[-3000:]
    verify = compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "ddm-node", "status", "verify", "/shared/bundle")
    assert "OK, 4 experts" in verify.stdout, verify.stdout
    taken = [s for s in ISLANDS if s != victim and re.search(r"resuming from|claimed shard", compose.logs(s))]
    assert taken, f"no island claimed work after {victim} was killed"

    # `docker compose restart`: every container comes back (the killed one too), nothing fails, nothing finished
    # is trained again (the first node back, alone, used to claim others' shards and train them from step 0)
    t0 = time.monotonic()
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    compose("restart", timeout=600)
    state = compose.wait_exit("assembler", RUN_TIMEOUT)
    t["restart"] = time.monotonic() - t0
    time.sleep(max(0.0, RESTART_SETTLE - t["restart"]))
    after = compose.containers()
    bad = {s: (c["State"]["Status"], c["State"]["ExitCode"], c["RestartCount"]) for s, c in after.items()
           if c["RestartCount"] or (s != "assembler" and c["State"]["Status"] != "running")
           or c["State"]["ExitCode"] not in (0,)}
    since_restart = {s: compose("logs", "--no-color", "--since", since, s, check=False).stdout[-2000:] for s in bad}
    assert not bad, f"containers failing after the restart (status, exit code, restarts): {bad}\n{since_restart}"
    assert state["ExitCode"] == 0
    for s in ["bootstrap", *ISLANDS]:
        assert "shard" in compose.logs(s), f"{s} logs nothing useful at INFO"
        again = compose("logs", "--no-color", "--since", since, s).stdout
        assert not re.findall(r"claimed shard|router trained", again), f"{s} trained again after the restart"
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + f"; killed {victim}")
