"""The protocol-only swarm of `python -m bench.scale --protocol` (see bench/protocol/main.py)."""
