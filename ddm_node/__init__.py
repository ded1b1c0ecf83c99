"""ddm-node: decentralized diffusion training on independent compute islands."""

__version__ = "0.1.0"
