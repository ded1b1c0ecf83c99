"""Bad input at every edge: each mistake is exit code 2 and ONE line on stderr naming the problem (the field
and the file for configs), and nothing is left half-written.

Config errors run in-process (`cli.main`). `ddm-node start` errors run as real subprocesses, a few at a
time: each must exit by itself with code 2, leave no process of its own behind (DHT child, p2pd; found
by a per-case environment tag) and leave its work dir exactly as it was. Cases that fail only after the
gRPC server and the DHT are up (ports, plan hash, dataset fingerprint, node config vs plan) exercise
`Island.run`'s shutdown path.

Root reads files whatever their mode, so "unreadable identity" uses a directory and a garbage file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from ddm_node.cli import main

START_TIMEOUT = 180  # seconds a failing `ddm-node start` may take, under a loaded CPU


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def tree(path: Path) -> set[str]:
    """Every path under `path` (relative), or an empty set when it does not exist."""
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# ------------------------------------------------------------------------------------------ configs


CONFIG_CASES = [
    # (yaml, what the one line must say), at least one per section, swarm spot-checked most
    ("data: {holdout_fraction: 1.5}\n", "data.holdout_fraction must be in [0, 1)"),
    ("data: {split_seed: seven}\n", "data.split_seed must be an integer"),
    ("partition: {experts: 0}\n", "partition.experts must be >= 1"),
    ("partition: {features: dino}\n", "partition.features must be 'pca', 'dataset' or 'npy'"),
    ("partition: {features: npy}\n", "partition.features 'npy' needs partition.features_path"),
    ("model: {image_size: 0}\n", "model.image_size must be >= 1"),
    ("model: {num_classes: ten}\n", "model.num_classes must be an integer"),
    ("model: {size: huge}\n", "model.size: unknown size 'huge'"),
    ("model: {class_dropout: 1.0}\n", "model.class_dropout must be in [0, 1)"),
    ("train: {lr: 0}\n", "train.lr must be > 0"),
    ("train: {betas: [0.9]}\n", "train.betas must be a list of 2 values"),
    ("train: {bf16: yes please}\n", "train.bf16 must be true or false"),
    ("router: {steps: -1}\n", "router.steps must be >= 0"),
    ("sample: {solver: rk4}\n", "sample.solver must be 'euler' or 'heun'"),
    ("swarm: {lease_ttl: 0}\n", "swarm.lease_ttl must be > 0"),
    ("swarm: {settle: 40}\n", "swarm.settle must be in [0, lease_ttl)"),
    ("swarm: {replicas: 1.5}\n", "swarm.replicas must be an integer"),
    ("swarm: {trusted_keys: abc}\n", "swarm.trusted_keys must be a list"),
    ("swarm: {trusted_keys: [nothex]}\n", "swarm.trusted_keys must be 64-hex Ed25519 public keys"),
    ("swarm: {compress: 1}\n", "swarm.compress must be true or false"),
    ("swarm: {leese_ttl: 3}\n", "unknown config key 'swarm.leese_ttl'"),
    ("swrm: {lease_ttl: 3}\n", "unknown config key 'swrm'"),
    ("train: 5\n", "train must be a mapping"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("train: {steps: [1, 2\n", "invalid YAML"),
]


@pytest.mark.parametrize("text, needle", CONFIG_CASES, ids=[c[1][:40] for c in CONFIG_CASES])
def test_bad_config_field_is_one_line_naming_field_and_file(capsys, tmp_path, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "plan"
    assert main(["partition", "--config", str(cfg), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert needle in line and str(cfg) in line, line
    assert tree(tmp_path) == {"bad.yaml"}, "something was written"


def test_missing_config_file(capsys, tmp_path):
    assert main(["partition", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "p")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot read config" in line and "nope.yaml" in line
    assert tree(tmp_path) == set()


def test_partition_out_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert main(["partition", "--experts", "2", "--steps", "5", "--out", str(tmp_path / "file" / "plan")]) == 2
    assert "file/plan" in one_line(capsys.readouterr().err)
    assert tree(tmp_path) == {"file"}


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_missing_ensemble(capsys, tmp_path, command):
    extra = ["--out", str(tmp_path / "out" / "grid.png")] if command == "sample" else []
    assert main([command, "--ensemble", str(tmp_path / "no-bundle"), "--n", "2", *extra]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no-bundle" in line and "bundle" in line
    assert tree(tmp_path) == set()


# ------------------------------------------------------------------------------------------ ddm-node start


@dataclass
class Case:
    """One failing `ddm-node start`: arguments, what stderr must say, and the work dir's files before."""

    name: str
    args: list[str]
    needle: str
    work: Path
    before: set[str] = field(default_factory=set)
    config: str | None = None  # the --config file, which the error line must name
    returncode: int | None = None
    stderr: str = ""
    seconds: float = 0.0
    leftovers: list[str] = field(default_factory=list)


def _held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _npz_digits(path: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(path, x=d.images.astype(np.uint8), y=d.target.astype(np.int64))


def _run(case: Case, env: dict) -> Case:
    tag = uuid.uuid4().hex
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "ddm_node.cli", "start", *case.args], capture_output=True,
                             text=True, env=dict(env, DDM_BAD_INPUT_CASE=tag), timeout=START_TIMEOUT)
        case.returncode, case.stderr = res.returncode, res.stderr
    except subprocess.TimeoutExpired as exc:
        case.returncode, case.stderr = None, f"did not exit within {START_TIMEOUT}s: {exc.stderr!r}"
    case.seconds = time.monotonic() - t0
    case.leftovers = _tagged(tag)
    return case


def _tagged(tag: str, grace: float = 10.0) -> list[str]:
    """Processes still carrying the case's tag (after a grace period for exiting children); killed if found."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("DDM_BAD_INPUT_CASE") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in found if p.is_running()]
    for p in found:
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


@pytest.fixture(scope="module")
def start_cases(tmp_path_factory):
    """Build every failing start case, run them three at a time, return them by name."""
    root = tmp_path_factory.mktemp("start")
    env = dict(os.environ, OMP_NUM_THREADS="1", DDM_CACHE_DIR=str(root / "cache"))
    env.pop("GRPC_VERBOSITY", None)  # the one-line guarantee must not depend on the caller's environment
    steps = ["--experts", "2", "--steps", "5"]
    assert main(["partition", *steps, "--out", str(root / "plan")]) == 0
    for name, text in (("other", "data: {split_seed: 1}\n"), ("slowplan", "swarm: {settle: 5}\n")):
        assert main(["partition", *steps, "--out", str(root / name), "--config", str(_cfg(root, text))]) == 0
    assert main(["keygen", "--out", str(root / "key.pem")]) == 0
    from ddm_node.data.plan import Plan

    run_id = Plan.load(root / "plan").run_id
    npz = root / "digits.npz"
    _npz_digits(npz)
    assert main(["partition", *steps, "--dataset", f"npz:{npz}", "--out", str(root / "npzplan")]) == 0
    with np.load(npz) as z:  # the dataset changes after the partition: one pixel
        x, y = z["x"].copy(), z["y"]
    x[0, 0, 0] = 255 - x[0, 0, 0]
    np.savez(npz, x=x, y=y)
    (root / "garbage.pem").write_bytes(os.urandom(300))
    (root / "keydir").mkdir()
    (root / "afile").write_text("not a directory")
    other_keys = _cfg(root, "swarm: {trusted_keys: ['" + "ab" * 32 + "']}\n")
    short_ttl = _cfg(root, "swarm: {lease_ttl: 4}\n")  # valid alone; with slowplan's settle (5) it is not

    grpc_sock, dht_sock = _held_port(), _held_port()
    plan, key = ["--plan", str(root / "plan")], ["--identity", str(root / "key.pem")]
    specs = [
        ("plan dir missing", ["--plan", str(root / "no-plan"), *key], "cannot read plan"),
        ("work dir under a file", [*plan, *key], "--work-dir"),
        ("identity is a directory", [*plan, "--identity", str(root / "keydir")], "cannot read identity file"),
        ("identity is garbage", [*plan, "--identity", str(root / "garbage.pem")], "is not a PEM private key"),
        ("grpc port in use", [*plan, *key, "--grpc-port", str(grpc_sock.getsockname()[1])],
         f"cannot listen on 127.0.0.1:{grpc_sock.getsockname()[1]}"),
        ("dht port in use", [*plan, *key, "--dht-port", str(dht_sock.getsockname()[1])],
         f"cannot start the DHT on 127.0.0.1:{dht_sock.getsockname()[1]}"),
        ("plan hash differs from run id", ["--run", run_id, *key], f"expected {run_id[:16]}"),
        ("dataset changed after partition", ["--plan", str(root / "npzplan"), *key], "fingerprint"),
        ("node config changes trusted keys", [*plan, *key, "--config", str(other_keys)],
         "swarm.trusted_keys comes from the plan"),
        ("node config invalid with the plan", ["--plan", str(root / "slowplan"), *key, "--config", str(short_ttl)],
         "swarm.settle must be in [0, lease_ttl)"),
    ]
    cases = []
    for name, args, needle in specs:
        work = root / "work" / name.replace(" ", "_")
        if name == "work dir under a file":
            work = root / "afile" / "work"
        else:
            work.mkdir(parents=True)
        if name == "plan hash differs from run id":
            shutil.copy(root / "other" / "plan.json", work / "plan.json")
        config = next((a for a in args if a.endswith(".yaml")), None)
        cases.append(Case(name, [*args, "--work-dir", str(work), "--announce-file", str(work / "announce.json")],
                          needle, work, tree(work), config))
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            done = list(pool.map(lambda c: _run(c, env), cases))
    finally:
        grpc_sock.close()
        dht_sock.close()
    return {c.name: c for c in done}


def _cfg(root: Path, text: str) -> Path:
    path = root / f"cfg-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return path


START_NAMES = ["plan dir missing", "work dir under a file", "identity is a directory", "identity is garbage",
               "grpc port in use", "dht port in use", "plan hash differs from run id",
               "dataset changed after partition", "node config changes trusted keys",
               "node config invalid with the plan"]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", START_NAMES)
def test_start_fails_cleanly(start_cases, name):
    case = start_cases[name]
    print(f"{name}: exit {case.returncode} after {case.seconds:.1f}s")  # -s shows it
    assert case.returncode == 2, f"{name}: exit {case.returncode} after {case.seconds:.0f}s; stderr:\n{case.stderr}"
    line = one_line(case.stderr)
    assert line.startswith("ddm-node start: error: ") and case.needle in line, line
    if case.config is not None:
        assert case.config in line, f"the config file is not named: {line}"
    assert not case.leftovers, f"{name}: processes left behind: {case.leftovers}"
    # the one thing a failed start may add is the node's libp2p key (WORK/p2p.key), made when its DHT peer first
    # starts and kept, so that the next attempt has the same peer id (tests/test_restart.py)
    assert tree(case.work) - {"p2p.key"} == case.before, f"{name}: work dir changed: {tree(case.work) - case.before}"


PEER = "12D3KooWQkeQTmYJoQ1PLcUrL1VJuRM7WSSNFZH9CfgGARWC3sBx"  # a well-formed libp2p peer id


def _rsa_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


START_CASES = ["rsa key", "run id not hex", "initial peer", "initial peer without id", "initial peer bad ip",
               "announce host", "announce port", "leave timeout", "bad swarm field", "set run key",
               "set bad swarm value"]


@pytest.mark.parametrize("case", START_CASES)
def test_start_argument_errors_before_any_service(capsys, tmp_path, case):
    """Mistakes `ddm-node start` catches before it starts anything (in-process: nothing can leak)."""
    assert main(["keygen", "--out", str(tmp_path / "key.pem")]) == 0
    (tmp_path / "rsa.pem").write_bytes(_rsa_pem())
    (tmp_path / "node.yaml").write_text("swarm: {settle: 9, lease_ttl: 8}\n")
    capsys.readouterr()
    work = tmp_path / "work"
    base = ["start", "--plan", str(tmp_path / "plan"), "--work-dir", str(work), "--identity", str(tmp_path / "key.pem")]
    argv, needle = {
        "rsa key": (base[:-1] + [str(tmp_path / "rsa.pem")], "holds a RSAPrivateKey, not an Ed25519 key"),
        "run id not hex": (["start", "--run", "xyz", *base[3:]], "--run: 'xyz' is not a run id"),
        "initial peer": ([*base, "--initial-peers", "127.0.0.1:31337"],
                         "--initial-peers: '127.0.0.1:31337' is not a peer multiaddr; write it as "
                         "/ip4/127.0.0.1/tcp/31337/p2p/PEER_ID (the form /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."),
        "initial peer without id": ([*base, "--initial-peers", "/ip4/10.0.0.5/tcp/31337"],
                                    "it lacks the peer id: expected the form /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."),
        "initial peer bad ip": ([*base, "--initial-peers", f"/ip4/10.0.0.500/tcp/31337/p2p/{PEER}"],
                                "'10.0.0.500' is not an IP address; expected the form /ip4/1.2.3.4/tcp/31337/p2p/"),
        "announce host": ([*base, "--announce-host", "not a host!"], "--announce-host: 'not a host!' is neither"),
        "announce port": ([*base, "--announce-host", "1.2.3.4", "--announce-port", "70000"],
                          "--announce-port 70000: a TCP port is 1..65535"),
        "leave timeout": ([*base, "--leave-timeout", "-1"], "--leave-timeout -1: seconds must be in [0, 3600]"),
        "bad swarm field": ([*base, "--config", str(tmp_path / "node.yaml")],
                            f"{tmp_path / 'node.yaml'}: swarm.settle must be in [0, lease_ttl)"),
        "set run key": ([*base, "--set", "train.steps=3"],
                        "--set train.steps: start applies swarm.* and train.nproc_per_node only"),
        "set bad swarm value": ([*base, "--set", "swarm.heartbeat=fast"], "--set swarm.heartbeat must be a number"),
    }[case]
    before = tree(tmp_path)
    assert main(argv) == 2
    assert needle in one_line(capsys.readouterr().err)
    assert tree(tmp_path) == before and not work.exists()


@pytest.mark.parametrize("command", ["status", "assemble"])
def test_readers_explain_a_bad_initial_peer_in_one_line(capsys, tmp_path, command):
    """`status` and `assemble` check --initial-peers before they start a DHT peer: one line with the form."""
    argv = [command, "--initial-peers", "10.0.0.5:31337", "--run", "a" * 64]
    argv += ["--out", str(tmp_path / "bundle")] if command == "assemble" else []
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"ddm-node {command}: error: ") and "/ip4/10.0.0.5/tcp/31337/p2p/PEER_ID" in line, line
    assert not (tmp_path / "bundle").exists()
