"""fora-export: export diffusion transformers as FORA full/reuse graphs.

Kept light on purpose (no torch import) so ``fora-export --help`` is instant.
"""

__version__ = "0.1.0"
