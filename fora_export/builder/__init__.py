"""Building an engine folder: split, export, manifest, atomically."""
