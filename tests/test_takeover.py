"""A takeover is bit-exact: the island that resumes a killed island's shard from a mirrored checkpoint ends
with exactly the weights, EMA, optimizer state and random generators of a run that was never interrupted.

Two `ddm-node start` islands, one shard. Once the trainer's newest checkpoint has been mirrored by the other
island, the trainer's process group is SIGKILLed; after its lease expires the other island claims the shard,
resumes from its mirror copy and trains to the budget. Its final checkpoint (step N, written by the
takeover) is compared tensor by tensor (torch.equal) with the same plan's shard trained in this process from
step 0 to N without a stop, on the CPU with one thread like the islands.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from live_swarm import config, holds, net, of, swarm_together, timeline, wait_until  # noqa: F401
from safetensors.torch import load_file

from ddm_node.core.events import EventKind
from ddm_node.core.manifest import read_manifest
from ddm_node.core.workdir import WorkDir
from ddm_node.data.datasets import load_dataset
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import train_shard

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

N, EVERY, TTL = 600, 200, 6.0


def tensors(step_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {"expert": load_file(step_dir / ckpt.EXPERT / ckpt.MODEL_FILE),
            "state": load_file(step_dir / ckpt.STATE / ckpt.STATE_FILE)}


def uninterrupted(plan: Plan, out) -> dict[str, dict[str, torch.Tensor]]:
    """The shard trained from scratch to N in this process, one thread, the caller's RNG left as it was (torch's
    thread count and RNG are process-wide: nothing else in this process trains while it runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            final = train_shard(plan, 0, out, dataset=load_dataset(plan.dataset), device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert final == WorkDir(out).step(0, N)
    return tensors(final)


def test_takeover_from_a_mirror_is_bit_exact(net, tmp_path):  # noqa: F811
    run_id = net.partition(config(k=1, steps=N, every=EVERY, ttl=TTL, replicas=1))
    # The reference run uses the core that the waiting island leaves idle (islands train on one thread each).
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(uninterrupted, Plan.load(net.root / "plan"), tmp_path / "reference")
        with swarm_together(net, run_id, 2) as ((a, b), _):
            check_takeover(net, tmp_path, a, b, reference.result)


def check_takeover(net, tmp_path, a, b, reference_result) -> None:  # noqa: F811
    def mirrored(ev):
        """(trainer, taker, step): the trainer's newest checkpoint short of N is held by the other island."""
        cps = of(ev, EventKind.CHECKPOINT, shard=0)
        if not cps or cps[-1].step >= N:
            return None
        trainer, taker = (a, b) if cps[-1].name == a.name else (b, a)
        return (trainer, taker, cps[-1].step) if holds(taker.work, 0, cps[-1].step) else None

    trainer, taker, mirrored_step = wait_until(net, mirrored, 120, "a mirrored checkpoint short of the budget")
    net.kill(trainer)  # SIGKILL of its process group: no stop checkpoint, no release
    t_kill = time.time()
    published = max(e.step for e in of(timeline(net), EventKind.CHECKPOINT, name=trainer.name, shard=0))
    trainer_key = read_manifest(WorkDir(trainer.work).step(0, mirrored_step) / ckpt.EXPERT).publisher

    done = wait_until(net, lambda ev: next(iter(of(ev, EventKind.DONE, name=taker.name, shard=0)), None),
                      120 + 4 * TTL, f"{taker.name} to take shard 0 over and finish it")
    ev = timeline(net)
    resume = of(ev, EventKind.RESUME, name=taker.name, shard=0, after=t_kill)
    assert len(resume) == 1 and resume[0].publisher == trainer_key[:12], resume
    resumed = resume[0].step
    assert mirrored_step <= resumed <= published and resumed < N and done.step == N, (mirrored_step, resumed, published)
    taken = WorkDir(taker.work).step(0, N)
    expert, _ = ckpt.verify_checkpoint(taken, require_signature=True)
    assert expert.publisher != trainer_key  # written by the takeover, not copied from the trainer

    reference = reference_result(timeout=600)
    got = tensors(taken)
    for part in ("expert", "state"):
        assert sorted(got[part]) == sorted(reference[part]), part
        differ = [name for name, t in reference[part].items()
                  if t.dtype != got[part][name].dtype or not torch.equal(t, got[part][name])]
        assert not differ, (f"takeover (resumed at {resumed}) differs from the uninterrupted run at step {N} in "
                            f"{part}: {differ[:8]}{' ...' if len(differ) > 8 else ''}")
    assert read_manifest(taken / ckpt.STATE).extra == read_manifest(WorkDir(tmp_path / "reference").step(0, N)
                                                                    / ckpt.STATE).extra
