"""DDP self-test: a few steps of a small DiT on random data in every rank of a torchrun group.

    python -m torch.distributed.run --standalone --nproc-per-node N -m ddm_node.train.selftest

Rank 0 prints one JSON line: world size, backend, device, the losses, the seconds the steps took and
the largest difference of any weight between ranks (0.0: every rank took the same updates). It needs
only torch, so it also runs where pytest is missing (scripts/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist

from ddm_node.core.config import ModelConfig, TrainConfig
from ddm_node.train.distributed import DistContext, destroy_distributed, init_distributed
from ddm_node.train.trainer import Trainer


def _trainer(ctx: DistContext, device: torch.device, steps: int) -> Trainer:
    """A small class-conditional DiT on 64 random 4x16x16 samples, 8 rows per rank."""
    model = ModelConfig(size="small", image_size=16, channels=4, num_classes=10)
    train = TrainConfig(batch_size=8 * ctx.world_size, warmup_steps=2, checkpoint_every=steps, seed=1)
    train = dataclasses.replace(train, compile=False)  # compiling would take longer than the test itself
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, 16, 16, generator=g).clamp(-1, 1), torch.randint(0, 10, (64,), generator=g)
    return Trainer(model, train, x, y, device=str(device), dist=ctx)


def _rank_weight_spread(ctx: DistContext, trainer: Trainer) -> float:
    """The largest difference of any weight between ranks (min and max all-reduced over the group)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in trainer.model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    if ctx.world_size > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).abs().max())


def selftest(steps: int = 8) -> dict:
    """Join the group (torchrun's environment), train `steps` DDP steps, leave; returns what this rank saw."""
    ctx, device = init_distributed()
    ok = False
    try:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        trainer = _trainer(ctx, device, steps)
        t0 = time.perf_counter()
        losses = [trainer.train_step() for _ in range(steps)]
        seconds = time.perf_counter() - t0
        result = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(device), "losses": losses,
                  "max_rank_weight_diff": _rank_weight_spread(ctx, trainer), "seconds": seconds}
        ok = True
        return result
    finally:
        destroy_distributed(sync=ok)


if __name__ == "__main__":
    report = selftest()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report), flush=True)
