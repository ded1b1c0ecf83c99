"""Routers p(k | x_t, t) and ensemble sampling over in-memory experts. Pure math: no files, no network."""
