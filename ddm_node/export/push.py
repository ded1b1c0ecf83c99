"""`ddm-node push`: upload an exported directory to a Hugging Face hub repository (huggingface_hub, optional extra).

The endpoint is HF_ENDPOINT when set (read at call time), else the hub's. Only a directory `export` wrote is pushed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ddm_node.core.errors import DDMError

log = logging.getLogger(__name__)
HUB_HINT = "pip install 'ddm-node[hub]'"
_PIPELINE = "DDMEnsemblePipeline_"


def check_export(folder: Path) -> None:
    """`folder` is an exported ensemble: its model_index.json names our pipeline."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        raise DDMError(f"{folder}: no readable model_index.json; push uploads a directory `ddm-node export` wrote") \
            from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not (isinstance(name, list) and len(name) == 2 and str(name[1]).startswith(_PIPELINE)):
        raise DDMError(f"{folder}: not a ddm-node export (model_index.json names {str(name)[:80]})")


def push(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
         message: str = "ddm-node export") -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; returns the commit URL."""
    folder = Path(folder)
    check_export(folder)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DDMError(f"push needs huggingface_hub: {HUB_HINT}") from None
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as exc:  # the one boundary: HTTP errors, the HTTP client's own (refused, timeout), bad ids
        log.debug("push to %s failed", repo_id, exc_info=True)
        text = str(exc).strip().splitlines()
        raise DDMError(f"push to {repo_id}: {type(exc).__name__}: {text[0] if text else 'failed'}") from None
    return str(getattr(info, "commit_url", info))
