"""Text conditioning end to end on a CPU: a tiny random CLIP text encoder saved to a temporary directory embeds
captions of a digits subset, two tiny experts and a learned router train on them, and `sample --prompt` draws
images whose classifier-free guidance scale matters. Nothing downloads (conftest sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_node.cli.main import main
from ddm_node.core.config import TextConfig, load_config
from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import load_dataset
from ddm_node.data.packing import shard_rows, write_plan_packs
from ddm_node.data.plan import make_plan
from ddm_node.data.text_encoder import embed_captions, embed_prompts
from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, write_bundle
from ddm_node.train.expert import train_shard
from ddm_node.train.router_job import train_plan_router
from router.base import Cond
from router.ensemble import Expert

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "zero one two three four five six seven eight nine".split()
N = 240


def _tiny_clip(directory: Path) -> Path:
    """A random 1-layer CLIP text model with projection and a character-level CLIP tokenizer, saved offline."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(WORDS) + "digit")):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=24, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    enc = directory / "clip"
    model.save_pretrained(enc)
    tokenizer.save_pretrained(enc)
    return enc


@dataclass
class World:
    encoder: Path
    data: Path
    plan: object
    bundle: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("text")
    encoder = _tiny_clip(root)
    digits = load_dataset("digits")
    data = root / "digits"
    data.mkdir()
    np.save(data / "x.npy", digits.x[:N])  # no y.npy: the text is the only condition
    (root / "captions.txt").write_text("".join(f"digit {WORDS[d]}\n" for d in digits.y[:N]))
    assert main(["embed-text", "--encoder", str(encoder), "--captions", str(root / "captions.txt"),
                 "--out", str(data)]) == 0
    info = json.loads((data / "text.json").read_text())
    assert (info["count"], info["dim"], info["encoder"]) == (N, 16, str(encoder))
    cfg = load_config(overrides={"data.dataset": f"latents:{data}", "model.hidden": 32, "model.depth": 1,
                                 "model.heads": 2, "train.steps": 40, "train.batch_size": 32,
                                 "train.checkpoint_every": 40, "train.warmup_steps": 5, "router.steps": 30,
                                 "router.batch_size": 32, "sample.steps": 4, "sample.solver": "euler",
                                 "partition.experts": 2})
    ds = load_dataset(cfg.data.dataset)
    plan = make_plan(cfg, ds)
    work = root / "work"
    for shard in (0, 1):
        train_shard(plan, shard, work, dataset=ds)
    router = train_plan_router(plan, root / "router", dataset=ds)
    sources = sources_from_work_dirs([work], [0, 1])
    bundle = write_bundle(root / "bundle", plan, sources, router)
    return World(encoder, data, plan, bundle)


def _sample(world: World, out: Path, *flags: str) -> np.ndarray:
    npz = out.with_suffix(".npz")
    rc = main(["sample", "--ensemble", str(world.bundle), "--n", "6", "--prompt", "digit seven", "--prompt",
               "digit one", "--out", str(out), "--npz", str(npz), *flags])
    assert rc == 0 and out.is_file()
    return np.load(npz)["x"]


def test_plan_records_the_encoder_and_packs_carry_the_text(world, tmp_path):
    cfg = world.plan.cfg
    assert cfg.model.text_dim == 16
    assert cfg.text.encoder == str(world.encoder) and len(cfg.text.sha256) == 64 and cfg.text.max_length == 24
    ds = load_dataset(cfg.data.dataset)
    packed = write_plan_packs(world.plan, ds, tmp_path)
    rows = shard_rows(packed, 1, work_dir=tmp_path)  # from the pack, not the dataset
    assert rows.text is not None
    np.testing.assert_array_equal(rows.text, ds.text[packed.shards[1].ids])


def test_sample_with_prompts_cfg_scale_changes_samples(world, tmp_path, capsys):
    a = _sample(world, tmp_path / "a.png", "--cfg-scale", "1")
    b = _sample(world, tmp_path / "b.png", "--cfg-scale", "4")
    b2 = _sample(world, tmp_path / "b2.png", "--cfg-scale", "4")
    c = _sample(world, tmp_path / "c.png", "--cfg-scale", "4", "--router", "centroid")  # cannot see text: still works
    assert a.shape == (6, 1, 8, 8) and c.shape == a.shape
    np.testing.assert_array_equal(b, b2)  # same scale and seed: the same samples
    assert np.abs(a - b).mean() > 1e-3  # guidance moves the samples


def test_prompts_change_the_velocity_and_cfg_uses_the_null_text(world):
    bundle = load_bundle(world.bundle)
    model = bundle.models[0]
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.5)
    text = torch.from_numpy(embed_prompts(world.plan.cfg.text, ["digit seven", "digit one"], 16))
    guided, plain = Expert(model, 0, 3.0, text_dim=16), Expert(model, 0, 1.0, text_dim=16)
    with torch.no_grad():
        v_seven = plain(x, t, Cond(text=text[[0, 0]]))
        v_one = plain(x, t, Cond(text=text[[1, 1]]))
        assert (v_seven - v_one).abs().mean() > 1e-4  # the expert reads the text
        v_cfg, v_cond = guided(x, t, Cond(text=text)), plain(x, t, Cond(text=text))
        v_uncond = plain(x, t, None)  # no text: the learned null text
        torch.testing.assert_close(v_cfg, v_uncond + 3.0 * (v_cond - v_uncond))
        model.backbone.null_text.add_(1.0)  # the unconditional pass must go through the null text
        try:
            assert (guided(x, t, Cond(text=text)) - v_cfg).abs().mean() > 1e-4
            torch.testing.assert_close(plain(x, t, Cond(text=text)), v_cond)  # scale 1 never uses it
        finally:
            model.backbone.null_text.sub_(1.0)
        router = bundle.router("learned")
        lp_seven = router.log_probs(x, t, Cond(text=text[[0, 0]]))
        lp_one = router.log_probs(x, t, Cond(text=text[[1, 1]]))
    assert (lp_seven - lp_one).abs().max() > 1e-6  # the learned router conditions on the text too


def test_bad_text_input_is_one_line(world, tmp_path, capsys):
    lines = tmp_path / "short.txt"
    lines.write_text("digit one\n" * 5)
    with pytest.raises(DDMError, match=f"5 captions for {N} samples"):
        embed_captions(str(world.encoder), lines, world.data)
    broken = tmp_path / "broken"
    shutil.copytree(world.data, broken)
    np.save(broken / "text.npy", np.zeros((N - 1, 16), np.float32))
    with pytest.raises(DDMError, match=f"{N - 1} text embeddings for {N} samples"):
        load_dataset(f"latents:{broken}")
    cfg = load_config(overrides={"data.dataset": f"latents:{world.data}"}, sets=["model.text_dim=5"])
    with pytest.raises(DDMError, match="model.text_dim 5 contradicts the dataset's 16-wide text embeddings"):
        make_plan(cfg, load_dataset(cfg.data.dataset))
    text = world.plan.cfg.text
    with pytest.raises(DDMError, match="no such directory"):
        embed_prompts(replace(text, encoder=str(tmp_path / "gone")), ["digit one"], 16)
    with pytest.raises(DDMError, match="the run's embeddings came from an encoder"):
        embed_prompts(replace(text, sha256="0" * 64), ["digit one"], 16)
    with pytest.raises(DDMError, match="not text-conditioned"):
        embed_prompts(TextConfig(), ["digit one"], 16)
    rc = main(["sample", "--ensemble", str(world.bundle), "--n", "2", "--prompt", " ", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "empty prompts" in err and len(err.splitlines()) == 1


def test_centroid_router_routes_labeled_text_runs_on_labels_and_pixels_alone():
    from router.centroid import CentroidRouter, ClusterStats

    gen = torch.Generator().manual_seed(0)
    stats = {k: ClusterStats.from_data(torch.randn(40, 4, generator=gen) + 2 * k, 2, y=torch.arange(40) % 3,
                                       num_classes=3, calibrate=False) for k in range(2)}
    router = CentroidRouter(stats)
    x, t, y = torch.randn(5, 4, generator=gen), torch.full((5,), 0.3), torch.tensor([0, 1, 2, 0, 1])
    text = torch.randn(5, 16, generator=gen)
    torch.testing.assert_close(router.log_probs(x, t, Cond(y, text)), router.log_probs(x, t, y))
    assert (router.log_probs(x, t, y) - router.log_probs(x, t, None)).abs().max() > 1e-6  # the labels count


def test_an_expert_config_from_before_text_loads_as_text_dim_0(tmp_path):
    from ddm_node.core.config import ModelConfig, to_dict
    from ddm_node.train.checkpoint import read_model_config

    old = to_dict(ModelConfig(image_size=8, channels=1, num_classes=10).resolved())
    del old["text_dim"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_model_config(tmp_path).text_dim == 0
