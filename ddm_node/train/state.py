"""A Trainer's training state: the tensors and JSON scalars a state artifact holds, and their checks on load.

`TrainerState` is mixed into `ddm_node.train.trainer.Trainer`: it saves and restores the model, EMA,
AdamW state, random generators and data position that the trainer owns. Everything a state brings is
checked (names, shapes, dtypes, finiteness, field types) before any of it is loaded, so a damaged or
foreign state raises a one-line DDMError instead of leaving a half-loaded trainer.
"""

from __future__ import annotations

import logging

import torch

from ddm_node.core.config import TrainConfig
from ddm_node.core.errors import DDMError

logger = logging.getLogger(__name__)

# Optimizer state AdamW keeps per parameter (without amsgrad); "step" is a 0-dim float32 tensor.
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
EXTRA_INT_KEYS = ("step", "epoch", "position", "num_samples", "seed")
MAX_EXTRA_INT = 2**62  # integers a state brings: exact in every type they reach (torch, numpy, protobuf)
MAX_HYPER = 1e6  # weight decay, eps, learning rates: far above any real value, far below float overflow
Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _host(t: torch.Tensor) -> torch.Tensor:
    # On the CPU this aliases live state (no copy): callers serialise it right away.
    return t.detach().to("cpu").contiguous()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text)} characters)"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_extra(extra: dict, num_samples: int | None) -> None:
    """DDMError unless `extra` holds the scalar fields of a state made on `num_samples` samples (any number of
    samples when None: the check a mirror can make without the shard's data).

    Every number is checked for type and range before anything converts it: a peer's `"eps": 10**400` is a
    valid JSON integer that `float()` cannot convert (OverflowError), and NaN or inf would poison training.
    Comparisons of Python ints with floats are exact, so the range checks themselves cannot overflow.
    """
    if not isinstance(extra, dict):
        raise DDMError(f"training state: extra must be a mapping, got {type(extra).__name__}")
    for key in EXTRA_INT_KEYS:
        value = extra.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EXTRA_INT:
            raise DDMError(f"training state: '{key}' must be an integer in [0, 2^62], got {_shown(value)}")
    if num_samples is not None and extra["num_samples"] != num_samples:
        raise DDMError(f"training state was made on {extra['num_samples']} samples, this shard has "
                       f"{num_samples}: wrong shard or data")
    if extra["position"] >= extra["num_samples"]:
        raise DDMError(f"training state: position {extra['position']} is past the {extra['num_samples']} samples")
    betas = extra.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise DDMError(f"training state: 'betas' must be a list of 2 numbers in [0, 1), got {_shown(betas)}")
    required = ("weight_decay", "eps")
    for key in (*required, "lr", "base_lr"):  # the learning rates are informational; checked when present
        value = extra.get(key)
        if value is None and key not in required:
            continue
        if not _is_number(value) or not 0 <= value <= MAX_HYPER:  # NaN fails the comparison
            raise DDMError(f"training state: '{key}' must be a number in [0, {MAX_HYPER:g}], got {_shown(value)}")
    for key in ("warmup_steps", "lr_position", "ema_steps"):
        value = extra.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_EXTRA_INT):
            raise DDMError(f"training state: '{key}' must be an integer in [0, 2^62], got {_shown(value)}")


def check_tensors(tensors: dict[str, torch.Tensor], expected: Expected) -> None:
    """DDMError unless `tensors` has exactly the `expected` names, shapes and dtypes (rng.cuda is optional)
    and only finite floating-point values."""
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
            raise DDMError(f"training state: '{name}' is {got.dtype} {list(got.shape)}, "
                           f"expected {dtype} {list(shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise DDMError(f"training state: '{name}' contains NaN or infinite values")


class TrainerState:
    """Saving and restoring a trainer's state; a mixin whose attributes the Trainer owns (declared below)."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # the trainer's own stream: data order, t, noise, label dropout
    device: torch.device
    cuda: bool
    train_cfg: TrainConfig
    num_samples: int
    step: int
    ema_steps: int
    epoch: int
    position: int
    seed: int
    _perm: tuple[int, torch.Tensor] | None
    _param_names: list[str]
    _params: list[torch.nn.Parameter]

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
            "warmup_steps": self.train_cfg.warmup(),
            "ema_steps": self.ema_steps,
            "lr_position": self.step,
            "betas": [float(b) for b in group["betas"]],
            "weight_decay": float(group["weight_decay"]),
            "eps": float(group["eps"]),
        }

    def _expected(self, with_optim: bool) -> Expected:
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

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        """Restore what `state_tensors` and `extra_state` saved; bad names, shapes or fields raise DDMError."""
        check_extra(extra, self.num_samples)
        with_optim = extra["step"] > 0 or any(k.startswith("optim.") for k in tensors)
        check_tensors(tensors, self._expected(with_optim))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
        self._load_optimizer(tensors, extra, with_optim)
        self._load_rng(tensors)
        self.step, self.epoch, self.position = extra["step"], extra["epoch"], extra["position"]
        # states written before the EMA counted its updates: it was updated once per step
        self.ema_steps = extra.get("ema_steps", self.step)
        self.seed = extra["seed"]
        self._perm = None
        logger.info("resumed at step %d (epoch %d, position %d)", self.step, self.epoch, self.position)

    def _load_rng(self, tensors: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(tensors["rng.generator"].clone())
        torch.set_rng_state(tensors["rng.cpu"].clone())
        if self.cuda and "rng.cuda" in tensors:
            try:
                torch.cuda.set_rng_state(tensors["rng.cuda"].clone(), self.device)
            except RuntimeError as exc:  # made on another kind of GPU; training draws nothing from it
                logger.warning("could not restore the CUDA RNG state (%s); continuing", exc)

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
