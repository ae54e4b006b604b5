"""Engines that run the model over data: evaluation metrics, val loop, prediction, training."""
