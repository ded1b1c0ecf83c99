"""The expert trainer: flow matching on one shard's samples, with exact resume.

Every random draw of training (data order, t, noise, label dropout) comes from one CPU
`torch.Generator` owned by the trainer, and each epoch's permutation is derived from the seed and the
epoch number. Saving that generator's state, the epoch and the position within it therefore makes a
resumed run replay exactly the batches an uninterrupted run would have seen, on any device. On the CPU
a resumed run gives bit-identical weights; on CUDA it sees the same data and noise, but kernels are not
bit-deterministic.

Batches: each optimizer step consumes `grad_accum` micro-batches of `batch_size` samples.

Several processes (DDP, `ddm_node.train.distributed`): `batch_size` is the GLOBAL micro-batch. Every
rank draws the randomness of the whole micro-batch from the same generator and trains on its own rows,
with its loss weighted so that the all-reduced gradient is the gradient of the global mean loss. The
data order and noise are thus independent of the number of processes, and a state saved by N processes
resumes on M. Every rank keeps the EMA (it is cheap and keeps ranks interchangeable); rank 0 saves.
Saving and restoring that state is `ddm_node.train.state.TrainerState`, which the Trainer mixes in.

On CUDA, `run()` does not wait for the GPU after every step: losses are collected as device tensors
and checked for divergence every `LOSS_CHECK_STEPS` steps and before every checkpoint, so the host
prepares the next batch while the GPU works. `train_step()` always returns the loss as a float.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ddm_node.core.config import Config, ModelConfig, TrainConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.model import DiT, condition_dropout, count_params
from ddm_node.train.distributed import DistContext, all_reduce_sum, rank_slice
from ddm_node.train.flow import Teacher, flow_matching_loss, sample_t
from ddm_node.train.state import TrainerState

logger = logging.getLogger(__name__)

ADAM_EPS = 1e-8
# Shards up to this size live on the GPU; larger ones stay in host memory and move batch by batch.
MAX_DEVICE_DATA_BYTES = 4 << 30
# Without a per-step callback on CUDA, losses are read back (and checked) at least this often.
LOSS_CHECK_STEPS = 32


def resolve_device(device: str | None) -> torch.device:
    """"auto"/None -> cuda when available, else cpu; anything else must name a usable device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DDMError(f"train.device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DDMError(f"train.device is {device!r} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DDMError(f"train.device is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise DDMError(f"train.device: unsupported device type {dev.type!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed from the run seed and tags, so separate streams never share a sequence."""
    digest = hashlib.sha256(":".join(str(v) for v in (seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=16)
def power_ema_exponent(std: float) -> float:
    """EDM2's gamma for a relative std `std` (sigma_rel): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0 (Karras et al. 2024, eq. 3)."""
    t = std ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the optimizer step taken at `step` (0-based): linear warmup (`TrainConfig.warmup`), then
    constant."""
    warmup = cfg.warmup()
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, n: int) -> float:
    """Decay of the EMA update after `n` earlier updates (0-based). Neither kind remembers the initial
    weights for long: the power EMA's first update copies the weights, the fixed one warms up from 0.1."""
    if cfg.ema == "power":
        return (1.0 - 1.0 / (n + 1)) ** (power_ema_exponent(cfg.ema_std) + 1.0)
    return min(cfg.ema_decay, (1.0 + n) / (10.0 + n))


def check_data(x: torch.Tensor, y: torch.Tensor | None, cfg: ModelConfig, device: torch.device,
               check_range: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate training samples and labels for a model; returns them as float32 / int64, the samples on
    `device` when they fit there (`MAX_DEVICE_DATA_BYTES`), the labels on the host. DDMError if bad."""
    if None in (cfg.channels, cfg.image_size, cfg.num_classes):
        raise DDMError("model.image_size, channels and num_classes are unset: a plan fills them from the dataset "
                       "(data.plan.fit_model), or set them in the config")
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DDMError(f"training data must be a tensor [N, {want[0]}, {want[1]}, {want[2]}], got {shape}")
    if x.shape[0] == 0:
        raise DDMError("training data is empty (0 samples in this shard)")
    if not x.is_floating_point():
        raise DDMError(f"training data must be float32 in [-1, 1], got dtype {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise DDMError("training data contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if check_range and (lo < -1.001 or hi > 1.001):
        raise DDMError(f"training data must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    on_device = device.type == "cuda" and x.numel() * 4 <= MAX_DEVICE_DATA_BYTES
    x = x.to(device if on_device else "cpu").contiguous()
    if y is None:
        return x, None
    if cfg.num_classes == 0:
        logger.info("model is unconditional (num_classes 0): ignoring the labels")
        return x, None
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DDMError(f"labels must be a tensor [{x.shape[0]}] (one per sample), got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DDMError(f"labels must be integers, got dtype {y.dtype}")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= cfg.num_classes:
        raise DDMError(f"labels must be in [0, {cfg.num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return x, y.cpu()  # labels stay on the host: reading them from the GPU would sync every step


def check_text(text: torch.Tensor | None, n: int, cfg: ModelConfig) -> torch.Tensor | None:
    """Pooled text embeddings [n, model.text_dim] as float32 on the host, None for a model without text."""
    dim = cfg.text_dim or 0
    if not dim:
        if text is not None:
            logger.info("model has no text conditioning (model.text_dim 0): ignoring the text embeddings")
        return None
    if text is None:
        raise DDMError(f"model.text_dim is {dim} but the shard has no text embeddings (ddm-node embed-text)")
    if not isinstance(text, torch.Tensor) or tuple(text.shape) != (n, dim) or not text.is_floating_point():
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise DDMError(f"text embeddings must be float [{n}, {dim}] (one per sample, model.text_dim wide), got {shape}")
    if not bool(torch.isfinite(text).all()):
        raise DDMError("text embeddings contain NaN or infinite values")
    return text.float().cpu()


class Trainer(TrainerState):
    """Trains one DiT expert on in-memory samples `x` (float32 [N,C,H,W] in [-1,1]) and labels `y`."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor | None,
                 device: str | None = None, dist: DistContext | None = None, check_range: bool = True,
                 teacher: Teacher | None = None, text: torch.Tensor | None = None):
        """`dist`: this process's place in a DDP group (None: one process). `check_range=False` accepts data
        outside [-1, 1] (latents, e.g. SD-VAE latents * 0.18215); finiteness is still checked. `teacher`: regress
        its velocity at each (x_t, t, y) instead of the flow's own target (distillation, `flow_matching_loss`).
        `text`: pooled text embeddings [N, model.text_dim] of a text-conditioned model."""
        Config(model=model_cfg, train=train_cfg).validate()
        self.teacher, self.dist = teacher, dist
        self.world_size = dist.world_size if dist is not None else 1
        self.rank = dist.rank if dist is not None else 0
        self._rows = rank_slice(train_cfg.batch_size, self.rank, self.world_size)
        # Weight of this rank's mean loss: DDP averages gradients over ranks, rows may differ by one.
        self._loss_weight = (self._rows.stop - self._rows.start) * self.world_size / train_cfg.batch_size
        self.check_range = check_range
        self.model_cfg = model_cfg.resolved()
        self.train_cfg = train_cfg
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        self.device = resolve_device(device if device is not None else train_cfg.device)
        self.cuda = self.device.type == "cuda"
        if dist is not None and (dist.backend == "nccl") != self.cuda:
            raise DDMError(f"process group backend {dist.backend} does not fit device {self.device} (NCCL needs CUDA)")
        self.x, self.y = check_data(x, y, self.model_cfg, self.device, check_range)
        self.text = check_text(text, int(self.x.shape[0]), self.model_cfg)
        self.num_samples = int(self.x.shape[0])
        self.lazy_loss = self.cuda  # see the module docstring; tests flip it to compare both paths
        self._build_model()
        self.optimizer = self._make_optimizer()

        self.seed = train_cfg.seed  # data-order seed; a loaded state brings its own
        self.gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "stream"))
        self.step = 0
        self.ema_steps = 0  # EMA updates so far (the power EMA's n); restored on resume
        self.epoch = 0
        self.position = 0  # index of the next sample within this epoch's permutation
        self._perm: tuple[int, torch.Tensor] | None = None
        self._bf16 = self.cuda and train_cfg.bf16
        self._forward = self._make_forward()
        compiled = self._forward is not self._trained
        logger.info("trainer: %d params, %d samples, device %s%s%s%s", count_params(self.model), self.num_samples,
                    self.device, ", bf16" if self._bf16 else "", ", compiled" if compiled else "",
                    f", rank {self.rank}/{self.world_size}" if dist is not None else "")

    # ------------------------------------------------------------------------------------- building
    def _build_model(self) -> None:
        """The model, its EMA copy and, with several processes, the DDP wrapper."""
        torch.manual_seed(self.train_cfg.seed)  # seeds the CPU and CUDA default generators (model init)
        model = DiT(self.model_cfg)  # built on the CPU so the initial weights are the same on every device
        self.model = model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        ema_named = dict(self.ema.named_parameters())
        self._ema_params = [ema_named[n] for n in self._param_names]
        self._ddp = self._wrap_ddp() if self.dist is not None else None
        self._trained: torch.nn.Module = self._ddp if self._ddp is not None else self.model

    def _wrap_ddp(self) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # Same seed, same initial weights on every rank; DDP also broadcasts rank 0's at construction.
        # The only buffer (position embedding) is a constant: no need to broadcast it every forward.
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync_buffers = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
        return DistributedDataParallel(self.model, device_ids=[self._device_index()] if self.cuda else None,
                                       gradient_as_bucket_view=True, **no_sync_buffers)

    def _device_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        opt_kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=ADAM_EPS,
                                          weight_decay=cfg.weight_decay)
        if self.cuda:
            opt_kwargs["fused"] = True
        return torch.optim.AdamW(self._params, **opt_kwargs)

    def _make_forward(self) -> Callable[..., torch.Tensor]:
        """The model call of a training step; on CUDA also switches on TF32 (and compiles when configured)."""
        if not self.cuda:
            return self._trained
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True  # the patch embedding is a convolution
        return torch.compile(self._trained) if self.train_cfg.compile else self._trained

    # ----------------------------------------------------------------------------------------- data
    def _epoch_perm(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            self._perm = (self.epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm[1]

    def _next_indices(self, n: int) -> torch.Tensor:
        """The next `n` sample indices, walking per-epoch permutations (a batch may span two epochs)."""
        parts = []
        while n > 0:
            perm = self._epoch_perm()
            take = min(n, self.num_samples - self.position)
            parts.append(perm[self.position:self.position + take])
            self.position += take
            n -= take
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda or t.device.type == "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)  # pinned: the copy never blocks the host

    def _micro_batch(self, sync_grads: bool = True) -> torch.Tensor:
        """Draw a global micro-batch and its t, noise and dropped labels from the trainer's generator, keep
        this rank's rows, backprop. Returns the rows' mean loss (times the rows' count with DDP)."""
        b = self.train_cfg.batch_size
        idx = self._next_indices(b)
        t = sample_t(b, self.train_cfg.t_sampling, self.gen)
        c, h, w = self.x.shape[1:]
        eps = torch.randn((b, c, h, w), generator=self.gen, pin_memory=self.cuda)
        null = self.model_cfg.num_classes
        y = torch.full((b,), null, dtype=torch.long) if self.y is None else self.y[idx]
        drop = torch.zeros(b, dtype=torch.bool)
        if self.model_cfg.class_dropout > 0 and (self.y is not None or self.text is not None):
            drop = condition_dropout(b, self.model_cfg.class_dropout, self.gen)  # labels and text together
            y = torch.where(drop, torch.full_like(y, null), y)
        text = None if self.text is None else self.text[idx]
        if self.world_size > 1:
            idx, t, eps, y, drop = (v[self._rows] for v in (idx, t, eps, y, drop))
            text = None if text is None else text[self._rows]
        x0 = self.x[self._to_device(idx) if self.x.device.type == "cuda" else idx]
        x0, t, eps, y = (self._to_device(v) for v in (x0, t, eps, y))
        cond = {} if text is None else {"text": self._to_device(text), "text_drop": self._to_device(drop)}
        skip_sync = self._ddp is not None and not sync_grads
        with self._ddp.no_sync() if skip_sync else contextlib.nullcontext():
            with self._autocast():
                loss = flow_matching_loss(self._forward, x0, y, t, eps, self.train_cfg.objective, self.teacher, **cond)
            if self.dist is None:
                (loss / self.train_cfg.grad_accum).backward()
            else:
                (loss * (self._loss_weight / self.train_cfg.grad_accum)).backward()
        if self.dist is None:
            return loss.detach()
        return loss.detach().float() * (self._rows.stop - self._rows.start)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay_at(self.train_cfg, self.ema_steps)
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - decay)
        self.ema_steps += 1

    def _forward_backward(self) -> torch.Tensor:
        """Set the step's lr, zero the gradients and accumulate `grad_accum` micro-batches (all-reduced across
        ranks on the last one). Returns the sum over micro-batches of the global mean loss, as a tensor."""
        lr = lr_at(self.train_cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.train_cfg.grad_accum
        total = sum(self._micro_batch(sync_grads=i == accum - 1) for i in range(accum))
        if self.dist is not None:
            total = all_reduce_sum(self.dist, total) / self.train_cfg.batch_size
        return total

    def _update(self) -> None:
        if self.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.train_cfg.grad_clip)
        self.optimizer.step()
        self._update_ema()
        self.step += 1

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns their mean loss (global with DDP).

        A non-finite loss raises DDMError before the weights change.
        """
        loss = float(self._forward_backward()) / self.train_cfg.grad_accum
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise DDMError(f"training diverged: loss is {loss} at step {self.step} (lower train.lr?)")
        self._update()
        return loss

    def _drain(self, pending: list[torch.Tensor]) -> list[float]:
        """Read back losses of `_forward_backward` kept on the device (one sync); DDMError if any diverged."""
        if not pending:
            return []
        values = [v / self.train_cfg.grad_accum for v in torch.stack(pending).float().cpu().tolist()]
        first = self.step - len(pending)
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise DDMError(f"training diverged: loss is {v} at step {first + i} (lower train.lr?)")
        return values

    def run(self, until: int, on_step: Callable[[int, float], None] | None = None,
            on_checkpoint: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_losses: Callable[[int, list[float]], None] | None = None) -> int:
        """Train until `step == until` or `should_stop()` (checked after each step); returns the step reached.

        `on_step(step, loss)` follows every step; `on_checkpoint(step)` every `checkpoint_every` steps;
        `on_losses(step, losses)` whenever losses are read back (every step, or every LOSS_CHECK_STEPS steps and
        at checkpoints when they stay on the GPU): live progress that never forces a GPU sync of its own.
        """
        every = self.train_cfg.checkpoint_every
        lazy = self.lazy_loss and on_step is None
        mark_time, mark_step, losses, pending = time.monotonic(), self.step, [], []

        def read(values: list[float]) -> list[float]:
            if on_losses is not None and values:
                on_losses(self.step, values)
            return values

        while self.step < until:
            if lazy:
                pending.append(self._forward_backward().detach())
                self._update()
                if len(pending) >= LOSS_CHECK_STEPS:
                    losses += read(self._drain(pending))
            else:
                loss = self.train_step()
                losses.append(loss)
                read([loss])
                if on_step is not None:
                    on_step(self.step, loss)
            if self.step % every == 0:
                losses += read(self._drain(pending))  # never checkpoint diverged weights
                rate = (self.step - mark_step) / max(time.monotonic() - mark_time, 1e-9)
                logger.info("step %d/%d loss %.4f lr %.2e (%.1f steps/s)", self.step, until,
                            sum(losses) / len(losses), self.optimizer.param_groups[0]["lr"], rate)
                mark_time, mark_step, losses = time.monotonic(), self.step, []
                if on_checkpoint is not None:
                    on_checkpoint(self.step)
            if should_stop is not None and should_stop():
                logger.info("stopping at step %d on request", self.step)
                break
        read(self._drain(pending))  # the caller may checkpoint now
        return self.step
