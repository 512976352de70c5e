"""Training: losses, optimiser, sharded steps, checkpoints, and the loop that ties them."""
