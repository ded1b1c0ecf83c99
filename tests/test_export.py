"""`ddm-node export --format diffusers` and `push`: the exported directory loads in diffusers, and its pipeline samples
what our sampler samples (same noise, labels, steps, Euler, top-1 routing) to float tolerance, for the centroid and
the learned router. The tiny bundle is trained for 2 steps per expert and then given random weights (re-sealed), so
that experts and router are far from their zero initialisation and a wrong mapping shows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from ddm_node.core.config import SampleConfig  # noqa: E402
from ddm_node.core.errors import DDMError  # noqa: E402

STEPS = 6


@dataclass
class TinyRun:
    bundle: Path  # 3 experts (shards 0, 1, 2) and a learned router
    partial: Path  # shards 0 and 2 only, centroid router


def _randomize(directory: Path, name: str, seed: int) -> None:
    """Replace an artifact's weights with random ones of the same shapes and seal it again (unsigned)."""
    from safetensors.torch import load_file, save_file

    from ddm_node.core.manifest import FileEntry, read_manifest, seal

    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(directory / name))
    save_file({k: (torch.randn(v.shape, generator=gen) * 0.3).to(v.dtype) for k, v in weights.items()},
              str(directory / name))
    m = read_manifest(directory)
    m.files = {f: FileEntry("", 0) for f in m.files}
    m.publisher, m.created = "", 0.0
    seal(directory, m)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread) -> TinyRun:
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.ensemble.bundle import sources_from_work_dirs, write_bundle
    from ddm_node.train import checkpoint as ckpt
    from ddm_node.train.expert import train_shard
    from ddm_node.train.router_job import train_plan_router

    root = tmp_path_factory.mktemp("export")
    cfg = load_config(overrides={"model.hidden": 16, "model.depth": 1, "model.heads": 2, "partition.experts": 3,
                                 "train.steps": 2, "train.batch_size": 8, "train.checkpoint_every": 2,
                                 "train.warmup_steps": 1, "router.steps": 2, "router.batch_size": 8,
                                 "router.size": "tiny", "router.max_patch": 4})
    ds = load_dataset(cfg.data.dataset)
    plan = make_plan(cfg, ds)
    work = root / "work"
    for k in range(3):
        step_dir = train_shard(plan, k, work, dataset=ds)
        _randomize(step_dir / ckpt.EXPERT, ckpt.MODEL_FILE, seed=k)
    router = train_plan_router(plan, root / "router", dataset=ds)
    _randomize(router, "model.safetensors", seed=7)
    sources = sources_from_work_dirs([work], range(3))
    run = TinyRun(root / "bundle", root / "partial")
    write_bundle(run.bundle, plan, sources, router)
    write_bundle(run.partial, plan, {k: sources[k] for k in (0, 2)})
    return run


def _load(out: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)


def _ours(bundle_dir: Path, noise: torch.Tensor, y: torch.Tensor, router: str, routing: str = "top1",
          cfg_scale: float = 1.0) -> torch.Tensor:
    from ddm_node.ensemble.bundle import load_bundle
    from router.sampler import sample

    bundle = load_bundle(bundle_dir)
    velocity = bundle.velocity(SampleConfig(steps=STEPS, solver="euler", routing=routing, router=router,
                                            cfg_scale=cfg_scale))
    return sample(velocity, noise, STEPS, "euler", y)


def _tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("router", ["learned", "centroid"])
def test_exported_pipeline_samples_what_our_sampler_samples(tiny, tmp_path, router):
    from ddm_node.export.diffusers_dir import export

    before = _tree_hash(tiny.bundle)
    out = export(tiny.bundle, tmp_path / "hf", router=router)
    assert _tree_hash(tiny.bundle) == before  # the bundle is only read
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "DDMEnsemblePipeline_0_1_2"]
    assert index["expert_1"] == ["ddm_dit", "DDMDiTTransformer2DModel"] and index["vae"] == [None, None]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"
    card = (out / "README.md").read_text()
    assert json.loads((tiny.bundle / "model_index.json").read_text())["run_id"] in card

    pipe = _load(out)
    assert type(pipe.router).__name__ == {"learned": "DDMLearnedRouter", "centroid": "DDMCentroidRouter"}[router]
    n = 6
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((n, 1, 8, 8), generator=gen)
    y = torch.tensor([0, 1, 2, 3, 9, 10])  # 10: the null class
    want = _ours(tiny.bundle, noise, y, router)
    chosen: set[int] = set()
    log_probs = pipe.router.log_probs

    def spy(x, t, y):
        logp = log_probs(x, t, y)
        chosen.update(logp.argmax(1).tolist())
        return logp

    pipe.router.log_probs = spy
    got = pipe(class_labels=y, latents=noise.clone(), num_inference_steps=STEPS, output_type="latent").images
    assert got.shape == want.shape == (n, 1, 8, 8)
    assert want.abs().max() > 1.0  # the experts are far from their zero initialisation
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(chosen) > 1  # several experts took part: the routing is exercised, not one expert's flow
    # the router itself, beyond the argmax: the same log p(k | x_t, t, y) at several times
    from ddm_node.ensemble.bundle import load_bundle

    ours = load_bundle(tiny.bundle).router(router)
    for t in (0.05, 0.3, 0.7):
        x_t = (1 - t) * want.clamp(-1, 1) + t * noise
        tt = torch.full((n,), t)
        torch.testing.assert_close(log_probs(x_t, tt, y), ours.log_probs(x_t, tt, y), rtol=1e-4, atol=1e-4)


def test_generator_guidance_and_images(tiny, tmp_path):
    """A seeded generator draws our noise (torch.randn of the same seed), guidance matches our Expert's, and the
    default output is n PIL images of the run's size."""
    from ddm_node.export.diffusers_dir import export

    pipe = _load(export(tiny.partial, tmp_path / "hf"))
    y = torch.tensor([4, 5, 10])
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(11))
    want = _ours(tiny.partial, noise, y, "centroid", cfg_scale=2.5)
    got = pipe(class_labels=y, generator=torch.Generator().manual_seed(11), num_inference_steps=STEPS,
               guidance_scale=2.5, output_type="latent").images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (8, 8)


def test_export_refuses_bad_input(tiny, tmp_path, capsys):
    from ddm_node.cli import main

    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["export", "--ensemble", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "is nope an ensemble"),
        (["export", "--ensemble", str(tiny.partial), "--format", "onnx", "--out", str(tmp_path / "b")], "onnx"),
        (["export", "--ensemble", str(tiny.partial), "--out", str(existing)], "already exists"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err.replace(str(tmp_path) + "/", ""), err
    assert (existing / "keep.txt").read_text() == "mine" and sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_missing_diffusers_is_one_line(monkeypatch):
    import sys

    from ddm_node.export.diffusers_dir import require_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(DDMError, match=r"pip install 'ddm-node\[latent\]'"):
        require_diffusers()


class FakeHub:
    """A local stand-in for the hub's HTTP API (HF_ENDPOINT points at it): create a repo, pre-upload (every file
    "regular": sent inline in the commit), commit. Records every request and the files each commit carried."""

    def __init__(self):
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.calls: list[str] = []
        self.files: dict[str, bytes] = {}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append(f"POST {self.path}")
                if self.path == "/api/repos/create":
                    doc = json.loads(raw)
                    return self._reply(200, {"url": f"{hub.url}/{doc.get('organization', 'me')}/{doc['name']}"})
                if self.path == "/api/validate-yaml":  # the model card's front matter
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(raw)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/me/tiny/commit/{'a' * 40}",
                                             "commitOid": "a" * 40})
                return self._reply(404, {"error": "not here"})

            def do_GET(self):
                hub.calls.append(f"GET {self.path}")
                return self._reply(404, {"error": "not here"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_push_uploads_every_file_to_the_endpoint(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    from ddm_node.cli import main
    from ddm_node.export.diffusers_dir import export

    out = export(tiny.partial, tmp_path / "hf", router="centroid")
    hub = FakeHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the suite runs offline; this is local
        assert main(["push", str(out), "--repo", "me/tiny", "--token", "hf_test"]) == 0, capsys.readouterr().err
    finally:
        hub.close()
    assert capsys.readouterr().out.strip().endswith("a" * 40)
    assert hub.calls[0] == "POST /api/repos/create"
    sent = {p: hashlib.sha256(b).hexdigest() for p, b in hub.files.items()}
    assert sent == _tree_hash(out)  # every file of the export, byte for byte

    capsys.readouterr()  # a directory that is not an export, and a dead endpoint: one line each
    assert main(["push", str(tiny.partial), "--repo", "me/tiny"]) == 2
    assert "not a ddm-node export" in capsys.readouterr().err
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # closed now: connection refused
    assert main(["push", str(out), "--repo", "me/tiny", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "push to me/tiny" in err, err


@pytest.mark.parametrize("change, needle", [({"objectives": {1: "epsilon"}}, "expert 1 predicts epsilon"),
                                            ({"distilled_from": {"run": "x"}}, "distilled bundle")])
def test_export_refuses_what_the_pipeline_would_sample_wrongly(tiny, tmp_path, monkeypatch, change, needle):
    """The exported pipeline sums routed velocities: an epsilon or x0 expert, or a student bundle, is refused."""
    import dataclasses

    from ddm_node.core.errors import DDMError
    from ddm_node.ensemble.bundle import load_bundle
    from ddm_node.export import diffusers_dir

    monkeypatch.setattr(diffusers_dir, "load_bundle", lambda d: dataclasses.replace(load_bundle(d), **change))
    with pytest.raises(DDMError, match=needle):
        diffusers_dir.export(tiny.bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()
