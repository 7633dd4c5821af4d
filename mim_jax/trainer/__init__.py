"""Running steps: optimiser, sharding, checkpoints, metrics and the training loop."""
