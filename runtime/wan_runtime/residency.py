"""Which components' weights are on the device when: the offload half of the memory plan.

A generation needs its components one after another: the text (and image) encoders for the
conditioning, then each transformer expert for its phase of the loop (Wan 2.2 A14B: the high-noise
expert before the boundary, the low-noise one after), then the VAE. Offloading keeps a component's
weights in host memory (the ``pinned_host`` memory kind, where the device copy is a DMA; every backend
jax ships has it, CPU included) and puts them on the device only while its stage runs:

- ``none``: everything stays on the device (fastest; a 14B expert pair plus UMT5-XXL is ~69 GiB in bf16);
- ``encoders``: UMT5 (10.6 GiB) and CLIP leave the device once the conditioning is computed, and come
  back for the next generation's;
- ``experts``: only the active Wan 2.2 expert is on the device (swapped at the boundary);
- ``all``: both;
- ``auto``: the least of these that leaves room on the device (``choose``; on CPU, where host and device
  memory are the same, ``none``). ``wan-run --plan`` gives the exact peaks.

The host copy is made once (the first time a component leaves the device) and kept: later moves off the
device only delete the device buffers. Moving weights never changes a bit of them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import jax

MODES = ("auto", "none", "encoders", "experts", "all")
ENCODERS = ("text_encoder", "image_encoder")
EXPERTS = ("transformer", "transformer_2")
#: ``auto`` offloads until the weights resident during the loop take at most this share of a device's
#: memory (the rest is the K/V cache, activations and the VAE decode; ``--plan`` says whether a size fits),
#: and those resident during the conditioning at most the second
AUTO_FRACTION, AUTO_PEAK_FRACTION = 0.6, 0.9


class OffloadError(ValueError):
    """An offload mode this runtime does not know, or one the backend cannot do."""


def offloaded(mode: str, components: Iterable[str]) -> frozenset[str]:
    """The components that leave the device between their uses under ``mode`` (not ``auto``). Experts
    move only when there are two of them."""
    components = tuple(components)
    if mode not in MODES or mode == "auto":
        raise OffloadError(f"--offload: {mode!r} is not one of {', '.join(MODES[1:])} (or auto)")
    two = sum(c in EXPERTS for c in components) > 1
    encoders = {c for c in components if c in ENCODERS} if mode in ("encoders", "all") else set()
    experts = {c for c in components if c in EXPERTS} if mode in ("experts", "all") and two else set()
    return frozenset(encoders | experts)


def device_bytes(tree) -> int:
    """Bytes of ``tree`` (arrays, or abstract ``jax.ShapeDtypeStruct`` with shardings) on one device."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def choose(bytes_per_component: Mapping[str, int], device_limit: int | None, backend: str) -> str:
    """``auto``: the first of none, encoders, experts, all under which the weights resident while the loop
    runs take at most ``AUTO_FRACTION`` of ``device_limit`` (per-device bytes; the rest is for the K/V
    cache and activations) and those resident during the conditioning at most ``AUTO_PEAK_FRACTION``.
    Unknown limit: none."""
    if backend == "cpu" or not device_limit:
        return "none"
    for mode in ("none", "encoders", "experts", "all"):
        w = stage_weights(bytes_per_component, offloaded(mode, bytes_per_component))
        if w["denoise"] <= AUTO_FRACTION * device_limit and w["conditioning"] <= AUTO_PEAK_FRACTION * device_limit:
            return mode
    return "all"


def stage_weights(sizes: Mapping[str, int], moved: frozenset[str]) -> dict[str, int]:
    """Weight bytes on the device during each stage when ``moved`` leave it between their uses: the
    components that stay, plus, of the moved ones, the encoders during the conditioning and one expert
    (the active one; the last one used, until the next loop) during every stage."""
    staying = sum(b for c, b in sizes.items() if c not in moved)
    expert = max((b for c, b in sizes.items() if c in moved and c in EXPERTS), default=0)
    encoders = sum(b for c, b in sizes.items() if c in moved and c in ENCODERS)
    return {"conditioning": staying + expert + encoders, "denoise": staying + expert, "decode": staying + expert}


def host_kind(device) -> str | None:
    kinds = {m.kind for m in device.addressable_memories()}
    return next((k for k in ("pinned_host", "unpinned_host") if k in kinds), None)


def resolve(mode: str, params: Mapping[str, Any]) -> str:
    """``mode``, with ``auto`` replaced by what fits the first device's memory (``choose``)."""
    if mode != "auto":
        offloaded(mode, params)  # validates
        return mode
    leaf = next(iter(jax.tree.leaves(dict(params))), None)
    if leaf is None:
        return "none"
    device = local_device(leaf)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    sizes = {c: device_bytes(t) for c, t in params.items()}
    return choose(sizes, (stats or {}).get("bytes_limit"), device.platform)


class Weights:
    """The pipeline's restored components, each on the device or in host memory. ``get(c)`` returns the
    device tree (copied back from the host copy if the device has none); ``release(c)`` frees the device
    copy, making the host copy first if there is none yet. Pipelines that share one ``Weights`` (see
    ``WanPipeline.replace``) see the same state whatever their offload modes. Indexing is ``get``."""

    def __init__(self, params: Mapping[str, Any]):
        self._device = dict(params)
        self._host: dict[str, Any] = {}
        self.unmerged: dict[str, Any] = {}  # per component with LoRAs applied: its weights without them (host)
        self.loras: dict[str, tuple] = {}  # per component: the LoRAs applied (``lora.Lora``)

    def __contains__(self, c) -> bool:
        return c in self._device or c in self._host

    def __iter__(self):
        return iter(dict.fromkeys([*self._device, *self._host]))

    def __getitem__(self, c):
        return self.get(c)

    def __setitem__(self, c, tree):
        self._device[c] = tree
        self._host.pop(c, None)

    def trees(self) -> dict[str, Any]:
        """Every component's tree where it is now (device or host), without moving anything."""
        return {c: self._device.get(c, self._host.get(c)) for c in self}

    @property
    def resident(self) -> tuple[str, ...]:
        """The components whose weights are on the device now."""
        return tuple(self._device)

    def get(self, c: str):
        if c not in self._device:
            self._device[c] = to_device(self._host[c])
        return self._device[c]

    def release(self, *components: str) -> None:
        """Free the device copies of ``components`` (the host copies stay for the next ``get``)."""
        for c in components:
            if c not in self._device:
                continue
            tree = self._device.pop(c)
            if _abstract(tree):  # a memory plan: nothing to copy
                self._host[c] = tree
                continue
            if c not in self._host:
                self._host[c] = jax.block_until_ready(to_host(tree))
            for a in jax.tree.leaves(tree):
                a.delete()


def to_host(tree):
    """A copy of ``tree`` in host memory (``pinned_host`` where the backend has it), same shardings."""
    def away(a):
        kind = host_kind(local_device(a))
        if kind is None:
            raise OffloadError("--offload: this backend has no host memory kind; use --offload none")
        return jax.device_put(a, a.sharding.with_memory_kind(kind))
    return jax.tree.map(away, tree)


def to_device(tree):
    """A device copy of a host-memory ``tree`` (an abstract tree, as a memory plan holds, as it is)."""
    if _abstract(tree):
        return tree
    return jax.tree.map(lambda a: jax.device_put(a, a.sharding.with_memory_kind(
        local_device(a).default_memory().kind)), tree)


def local_device(a):
    """One of this process's devices holding ``a`` (several processes: the others' are not addressable)."""
    return min(a.sharding.addressable_devices, key=lambda d: d.id)


def _abstract(tree) -> bool:
    return any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(tree))
