"""Wan models: pure-JAX functions over param trees."""
