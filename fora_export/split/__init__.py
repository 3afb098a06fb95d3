"""Splitting a transformer into FORA full and reuse step graphs."""
