"""GPU islands on the CPU: DDP over gloo with 2 processes, resume across world sizes, the torchrun supervisor
and a real island training with `--nproc-per-node 2` through a killed worker group.

Each spawned process runs with one torch thread; rank-to-rank traffic stays on loopback (GLOO_SOCKET_IFNAME=lo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddm_node.core.config import ModelConfig, TrainConfig, load_config
from ddm_node.core.errors import DDMError
from ddm_node.core.events import Event, EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.workdir import step_of
from ddm_node.train.distributed import rank_slice
from ddm_node.train.supervisor import RestartPolicy, check_devices, resolve_nproc, train_shard_distributed
from ddm_node.train.trainer import Trainer

MODEL = ModelConfig(size="tiny", image_size=8, channels=1, num_classes=10, class_dropout=0.3, hidden=32, depth=2,
                    heads=2)
# 15 = 7 + 8 rows: uneven ranks; 2 micro-batches: DDP's no_sync path
TRAIN = TrainConfig(batch_size=15, grad_accum=2, lr=2e-3, warmup_steps=2, checkpoint_every=100, device="cpu",
                    threads=1, ema_decay=0.9, grad_clip=1.0, t_sampling="logit_normal", seed=5)


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def save_state(trainer: Trainer, path: Path) -> None:
    save_file({k: v.clone() for k, v in trainer.state_tensors().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(trainer.extra_state()))


def load_state(path: Path) -> tuple[dict, dict]:
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


def assert_close_states(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if name.startswith("rng."):
            assert torch.equal(a[name], b[name]), name  # the data/noise stream is world-size independent
        else:
            worst = float((a[name] - b[name]).abs().max())
            assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, worst)


# ----------------------------------------------------------------------------------------- unit checks


def test_rank_slices_cover_the_batch_and_restarts_are_bounded(tmp_path):
    for n, world in [(15, 2), (64, 8), (7, 7), (100, 3)]:
        rows = [rank_slice(n, r, world) for r in range(world)]
        assert rows[0].start == 0 and rows[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
        assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1
    with pytest.raises(DDMError, match="cannot be split"):
        rank_slice(3, 0, 4)
    with pytest.raises(DDMError, match="cannot be split"):
        Trainer(MODEL, dataclasses.replace(TRAIN, batch_size=1), *data(), dist=_FakeCtx(2))

    policy = RestartPolicy(max_restarts=2)
    assert policy.allow(False) and policy.allow(False) and not policy.allow(False)
    policy = RestartPolicy(max_restarts=1)
    assert policy.allow(False) and policy.allow(True) and policy.allow(False) and not policy.allow(False)

    # --nproc-per-node beats the node config, which beats nothing (the plan's value then applies)
    node = tmp_path / "node.yaml"
    node.write_text("train: {nproc_per_node: 3}\n")
    assert resolve_nproc(2, node) == 2 and resolve_nproc(None, node) == 3 and resolve_nproc(None, None) is None
    node.write_text("swarm: {heartbeat: 2}\n")
    assert resolve_nproc(None, node) is None
    node.write_text("train: {nproc_per_node: 0}\n")
    with pytest.raises(DDMError, match="nproc_per_node"):
        resolve_nproc(None, node)
    with pytest.raises(DDMError, match="positive"):
        resolve_nproc(0)
    assert load_config(overrides={"train.nproc_per_node": 4}).train.nproc_per_node == 4


@dataclasses.dataclass(frozen=True)
class _FakeCtx:
    """Only for the batch-size check, which runs before anything touches a process group."""

    world_size: int
    rank: int = 0
    local_rank: int = 0
    backend: str = "gloo"
    control: object = None


def test_cuda_islands_need_enough_gpus():
    have = torch.cuda.device_count()
    with pytest.raises(DDMError, match="CUDA device"):
        check_devices(have + 1, "cuda")
    with pytest.raises(DDMError, match="LOCAL_RANK"):
        check_devices(2, "cuda:1")
    with pytest.raises(DDMError, match="positive"):
        check_devices(0, "cpu")
    check_devices(4, "cpu")


# ----------------------------------------------------------------------------------------- 2 ranks vs 1


def _ddp_job(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank job: 3 steps, save; 3 more, save; then continue the single-process step-3 state for 3 steps."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from ddm_node.train.distributed import destroy_distributed, init_distributed

    ctx, dev = init_distributed("cpu", rank=rank, world_size=world, init_method=f"file://{init_file}")
    out = Path(out)
    ok = False
    try:
        x, y = data()
        trainer = Trainer(MODEL, TRAIN, x, y, device=str(dev), dist=ctx)
        losses = [trainer.train_step() for _ in range(3)]
        if ctx.is_main:
            save_state(trainer, out / "ddp3.safetensors")
        losses += [trainer.train_step() for _ in range(3)]
        save_state(trainer, out / f"ddp6.rank{rank}.safetensors")
        (out / f"losses.rank{rank}.json").write_text(json.dumps(losses))

        resumed = Trainer(MODEL, TRAIN, x, y, device=str(dev), dist=ctx)
        resumed.load_state(*load_state(out / "single3.safetensors"))
        resumed.run(6)
        if ctx.is_main:
            save_state(resumed, out / "ddp_from_single6.safetensors")
        ok = True
    finally:
        destroy_distributed(sync=ok)


def run_ranks(job: str, world: int, *args: str, timeout: float = 300) -> None:
    """Run `job(rank, world, *args)` of this module in `world` fresh processes (plain subprocesses: unlike
    multiprocessing's spawn they leave no resource tracker behind); fail with the first rank's error."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_distributed import {job}; {job}(int(sys.argv[1]), {world}, *sys.argv[2:])")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), *args], env=env, stderr=subprocess.PIPE)
             for r in range(world)]
    try:
        errors = [p.communicate(timeout=timeout)[1].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.multiproc
@pytest.mark.islands
def test_two_processes_match_one_and_checkpoints_cross_world_sizes(tmp_path):
    torch.set_num_threads(1)
    x, y = data()
    single = Trainer(MODEL, TRAIN, x, y)
    single_losses = [single.train_step() for _ in range(3)]
    save_state(single, tmp_path / "single3.safetensors")
    single_losses += [single.train_step() for _ in range(3)]
    single6 = single.state_tensors()

    run_ranks(_ddp_job.__name__, 2, str(tmp_path / "rdzv"), str(tmp_path))

    # one step (and six) with 2 processes = one process with the same global batch, up to summation order
    ddp3, extra3 = load_state(tmp_path / "ddp3.safetensors")
    single3, single_extra3 = load_state(tmp_path / "single3.safetensors")
    assert_close_states(ddp3, single3)
    assert extra3 == single_extra3
    ddp6, extra6 = load_state(tmp_path / "ddp6.rank0.safetensors")
    assert_close_states(ddp6, single6)
    assert json.loads((tmp_path / "losses.rank0.json").read_text()) == pytest.approx(single_losses, abs=1e-5)
    # both ranks hold the very same weights and report the same all-reduced losses
    rank1, _ = load_state(tmp_path / "ddp6.rank1.safetensors")
    assert all(torch.equal(ddp6[k], rank1[k]) for k in ddp6 if not k.startswith("rng.cpu"))
    assert (tmp_path / "losses.rank0.json").read_text() == (tmp_path / "losses.rank1.json").read_text()

    # a 2-process checkpoint resumes in 1 process exactly: two 1-process continuations are bit-identical,
    # and they agree with the 2-process continuation up to summation order
    continued = []
    for seed in (0, 99):
        torch.manual_seed(seed)
        t = Trainer(MODEL, dataclasses.replace(TRAIN, seed=seed), x, y)
        t.load_state(ddp3, extra3)
        t.run(6)
        continued.append(t.state_tensors())
    assert all(torch.equal(continued[0][k], continued[1][k]) for k in continued[0])
    assert_close_states(continued[0], ddp6)

    # and a 1-process checkpoint resumes on 2 processes
    from_single, extra = load_state(tmp_path / "ddp_from_single6.safetensors")
    assert_close_states(from_single, single6)
    assert extra["step"] == 6


def test_lazy_loss_path_is_the_same_training():
    """The CUDA run loop (losses read back in batches) trains exactly like the per-step loop; here on the CPU."""
    x, y = data()
    a = Trainer(MODEL, TRAIN, x, y)
    a.run(5)
    b = Trainer(MODEL, TRAIN, x, y)
    b.lazy_loss = True
    b.run(5)
    sa, sb = a.state_tensors(), b.state_tensors()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    bad = Trainer(MODEL, dataclasses.replace(TRAIN, lr=1e30, grad_clip=0.0), x, y)
    bad.lazy_loss = True
    with pytest.raises(DDMError, match="diverged"):
        bad.run(40)


# ----------------------------------------------------------------------------------------- torchrun supervisor


@pytest.mark.multiproc
@pytest.mark.islands
def test_supervised_group_stops_with_a_final_checkpoint_and_resumes_in_one_process(tmp_path):
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train import checkpoint as ckpt
    from ddm_node.train.expert import train_shard

    torch.set_num_threads(1)
    cfg = load_config(overrides={"partition.experts": 1, "model.hidden": 32, "model.depth": 2, "model.heads": 2,
                                 "train.steps": 5000, "train.batch_size": 16, "train.checkpoint_every": 10,
                                 "train.warmup_steps": 2})
    plan = make_plan(cfg, load_dataset("digits"))
    identity = Identity.generate()
    key = tmp_path / "node.key"
    identity.save(key)
    work = tmp_path / "work"
    announced, events, stop = [], [], threading.Event()

    def on_checkpoint(step_dir: Path) -> None:
        announced.append(step_dir)
        stop.set()  # as a lost lease would: stop once the first checkpoint is out

    heard: list[tuple[int, list[float]]] = []  # rank 0's live progress, relayed through the progress file
    final = train_shard_distributed(plan, 0, work, 2, identity_path=key, device="cpu", on_checkpoint=on_checkpoint,
                                    should_stop=stop.is_set, on_event=lambda k, f: events.append((k, f)), poll=0.2,
                                    on_losses=lambda step, losses: heard.append((step, losses)))
    expert, state = ckpt.verify_checkpoint(final, require_signature=True)
    assert expert.publisher == identity.public_hex and expert.step == state.step
    assert announced and step_of(announced[0]) % 10 == 0  # the periodic checkpoint rank 0 wrote
    assert 10 <= expert.step < 5000  # stopped early, after the first checkpoint
    assert heard and all(0 < step <= expert.step for step, _ in heard)
    assert heard[0][1] and all(0 < v < 10 for _, losses in heard for v in losses)
    kinds = [k for k, _ in events]
    assert kinds == [EventKind.WORKERS_START, EventKind.WORKERS_EXIT] and events[1][1]["stopped"]
    assert all(isinstance(k, EventKind) for k in kinds)
    assert ckpt.stats_dir(work, 0).is_dir()

    # the 2-process checkpoint continues in one process
    out = train_shard(plan, 0, work, steps=expert.step + 3, identity=identity, device="cpu")
    assert out.name == f"step_{expert.step + 3:08d}"

    # a worker's own error (here an unreadable key) ends the shard with that message, without restarts
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    events.clear()
    with pytest.raises(DDMError, match="not a PEM private key"):
        train_shard_distributed(plan, 0, work, 2, identity_path=bad, device="cpu", poll=0.2,
                                on_event=lambda k, f: events.append((k, f)))
    assert [k for k, _ in events] == [EventKind.WORKERS_START, EventKind.WORKERS_EXIT]


# ----------------------------------------------------------------------------------------- a real island


ISLAND = """
partition: {experts: 1}
model: {hidden: 32, depth: 2, heads: 2}
train: {steps: 400, batch_size: 32, checkpoint_every: 50, warmup_steps: 5}
swarm: {lease_ttl: 20, settle: 1, heartbeat: 1, announce_ttl: 60, router_job: false}
"""


def _worker_pids(torchrun_pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(torchrun_pid).children()
                if "ddm_node.train.worker" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.multiproc
@pytest.mark.islands
@pytest.mark.slow  # 90-150 s of torchrun start-ups on 2 cores: run with -m slow
def test_island_with_two_processes_trains_to_budget_through_a_killed_worker(tmp_path):
    from ddm_node.cli.localnet import LocalNet
    from ddm_node.train import checkpoint as ckpt

    net = LocalNet(tmp_path)
    try:
        net.partition(ISLAND)
        island = net.start("gpu-island", "--plan", str(net.root / "plan"), "--nproc-per-node", "2")

        def first_checkpoint_and_group(ev: list[Event]):
            starts = [e for e in ev if e.kind is EventKind.WORKERS_START]
            ckpts = [e for e in ev if e.kind is EventKind.CHECKPOINT]
            return starts and ckpts and (starts[-1], ckpts[-1])

        start, first = net.wait_for(first_checkpoint_and_group, 240, "the first checkpoint of the worker group")
        assert start.nproc == 2 and start.attempt == 1
        pids = _worker_pids(start.pid)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)  # one rank crashes: torchrun ends the group, the daemon restarts it

        ev = net.wait_for(lambda ev: any(e.kind is EventKind.DONE for e in ev) and ev, 300, "the shard's budget")
        restarts = [e for e in ev if e.kind is EventKind.WORKERS_START and e.attempt == 2]
        assert restarts and restarts[0].resume_step >= first.step >= 50  # not from scratch
        assert [e.step for e in ev if e.kind is EventKind.TRAIN] == [0, restarts[0].resume_step]
        crashed = next(e for e in ev if e.kind is EventKind.WORKERS_EXIT and e.attempt == 1)
        assert crashed.code != 0 and not crashed.stopped
        assert next(e for e in ev if e.kind is EventKind.DONE).step == 400
        steps = [e.step for e in ev if e.kind is EventKind.CHECKPOINT]
        assert steps == sorted(steps) and steps[-1] == 400  # announced by the daemon as rank 0 wrote them
        final = ckpt.latest_checkpoint(island.work, 0, require_signature=True)
        assert final.name == "step_00000400"
        owner = Identity.load(net.key("gpu-island")).public_hex
        assert ckpt.verify_checkpoint(final, require_signature=True)[0].publisher == owner
        assert not _worker_pids(start.pid)
        codes = net.stop_all()
        assert codes["gpu-island"] == 0
    finally:
        net.stop_all()
