"""Datasets, partitioning and the run plan."""
