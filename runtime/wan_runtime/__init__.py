"""wan-run: the lean JAX runtime for Wan 2.1 / 2.2 video generation."""
__version__ = "0.1.0"
