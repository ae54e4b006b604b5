"""Data: reading datasets, targets, augmentation and the letterbox pre-processing."""
