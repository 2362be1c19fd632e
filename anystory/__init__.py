"""AnyStory core (arXiv 2501.09503) in pure torch: subject encoding, routing, routed injection,
checkpoints. No ComfyUI import here: ``nodes/`` adapts ComfyUI types to this package."""
