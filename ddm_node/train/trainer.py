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

On CUDA, `run()` does not wait for the GPU after every step: losses are collected as device tensors
and checked for divergence every `LOSS_CHECK_STEPS` steps and before every checkpoint, so the host
prepares the next batch while the GPU works. `train_step()` always returns the loss as a float.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import math
import time
from typing import Any, Callable

import torch

from ddm_node.core.config import Config, ModelConfig, TrainConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.model import DiT, count_params
from ddm_node.train.distributed import DistContext, all_reduce_sum, rank_slice
from ddm_node.train.flow import flow_matching_loss, sample_t

logger = logging.getLogger(__name__)

ADAM_EPS = 1e-8
# Shards up to this size live on the GPU; larger ones stay in host memory and move batch by batch.
MAX_DEVICE_DATA_BYTES = 4 << 30
# Optimizer state AdamW keeps per parameter (without amsgrad); "step" is a 0-dim float32 tensor.
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
EXTRA_INT_KEYS = ("step", "epoch", "position", "num_samples", "seed")
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


def _host(t: torch.Tensor) -> torch.Tensor:
    # On the CPU this aliases live state (no copy): callers serialise it right away.
    return t.detach().to("cpu").contiguous()


class Trainer:
    """Trains one DiT expert on in-memory samples `x` (float32 [N,C,H,W] in [-1,1]) and labels `y`."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor | None,
                 device: str | None = None, dist: DistContext | None = None, check_range: bool = True):
        """`dist`: this process's place in a DDP group (None: one process). `check_range=False` accepts data
        outside [-1, 1] (latents, e.g. SD-VAE latents * 0.18215); finiteness is still checked."""
        Config(model=model_cfg, train=train_cfg).validate()
        self.dist = dist
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
        self.x, self.y = self._check_data(x, y)
        self.num_samples = int(self.x.shape[0])
        self.lazy_loss = self.cuda  # see the module docstring; tests flip it to compare both paths

        torch.manual_seed(train_cfg.seed)  # seeds the CPU and CUDA default generators (model init)
        model = DiT(self.model_cfg)  # built on the CPU so the initial weights are the same on every device
        self.model = model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        ema_named = dict(self.ema.named_parameters())
        self._ema_params = [ema_named[n] for n in self._param_names]
        self._ddp: torch.nn.Module | None = None
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            # Same seed, same initial weights on every rank; DDP also broadcasts rank 0's at construction.
            # The only buffer (position embedding) is a constant: no need to broadcast it every forward.
            newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            no_sync_buffers = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
            self._ddp = DistributedDataParallel(self.model, device_ids=[self._device_index()] if self.cuda else None,
                                                gradient_as_bucket_view=True, **no_sync_buffers)
        opt_kwargs: dict[str, Any] = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=ADAM_EPS,
                                          weight_decay=train_cfg.weight_decay)
        if self.cuda:
            opt_kwargs["fused"] = True
        self.optimizer = torch.optim.AdamW(self._params, **opt_kwargs)

        self.seed = train_cfg.seed  # data-order seed; a loaded state brings its own
        self.gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "stream"))
        self.step = 0
        self.epoch = 0
        self.position = 0  # index of the next sample within this epoch's permutation
        self._perm: tuple[int, torch.Tensor] | None = None

        trained = self._ddp if self._ddp is not None else self.model
        self._forward: Callable[..., torch.Tensor] = trained
        self._bf16 = self.cuda and train_cfg.bf16
        if self.cuda:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
            torch.backends.cudnn.allow_tf32 = True  # the patch embedding is a convolution
            if train_cfg.compile:
                self._forward = torch.compile(trained)
        logger.info("trainer: %d params, %d samples, device %s%s%s%s", count_params(self.model), self.num_samples,
                    self.device, ", bf16" if self._bf16 else "", ", compiled" if self._forward is not trained else "",
                    f", rank {self.rank}/{self.world_size}" if dist is not None else "")

    def _device_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    # ----------------------------------------------------------------------------------------- data
    def _check_data(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.model_cfg
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
        if self.check_range and (lo < -1.001 or hi > 1.001):
            raise DDMError(f"training data must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        on_device = self.cuda and x.numel() * 4 <= MAX_DEVICE_DATA_BYTES
        x = x.to(self.device if on_device else "cpu").contiguous()
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
    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken at `step` (0-based): linear warmup, then constant."""
        warmup = self.train_cfg.warmup_steps
        if warmup > 0 and step < warmup:
            return self.train_cfg.lr * (step + 1) / warmup
        return self.train_cfg.lr

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
        if self.y is None:
            y = torch.full((b,), null, dtype=torch.long)
        else:
            y = self.y[idx]
            if self.model_cfg.class_dropout > 0:
                drop = torch.rand(b, generator=self.gen) < self.model_cfg.class_dropout
                y = torch.where(drop, torch.full_like(y, null), y)
        if self.world_size > 1:
            idx, t, eps, y = (v[self._rows] for v in (idx, t, eps, y))
        x0 = self.x[self._to_device(idx) if self.x.device.type == "cuda" else idx]
        x0, t, eps, y = (self._to_device(v) for v in (x0, t, eps, y))
        skip_sync = self._ddp is not None and not sync_grads
        with self._ddp.no_sync() if skip_sync else contextlib.nullcontext():
            with self._autocast():
                loss = flow_matching_loss(self._forward, x0, y, t, eps)
            if self.dist is None:
                (loss / self.train_cfg.grad_accum).backward()
            else:
                (loss * (self._loss_weight / self.train_cfg.grad_accum)).backward()
        if self.dist is None:
            return loss.detach()
        return loss.detach().float() * (self._rows.stop - self._rows.start)

    @torch.no_grad()
    def _update_ema(self) -> None:
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.train_cfg.ema_decay)

    def _forward_backward(self) -> torch.Tensor:
        """Set the step's lr, zero the gradients and accumulate `grad_accum` micro-batches (all-reduced across
        ranks on the last one). Returns the sum over micro-batches of the global mean loss, as a tensor."""
        lr = self.lr_at(self.step)
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
            should_stop: Callable[[], bool] | None = None) -> int:
        """Train until `step == until` or `should_stop()` (checked after each step); returns the step reached.

        `on_step(step, loss)` follows every step; `on_checkpoint(step)` every `checkpoint_every` steps.
        """
        every = self.train_cfg.checkpoint_every
        lazy = self.lazy_loss and on_step is None
        mark_time, mark_step, losses, pending = time.monotonic(), self.step, [], []
        while self.step < until:
            if lazy:
                pending.append(self._forward_backward().detach())
                self._update()
                if len(pending) >= LOSS_CHECK_STEPS:
                    losses += self._drain(pending)
            else:
                loss = self.train_step()
                losses.append(loss)
                if on_step is not None:
                    on_step(self.step, loss)
            if self.step % every == 0:
                losses += self._drain(pending)  # never checkpoint diverged weights
                rate = (self.step - mark_step) / max(time.monotonic() - mark_time, 1e-9)
                logger.info("step %d/%d loss %.4f lr %.2e (%.1f steps/s)", self.step, until,
                            sum(losses) / len(losses), self.optimizer.param_groups[0]["lr"], rate)
                mark_time, mark_step, losses = time.monotonic(), self.step, []
                if on_checkpoint is not None:
                    on_checkpoint(self.step)
            if should_stop is not None and should_stop():
                logger.info("stopping at step %d on request", self.step)
                break
        self._drain(pending)  # the caller may checkpoint now
        return self.step

    # -------------------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """model.*, ema.*, optim.<param>.<field> and rng.* tensors on the CPU, ready for safetensors.

        On a CPU trainer the tensors alias the live state: serialise them before training on.
        """
        out = {f"model.{k}": _host(v) for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": _host(v) for k, v in self.ema.state_dict().items()})
        for name, p in zip(self._param_names, self._params):
            for key, value in self.optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(float(value), dtype=torch.float32)
                out[f"optim.{name}.{key}"] = _host(value)
        out["rng.generator"] = self.gen.get_state()
        out["rng.cpu"] = torch.get_rng_state()
        if self.cuda:
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def extra_state(self) -> dict:
        """JSON-safe scalars: step, data position, optimizer hyperparameters, lr schedule position."""
        group = self.optimizer.param_groups[0]
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "lr": float(group["lr"]),
            "base_lr": float(self.train_cfg.lr),
            "warmup_steps": self.train_cfg.warmup_steps,
            "lr_position": self.step,
            "betas": [float(b) for b in group["betas"]],
            "weight_decay": float(group["weight_decay"]),
            "eps": float(group["eps"]),
        }

    def _expected(self, with_optim: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes that `load_state` requires (rng.cuda is optional)."""
        exp = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}
        exp.update({f"ema.{k}": (tuple(v.shape), v.dtype) for k, v in self.ema.state_dict().items()})
        if with_optim:
            for name, p in zip(self._param_names, self._params):
                exp[f"optim.{name}.exp_avg"] = (tuple(p.shape), p.dtype)
                exp[f"optim.{name}.exp_avg_sq"] = (tuple(p.shape), p.dtype)
                exp[f"optim.{name}.step"] = ((), torch.float32)
        exp["rng.generator"] = (tuple(self.gen.get_state().shape), torch.uint8)
        exp["rng.cpu"] = (tuple(torch.get_rng_state().shape), torch.uint8)
        return exp

    def _check_extra(self, extra: dict) -> None:
        if not isinstance(extra, dict):
            raise DDMError(f"training state: extra must be a mapping, got {type(extra).__name__}")
        for key in EXTRA_INT_KEYS:
            value = extra.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DDMError(f"training state: '{key}' must be a non-negative integer, got {value!r}")
        if extra["num_samples"] != self.num_samples:
            raise DDMError(f"training state was made on {extra['num_samples']} samples, this shard has "
                           f"{self.num_samples}: wrong shard or data")
        if extra["position"] >= self.num_samples:
            raise DDMError(f"training state: position {extra['position']} is past the {self.num_samples} samples")
        betas = extra.get("betas")
        if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
            raise DDMError(f"training state: 'betas' must be a list of 2 numbers, got {betas!r}")
        for key in ("weight_decay", "eps"):
            if not isinstance(extra.get(key), (int, float)) or isinstance(extra.get(key), bool):
                raise DDMError(f"training state: '{key}' must be a number, got {extra.get(key)!r}")

    def _check_tensors(self, tensors: dict[str, torch.Tensor], with_optim: bool) -> None:
        expected = self._expected(with_optim)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise DDMError(f"training state is missing tensor '{missing[0]}' ({len(missing)} missing)")
        unexpected = sorted(set(tensors) - set(expected) - {"rng.cuda"})
        if unexpected:
            raise DDMError(f"training state has unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected)")
        for name, (shape, dtype) in expected.items():
            got = tensors[name]
            if not isinstance(got, torch.Tensor):
                raise DDMError(f"training state: '{name}' is not a tensor")
            if tuple(got.shape) != shape or got.dtype != dtype:
                raise DDMError(f"training state: '{name}' is {got.dtype} {list(got.shape)}, expected {dtype} {list(shape)}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise DDMError(f"training state: '{name}' contains NaN or infinite values")

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        """Restore what `state_tensors` and `extra_state` saved; bad names, shapes or fields raise DDMError."""
        self._check_extra(extra)
        with_optim = extra["step"] > 0 or any(k.startswith("optim.") for k in tensors)
        self._check_tensors(tensors, with_optim)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
        self._load_optimizer(tensors, extra, with_optim)
        self.gen.set_state(tensors["rng.generator"].clone())
        torch.set_rng_state(tensors["rng.cpu"].clone())
        if self.cuda and "rng.cuda" in tensors:
            try:
                torch.cuda.set_rng_state(tensors["rng.cuda"].clone(), self.device)
            except RuntimeError as exc:  # made on another kind of GPU; training draws nothing from it
                logger.warning("could not restore the CUDA RNG state (%s); continuing", exc)
        self.step, self.epoch, self.position = extra["step"], extra["epoch"], extra["position"]
        self.seed = extra["seed"]
        self._perm = None
        logger.info("resumed at step %d (epoch %d, position %d)", self.step, self.epoch, self.position)

    def _load_optimizer(self, tensors: dict[str, torch.Tensor], extra: dict, with_optim: bool) -> None:
        saved = {"betas": tuple(float(b) for b in extra["betas"]), "weight_decay": float(extra["weight_decay"]),
                 "eps": float(extra["eps"])}
        group = self.optimizer.param_groups[0]
        changed = [k for k, v in saved.items() if (tuple(group[k]) if k == "betas" else group[k]) != v]
        if changed:
            logger.warning("optimizer %s restored from the checkpoint differ from the config", ", ".join(changed))
        sd = self.optimizer.state_dict()
        groups = [dict(g, **saved) for g in sd["param_groups"]]
        state = {}
        if with_optim:
            # cloned: loading the same tensors into two trainers must not let one train the other's state
            state = {i: {k: tensors[f"optim.{name}.{k}"].clone() for k in ADAM_STATE_KEYS}
                     for i, name in enumerate(self._param_names)}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
