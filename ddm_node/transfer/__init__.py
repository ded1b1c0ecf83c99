"""Transfer layer: a node's gRPC server and client. Moves and verifies bytes; knows nothing of models.

- `ArtifactStore`: what a node serves (verified artifact directories and plans, by content hash).
- `TransferServer`: the `ddm.v1.DDMNode` gRPC service over a store.
- `NodeClient`, `fetch_file`, `fetch_artifact`: download from one or many holders, verify, commit atomically.
See docs/TRANSFER.md for the wire format, limits and retry policy.
"""

from ddm_node.transfer.client import NodeClient, PeerError, check_address
from ddm_node.transfer.download import fetch_artifact, fetch_file
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import (
                                     ANY_SHARD,
                                     DEFAULT_CHUNK,
                                     DEFAULT_MAX_MESSAGE,
                                     ArtifactRef,
                                     ArtifactStore,
                                     NodeInfoData,
                                     StoredArtifact,
)

__all__ = [
    "ANY_SHARD", "DEFAULT_CHUNK", "DEFAULT_MAX_MESSAGE", "ArtifactRef", "ArtifactStore", "NodeClient",
    "NodeInfoData", "PeerError", "StoredArtifact", "TransferServer", "check_address", "fetch_artifact", "fetch_file",
]
