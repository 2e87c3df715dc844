"""Repo-root pytest setup: import paths for the two packages, and 8 simulated CPU devices."""
import os
import pathlib
import sys

# Must happen before JAX initialises its backends (sharding tests use 8 simulated CPU devices).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_root = pathlib.Path(__file__).parent
for sub in ("runtime", "convert", "tools"):
    p = str(_root / sub)
    if p not in sys.path:
        sys.path.insert(0, p)
