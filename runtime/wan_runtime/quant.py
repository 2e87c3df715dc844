"""Weight-only quantization of the transformer blocks' 2-D weights: one rule, in numpy (wan-convert, at
conversion) and in JAX (``wan-run --quantize``, once per load), giving the same bits.

The rule (symmetric absmax, one float32 scale per output channel, i.e. per row of a torch (out, in)
weight): ``scale = max|w_row| * (1 / Q)`` with Q = 448 for float8_e4m3fn and 127 for int8
(``format.QUANT_DTYPES``; the reciprocal rounded to float32 first: XLA turns a division by a constant into
that multiplication, so numpy does the same; a row of zeros gets scale 1), ``q = w / scale`` in float32, rounded to nearest even and saturated to
[-Q, Q], stored in the quantized dtype. ``dense`` (models/layers.py) multiplies by the stored values and
applies the scale to its output. Which leaves are quantized is the param tree's business
(``format.transformer_tree``: ``<weight>`` in the quantized dtype beside ``<weight>_scale``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import format as fmt


def quantize_np(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) of ``w`` (..., out, in) by the rule above; any leading (layer) axes are kept."""
    limit = np.float32(fmt.QUANT_DTYPES[dtype])
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=-1)
    scale = np.where(amax > 0, amax * (np.float32(1) / limit), np.float32(1)).astype(np.float32)
    x = np.clip(w / scale[..., None], -limit, limit)
    if dtype == "int8":
        return np.rint(x).astype(np.int8), scale
    return x.astype(fmt.np_dtype(dtype)), scale  # float32 -> e4m3: round to nearest even (ml_dtypes)


def quantize_jax(w, dtype: str):
    """:func:`quantize_np` on the device (same bits)."""
    import jax.numpy as jnp

    limit = jnp.float32(fmt.QUANT_DTYPES[dtype])
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax * (np.float32(1) / np.float32(fmt.QUANT_DTYPES[dtype])), jnp.float32(1))
    x = jnp.clip(w / scale[..., None], -limit, limit)
    if dtype == "int8":
        return jnp.rint(x).astype(jnp.int8), scale
    return x.astype(jnp.dtype(fmt.np_dtype(dtype))), scale


def quantize_tree(tree: Mapping[str, Any], abstract: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """A restored (unquantized) transformer tree quantized on the device as ``abstract`` (the component's
    tree built with ``dtype``) declares: each quantized leaf and its ``_scale`` sibling, in one compiled
    program per leaf shape, keeping the weight's sharding (the scale: the weight's, less its last axis)."""
    from jax.sharding import NamedSharding, PartitionSpec

    flat, want = fmt.flatten(tree), fmt.flatten(abstract)
    out = dict(flat)
    for path, leaf in want.items():
        if leaf.dtype != dtype:
            continue
        w = flat[path]
        s = w.sharding
        scale_sharding = NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[: w.ndim - 1])) \
            if isinstance(s, NamedSharding) else s
        q, scale = _program(dtype, s, scale_sharding)(w)
        out[path], out[f"{path}_scale"] = q, scale
    return fmt.unflatten(out)


_PROGRAMS: dict = {}


def _program(dtype: str, sharding, scale_sharding):
    import jax

    key = (dtype, sharding, scale_sharding)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(lambda w: quantize_jax(w, dtype), out_shardings=(sharding, scale_sharding))
    return _PROGRAMS[key]
