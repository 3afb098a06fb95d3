"""Serving engine folders: Triton model repositories (``fora-export triton``) and a
tritonserver launcher for tests, benchmarks and ``tools/serve_triton.py``."""
