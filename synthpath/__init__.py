"""synthpath: privacy-preserving synthetic histopathology datasets."""

__version__ = "0.1.0"
