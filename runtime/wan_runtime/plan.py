"""``wan-run --plan``: the memory a generation needs on each device, before any weight is read.

The pipeline runs its stages as it would for the requested size, settings, mesh and offload mode, with
abstract weights (shapes, dtypes and shardings from the checkpoint's configs; nothing read from disk) and
every compiled stage replaced by zeros of its outputs: each stage is lowered and compiled for real, and
XLA's memory analysis of the compiled program gives its per-device bytes (arguments, outputs,
temporaries). A stage's peak is the weights on the device while it runs (the offload mode says which:
residency.py), its other inputs, its outputs and its temporaries. Small arrays alive between stages (text
embeddings, latents: megabytes) are not counted. It runs on CPU for any model and size; compiling the
real stages takes seconds to a minute there.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from . import format as fmt
from . import residency
from . import sharding as shd

#: the stages of a generation as the pipeline compiles them (the compile key's first element)
STAGE_NAMES = {"text": "text encoder", "clip": "image encoder (CLIP)", "encode": "VAE encode (image)",
               "conditions": "cross-attention K/V", "denoise": "denoise loop", "finish": "finish",
               "decode": "VAE decode"}
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the compile key's first element
    resident: tuple[str, ...]  # components whose weights are on the device while it runs
    weights: int  # bytes of those weights
    inputs: int  # bytes of the stage's other arguments (latents, K/V, embeddings)
    arguments: int  # XLA's argument bytes (the weights it reads and the inputs it uses)
    outputs: int  # XLA's output bytes (the arrays, and a few bytes of tuple index per output)
    aliased: int
    temporaries: int
    output_arrays: int  # bytes of the output arrays alone (per device)

    @property
    def peak(self) -> int:
        return self.weights + self.inputs + self.outputs - self.aliased + self.temporaries

    @property
    def working(self) -> int:
        """Activations, outputs and temporaries: the peak less the weights."""
        return self.peak - self.weights


@dataclasses.dataclass
class Plan:
    """Per-device bytes: each component's weights, the K/V cache, every stage of a generation."""

    weights: dict[str, int]
    stages: list[Stage]
    device_memory: int | None
    device: str
    offload: str

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def kv_cache(self) -> int:
        return max((s.output_arrays for s in self.stages if s.name == "conditions"), default=0)

    @property
    def fits(self) -> bool | None:
        return None if not self.device_memory else self.peak.peak <= self.device_memory

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "device_memory": self.device_memory, "offload": self.offload,
                "weights": self.weights, "kv_cache": self.kv_cache, "peak": self.peak.peak, "fits": self.fits,
                "stages": [dataclasses.asdict(s) | {"peak": s.peak} for s in self.stages]}

    def render(self) -> str:
        unit, scale = ("GiB", GiB) if self.peak.peak >= GiB else ("MiB", 1 << 20)
        g = lambda b: f"{b / scale:10.2f}"  # noqa: E731
        rows = [f"memory plan, per device ({self.device}; offload {self.offload}), {unit}:", "  weights"]
        rows += [f"    {c:<24}{g(b)}" for c, b in self.weights.items()]
        rows.append(f"    {'K/V cache (per expert)':<24}{g(self.kv_cache)}")
        rows.append(f"  {'stage':<26}{'weights':>10}{'working':>10}{'peak':>10}")
        for s in self.stages:
            rows.append(f"  {STAGE_NAMES.get(s.name, s.name):<26}{g(s.weights)}{g(s.working)}{g(s.peak)}")
        limit = "unknown" if not self.device_memory else f"{self.device_memory / scale:.2f} {unit}"
        verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[self.fits]
        rows.append(f"  peak {self.peak.peak / scale:.2f} {unit} ({STAGE_NAMES.get(self.peak.name, self.peak.name)}) "
                    f"of {limit} device memory: {verdict}")
        return "\n".join(rows)


class Recorder:
    """Set as ``WanPipeline.planner``: every compiled stage is recorded, and called as zeros."""

    def __init__(self):
        self.stages: list[Stage] = []

    def record(self, key, compiled, args, weights: residency.Weights):
        m = compiled.memory_analysis()
        trees = weights.trees()
        params = {id(x) for x in jax.tree.leaves(trees)}
        inputs = [x for x in jax.tree.leaves(args) if id(x) not in params and hasattr(x, "sharding")]
        resident = sum(residency.device_bytes(trees[c]) for c in weights.resident)
        self.stages.append(Stage(key[0], weights.resident, resident, residency.device_bytes(inputs),
                                 m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                 m.temp_size_in_bytes, residency.device_bytes(compiled.out_info)))

    @staticmethod
    def zeros(compiled):
        return lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), compiled.out_info)


def abstract_params(ckpt, mesh, dtypes, rules: Mapping[str, str | None] = shd.DEFAULT_RULES,
                    quantize: str | None = None) -> dict:
    """Every component's param tree as ``jax.ShapeDtypeStruct`` with the sharding restore gives it and
    the dtype after the pipeline's weight recast (``dtypes.weights`` / ``vae_weights``; quantized leaves
    stay quantized), the transformers quantized as ``--quantize`` would."""
    out = {}
    for c in ckpt.components:
        want = dtypes.vae_weights if c == "vae" else dtypes.weights
        tree = fmt.component_tree(c, ckpt.config(c), quantize) if quantize and c.startswith("transformer") \
            else ckpt.abstract_tree(c)
        flat = {p: jax.ShapeDtypeStruct(leaf.shape, fmt.recast_dtype(p, leaf.dtype, want),
                                        sharding=shd.named_sharding(mesh, leaf.shape, leaf.axes, rules))
                for p, leaf in fmt.flatten(tree).items()}
        out[c] = fmt.unflatten(flat)
    return out


def device_memory(device) -> int | None:
    """What one device can hold: the allocator's limit on GPU/TPU; physical memory on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def plan(ckpt, config, *, dtypes, image: bool = False, device_memory_bytes: int | None = None,
         quantize: str | None = None, **options) -> Plan:
    """The memory plan of one generation with ``config`` (a resolved RunConfig) on its mesh.
    ``options``: the pipeline's (offload, kv_cache, vae_chunk, ...). ``image``: plan the image-to-video
    path (a blank first frame)."""
    from PIL import Image

    from .pipeline import WanPipeline

    mesh = shd.make_mesh(shd.parse_mesh(config.mesh))
    params = abstract_params(ckpt, mesh, dtypes, quantize=quantize)
    pipe = WanPipeline(ckpt, params, mesh, dtypes, **options)
    pipe.planner = Recorder()
    first = Image.new("RGB", (config.width, config.height)) if image else None
    pipe.generate("a memory plan", config, image=first, output_type="uint8")
    dev = mesh.devices.flat[0]
    weights = {c: residency.device_bytes(t) for c, t in params.items()}
    return Plan(weights, pipe.planner.stages, device_memory_bytes or device_memory(dev),
                f"{mesh.devices.size} x {dev.device_kind}", pipe.offload)


def parse_bytes(text: str) -> int:
    """'80GiB', '80G', '141e9', '96 GB' -> bytes (G/GiB: 2**30; GB: 10**9)."""
    t = text.strip().replace(" ", "")
    units = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 1 << 20, "m": 1 << 20, "mb": 10**6, "tib": 1 << 40, "tb": 10**12}
    for u in sorted(units, key=len, reverse=True):
        if t.lower().endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    value = float(t)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return int(value)


