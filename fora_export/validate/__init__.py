"""Checking engine outputs against the PyTorch model."""
