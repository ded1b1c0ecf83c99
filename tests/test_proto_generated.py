"""The committed gRPC modules must be exactly what protoc generates from proto/ddm.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates the modules")

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("ddm_pb2.py", "ddm_pb2_grpc.py")


@pytest.mark.multiproc  # runs protoc in a subprocess
def test_committed_modules_match_a_fresh_generation(tmp_path):
    # Run the developer's helper from the repository root, as `python -m proto` does.
    code = "import sys, proto; proto.regenerate(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh, committed = tmp_path / "proto" / name, REPO / "proto" / name
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"proto/{name} is stale: run `python -m proto` from the repository root and commit the result")


def test_generated_import_path_and_service():
    from proto import ddm_pb2, ddm_pb2_grpc

    service = ddm_pb2.DESCRIPTOR.services_by_name["DDMNode"]
    assert ddm_pb2.DESCRIPTOR.package == "ddm.v1"
    assert sorted(m.name for m in service.methods) == ["Fetch", "GetManifest", "GetPlan", "Info", "ListArtifacts"]
    assert service.methods_by_name["Fetch"].server_streaming
    assert "from proto import ddm_pb2 as" in Path(ddm_pb2_grpc.__file__).read_text()
