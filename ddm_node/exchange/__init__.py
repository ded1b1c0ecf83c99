"""Between the swarm and its users: candidate grouping, the one verified fetch with its reject list, the
announcer, and joining a run as a client. Used by the node and by the clients."""
