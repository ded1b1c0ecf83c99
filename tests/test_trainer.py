"""Trainer: flow-matching loss, learning on digits, exact resume from saved state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load, save

from ddm_node.core.config import ModelConfig, TrainConfig
from ddm_node.core.errors import DDMError
from ddm_node.train.flow import flow_matching_loss, interpolate, sample_t
from ddm_node.train.trainer import Trainer, ema_decay_at, lr_at, power_ema_exponent

MODEL = ModelConfig(size="tiny", image_size=8, channels=1, num_classes=10, class_dropout=0.1,
                    hidden=32, depth=2, heads=2)
TRAIN = TrainConfig(batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=4, device="cpu", threads=1,
                    ema_decay=0.9, grad_clip=1.0, t_sampling="logit_normal", seed=3)


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return (x, y) if n is None else (x[:n], y[:n])


def random_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sorted(sa) == sorted(sb)
    assert any(k.startswith("optim.") for k in sa)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.extra_state() == b.extra_state()


def test_sample_t_modes():
    g = torch.Generator().manual_seed(0)
    u = sample_t(20000, "uniform", g)
    ln = sample_t(20000, "logit_normal", g)
    for t in (u, ln):
        assert t.shape == (20000,) and t.dtype == torch.float32
        assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(ln.mean()) - 0.5) < 0.02
    assert float(ln.std()) < float(u.std()) - 0.05  # logit-normal concentrates around the middle
    # same seed, same draws
    assert torch.equal(sample_t(5, "uniform", torch.Generator().manual_seed(1)),
                       sample_t(5, "uniform", torch.Generator().manual_seed(1)))
    with pytest.raises(DDMError, match="unknown t sampling"):
        sample_t(3, "cosine", g)


def test_flow_matching_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=g)
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = interpolate(x0, t, eps)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[3], eps[3])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # a model that outputs zeros has loss E[(eps - x0)^2]; the exact velocity has loss 0
    zero = flow_matching_loss(lambda x, t, y: torch.zeros_like(x), x0, None, t, eps)
    assert torch.allclose(zero, ((eps - x0) ** 2).mean())
    exact = flow_matching_loss(lambda x, t, y: eps - x0, x0, None, t, eps)
    assert float(exact) == 0.0


def test_loss_decreases_on_digits():
    x, y = digits()
    cfg = dataclasses.replace(TRAIN, t_sampling="uniform")
    trainer = Trainer(MODEL, cfg, x, y)
    losses: list[float] = []
    assert trainer.run(100, on_step=lambda s, loss: losses.append(loss)) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    # EMA follows the model and is frozen
    assert not trainer.ema.training and not any(p.requires_grad for p in trainer.ema.parameters())
    diff = [float((a - b).detach().abs().max()) for a, b in zip(trainer.model.parameters(), trainer.ema.parameters())]
    assert max(diff) > 0


def test_run_callbacks_and_stop():
    x, y = random_data()
    trainer = Trainer(MODEL, TRAIN, x, y)
    steps, ckpts = [], []
    reached = trainer.run(10, on_step=lambda s, loss: steps.append(s), on_checkpoint=ckpts.append)
    assert reached == 10 == trainer.step
    assert steps == list(range(1, 11)) and ckpts == [4, 8]
    calls = []
    reached = trainer.run(20, should_stop=lambda: (calls.append(1), len(calls) >= 3)[1])
    assert reached == 13 and len(calls) == 3
    assert trainer.run(5) == 13  # already past: nothing to do


def test_warmup_schedule_and_epochs():
    x, y = random_data(40)
    trainer = Trainer(MODEL, dataclasses.replace(TRAIN, warmup_steps=4), x, y)
    lrs = []
    for _ in range(6):
        trainer.train_step()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([TRAIN.lr * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])
    # 6 steps of 32 samples over 40 samples = 4 epochs and 32 samples in
    assert (trainer.epoch, trainer.position) == (4, 32)


def test_warmup_fraction_scales_with_the_run():
    cfg = dataclasses.replace(TRAIN, warmup_steps=50, warmup_fraction=0.1, steps=40)
    assert cfg.warmup() == 4 and dataclasses.replace(cfg, steps=400).warmup() == 40
    assert dataclasses.replace(cfg, warmup_fraction=0.0).warmup() == 50
    trainer = Trainer(MODEL, cfg, *random_data(40))
    assert [lr_at(trainer.train_cfg, s) for s in range(5)] == pytest.approx([TRAIN.lr * f for f in (0.25, 0.5, 0.75, 1, 1)])
    assert trainer.extra_state()["warmup_steps"] == 4


def test_ema_kinds_forget_the_initial_weights():
    # EDM2's table: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    power = dataclasses.replace(TRAIN, ema="power", ema_std=0.05)
    fixed = dataclasses.replace(TRAIN, ema="fixed", ema_decay=0.99)
    assert ema_decay_at(power, 0) == 0.0 and ema_decay_at(fixed, 0) == pytest.approx(0.1)
    assert ema_decay_at(fixed, 10_000) == 0.99
    # the power EMA's averaging length grows with the run: decay after n updates is (1 - 1/(n+1))^(gamma+1)
    assert 1 / (1 - ema_decay_at(power, 999)) == pytest.approx(1000 / 17.97, rel=0.01)
    # after one update the power EMA is the trained weights: nothing of the (zero-initialised) start is left
    trainer = Trainer(MODEL, power, *random_data(40))
    trainer.train_step()
    for a, b in zip(trainer.model.parameters(), trainer.ema.parameters()):
        assert torch.equal(a, b)
    trainer.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), trainer.ema.parameters()))
    assert trainer.ema_steps == 2


def _roundtrip(trainer: Trainer) -> tuple[dict, dict]:
    """State through safetensors bytes, as a checkpoint file would carry it."""
    return load(save(trainer.state_tensors())), trainer.extra_state()


@pytest.mark.parametrize("accum,dropout,mode", [(1, 0.1, "logit_normal"), (2, 0.5, "uniform")])
def test_resume_is_bit_exact(accum, dropout, mode):
    x, y = random_data(50)  # 50 samples, batch 32: epochs end mid-batch
    model_cfg = dataclasses.replace(MODEL, class_dropout=dropout)
    cfg = dataclasses.replace(TRAIN, grad_accum=accum, t_sampling=mode)
    full = Trainer(model_cfg, cfg, x, y)
    full.run(12)

    first = Trainer(model_cfg, cfg, x, y)
    first.run(5)
    tensors, extra = _roundtrip(first)
    first.run(7)  # training on afterwards must not disturb the saved copy
    torch.manual_seed(1234)  # a resumed process starts with unrelated global RNG state
    second = Trainer(model_cfg, dataclasses.replace(cfg, seed=99), x, y)
    second.load_state(tensors, extra)
    assert second.step == 5
    second.run(12)
    assert_same_state(full, second)


def test_state_without_ema_step_count_resumes_exactly():
    """States written before the EMA counted its updates (one per step) resume as if they had the count."""
    x, y = random_data(50)
    full = Trainer(MODEL, TRAIN, x, y)
    full.run(9)
    first = Trainer(MODEL, TRAIN, x, y)
    first.run(4)
    tensors, extra = _roundtrip(first)
    assert extra.pop("ema_steps") == 4
    second = Trainer(MODEL, TRAIN, x, y)
    second.load_state(tensors, extra)
    assert second.ema_steps == 4
    second.run(9)
    assert_same_state(full, second)
    with pytest.raises(DDMError, match="'ema_steps' must be an integer"):
        Trainer(MODEL, TRAIN, x, y).load_state(tensors, dict(extra, ema_steps=-1))


def test_unconditional_and_step0_state():
    x, _ = random_data(20)
    cfg = dataclasses.replace(MODEL, num_classes=0)
    a = Trainer(cfg, TRAIN, x, None)
    tensors, extra = _roundtrip(a)  # step 0: no optimizer state yet
    assert not any(k.startswith("optim.") for k in tensors)
    b = Trainer(cfg, TRAIN, x, None)
    b.load_state(tensors, extra)
    a.run(3)
    b.run(3)
    assert_same_state(a, b)


def test_bad_state_is_rejected():
    x, y = random_data()
    trainer = Trainer(MODEL, TRAIN, x, y)
    trainer.run(2)
    tensors, extra = _roundtrip(trainer)
    fresh = Trainer(MODEL, TRAIN, x, y)
    missing = dict(tensors)
    del missing["optim.backbone.x_embed.weight.exp_avg"]
    with pytest.raises(DDMError, match="missing tensor 'optim.backbone.x_embed.weight.exp_avg'"):
        fresh.load_state(missing, extra)
    with pytest.raises(DDMError, match="unexpected tensor 'model.nope'"):
        fresh.load_state({**tensors, "model.nope": torch.zeros(1)}, extra)
    bad_shape = dict(tensors, **{"ema.final.linear.bias": torch.zeros(3)})
    with pytest.raises(DDMError, match="ema.final.linear.bias"):
        fresh.load_state(bad_shape, extra)
    with pytest.raises(DDMError, match="rng.generator"):
        fresh.load_state(dict(tensors, **{"rng.generator": torch.zeros(7, dtype=torch.uint8)}), extra)
    with pytest.raises(DDMError, match="samples"):
        fresh.load_state(tensors, dict(extra, num_samples=extra["num_samples"] + 1))
    with pytest.raises(DDMError, match="'step'"):
        fresh.load_state(tensors, dict(extra, step=-1))
    with pytest.raises(DDMError, match="'position'"):
        fresh.load_state(tensors, {k: v for k, v in extra.items() if k != "position"})
    assert fresh.step == 0  # nothing was half-loaded by a rejected state
    fresh.load_state(tensors, extra)
    assert fresh.step == 2


def test_bad_inputs():
    x, y = random_data()
    with pytest.raises(DDMError, match=r"\[N, 1, 8, 8\]"):
        Trainer(MODEL, TRAIN, x[:, :, :4], y)
    with pytest.raises(DDMError, match=r"\[-1, 1\]"):
        Trainer(MODEL, TRAIN, x * 10, y)
    with pytest.raises(DDMError, match="labels must be in"):
        Trainer(MODEL, TRAIN, x, y + 10)
    with pytest.raises(DDMError, match="one per sample"):
        Trainer(MODEL, TRAIN, x, y[:3])
    with pytest.raises(DDMError, match="empty"):
        Trainer(MODEL, TRAIN, x[:0], y[:0])
    with pytest.raises(DDMError, match="grad_accum"):
        Trainer(MODEL, dataclasses.replace(TRAIN, grad_accum=0), x, y)
    with pytest.raises(DDMError, match="device"):
        Trainer(MODEL, dataclasses.replace(TRAIN, device="tpu"), x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_trains_and_state_moves_to_cpu():
    x, y = digits(256)
    cfg = dataclasses.replace(TRAIN, device="auto", threads=0)
    gpu = Trainer(MODEL, cfg, x, y)
    assert gpu.device.type == "cuda" and gpu._bf16
    losses = []
    gpu.run(30, on_step=lambda s, loss: losses.append(loss))
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    tensors, extra = _roundtrip(gpu)
    cpu = Trainer(MODEL, dataclasses.replace(cfg, device="cpu"), x, y)
    cpu.load_state(tensors, extra)  # an island on another device can take over
    for k, v in cpu.state_tensors().items():
        if not k.startswith("rng.cuda"):
            assert torch.equal(v, tensors[k]), k
    cpu.run(32)
