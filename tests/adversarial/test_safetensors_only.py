"""A pickle where safetensors belongs: correctly signed, intact, and still never unpickled.

The attack: a peer seals (with its own valid key) an artifact whose `*.safetensors` file is a pickle (raw,
or torch.save's zip) that would create a marker file when unpickled. Signature and hashes verify, so
only the loaders stand between it and code execution. Every loader must fail with a one-line
IntegrityError, and the marker must never appear.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from ddm_node.cli import main
from ddm_node.core.errors import IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import verify_artifact
from ddm_node.ensemble.bundle import ExpertSource, load_bundle, verify_bundle, write_bundle
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.router_job import load_router

from .evil_peer import _Boom, pickle_payload, seal_copy


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, request):
    """A real checkpoint, stats and router of a tiny plan, signed by an honest key."""
    from ddm_node.core.config import load_config
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train.expert import train_shard
    from ddm_node.train.router_job import train_plan_router

    root = tmp_path_factory.mktemp("genuine")
    cfg = load_config(overrides={"model.hidden": 32, "model.depth": 2, "model.heads": 2, "train.steps": 2,
                                 "train.batch_size": 16, "train.checkpoint_every": 2, "train.warmup_steps": 1,
                                 "router.batch_size": 16, "partition.experts": 2})
    ds = load_dataset("digits")
    plan = make_plan(cfg, ds)
    honest = Identity.generate()
    step = train_shard(plan, 0, root / "work", identity=honest, dataset=ds)
    router = train_plan_router(plan, root / "router", steps=2, identity=honest, dataset=ds)
    return {"plan": plan, "cfg": cfg, "ds": ds, "step": step, "stats": ckpt.stats_dir(root / "work", 0),
            "router": router}


def torch_zip_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": _Boom(str(marker))}, buf)
    return buf.getvalue()


PAYLOADS = {"pickle": pickle_payload, "torch.save": torch_zip_payload}


def one_line_integrity(exc_info, needle: str) -> str:
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, IntegrityError) and "\n" not in msg and needle in msg, msg
    return msg


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_every_loader_refuses_a_signed_pickle(genuine, tmp_path, payload):
    marker = tmp_path / "UNPICKLED"
    evil = Identity.generate()
    bad = PAYLOADS[payload](marker)
    expert = tmp_path / "expert"
    seal_copy(genuine["step"] / ckpt.EXPERT, expert, evil, {ckpt.MODEL_FILE: bad})
    state = tmp_path / "state"
    seal_copy(genuine["step"] / ckpt.STATE, state, evil, {ckpt.STATE_FILE: bad})
    stats = tmp_path / "stats"
    seal_copy(genuine["stats"], stats, evil, {ckpt.STATS_FILE: bad})
    router = tmp_path / "router"
    seal_copy(genuine["router"], router, evil, {"model.safetensors": bad})
    for d in (expert, state, stats, router):  # the premise: signature and hashes are fine
        assert verify_artifact(d, require_signature=True).publisher == evil.public_hex

    with pytest.raises(IntegrityError) as exc:
        ckpt.check_tensor_file(expert / ckpt.MODEL_FILE)
    one_line_integrity(exc, "not a readable safetensors file")
    with pytest.raises(IntegrityError) as exc:
        ckpt.load_expert(expert, require_signature=True)
    one_line_integrity(exc, "not a readable safetensors file")
    with pytest.raises(IntegrityError) as exc:
        ckpt.read_stats(stats, require_signature=True)
    one_line_integrity(exc, "not a readable safetensors file")
    from ddm_node.train.expert import shard_data
    from ddm_node.train.trainer import Trainer

    cfg, data = genuine["plan"].cfg, shard_data(genuine["plan"], 0, genuine["ds"])  # the plan's model: fitted to data
    trainer = Trainer(cfg.model, cfg.train, data.x, data.y, device="cpu")
    with pytest.raises(IntegrityError) as exc:
        ckpt.load_state(state, trainer, require_signature=True)
    one_line_integrity(exc, "not a readable safetensors file")
    assert trainer.step == 0
    with pytest.raises(IntegrityError) as exc:
        load_router(router, require_signature=True)
    one_line_integrity(exc, "cannot load router weights")
    assert not marker.exists(), "something unpickled peer data"


def test_bundle_with_a_signed_pickle_fails_to_verify_load_and_sample(genuine, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    evil = Identity.generate()
    expert = tmp_path / "expert"
    seal_copy(genuine["step"] / ckpt.EXPERT, expert, evil, {ckpt.MODEL_FILE: pickle_payload(marker)})
    out = tmp_path / "bundle"
    # write_bundle checks signatures and hashes only; both hold
    write_bundle(out, genuine["plan"], {0: ExpertSource(0, expert, genuine["stats"])}, require_signature=True)
    with pytest.raises(IntegrityError) as exc:
        verify_bundle(out)
    one_line_integrity(exc, "expert_0/model.safetensors: not a readable safetensors file")
    for verify in (True, False):
        with pytest.raises(IntegrityError) as exc:
            load_bundle(out, verify=verify)
        one_line_integrity(exc, "not a readable safetensors file")
    png = tmp_path / "grid.png"
    capsys.readouterr()
    assert main(["sample", "--ensemble", str(out), "--n", "2", "--steps", "1", "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable safetensors file" in err, err
    assert not png.exists()
    assert main(["verify", str(out)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists(), "something unpickled peer data"


def test_the_payloads_are_live(tmp_path):
    """Control: the payloads above really run code when unpickled, so the marker checks mean something."""
    import pickle

    a, b = tmp_path / "a", tmp_path / "b"
    pickle.loads(pickle_payload(a))
    torch.load(io.BytesIO(torch_zip_payload(b)), weights_only=False)
    assert a.exists() and b.exists()
