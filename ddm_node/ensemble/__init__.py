"""The ensemble side: the bundle on disk, sampling from it, and its metrics."""
