"""wan-convert: diffusers Wan checkpoints -> layer-stacked, pre-sharded wan-jax checkpoints."""
__version__ = "0.1.0"
