"""LoRAs for the Wan transformer: the three key formats users hold, read without torch, as deltas to the
runtime's weights.

Formats (detected per key; prefixes ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``,
``base_model.model.`` are dropped):

- diffusers / PEFT: ``blocks.3.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``: a bias delta);
- original Wan / ComfyUI: ``blocks.3.self_attn.q.lora_down.weight`` / ``lora_up.weight`` (or ``lora_A`` /
  ``lora_B``), ``.alpha``, full-weight deltas ``.diff`` and bias deltas ``.diff_b``;
- musubi-tuner / kohya: ``lora_unet_blocks_3_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

Module names go through ``names.py`` (original -> diffusers -> the runtime tree). A low-rank pair adds
``strength * alpha / rank * (up @ down)`` to its weight (alpha absent: ``rank``, i.e. a scale of 1), a
``.diff`` adds ``strength * diff``, a bias delta ``strength * diff_b``; computed in float32. Anything
else (``dora_scale``, an unknown module) is a ``LoraError`` naming the key, unless ``ignore_unknown``.
A LoRA made for a text-to-video model leaves an image-to-video model's image projections untouched.

``merge`` applies deltas to host arrays (wan-convert merges at conversion); ``apply`` to a restored
param tree on the device, in one compiled program per set of LoRA shapes with the strength a traced
argument, so changing it compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from typing import Any, Iterable, Mapping

import numpy as np

from . import names, tensorfile

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
#: suffix -> role of a tensor in a LoRA
SUFFIXES = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_up.weight": "up",
            ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b", ".lora_B.bias": "diff_b"}
_KOHYA = re.compile(r"lora_unet_(?P<module>[a-z0-9_]+)")


class LoraError(ValueError):
    """A LoRA file that cannot be applied; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """One change to one weight (or bias) of the runtime tree, at ``layer`` of a stacked leaf."""

    path: str  # the runtime tree's leaf, e.g. "blocks.attn1.to_q.weight"
    layer: int | None
    key: str  # the LoRA's module name, for messages
    up: np.ndarray | None = None  # (out, rank)
    down: np.ndarray | None = None  # (rank, in)
    diff: np.ndarray | None = None  # full delta, same shape as the weight (or bias)
    scale: float = 1.0  # alpha / rank of a low-rank pair

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape) if self.diff is not None else (self.up.shape[0], self.down.shape[1])

    def value(self) -> np.ndarray:
        """The float32 delta at strength 1."""
        if self.diff is not None:
            return np.array(self.diff, np.float32)
        t = np.asarray(self.up, np.float32) @ np.asarray(self.down, np.float32)
        t *= np.float32(self.scale)
        return t


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA file read into deltas, and the strength it is applied with."""

    file: pathlib.Path
    sha256: str
    deltas: tuple[Delta, ...]
    strength: float = 1.0
    skipped: tuple[str, ...] = ()  # unknown keys left out (``ignore_unknown``)

    def with_strength(self, strength: float) -> "Lora":
        return dataclasses.replace(self, strength=float(strength))

    def record(self) -> dict[str, Any]:
        return {"file": self.file.name, "sha256": self.sha256, "strength": self.strength}


def parse_spec(spec: str, flag: str = "--lora") -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a strength that is not a number is an error naming ``flag``."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and not tail.startswith(("/", "\\")):
        try:
            return path, float(tail)
        except ValueError:
            raise LoraError(f"{flag}: {spec!r}: strength {tail!r} is not a number") from None
    return spec, 1.0


def read(path: str | pathlib.Path, strength: float = 1.0, *, ignore_unknown: bool = False) -> Lora:
    """Read a LoRA safetensors file (any of the three formats) into runtime-tree deltas."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    f = tensorfile.TensorFile(path, LoraError)
    try:
        modules, skipped = _group(path, {k: f.array(info) for k, info in f.tensors.items()}, ignore_unknown)
        alpha = _peft_alpha(path, f.metadata)
        deltas = [d for module, parts in modules.items()
                  for d in _deltas(path, module, parts if alpha is None or "alpha" in parts else parts | alpha(parts),
                                   ignore_unknown, skipped)]
        deltas = [dataclasses.replace(d, up=_own(d.up), down=_own(d.down), diff=_own(d.diff)) for d in deltas]
    finally:
        f.close()
    return Lora(path, tensorfile.sha256(path), tuple(deltas), float(strength), tuple(skipped))


def _peft_alpha(path, metadata: dict):
    """A diffusers / PEFT file's ``lora_adapter_metadata`` (diffusers' ``save_lora_weights``): PEFT scales
    every pair by lora_alpha / r; returns {role: alpha} for a module's parts, or None without metadata."""
    import json

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
        meta = {k.split(".", 1)[1] if k.startswith(("transformer.", "transformer_2.")) else k: v
                for k, v in meta.items()}
        alpha, rank = meta.get("lora_alpha"), meta.get("r")
    except (json.JSONDecodeError, AttributeError, TypeError, IndexError):
        raise LoraError(f"{path}: lora_adapter_metadata is not the JSON object diffusers writes") from None
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        raise LoraError(f"{path}: lora_adapter_metadata has per-module alpha_pattern / rank_pattern (not supported)")
    if alpha is None or rank is None:
        return None
    return lambda parts: {"alpha": np.float32(float(alpha) * parts["down"].shape[0] / float(rank))} \
        if "down" in parts else {}


def _own(a):
    return None if a is None else np.array(a)  # off the file's mmap


def _group(path, tensors: Mapping[str, np.ndarray], ignore_unknown: bool):
    """{module (as written, prefix dropped): {role: tensor}}, and the keys skipped."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    skipped: list[str] = []
    for key in sorted(tensors):
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if not ignore_unknown:
                what = "DoRA (dora_scale) is not supported" if "dora" in key or "magnitude" in key else "unknown key"
                raise LoraError(f"{path}: key {key}: {what} (--lora-ignore-unknown skips such keys)")
            skipped.append(key)
            continue
        module = name[: -len(suffix)]
        m = _KOHYA.fullmatch(module)
        if m:
            module = _kohya_module(path, key, m["module"])
        role = SUFFIXES[suffix]
        if role in modules.setdefault(module, {}):
            raise LoraError(f"{path}: key {key}: a second {role} tensor for module {module}")
        modules[module][role] = tensors[key]
    return modules, skipped


@functools.lru_cache(maxsize=None)
def _kohya_names() -> dict[str, str]:
    """kohya module spellings (dots as underscores) of the original Wan module names."""
    out = {}
    for src, _ in names.ORIGINAL_TRANSFORMER:
        stem = src.rstrip(".")
        out[stem.replace(".", "_")] = stem
    return out


def _kohya_module(path, key: str, module: str) -> str:
    m = re.fullmatch(r"blocks_(\d+)_(.+)", module)
    stem = f"blocks_{{L}}_{m[2]}" if m else module
    original = _kohya_names().get(stem)
    if original is None:
        raise LoraError(f"{path}: key {key}: module {module} is not a Wan transformer module")
    return original.replace("{L}", m[1]) if m else original


def _deltas(path, module: str, parts: dict, ignore_unknown: bool, skipped: list) -> Iterable[Delta]:
    """The deltas of one module: a low-rank pair and/or a full-weight delta, and a bias delta."""
    diffusers = names.original_to_diffusers(module + ".") or module + "."
    weight = names.diffusers_to_runtime(diffusers + "weight")
    if weight is None or (set(parts) - {"alpha"}) == set():
        if ignore_unknown:
            skipped.append(module)
            return
        raise LoraError(f"{path}: module {module}: not a Wan transformer module (or no tensors but alpha)")
    (wpath, layer), bias = weight, names.diffusers_to_runtime(diffusers + "bias")
    if ("up" in parts) != ("down" in parts):
        raise LoraError(f"{path}: module {module}: lora_up/lora_B and lora_down/lora_A must come together")
    if "up" in parts:
        up, down = parts["up"], parts["down"]
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: module {module}: up {list(up.shape)} and down {list(down.shape)} are not "
                            "a rank-r pair")
        rank = down.shape[0]
        alpha = float(np.asarray(parts["alpha"], np.float32).reshape(-1)[0]) if "alpha" in parts else float(rank)
        yield Delta(wpath, layer, module, up=up, down=down, scale=alpha / rank)
    if "diff" in parts:
        yield Delta(wpath, layer, module, diff=parts["diff"])
    if "diff_b" in parts:
        yield Delta(bias[0], bias[1], module + " (bias)", diff=parts["diff_b"])


def check(loras: Iterable[Lora], leaves: Mapping[str, Any], component: str = "transformer") -> None:
    """Every delta names a leaf of ``leaves`` ({path: anything with .shape}) with its shape; else a
    LoraError naming the file and the module."""
    for lo in loras:
        for d in lo.deltas:
            leaf = leaves.get(d.path)
            if leaf is None:
                raise LoraError(f"{lo.file}: module {d.key}: the {component} has no {d.path} (a LoRA for "
                                "another model?)")
            shape = tuple(leaf.shape)
            stacked = d.layer is not None
            if stacked and d.layer >= shape[0]:
                raise LoraError(f"{lo.file}: module {d.key}: block {d.layer}, but the {component} has {shape[0]}")
            want = shape[1:] if stacked else shape
            if tuple(d.shape) != want:
                raise LoraError(f"{lo.file}: module {d.key}: delta shape {list(d.shape)}, but {d.path} is "
                                f"{list(want)} (a LoRA for another model size?)")


def merge(path: str, layer: int | None, weight: np.ndarray, loras: Iterable[Lora]) -> np.ndarray:
    """A host weight (one layer of a stacked leaf, or the leaf) with every delta of ``loras`` for it
    added, in float32: W + sum(strength * delta), in the order given."""
    out = np.array(weight, np.float32)  # a copy, then in place: one layer-sized temporary at a time
    for lo in loras:
        for d in lo.deltas:
            if d.path == path and d.layer == layer and lo.strength != 0:
                t = d.value()
                t *= np.float32(lo.strength)
                out += t
    return out


def touches(path: str, layer: int | None, loras: Iterable[Lora]) -> bool:
    return any(d.path == path and d.layer == layer for lo in loras for d in lo.deltas)


# ------------------------------------------------------------------------------------------ on the device
def packs(loras: Iterable[Lora], leaves: Mapping[str, Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per touched leaf, per LoRA: the deltas as arrays a compiled program adds (stacked leaves: every
    layer, zeros where the LoRA has none): ``up`` (L, out, r), ``down`` (L, r, in), ``scale`` (L,), and
    ``diff`` (the leaf's shape) when the LoRA has full deltas there."""
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for i, lo in enumerate(loras):
        by_path: dict[str, list[Delta]] = {}
        for d in lo.deltas:
            by_path.setdefault(d.path, []).append(d)
        for p, ds in by_path.items():
            shape = tuple(leaves[p].shape)
            pack = _pack(ds, shape)
            pack["lora"] = np.int32(i)
            out.setdefault(p, []).append(pack)
    return out


def _pack(ds: list[Delta], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    stacked = ds[0].layer is not None
    n = shape[0] if stacked else 1
    pairs = [d for d in ds if d.up is not None]
    pack: dict[str, np.ndarray] = {}
    if pairs:
        rank = max(d.up.shape[1] for d in pairs)
        out_dim, in_dim = pairs[0].shape
        up, down = np.zeros((n, out_dim, rank), np.float32), np.zeros((n, rank, in_dim), np.float32)
        scale = np.zeros((n,), np.float32)
        for d in pairs:
            j, r = d.layer or 0, d.up.shape[1]
            up[j, :, :r], down[j, :r], scale[j] = d.up, d.down, d.scale
        pack.update(up=up, down=down, scale=scale)
    fulls = [d for d in ds if d.diff is not None]
    if fulls:
        diff = np.zeros((n,) + tuple(fulls[0].shape), np.float32)
        for d in fulls:
            diff[d.layer or 0] += np.asarray(d.diff, np.float32)
        pack["diff"] = diff
    if not stacked:
        pack = {k: v[0] for k, v in pack.items()}
    return pack


def apply(tree: Mapping[str, Any], loras: Iterable[Lora]) -> dict[str, Any]:
    """``tree`` (a restored runtime param tree of jax arrays) with ``loras`` added, on the device: one
    compiled program for the touched leaves, the strengths a traced argument (another strength, or
    another LoRA of the same shapes, compiles nothing). Untouched leaves are the same arrays."""
    import jax.numpy as jnp

    from .format import flatten, unflatten

    loras = tuple(loras)
    flat = flatten(tree)
    check(loras, flat)
    todo = packs(loras, flat)
    if not todo:
        return dict(tree)
    strengths = jnp.asarray([lo.strength for lo in loras], jnp.float32)
    leaves = {p: flat[p] for p in todo} | {f"{p}_scale": flat[f"{p}_scale"] for p in todo if f"{p}_scale" in flat}
    shardings = {p: a.sharding for p, a in leaves.items()}
    new = _apply_program(tuple(sorted(shardings.items(), key=lambda kv: kv[0])))(leaves, todo, strengths)
    return unflatten({**flat, **new})


@functools.lru_cache(maxsize=32)
def _apply_program(shardings: tuple):
    """The jitted sum for one set of touched leaves (jit then compiles once per set of shapes)."""
    import jax
    import jax.numpy as jnp

    from . import quant
    from .format import QUANT_DTYPES

    def add(leaves, todo, strengths):
        out = {}
        for p in todo:
            w, scale = leaves[p], leaves.get(f"{p}_scale")
            acc = w.astype(jnp.float32) if scale is None else w.astype(jnp.float32) * scale[..., None]
            for pack in todo[p]:
                s = strengths[pack["lora"]]
                if "up" in pack:
                    eq = "lor,lri->loi" if pack["up"].ndim == 3 else "or,ri->oi"
                    alpha = pack["scale"][:, None, None] if pack["up"].ndim == 3 else pack["scale"]
                    acc = acc + s * alpha * jnp.einsum(eq, pack["up"], pack["down"],
                                                      precision=jax.lax.Precision.HIGHEST)
                if "diff" in pack:
                    acc = acc + s * pack["diff"]
            if scale is None:
                out[p] = acc.astype(w.dtype)
            else:  # a quantized weight: dequantized, the deltas added, quantized again by the same rule
                out[p], out[f"{p}_scale"] = quant.quantize_jax(acc, next(q for q in QUANT_DTYPES
                                                                        if jnp.dtype(w.dtype).name == q))
        return out

    return jax.jit(add, out_shardings=dict(shardings))
