"""Training: optimizer from config, sharded train step, checkpoints, metrics."""
