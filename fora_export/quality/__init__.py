"""``fora-export quality``: what a cache schedule costs in sample quality, on a trained model.

- :mod:`~fora_export.quality.metrics`: PSNR, relative L2 and the Fréchet distance;
- :mod:`~fora_export.quality.classifier`: the digit classifier whose accuracy and feature
  space score samples against the real digits (scikit-learn);
- :mod:`~fora_export.quality.runner`: sampling every schedule through the runtime;
- :mod:`~fora_export.quality.report`: the table, the quality-vs-speedup plot, the image grid.
"""
