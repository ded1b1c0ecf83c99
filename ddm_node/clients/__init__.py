"""Clients of a run's swarm: assemble and status."""
