"""The training loop and what it is built from: optimizers, time budget, metrics, data/model parallelism, FLOPs."""
