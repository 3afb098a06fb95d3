"""Model-family adapters: one file per diffusers transformer family."""
