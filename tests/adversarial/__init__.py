"""Adversarial-peer suite: a peer that speaks the real protocol and lies (see evil_peer.py)."""
