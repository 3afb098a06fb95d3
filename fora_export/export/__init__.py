"""Exporting the step graphs to ONNX."""
