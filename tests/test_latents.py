"""Latent runs (issue 15, item 1): `ddm-node encode` through a tiny random diffusers AutoencoderKL saved to a temporary
directory (nothing downloads), then partition -> 2 experts -> bundle -> `sample` writes a PNG of decoded images and
`eval` scores decoded images. The plan and the bundle name the VAE by its files' sha256; a moved or different VAE is
a one-line error. The default run encodes digits (8x8, a VAE with a factor of 2: 4x4x4 latents); the real
Fashion-MNIST run is `slow`."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from ddm_node.cli import main
from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import FASHION_MNIST_DIR, load_dataset
from ddm_node.data.plan import Plan

pytest.importorskip("diffusers", reason="the latent tests need diffusers: pip install 'ddm-node[latent]'")

TINY = [f"--set={kv}" for kv in ("model.hidden=32", "model.depth=1", "model.heads=2", "train.steps=3",
                                 "train.batch_size=16", "train.checkpoint_every=3", "train.warmup_steps=1",
                                 "train.device=cpu", "train.threads=1", "sample.steps=4")]


def tiny_vae(path, in_channels: int = 3, seed: int = 0):
    """A random AutoencoderKL of ~15k parameters with one downsampling (factor 2), saved to `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = 2
    vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        block_out_channels=(8,) * blocks, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return vae


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """digits encoded (the CLI), partitioned K=2, two experts trained 3 steps, bundled (centroid router)."""
    from ddm_node.train.expert import train_shard

    d = tmp_path_factory.mktemp("latent")
    tiny_vae(d / "vae")
    assert main(["encode", "--vae", str(d / "vae"), "--dataset", "digits", "--out", str(d / "lat"), "--batch", "512",
                 "--device", "cpu"]) == 0
    assert main(["partition", "--dataset", f"latents:{d / 'lat'}", "--experts", "2", *TINY, "--out",
                 str(d / "plan")]) == 0
    plan = Plan.load(d / "plan")
    ds = load_dataset(plan.dataset)
    for k in (0, 1):
        assert train_shard(plan, k, d / "work", dataset=ds, device="cpu") is not None
    assert main(["bundle", "--plan", str(d / "plan"), "--experts", str(d / "work"), "--out", str(d / "bundle")]) == 0
    return d


def test_encode_writes_the_scaled_posterior_mean_and_names_the_vae(run):
    from diffusers import AutoencoderKL

    ds = load_dataset(f"latents:{run / 'lat'}")
    digits = load_dataset("digits")
    assert ds.latent and ds.x.shape == (1797, 4, 4, 4) and ds.x.dtype == np.float32
    assert isinstance(ds.x, np.memmap)
    assert np.array_equal(ds.y, digits.y)
    vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    with torch.no_grad():  # gray repeated to RGB; 8x8 is a multiple of the factor 2: no resize
        want = vae.encode(torch.from_numpy(digits.x[:5]).expand(-1, 3, -1, -1)).latent_dist.mode() * 0.18215
    assert torch.allclose(torch.from_numpy(np.array(ds.x[:5])), want, atol=1e-5)
    ref = ds.vae
    assert ref.source == str((run / "vae").resolve()) and ref.scaling_factor == 0.18215 and ref.shift_factor is None
    assert ref.files == {n: sha256(run / "vae" / n) for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    assert (ref.channels, ref.image_size) == (1, 8)
    made = json.loads((run / "lat" / "vae.json").read_text())
    assert made["dataset"] == "digits" and made["fingerprint"] == digits.fingerprint()


def test_plan_and_bundle_carry_the_vae_reference(run):
    plan = Plan.load(run / "plan")
    assert plan.vae == load_dataset(plan.dataset).vae
    assert Plan.from_bytes(plan.to_bytes()).vae == plan.vae  # survives the canonical bytes (the run id)
    index = json.loads((run / "bundle" / "model_index.json").read_text())
    assert index["vae"] == plan.vae.to_dict()
    assert main(["verify", str(run / "bundle"), "--allow-unsigned"]) == 0
    pixel = json.loads(Plan.load(run / "plan").to_bytes())
    pixel.pop("vae")
    assert b'"vae"' not in Plan.from_bytes(json.dumps(pixel, sort_keys=True, separators=(",", ":")).encode()).to_bytes()


def test_sample_writes_a_png_of_decoded_images(run, tmp_path, capsys):
    from PIL import Image

    from ddm_node.data.vae import open_vae

    assert main(["sample", "--ensemble", str(run / "bundle"), "--n", "9", "--out", str(tmp_path / "s.png"),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        x, images = z["x"], z["images"]
    assert x.shape == (9, 4, 4, 4) and images.shape == (9, 1, 8, 8)  # latents in, digit-shaped images out
    ref = Plan.load(run / "plan").vae
    decoded = open_vae(ref, device="cpu").decode(torch.from_numpy(x), ref)
    assert np.allclose(images, decoded.numpy(), atol=1e-6) and images.min() >= -1 and images.max() <= 1
    with Image.open(tmp_path / "s.png") as im:  # a 3x3 grid of 8x8 images, 1-pixel borders, upscaled 4x
        assert im.size == ((3 * 9 + 1) * 4,) * 2 and im.mode == "L"


def test_eval_scores_decoded_images(run, tmp_path, capsys, monkeypatch):
    from ddm_node.ensemble.bundle import load_bundle
    from ddm_node.ensemble.domain_classifier import load_classifier
    from ddm_node.ensemble.generate import bundle_eval_data
    from ddm_node.ensemble.images import bundle_vae, image_eval_data

    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path))
    capsys.readouterr()
    assert main(["eval", "--ensemble", str(run / "bundle"), "--n", "64", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(np.isfinite(scores[k]) for k in ("fd_dom", "kid", "precision", "recall")), scores
    # the domain classifier saw decoded images: 1 x 8 x 8, not 4 x 4 x 4 latents
    (cached,) = tmp_path.glob("domain-*.safetensors")
    assert load_classifier(cached).input_shape == (1, 8, 8)
    bundle = load_bundle(run / "bundle")
    data = bundle_eval_data(bundle)
    vae = bundle_vae(bundle, device="cpu")
    images = image_eval_data(vae, bundle, data)
    assert images.reference.shape == (len(data.reference), 1, 8, 8) and images.x_train.shape[1:] == (1, 8, 8)
    want = vae.decode(torch.from_numpy(np.asarray(data.reference[:4])), bundle.plan.vae).numpy()
    assert np.allclose(images.reference[:4], want, atol=1e-6)


def test_a_moved_or_different_vae_is_one_line(run, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    os.rename(run / "vae", moved)
    try:
        assert main(["sample", "--ensemble", str(run / "bundle"), "--n", "2", "--out", str(tmp_path / "a.png")]) == 2
        assert "is not there (moved? pass --vae DIR)" in one_line(capsys.readouterr().err)
        assert main(["sample", "--ensemble", str(run / "bundle"), "--n", "2", "--out", str(tmp_path / "b.png"),
                     "--vae", str(moved)]) == 0
        assert (tmp_path / "b.png").is_file()
        capsys.readouterr()
        other = tmp_path / "other"
        shutil.copytree(moved, other)
        tiny_vae(other, seed=1)  # same config, other weights
        assert main(["eval", "--ensemble", str(run / "bundle"), "--n", "4", "--vae", str(other)]) == 2
        line = one_line(capsys.readouterr().err)
        assert "is not the one that made these latents: diffusion_pytorch_model.safetensors" in line, line
        assert main(["sample", "--ensemble", str(run / "bundle"), "--n", "2", "--out", str(tmp_path / "c.png"),
                     "--vae", str(tmp_path / "nowhere")]) == 2
        assert "no such directory" in one_line(capsys.readouterr().err)
        assert not (tmp_path / "a.png").exists() and not (tmp_path / "c.png").exists()
    finally:
        os.rename(moved, run / "vae")


def test_encode_bad_input_is_one_line_and_touches_nothing(run, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    for vae, needle in ((tmp_path / "none", "no such directory, and not a hub id"),
                        (tmp_path / "bad", "no weight file")):
        assert main(["encode", "--vae", str(vae), "--dataset", "digits", "--out", str(tmp_path / "o")]) == 2
        assert needle in one_line(capsys.readouterr().err)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x.npy").write_bytes(b"mine")
    assert main(["encode", "--vae", str(run / "vae"), "--dataset", "digits", "--out", str(keep)]) == 2
    assert "exists and does not hold latents of digits" in one_line(capsys.readouterr().err)
    assert (keep / "x.npy").read_bytes() == b"mine"
    assert main(["encode", "--vae", str(run / "vae"), "--dataset", f"latents:{run / 'lat'}", "--out",
                 str(tmp_path / "o")]) == 2
    assert "already holds latents" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_an_interrupted_encode_leaves_no_dataset_and_resumes(run, tmp_path):
    from ddm_node.data.datasets import Dataset
    from ddm_node.data.latents import encode_latents
    from ddm_node.data.vae import load_vae

    ds, vae = load_dataset("digits"), load_vae(str(run / "vae"))
    out = tmp_path / "lat"

    def stop_after_two(done: int) -> None:
        if done >= 600:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_latents(ds, vae, out, batch=300, on_batch=stop_after_two)
    assert not out.exists() and (tmp_path / ".lat.partial" / "progress.json").is_file()
    done = encode_latents(ds, vae, out, batch=300)
    assert done.resumed_at == 600 and done.n == 1797 and not (tmp_path / ".lat.partial").exists()
    assert np.array_equal(np.load(out / "x.npy"), np.load(run / "lat" / "x.npy"))
    assert (out / "vae.json").read_bytes() == (run / "lat" / "vae.json").read_bytes()
    again = encode_latents(ds, vae, out, batch=300)
    assert again.already
    with pytest.raises(DDMError, match="multiple of the VAE's downsampling factor 2"):
        encode_latents(ds, vae, tmp_path / "odd", size=9)
    small = Dataset("digits", ds.x[:16], ds.y[:16], None, 10)  # --size 16: 8x8 images resized, 4x8x8 latents
    up = encode_latents(small, vae, tmp_path / "up", size=16)
    ref = load_dataset(f"latents:{up.path}").vae
    assert up.shape == (4, 8, 8) and ref.image_size == 16
    assert vae.decode(torch.from_numpy(np.load(up.path / "x.npy")), ref).shape == (16, 1, 16, 16)


def test_a_hub_id_resolves_to_its_cached_snapshot(run, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from ddm_node.data.vae import load_vae

    revision = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "snapshots" / revision
    shutil.copytree(run / "vae", snap / "vae")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=(): asked.append((repo, allow_patterns)) or snap)
    vae = load_vae("someone/pipeline/vae")
    assert (vae.source, vae.revision, vae.directory) == ("someone/pipeline/vae", revision, snap / "vae")
    assert asked == [("someone/pipeline", ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"])]
    shutil.rmtree(snap / "vae")
    tiny_vae(snap / "vae").save_pretrained(snap / "vae", safe_serialization=False)
    (snap / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    asked.clear()  # a repo without safetensors: the .bin, asked for only then
    assert load_vae("someone/pipeline/vae").files.keys() == {"config.json", "diffusion_pytorch_model.bin"}
    assert [a[1][1] for a in asked] == ["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"]


@pytest.mark.parametrize("field, value, needle", [
    ("files", {"config.json": "ab" * 32}, "files must map"),
    ("scaling_factor", 0, "scaling_factor must be a positive number"),
    ("revision", "main", "revision must be null or a 40-character commit hash"),
    ("extra", 1, "needs exactly the keys"),
])
def test_a_tampered_plan_vae_is_refused(run, field, value, needle):
    raw = json.loads(Plan.load(run / "plan").to_bytes())
    raw["vae"][field] = value
    with pytest.raises(DDMError, match=needle):
        Plan.from_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.slow
def test_fashion_mnist_latent_run_end_to_end(tmp_path, capsys, one_torch_thread):
    """The issue's Done line on the real data: all 60,000 Fashion-MNIST images through the tiny VAE (28x28 ->
    4x14x14), 2 experts, a bundle, a PNG of decoded 28x28 images, finite scores of decoded images."""
    directory = os.environ.get("DDM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    if not any(os.path.isfile(os.path.join(directory, f"train-images-idx3-ubyte{s}")) for s in (".gz", "")):
        pytest.skip(f"dataset-fashion-mnist is not installed in {directory} (apt-get install dataset-fashion-mnist)")
    from ddm_node.train.expert import train_shard

    tiny_vae(tmp_path / "vae")
    assert main(["encode", "--vae", str(tmp_path / "vae"), "--dataset", "fashion-mnist", "--out",
                 str(tmp_path / "lat"), "--batch", "1000", "--device", "cpu"]) == 0
    assert main(["partition", "--dataset", f"latents:{tmp_path / 'lat'}", "--experts", "2", *TINY, "--out",
                 str(tmp_path / "plan")]) == 0
    plan = Plan.load(tmp_path / "plan")
    assert plan.shape == [4, 14, 14] and plan.vae.image_size == 28
    for k in (0, 1):
        train_shard(plan, k, tmp_path / "work", device="cpu")
    assert main(["bundle", "--plan", str(tmp_path / "plan"), "--experts", str(tmp_path / "work"), "--out",
                 str(tmp_path / "bundle")]) == 0
    assert main(["sample", "--ensemble", str(tmp_path / "bundle"), "--n", "16", "--out", str(tmp_path / "s.png"),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (16, 1, 28, 28)
    capsys.readouterr()
    assert main(["eval", "--ensemble", str(tmp_path / "bundle"), "--n", "200", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(scores["fd_dom"]) and np.isfinite(scores["kid"])


def test_a_latent_bundle_exports_with_its_vae_and_the_pipeline_decodes_images(run, tmp_path):
    """export copies the local VAE the plan names (files hashed as recorded) into vae/, and the diffusers pipeline
    decodes its samples through it: images of the VAE's size, not latents."""
    from diffusers import DiffusionPipeline

    from ddm_node.export.diffusers_dir import export

    out = export(run / "bundle", tmp_path / "exported")
    ref = Plan.load(run / "plan").vae
    assert {name: sha256(out / "vae" / name) for name in ref.files} == ref.files
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert f"latent space of `{ref.source}`" in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1  # 4x4x4 latents decoded
    latents = pipe(batch_size=2, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, 4, 4, 4)
