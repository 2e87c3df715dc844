"""Sharding as data: mesh shapes, logical-axis rules, partition specs and shard shapes.

Params carry logical axis names (see :mod:`wan_runtime.format`); one rules table maps them to the
mesh axes ``data, fsdp, context, tensor``; activations have their own table and :class:`Layout`
places their sharding constraints. The arithmetic here is pure Python so the converter can lay out
chunks for a target mesh without touching any device; only :func:`make_mesh`,
:func:`named_sharding` and :class:`Layout`'s methods import JAX.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

MESH_AXES = ("data", "fsdp", "context", "tensor")

#: logical axis -> mesh axis (or None: replicated). First-class parameters of a deployment.
DEFAULT_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


#: activation logical axis -> mesh axes. Video diffusion runs a batch of one or two (CFG) over tens
#: of thousands of tokens, so data parallelism over the sequence is what scales: the token axis is
#: split over ``fsdp`` (whose devices also split the weights) and ``context``, and self-attention
#: gathers keys across them (models/context_parallel.py). Heads and the FFN hidden width follow the
#: weights over ``tensor``; the batch (cond / uncond) goes over ``data``.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data",),
    "seq": ("fsdp", "context"),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
}


class MeshError(ValueError):
    pass


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=1,fsdp=2,context=4"`` -> {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}."""
    shape = {a: 1 for a in MESH_AXES}
    if spec is None or spec == "" or spec == "1":
        return shape
    items = spec.items() if isinstance(spec, Mapping) else (p.split("=", 1) for p in spec.split(","))
    for item in items:
        try:
            name, size = item
            name, size = str(name).strip(), int(size)
        except ValueError:
            raise MeshError(f"--mesh: cannot read {spec!r}; expected e.g. data=1,fsdp=2,context=4") from None
        if name not in shape:
            raise MeshError(f"--mesh: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if size < 1:
            raise MeshError(f"--mesh: axis {name} must be >= 1, got {size}")
        shape[name] = size
    return shape


def mesh_size(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.values())


def format_mesh(mesh_shape: Mapping[str, int]) -> str:
    return ",".join(f"{a}={mesh_shape.get(a, 1)}" for a in MESH_AXES)


def partition_spec(shape: Sequence[int], axes: Sequence[str | None], mesh_shape: Mapping[str, int],
                   rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES) -> tuple:
    """Mesh axes per array dimension (a rule may name one mesh axis or several, split jointly); a
    dimension stays replicated when its mesh axes have size one, do not divide it, or one of them is
    already used by an earlier dimension. Used for params (DEFAULT_RULES) and activations
    (ACTIVATION_RULES) alike."""
    used: set[str] = set()
    spec: list = []
    for dim, name in zip(shape, axes):
        rule = rules.get(name) if name else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh_shape.get(a, 1) > 1)
        size = math.prod(mesh_shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size or used & set(mesh_axes):
            spec.append(None)
        else:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
    return tuple(spec)


def shard_shape(shape: Sequence[int], spec: Sequence[str | None], mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    def n(a):  # devices along one spec entry: None, a mesh axis, or a tuple of them
        return 1 if a is None else mesh_shape[a] if isinstance(a, str) else math.prod(mesh_shape[x] for x in a)

    return tuple(d // n(a) for d, a in zip(shape, spec))


#: A stacked leaf one layer of which is smaller than this many bytes (biases, norms, modulation tables,
#: the ``<weight>_scale`` leaves of quantized weights: 36 KiB a layer at most in the 1.3B transformer,
#: 120 KiB in the 14B) is stored with all its layers in each chunk: one file per shard instead of one
#: per layer and shard. Weight matrices (2.25 MiB a layer and up, even in float8) stay a layer deep.
#: Measured on the 1.3B transformer (2 cores, warm cache): 332 chunk files instead of 825 in bf16 and 342
#: instead of 1125 in float8; restore 0.23 -> 0.18 s in bf16, float8 / bf16 time 0.76 -> 0.65
#: (tools/bench_restore.py). Chunking the weights over layers as well (one file per leaf) only reached
#: 0.63, for units holding whole weight leaves. It is the whole layer's size that counts, not a shard's,
#: so a unit of conversion holds at most this times the layers on any mesh (wan_convert.convert).
SMALL_LAYER_CHUNK = 1 << 20


def chunk_shape(shape: Sequence[int], axes: Sequence[str | None], mesh_shape: Mapping[str, int],
                itemsize: int, target_bytes: int = 64 << 20,
                rules: Mapping[str, str | None] = DEFAULT_RULES) -> tuple[int, ...]:
    """Storage chunk for an array: its shard shape on the mesh, one layer deep along a "layers" axis
    (every layer of a small leaf: :data:`SMALL_LAYER_CHUNK`), and split further along the first axis (at
    shard-aligned boundaries) to stay near ``target_bytes``. Every chunk lies inside exactly one shard,
    so a device's restore reads only its own chunks."""
    spec = partition_spec(shape, axes, mesh_shape, rules)
    chunk = list(shard_shape(shape, spec, mesh_shape))
    if not chunk:
        return ()
    layer_bytes = itemsize * math.prod(d for d, name in zip(shape, axes) if name != "layers")
    for i, name in enumerate(axes):
        if name == "layers" and layer_bytes >= SMALL_LAYER_CHUNK:
            chunk[i] = 1
    nbytes = math.prod(chunk) * itemsize
    lead = 0
    while lead < len(chunk) and chunk[lead] == 1:
        lead += 1
    if lead < len(chunk) and nbytes > target_bytes:
        rows = chunk[lead]
        want = max(1, math.ceil(rows * target_bytes / nbytes))
        # a divisor of the shard rows keeps chunks inside shards; if the shard is the whole axis,
        # any split is fine (the edge chunk is partial), but the layers of a small leaf split evenly
        # (no padded chunk row: restore reads whole chunks straight into place)
        whole_axis = spec[lead] is None and axes[lead] != "layers"
        best = rows
        for c in range(want, rows + 1):
            if whole_axis or rows % c == 0:
                best = c
                break
        chunk[lead] = best
    return tuple(chunk)


def stage_spec(spec: Sequence, shard: Sequence[int], mesh_shape: Mapping[str, int]) -> tuple | None:
    """The spec that splits every shard of ``spec`` (shape ``shard``) once more, over the mesh axes that
    replicate it: they are appended (in mesh order) to the first dimension whose shard extent their
    device count N divides, so each of a shard's N holders gets a different 1/N of it. None when
    ``spec`` replicates over no axis of size > 1 or no dimension divides (restore's staged transfer)."""
    spec = list(spec) + [None] * (len(shard) - len(spec))
    used = {a for e in spec for a in ((e,) if isinstance(e, str) else e or ())}
    rep = tuple(a for a, n in mesh_shape.items() if n > 1 and a not in used)
    n = math.prod(mesh_shape[a] for a in rep)
    dim = next((d for d, extent in enumerate(shard) if extent % n == 0), None)
    if n == 1 or dim is None:
        return None
    own = spec[dim]
    spec[dim] = ((own,) if isinstance(own, str) else tuple(own or ())) + rep
    return tuple(spec)


# ---------------------------------------------------------------------------------------- JAX
def make_mesh(mesh_shape: Mapping[str, int], devices=None):
    """A ``jax.sharding.Mesh`` with the four named axes (Auto axis types, GSPMD propagation)."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    n = mesh_size(mesh_shape)
    if n > len(devices):
        raise MeshError(f"--mesh {format_mesh(mesh_shape)} needs {n} devices; {len(devices)} available")
    arr = np.array(devices[:n]).reshape([mesh_shape[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def named_sharding(mesh, shape, axes, rules: Mapping[str, str | None] = DEFAULT_RULES):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    return NamedSharding(mesh, PartitionSpec(*partition_spec(shape, axes, mesh_shape, rules)))


class Layout:
    """Where activations live on a mesh: sharding constraints by logical axis names, the sequence axes
    for context-parallel attention and the spatial axes of the VAE. Hashable (by mesh and settings), so
    it can be a static argument of compiled stages. ``Layout(None)`` (one device) constrains nothing."""

    def __init__(self, mesh, context_attention: str = "auto"):
        self.mesh = mesh
        self.context_attention = context_attention
        self.shape = {} if mesh is None else dict(zip(mesh.axis_names, mesh.devices.shape))

    def _key(self):
        return (self.mesh, self.context_attention)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Layout) and self._key() == other._key()

    def __repr__(self):
        return f"Layout({format_mesh(self.shape) if self.shape else 'one device'}, {self.context_attention})"

    @property
    def active(self) -> bool:
        return bool(self.shape) and mesh_size(self.shape) > 1

    def axes(self, name: str) -> tuple[str, ...]:
        """The mesh axes (of size > 1) an activation axis is split over."""
        return tuple(a for a in ACTIVATION_RULES.get(name, ()) if self.shape.get(a, 1) > 1)

    def count(self, name: str) -> int:
        return math.prod(self.shape[a] for a in self.axes(name))

    @property
    def seq_axes(self) -> tuple[str, ...]:
        return self.axes("seq")

    @property
    def seq_shards(self) -> int:
        return self.count("seq")

    def axis_if_divides(self, name: str, dim: int):
        """PartitionSpec entry for one dimension: its mesh axes if they divide it, else None (replicated)."""
        return partition_spec((dim,), (name,), self.shape, ACTIVATION_RULES)[0]

    def spec(self, shape, names):
        from jax.sharding import PartitionSpec

        return PartitionSpec(*partition_spec(shape, names, self.shape, ACTIVATION_RULES))

    def constrain(self, x, names):
        """``with_sharding_constraint`` by logical names (None = replicated dim); a no-op on one device."""
        if not self.active:
            return x
        import jax
        from jax.sharding import NamedSharding

        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x.shape, names)))

    def replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec())

    def spatial(self, x, h_axis: int, w_axis: int):
        """VAE activations split along width (else height) over every device; batch redundant."""
        if not self.active:
            return x
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        axes = tuple(a for a in MESH_AXES if self.shape.get(a, 1) > 1)
        n = math.prod(self.shape[a] for a in axes)
        spec = [None] * x.ndim
        if x.shape[w_axis] % n == 0:
            spec[w_axis] = axes
        elif x.shape[h_axis] % n == 0:
            spec[h_axis] = axes
        else:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))
