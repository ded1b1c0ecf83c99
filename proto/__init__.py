"""Wire protocol of a ddm-node (package `ddm.v1`): `ddm.proto` and its generated modules.

`ddm_pb2.py` and `ddm_pb2_grpc.py` are generated and committed; after editing `ddm.proto` run
`python -m proto` from the repository root (needs grpcio-tools, a dev dependency). A test checks
that the committed files match a fresh generation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
GENERATED = ("ddm_pb2.py", "ddm_pb2_grpc.py")


def regenerate(out_root: str | Path | None = None) -> list[Path]:
    """Run protoc on proto/ddm.proto; write `<out_root>/proto/ddm_pb2*.py` (the repository by default).

    protoc runs from the repository root with `-I .`, so the generated import is `from proto import ddm_pb2`.
    Returns the paths written. Raises RuntimeError with protoc's message when generation fails.
    """
    out_root = Path(out_root) if out_root is not None else REPO_ROOT
    (out_root / "proto").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out_root}",
           f"--grpc_python_out={out_root}", "proto/ddm.proto"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return [out_root / "proto" / name for name in GENERATED]
