"""Watching a run: Prometheus metrics, the swarm dashboard (HTTP + a static page) and TensorBoard scalars of a
node, composed in `watch.py`. Level 5: reads the island (node) and the swarm's status (clients)."""
