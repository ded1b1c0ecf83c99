"""Chaos suite (issue 4): real islands under kills, partitions, slow links, full disks and a dead bootstrap peer."""
