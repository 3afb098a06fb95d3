"""Exporting the step graphs (ONNX, torch.export programs); each exporter returns the IO
spec of the graph it wrote."""
