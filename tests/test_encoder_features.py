"""`ddm-node features` (issue 14): DINOv2 / CLIP image features with transformers, from a local directory.

The encoders are tiny randomly initialised models written with save_pretrained into a temporary directory;
tests/conftest.py sets HF_HUB_OFFLINE=1 for every test process, so nothing is ever downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the [features] extra (transformers) is not installed")
torch = pytest.importorskip("torch")

from ddm_node.cli import main  # noqa: E402
from ddm_node.data.datasets import load_dataset  # noqa: E402
from ddm_node.data.encoder import IMAGENET_MEAN, IMAGENET_STD, encode_dataset, load_encoder  # noqa: E402
from ddm_node.data.plan import Plan  # noqa: E402


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    path = tmp_path_factory.mktemp("dino")
    transformers.Dinov2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=16)
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
                           ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """40 grayscale 16x16 images in two kinds (dark with a bright square, bright), unlabeled."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (40, 16, 16), dtype=np.uint8)
    x[:20, 4:12, 4:12] = 250
    x[20:] += 180
    path = tmp_path_factory.mktemp("imgs") / "d.npz"
    np.savez(path, x=x)
    return f"npz:{path}"


def test_dinov2_features_cli_matches_the_model_and_partitions(dino_dir, images, tmp_path, capsys):
    out = tmp_path / "f.npy"
    assert main(["features", "--encoder", str(dino_dir), "--dataset", images, "--out", str(out),
                 "--batch-size", "16", "--device", "cpu"]) == 0
    f = np.load(out)
    assert f.shape == (40, 32) and f.dtype == np.float32 and np.isfinite(f).all()
    # row 0 is the model's pooled output (layer-normed CLS) for the image scaled to [0,1], RGB, 28x28, normalised
    ds = load_dataset(images)
    px = torch.from_numpy((ds.x[:1] + 1) / 2).expand(-1, 3, -1, -1)
    px = torch.nn.functional.interpolate(px, size=(28, 28), mode="bicubic", antialias=True, align_corners=False)
    px = (px.clamp(0, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model = transformers.AutoModel.from_pretrained(dino_dir).eval()
    with torch.no_grad():
        want = model(pixel_values=px).pooler_output.numpy()
    np.testing.assert_allclose(f[:1], want, rtol=1e-4, atol=1e-5)
    assert np.abs(f[0] - f[25]).max() > 1e-3  # different images, different features
    # the batch size does not change the features
    enc = load_encoder(str(dino_dir), device="cpu")
    np.testing.assert_allclose(np.load(encode_dataset(ds, enc, tmp_path / "g.npy", batch_size=7).path), f, atol=1e-5)
    # and the file partitions the dataset
    assert main(["partition", "--dataset", images, "--features", f"npy:{out}", "--experts", "2",
                 "--out", str(tmp_path / "plan")]) == 0
    plan = Plan.load(tmp_path / "plan")
    assert plan.cfg.partition.features == "npy" and sum(len(s.ids) for s in plan.shards) == 36


def test_clip_features_are_the_projected_image_embeddings(clip_dir, images, tmp_path, capsys):
    out = tmp_path / "c.npy"
    assert main(["features", "--encoder", str(clip_dir), "--dataset", images, "--out", str(out)]) == 0
    f = np.load(out)
    assert f.shape == (40, 24) and np.isfinite(f).all()  # projection_dim, not the vision width 32
    enc = load_encoder(str(clip_dir), device="cpu")
    assert enc.model_type == "clip" and enc.size == 32 and enc.mean[0] == pytest.approx(0.48145466)


@pytest.mark.parametrize("encoder, needle", [
    ("/nonexistent/encoder", "no such directory"),
    ("facebook/dinov2-small", "cannot load encoder 'facebook/dinov2-small'"),  # a hub id, offline: not cached
], ids=["missing dir", "hub id offline"])
def test_encoder_that_cannot_load_is_one_line(images, tmp_path, capsys, encoder, needle):
    out = tmp_path / "f.npy"
    assert main(["features", "--encoder", encoder, "--dataset", images, "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddm-node features: error: ") and needle in lines[0], lines
    assert not out.exists()


def test_latents_and_channel_mismatch_are_refused(dino_dir, tmp_path, capsys):
    lat = tmp_path / "lat"
    lat.mkdir()
    np.save(lat / "x.npy", np.zeros((4, 4, 8, 8), np.float32))
    assert main(["features", "--encoder", str(dino_dir), "--dataset", f"latents:{lat}", "--out",
                 str(tmp_path / "f.npy")]) == 2
    assert "holds latents" in capsys.readouterr().err
    np.savez(tmp_path / "rgba.npz", x=np.zeros((4, 4, 8, 8), np.uint8))
    assert main(["features", "--encoder", str(dino_dir), "--dataset", f"npz:{tmp_path / 'rgba.npz'}", "--out",
                 str(tmp_path / "f.npy")]) == 2
    assert "takes 3-channel images" in capsys.readouterr().err and not (tmp_path / "f.npy").exists()
