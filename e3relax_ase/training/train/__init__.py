"""The trainer: config, prepared dataset and batching, loss and metrics, training and evaluation."""
