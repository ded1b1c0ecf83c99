"""The `ddm-node` command line (argument parsing), the demo and the loopback network of islands."""

from ddm_node.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
