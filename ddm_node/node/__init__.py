"""The island (a node): the work loop, the lease keeper, the mirror and their options."""
