"""Structured knowledge for training: hard negatives from scene graphs and word-order perturbations."""
