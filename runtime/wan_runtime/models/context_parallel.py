"""Context-parallel self-attention: the video tokens split along the sequence across devices.

Activations of the transformer are sharded along the token sequence over the mesh axes of
:attr:`wan_runtime.sharding.Layout.seq_axes` (``fsdp`` and ``context``); every matmul is then local,
and only self-attention needs keys and values from other devices. Three ways to give each device's
queries every key, all under ``shard_map`` over the whole mesh (batch over ``data``, heads over
``tensor``, the sequence over the sequence axes), selectable per run:

- ``allgather``: all-gather K, V and the key mask along the sequence; each device attends its own
  queries to every key with the backend's kernel. Simple; a device holds the whole K/V.
- ``ulysses`` (DeepSpeed-Ulysses): all-to-all from (sequence shard, all local heads) to (whole
  sequence, 1/n of the heads), the backend's kernel on the whole sequence, all-to-all back. Moves
  the least data; needs the local head count divisible by the sequence shard count.
- ``ring``: K/V blocks travel around the ring of devices (``ppermute``, n - 1 hops); each device
  folds one block at a time into its queries' result with a running max and sum (online softmax),
  never holding more than two K/V blocks.

Cross-attention stays local: its keys are the short text context, replicated. Padded tokens (the
sequence is padded to a multiple of the shard count) are masked out of the keys by ``key_mask``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import attention as attn
from .attention import attention

MODES = ("allgather", "ulysses", "ring")


def choose_mode(mode: str, heads: int, tensor: int, shards: int) -> str:
    """``auto``: Ulysses when the heads per tensor shard split evenly over the sequence shards, else ring."""
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"--context-attention: unknown mode {mode!r}; modes are auto, {', '.join(MODES)}")
        if mode == "ulysses" and (heads // tensor) % shards:
            raise ValueError(f"--context-attention ulysses: {heads // tensor} heads per tensor shard do not split "
                             f"over {shards} sequence shards; use ring or allgather")
        return mode
    return "ulysses" if (heads // tensor) % shards == 0 else "ring"


def self_attention(q, k, v, key_mask, layout, mode: str):
    """softmax(q k^T / sqrt(Dh)) v for q, k, v (B, S, H, Dh) sharded along S over ``layout.seq_axes``.

    ``key_mask``: (B, S) bool, True = real key, or None. Same result as :func:`attention.attention`
    on the gathered arrays (up to float reassociation)."""
    mesh, seq = layout.mesh, layout.seq_axes
    B, S, H, _ = q.shape
    batch = layout.axis_if_divides("batch", B)
    heads = layout.axis_if_divides("act_heads", H)
    spec = P(batch, seq, heads, None)
    mask_spec = P(batch, seq)
    if key_mask is None:
        key_mask = jnp.ones((B, S), bool)
    body = {"allgather": _allgather, "ulysses": _ulysses, "ring": _ring}[mode]
    fn = jax.shard_map(lambda q, k, v, m: body(q, k, v, m, seq), mesh=mesh,
                       in_specs=(spec, spec, spec, mask_spec), out_specs=spec, check_vma=False)
    return fn(q, k, v, key_mask)


def local_attention(q, k, v, layout, key_mask=None):
    """:func:`attention.attention` for attention that needs no exchange between the sequence shards
    (cross-attention: every text / image key is on every device; self-attention whose sequence is not
    split). On a mesh of several devices the kernel runs inside ``shard_map`` with explicit specs, q
    split by batch, sequence and heads, k / v by batch and heads, so a custom kernel (cuDNN, splash) is
    never left to XLA's partitioner, which cannot split it. One device: a plain call."""
    if layout is None or not layout.active:
        return attention(q, k, v, key_mask=key_mask)
    B, S, H, _ = q.shape
    batch, heads = layout.axis_if_divides("batch", B), layout.axis_if_divides("act_heads", H)
    seq = layout.axis_if_divides("seq", S)
    q_spec, kv_spec = P(batch, seq, heads, None), P(batch, None, heads, None)
    if key_mask is None:
        fn = jax.shard_map(lambda q, k, v: attention(q, k, v), mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec),
                           out_specs=q_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(lambda q, k, v, m: attention(q, k, v, key_mask=m), mesh=layout.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec, check_vma=False)
    return fn(q, k, v, key_mask)


def _gather(x, axes, axis):
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True)


def _allgather(q, k, v, m, axes):
    return attention(q, _gather(k, axes, 1), _gather(v, axes, 1), key_mask=_gather(m, axes, 1))


def _ulysses(q, k, v, m, axes):
    # (b, s/n, h, d) -> (b, s, h/n, d): split the heads, gather the sequence
    to_heads = lambda x: jax.lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
    o = attention(to_heads(q), to_heads(k), to_heads(v), key_mask=_gather(m, axes, 1))
    return jax.lax.all_to_all(o, axes, split_axis=1, concat_axis=2, tiled=True)


def _ring(q, k, v, m, axes):
    """Ring attention: the K/V blocks travel around the ring (``ppermute``); each hop attends to the block
    that arrived with the memory-bounded kernel (its own query and key blocks: never the whole
    (S/n)^2 logits) and merges the partial result by its log-sum-exp, in float32."""
    n = math.prod(jax.lax.axis_size(a) for a in axes)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def part(k, v, m):
        return attn.blocked_attention(q, k, v, m, return_lse=True, out_dtype=jnp.float32)

    def hop(carry, _):  # the neighbour's block arrives, then is merged in
        k, v, m = (jax.lax.ppermute(x, axes, perm) for x in carry[:3])
        return (k, v, m, *attn.merge_partial(*carry[3:], *part(k, v, m))), None

    carry = (k, v, m, *part(k, v, m))
    (_, _, _, out, _), _ = jax.lax.scan(hop, carry, None, length=n - 1)
    return out.astype(q.dtype)
