"""The ground layer: errors, typed config, identity, the artifact format, atomic files, placement, events,
the work-dir layout and the model. Imports nothing else of ddm_node."""
