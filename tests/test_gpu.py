"""GPU-island support that runs anywhere (latent datasets, imports without optional packages, the GPU check's
CPU path) and the CUDA checks (`pytest -m cuda`, skipped without a GPU; scripts/gpu_check.sh runs them with
--noconftest on a machine that may lack hivemind, pyyaml, cryptography, safetensors and psutil).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_node.core.errors import DDMError

REPO = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------- latents


def write_latents(root: Path, n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents like SD-VAE's * 0.18215: about unit variance, well outside [-1, 1] in the tails."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.5, size=(3, 4, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = (centers[y] + rng.normal(0, 0.5, size=(n, 4, 4, 4))).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    return x, y


def test_latents_are_memory_mapped_and_not_limited_to_unit_range(tmp_path):
    from ddm_node.data.datasets import load_dataset

    x, y = write_latents(tmp_path / "lat")
    assert np.abs(x).max() > 1.5
    ds = load_dataset(f"latents:{tmp_path / 'lat'}")
    assert isinstance(ds.x, np.memmap) and not ds.x.flags.writeable and ds.latent
    assert np.array_equal(np.asarray(ds.x), x) and np.array_equal(ds.y, y) and ds.num_classes == 3
    assert ds.fingerprint() == load_dataset(f"latents:{tmp_path / 'lat'}").fingerprint()
    only_x = load_dataset(f"latents:{tmp_path / 'lat' / 'x.npy'}")
    assert only_x.y is None and only_x.num_classes == 0 and only_x.shape == (4, 4, 4)

    bad = tmp_path / "bad"
    bad.mkdir()
    nan = x.copy()
    nan[5, 0, 0, 0] = np.nan
    np.save(bad / "x.npy", nan)
    with pytest.raises(DDMError, match="NaN"):
        load_dataset(f"latents:{bad}")
    np.save(bad / "x.npy", x.astype(np.float64))
    with pytest.raises(DDMError, match="float32"):
        load_dataset(f"latents:{bad}")
    np.save(bad / "x.npy", x[:, 0])
    with pytest.raises(DDMError, match=r"\[N,C,H,W\]"):
        load_dataset(f"latents:{bad}")
    with pytest.raises(DDMError, match="no such file"):
        load_dataset(f"latents:{tmp_path / 'nothing'}")
    # the image specs keep their [-1, 1] contract; an .npz is not a latents file (it cannot be memory-mapped)
    np.savez(tmp_path / "imgs.npz", x=x)
    with pytest.raises(DDMError, match=r"\[-1,1\]"):
        load_dataset(f"npz:{tmp_path / 'imgs.npz'}")
    with pytest.raises(DDMError, match="x.npy"):
        load_dataset(f"latents:{tmp_path / 'imgs.npz'}")


def test_latent_shard_trains_and_checkpoints(tmp_path):
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train import checkpoint as ckpt
    from ddm_node.train.expert import shard_data, train_shard
    from ddm_node.train.trainer import Trainer

    torch.set_num_threads(1)
    write_latents(tmp_path / "lat")
    spec = f"latents:{tmp_path / 'lat'}"
    cfg = load_config(overrides={"data.dataset": spec, "partition.experts": 2, "partition.pca_dim": 8,
                                 "model.image_size": 4, "model.channels": 4, "model.num_classes": 3,
                                 "model.hidden": 32, "model.depth": 1, "model.heads": 2, "model.patch_size": 2,
                                 "train.steps": 4, "train.batch_size": 8, "train.checkpoint_every": 2,
                                 "train.device": "cpu"})
    plan = make_plan(cfg, load_dataset(spec))
    data = shard_data(plan, 0)
    assert data.latent and float(data.x.abs().max()) > 1.0
    with pytest.raises(DDMError, match=r"\[-1, 1\]"):  # the image contract still holds without the flag
        Trainer(cfg.model, cfg.train, data.x, data.y)
    out = train_shard(plan, 0, tmp_path / "work", device="cpu")
    assert out.name == "step_00000004"
    expert, _ = ckpt.verify_checkpoint(out)
    assert expert.step == 4


def test_gpu_latent_configs_load():
    from ddm_node.core.config import load_config
    from ddm_node.core.model import flops_per_image

    for name, size, hidden in (("latent-b2.yaml", "B/2", 768), ("latent-xl2.yaml", "XL/2", 1152)):
        cfg = load_config(REPO / "configs" / name)
        m = cfg.model.resolved()
        assert (m.size, m.hidden, m.image_size, m.channels) == (size, hidden, 32, 4)
        assert cfg.data.dataset.startswith("latents:") and cfg.train.bf16 and cfg.train.compile
    # DiT paper: B/2 23 GFLOPs (multiply-adds) per 256x256 image = 32x32x4 latent
    b2 = flops_per_image(load_config(REPO / "configs" / "latent-b2.yaml").model)
    assert 40e9 < b2 < 50e9


# ----------------------------------------------------------------------------------------- no optional packages

BLOCK = ("yaml", "cryptography", "safetensors", "hivemind", "grpc", "psutil", "sklearn")
BLOCKER = "import sys\nfor m in {mods!r}:\n    sys.modules[m] = None  # import m now raises ImportError\n"


@pytest.mark.multiproc
def test_gpu_check_cpu_path_runs_without_optional_packages(tmp_path):
    """Ground modules, trainer, self-test and bench/gpu_check.py import on a bare torch; its CPU path runs."""
    code = BLOCKER.format(mods=BLOCK) + (
        "import ddm_node.core.config, ddm_node.core.model, ddm_node.train.trainer, ddm_node.train.distributed\n"
        "import ddm_node.train.selftest\n"
        "import runpy\n"
        f"sys.argv = ['bench/gpu_check.py', '--device', 'cpu', '--tiny', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(BLOCK) <= set(report["info"]["missing"])
    (train,) = report["training"]
    assert train["size"] == "tiny" and len(train["ours"]) == len(train["plain"]) == 2
    assert all(v > 0 for v in train["ours"] + train["plain"]) and train["ratio"] > 0
    assert report["sampling"][0]["images_per_s"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | 16 |" in md and "ours/plain" in md


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_cuda
def test_cuda_trainer_uses_bf16_compile_fused_adamw_and_tf32():
    import dataclasses

    from ddm_node.core.config import ModelConfig, TrainConfig
    from ddm_node.train.trainer import Trainer

    model = ModelConfig(size="tiny", image_size=8, channels=4, num_classes=10, hidden=64, depth=2, heads=4)
    train = TrainConfig(batch_size=64, lr=1e-3, warmup_steps=5, checkpoint_every=10, compile=True, device="cuda")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 4, 8, 8, generator=g) * 0.5, torch.randint(0, 10, (512,), generator=g)
    a = Trainer(model, train, x, y, check_range=False)
    w0 = torch.cat([p.detach().float().cpu().reshape(-1) for p in a.model.parameters()])
    assert a.device.type == "cuda" and a._bf16 and a.lazy_loss and a._forward is not a.model
    assert a.optimizer.defaults.get("fused") and torch.get_float32_matmul_precision() == "high"
    losses = []
    a.run(10, on_step=lambda s, loss: losses.append(loss))
    a.run(60)  # lazy path: no per-step sync
    assert all(v == v for v in losses)
    state = a.state_tensors()
    assert all(v.device.type == "cpu" for v in state.values()) and "rng.cuda" in state
    assert all(bool(torch.isfinite(v).all()) for k, v in state.items() if v.is_floating_point())
    # the same run without compile and with per-step losses sees the same data and noise: it moves the
    # weights the same way up to bf16 rounding (kernels differ, so not bit for bit)
    b = Trainer(model, dataclasses.replace(train, compile=False), x, y, check_range=False)
    b.lazy_loss = False
    b.run(70)
    assert torch.equal(a.state_tensors()["rng.generator"], b.state_tensors()["rng.generator"])
    wa, wb = (torch.cat([p.detach().float().cpu().reshape(-1) for p in t.model.parameters()]) for t in (a, b))
    ratio = float((wa - wb).norm() / (wa - w0).norm())
    assert ratio < 0.5, ratio


@pytest.mark.cuda
@needs_cuda
def test_cuda_ddp_selftest_under_torchrun():
    """NCCL process group, DDP on cuda:LOCAL_RANK, gloo control group: every rank ends with the same weights."""
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "ddm_node.train.selftest"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    out = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert out["backend"] == "nccl" and out["world_size"] == nproc and out["device"].startswith("cuda")
    assert all(v == v for v in out["losses"]) and out["max_rank_weight_diff"] == 0.0
